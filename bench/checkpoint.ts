/**
 * pnpm bench:checkpoint → bench/results/checkpoint.json
 *
 * The 256 MiB probe guest under TCG as a libvirt domain on the lab's `primary`, on ftvm's QEMU as
 * the product runs it, checkpointed into the store on `backup` over SSH. Two phases, same guest:
 *
 * 1. Continuous: a checkpoint every second with the product's defaults — the first one full, the
 *    rest incremental (x-ftvm-incremental). Gives the guest-visible pause (STOP→RESUME from QMP
 *    event times), durations and bytes.
 * 2. Channel throughput: full checkpoints (the bandwidth-bound kind: the first, after a failure,
 *    every `fullEvery`) alternating with raw `ssh backup 'cat > /dev/null'` of as many bytes, so
 *    both see the same host load. An increment (~1 MB) is bound by round trips, not bandwidth; its
 *    MB/s is reported beside it but is no measure of the channel.
 *
 * Also measured in the same run on the same guest: QEMU's own `migrate` to a local file (the
 * baseline pause, plain QEMU behaviour: ftvm's capabilities off).
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Checkpointer, DiskReplicator, type CheckpointDisks, type CheckpointResult } from '@ftvm/coordinator';
import type { QmpClient } from '@ftvm/qmp';
import { openRemoteReceiver } from '@ftvm/transport';
import { hostInfo, labKnownHosts, labSshKey, labUp } from '../test/lab/lab.js';
import { connectLabSsh } from '../test/support/lab-ssh.js';
import { patchedQemu } from '../test/support/patched-qemu.js';
import { makeProbeDisks } from '../test/support/ft-cluster.js';
import { diskCounters } from '../test/support/probe-client.js';
import { startProbeVm, type ProbeVm } from '../test/support/probe-vm.js';
import { describeEnvironment } from './environment.js';
import { round, summarize } from './stats.js';

const CHECKPOINTS = Number(process.env.FTVM_BENCH_CHECKPOINTS ?? 30);
const INTERVAL_MS = Number(process.env.FTVM_BENCH_INTERVAL_MS ?? 1000);
const FULL_RUNS = Number(process.env.FTVM_BENCH_FULL_RUNS ?? 5);
const BASELINE_RUNS = Number(process.env.FTVM_BENCH_BASELINE_RUNS ?? 10);
const WORKLOAD_MIBPS = Number(process.env.FTVM_BENCH_WORKLOAD_MIBPS ?? 4);
const VM = 'bench-ckpt';
// ftvm's QEMU by default (what the product runs); FTVM_BENCH_EMULATOR=stock for Debian's, or a path.
const EMULATOR = process.env.FTVM_BENCH_EMULATOR === 'stock' ? undefined : (process.env.FTVM_BENCH_EMULATOR ?? patchedQemu());
const RESULT_NAME = process.env.FTVM_BENCH_RESULT ?? 'checkpoint.json';
const DOWNTIME_LIMIT_MS = process.env.FTVM_BENCH_DOWNTIME_MS === undefined ? undefined : Number(process.env.FTVM_BENCH_DOWNTIME_MS);
// disk section: the probe's ring + ext4 disks, the fs workload sized for ~4 MiB/s (20 cycles/s)
const DISK_SECTION = process.env.FTVM_BENCH_DISK !== '0';
const DISK_CHECKPOINTS = Number(process.env.FTVM_BENCH_DISK_CHECKPOINTS ?? 30);
const DISK_FS_KIB = Number(process.env.FTVM_BENCH_DISK_FS_KIB ?? 200);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const sshArgs = (ip: string, command: string) => ['-i', labSshKey(), '-o', `UserKnownHostsFile=${labKnownHosts()}`, '-o', 'StrictHostKeyChecking=yes', '-o', 'BatchMode=yes', `root@${ip}`, command];
const pauseMs = (r: CheckpointResult) => Number(r.resumeNs - r.stopNs) / 1e6;
const mbPerS = (results: { bytes: number; durationMs: number }[]) =>
  results.reduce((n, r) => n + r.bytes, 0) / 1e6 / (results.reduce((n, r) => n + r.durationMs, 0) / 1000);

// The checkpointer runs inside the agent, which runs at nice -10 (agent config `nice`): so here.
const NICE = Number(process.env.FTVM_BENCH_NICE ?? -10);
os.setPriority(NICE);

await labUp();
const vm = await startProbeVm({ host: 'primary', name: VM, memoryMiB: 256, workloadMiBps: WORKLOAD_MIBPS, ...(EMULATOR ? { emulator: EMULATOR } : {}) });
const storeInside = `/var/lib/libvirt/ftvm/${VM}`;
fs.rmSync(path.join(hostInfo('backup').libvirtLibDir, 'ftvm', VM), { recursive: true, force: true });

try {
  // --- phase 1: continuous checkpoints, product defaults ------------------------------------
  const ssh = await connectLabSsh('backup');
  let receiver = await openRemoteReceiver(ssh, { storeDir: storeInside, keep: 3 });
  const checkpointer = await Checkpointer.create({
    vm: VM,
    qmp: vm.qmp,
    socketPath: vm.paths.migrationOutside,
    qemuSocketPath: vm.paths.migration,
    qemuVersion: (await vm.qmp.execute<{ qemu: { major: number; minor: number; micro: number } }>('query-version')).qemu.major.toString(),
    domainXml: vm.xml,
    ...(DOWNTIME_LIMIT_MS === undefined ? {} : { downtimeLimitMs: DOWNTIME_LIMIT_MS }),
  });
  const downtimeLimitMs = (await vm.qmp.execute<{ 'downtime-limit': number }>('query-migrate-parameters'))['downtime-limit'];
  let epoch = 0;
  let failures = 0;
  const take = async (options: { full?: boolean } = {}): Promise<CheckpointResult | undefined> => {
    epoch++;
    try {
      return await checkpointer.checkpoint(epoch, receiver.sender, options);
    } catch (error) {
      failures++;
      console.error(`checkpoint ${epoch} failed: ${(error as Error).message}; ${receiver.stderr()}`);
      if (!receiver.sender.isOpen) receiver = await openRemoteReceiver(ssh, { storeDir: storeInside, keep: 3 });
      return undefined;
    }
  };
  const continuous: CheckpointResult[] = [];
  for (let i = 0; i < CHECKPOINTS; i++) {
    const started = performance.now();
    const result = await take();
    if (result) {
      continuous.push(result);
      console.error(`checkpoint ${result.epoch}: ${result.base === undefined ? 'full' : `on ${result.base}`}, ${(result.bytes / 1e6).toFixed(1)} MB in ${result.durationMs.toFixed(0)} ms, pause ${pauseMs(result).toFixed(2)} ms`);
    }
    await sleep(Math.max(0, INTERVAL_MS - (performance.now() - started)));
  }
  const full = continuous.filter((r) => r.base === undefined);
  const increments = continuous.filter((r) => r.base !== undefined);

  // --- phase 2: full checkpoints against raw ssh, alternating ------------------------------
  const throughputRuns: { checkpoint_mb_per_s: number; raw_ssh_mb_per_s: number; raw_ssh_connect_ms: number; raw_ssh_with_connect_mb_per_s: number; bytes: number }[] = [];
  const fullForThroughput: CheckpointResult[] = [];
  const rawRuns: { bytes: number; durationMs: number; connectMs: number }[] = [];
  for (let i = 0; i < FULL_RUNS; i++) {
    const result = await take({ full: true });
    if (!result) continue;
    fullForThroughput.push(result);
    await sleep(INTERVAL_MS);
    const raw = await rawSshTransfer(hostInfo('backup').ip, result.bytes);
    rawRuns.push(raw);
    throughputRuns.push({
      checkpoint_mb_per_s: round(mbPerS([result])),
      raw_ssh_mb_per_s: round(mbPerS([raw])),
      raw_ssh_connect_ms: round(raw.connectMs),
      raw_ssh_with_connect_mb_per_s: round(mbPerS([{ bytes: raw.bytes, durationMs: raw.durationMs + raw.connectMs }])),
      bytes: result.bytes,
    });
    console.error(`full checkpoint ${result.epoch}: ${mbPerS([result]).toFixed(1)} MB/s; raw ssh ${mbPerS([raw]).toFixed(1)} MB/s`);
    await sleep(INTERVAL_MS);
  }
  await checkpointer.close();
  receiver.sender.close();
  ssh.close();
  const checkpointMBps = mbPerS(fullForThroughput);
  const rawMBps = mbPerS(rawRuns);
  // the literal `ssh backup 'cat > /dev/null'`, connection set-up included (ftvm's channel is open already)
  const rawWithConnectMBps = mbPerS(rawRuns.map((r) => ({ bytes: r.bytes, durationMs: r.durationMs + r.connectMs })));

  // --- baseline: QEMU's own migrate to a local file (plain QEMU: ftvm's capabilities off) ---
  const ftvmCapabilities = (await vm.qmp.execute<{ capability: string }[]>('query-migrate-capabilities'))
    .filter((c) => c.capability.startsWith('x-ftvm-'))
    .map((c) => ({ capability: c.capability, state: false }));
  if (ftvmCapabilities.length > 0) await vm.qmp.execute('migrate-set-capabilities', { capabilities: ftvmCapabilities });
  const localPausesMs = await localMigratePauses(vm.qmp, vm.paths.run, BASELINE_RUNS);

  const result = {
    ...describeEnvironment(),
    emulator: EMULATOR ?? 'stock (libvirt default)',
    self_resuming: checkpointer.selfResuming,
    incremental: checkpointer.incremental,
    downtime_limit_ms: downtimeLimitMs,
    checkpointer_nice: NICE,
    guest: { memory_mib: 256, workload_mib_per_s: WORKLOAD_MIBPS, image: vm.image.dir, cmdline: vm.image.cmdline },
    checkpoints: { requested: CHECKPOINTS, committed: continuous.length, full: full.length, incremental: increments.length, failed: failures, interval_ms: INTERVAL_MS },
    // phase 1: every checkpoint of the continuous run, full and incremental
    pause_ms: summarize(continuous.map(pauseMs)),
    qemu_reported_downtime_ms: summarize(continuous.flatMap((r) => (r.qemuDowntimeMs === undefined ? [] : [r.qemuDowntimeMs]))),
    checkpoint_duration_ms: summarize(continuous.map((r) => r.durationMs)),
    checkpoint_bytes: summarize(continuous.map((r) => r.bytes)),
    incremental_checkpoints: increments.length === 0 ? null : {
      pause_ms: summarize(increments.map(pauseMs)),
      duration_ms: summarize(increments.map((r) => r.durationMs)),
      bytes: summarize(increments.map((r) => r.bytes)),
      mb_per_s: round(mbPerS(increments)),
    },
    continuous_mb_per_s: round(mbPerS(continuous)),
    // phase 2: the channel's throughput, full checkpoints vs raw ssh in alternation
    checkpoint_mb_per_s: round(checkpointMBps),
    raw_ssh_mb_per_s: round(rawMBps),
    throughput_vs_raw_ssh: round(checkpointMBps / rawMBps),
    throughput_basis: 'full checkpoints (bytes ÷ migrate-to-ack time) vs raw ssh of as many bytes (minus its connect time), alternating',
    raw_ssh_with_connect_mb_per_s: round(rawWithConnectMBps),
    throughput_vs_raw_ssh_with_connect: round(checkpointMBps / rawWithConnectMBps),
    throughput_runs: throughputRuns,
    full_checkpoint_pause_ms: summarize([...full, ...fullForThroughput].map(pauseMs)),
    baseline: { local_migrate_pause_ms: summarize(localPausesMs), runs: BASELINE_RUNS },
    targets: { pause_ms_p50: 10, pause_ms_p99: 25, throughput_vs_raw_ssh: 0.8, disk_added_pause_ms_p50: 2 },
    ...(DISK_SECTION ? { disk: await diskSection() } : {}),
  };
  fs.mkdirSync(new URL('./results/', import.meta.url), { recursive: true });
  fs.writeFileSync(new URL(`./results/${RESULT_NAME}`, import.meta.url), `${JSON.stringify(result, null, 2)}\n`);
  console.log(JSON.stringify(result, null, 2));
} finally {
  await vm.destroy();
}

/**
 * Disk section (issue #15): a second probe guest with the ring and ext4 disks under a disk write
 * load, checkpointed the same way, alternately with and without disk replication (the same guest,
 * the same load, interleaved in blocks so both see the same host): the pause each way, the delta
 * bytes against the guest's write rate, and the seed's throughput against raw ssh.
 */
async function diskSection(): Promise<object> {
  const name = 'bench-disk';
  // the ring disk filled with 128 MiB of random data beyond its slots: the seed's bulk
  const disks = await makeProbeDisks('primary', name, { format: 'qcow2', ringMiB: 128, fsMiB: 256, fillRing: true });
  const dvm: ProbeVm = await startProbeVm({ host: 'primary', name, memoryMiB: 256, probePort: 5556, workloadMiBps: WORKLOAD_MIBPS, disks, fsKiB: DISK_FS_KIB, ...(EMULATOR ? { emulator: EMULATOR } : {}) });
  // two stores on the backup, one per arm: a checkpoint without disks would break the disk chain
  const stores = { with: `/var/lib/libvirt/ftvm/${name}`, without: `/var/lib/libvirt/ftvm/${name}-nodisk` };
  for (const dir of Object.values(stores)) fs.rmSync(path.join(hostInfo('backup').libvirtLibDir, 'ftvm', path.basename(dir)), { recursive: true, force: true });
  const ssh = await connectLabSsh('backup');
  try {
    const receivers = {
      with: await openRemoteReceiver(ssh, { storeDir: stores.with, keep: 3 }),
      without: await openRemoteReceiver(ssh, { storeDir: stores.without, keep: 3 }),
    };
    const checkpointer = await Checkpointer.create({
      vm: name,
      qmp: dvm.qmp,
      socketPath: dvm.paths.migrationOutside,
      qemuSocketPath: dvm.paths.migration,
      qemuVersion: '7',
      domainXml: dvm.xml,
      ...(DOWNTIME_LIMIT_MS === undefined ? {} : { downtimeLimitMs: DOWNTIME_LIMIT_MS }),
    });
    const replicator = await DiskReplicator.create({ qmp: dvm.qmp, vm: name, disks: [
      { target: 'vda', source: disks.ring.path, format: 'qcow2', sourceType: 'file' },
      { target: 'vdb', source: disks.fs.path, format: 'qcow2', sourceType: 'file' },
    ], runDir: dvm.paths.run, runDirHere: path.join(hostInfo('primary').runDir, 'ftvm') });
    // the seed, against raw ssh of as many bytes right after
    const seed = await replicator.seed(receivers.with.sender);
    const rawSeed = await rawSshTransfer(hostInfo('backup').ip, seed.bytes);
    // the delta bytes each checkpoint carried (extent data, as read through the fleece)
    let deltaBytes = 0;
    const counted: CheckpointDisks = {
      arm: (e) => replicator.arm(e),
      settle: (ok) => replicator.settle(ok),
      async *sections() {
        for await (const section of replicator.sections()) {
          yield {
            ...section,
            extents: (async function* () {
              for await (const extent of section.extents) {
                deltaBytes += extent.data?.length ?? 0;
                yield extent;
              }
            })(),
          };
        }
      },
    };
    const probe = { host: hostInfo('primary').ip, port: 5556 };
    const withDisk: CheckpointResult[] = [];
    const without: CheckpointResult[] = [];
    let failures = 0;
    let epoch = 0;
    const startCounters = await diskCounters(probe);
    const started = performance.now();
    for (let i = 0; i < DISK_CHECKPOINTS * 2; i++) {
      // blocks of 5, alternating: the first of each block is full (another channel), in both arms
      const replicate = Math.floor(i / 5) % 2 === 0;
      const arm = replicate ? 'with' : 'without';
      const t0 = performance.now();
      epoch++;
      try {
        if (replicate && replicator.needsSeed) await replicator.seed(receivers.with.sender);
        const result = await checkpointer.checkpoint(epoch, receivers[arm].sender, replicate ? { disks: counted } : {});
        (replicate ? withDisk : without).push(result);
      } catch (error) {
        failures++;
        if (replicate && /no-disk-base/.test(String((error as { code?: string }).code))) replicator.forgetBase();
        console.error(`disk section: checkpoint ${epoch} (${arm} disks) failed: ${(error as Error).message}; ${receivers[arm].stderr()}`);
        if (!receivers[arm].sender.isOpen) receivers[arm] = await openRemoteReceiver(ssh, { storeDir: stores[arm], keep: 3 });
      }
      await sleep(Math.max(0, INTERVAL_MS - (performance.now() - t0)));
    }
    const seconds = (performance.now() - started) / 1000;
    const endCounters = await diskCounters(probe);
    await replicator.close();
    await checkpointer.close();
    receivers.with.sender.close();
    receivers.without.sender.close();
    // the guest's own write rate: ring sectors + fs bytes, in the guest's clock
    const guestBytes = Number(endCounters.ring.completed - startCounters.ring.completed) * 4096 + Number(endCounters.fs.bytes - startCounters.fs.bytes);
    const guestSeconds = Number(endCounters.monotonicNs - startCounters.monotonicNs) / 1e9;
    // the bitmaps record all the time, so the deltas together cover every write of the run
    const deltaBytesPerS = deltaBytes / seconds;
    return {
      guest: { disks: 'ring 128 MiB (random data beyond its slots) + ext4 256 MiB, qcow2, cache=none', fs_kib_per_cycle: DISK_FS_KIB, memory_workload_mib_per_s: WORKLOAD_MIBPS },
      checkpoints: { with_disk: withDisk.length, without_disk: without.length, failed: failures, interval_ms: INTERVAL_MS, seconds: round(seconds) },
      pause_ms: summarize(withDisk.map(pauseMs)),
      no_disk_pause_ms: summarize(without.map(pauseMs)),
      added_pause_ms_p50: round(summarize(withDisk.map(pauseMs)).p50 - summarize(without.map(pauseMs)).p50),
      checkpoint_duration_ms: summarize(withDisk.map((r) => r.durationMs)),
      no_disk_checkpoint_duration_ms: summarize(without.map((r) => r.durationMs)),
      delta_bytes_per_s: round(deltaBytesPerS),
      guest_write_bytes_per_s: round(guestBytes / guestSeconds),
      seed_bytes: seed.bytes,
      seed_mb_per_s: round(seed.bytes / 1e6 / (seed.ms / 1000)),
      seed_raw_ssh_mb_per_s: round(mbPerS([rawSeed])),
      seed_vs_raw_ssh: round(seed.bytes / 1e6 / (seed.ms / 1000) / mbPerS([rawSeed])),
      delta_bytes: deltaBytes,
      basis: 'one guest, checkpoints alternating in blocks of 5 with and without disk replication (two stores on the backup; the first of each block is full in both arms); delta bytes = extent data of every delta ÷ run time (the bitmaps record throughout, so the deltas cover every write); guest write rate = ring sectors + fs bytes in the guest clock; seed = all allocated extents of both disks over the same channel, vs raw ssh of as many bytes',
    };
  } finally {
    ssh.close();
    await dvm.destroy();
  }
}

/** QEMU's `migrate` into a local file, `cont` on the completed event; pause from STOP/RESUME. */
async function localMigratePauses(qmp: QmpClient, runDir: string, runs: number): Promise<number[]> {
  const pauses: number[] = [];
  for (let i = 0; i < runs; i++) {
    let stopNs = 0n;
    const off = qmp.onEvent((e) => {
      if (e.event === 'STOP') stopNs = e.timestampNs;
    });
    const completed = qmp.waitForEvent<{ status: string }>('MIGRATION', { timeoutMs: 60_000, predicate: (e) => e.data.status === 'completed' });
    const resumed = qmp.waitForEvent('RESUME', { timeoutMs: 60_000 });
    // libvirt's seccomp sandbox forbids exec: migration; a file: URI needs QEMU 8, so a unix
    // socket drained to a local file by this process stands in for "migrate to a local file".
    const sink = await import('node:net').then((net) => net.createServer());
    const sockOutside = path.join(hostInfo('primary').runDir, 'ftvm', 'baseline.mig');
    fs.rmSync(sockOutside, { force: true });
    await new Promise<void>((r) => sink.listen(sockOutside, r));
    sink.on('connection', (s) => s.pipe(fs.createWriteStream('/tmp/ftvm-bench-local.mig')));
    completed.catch(() => undefined); // awaited below; a failure before then must not go unhandled
    resumed.catch(() => undefined);
    await qmp.execute('migrate', { uri: `unix:${runDir}/baseline.mig` });
    await completed;
    await contWhenFinalized(qmp);
    const resume = await resumed;
    off();
    sink.close();
    pauses.push(Number(resume.timestampNs - stopNs) / 1e6);
    await sleep(500);
  }
  fs.rmSync('/tmp/ftvm-bench-local.mig', { force: true });
  return pauses;
}

/**
 * `cont` as soon as QEMU takes it: it emits MIGRATION completed a moment before it finalizes, and
 * a `cont` in between is refused with "Migration is not finalized yet".
 */
async function contWhenFinalized(qmp: QmpClient): Promise<void> {
  for (let attempt = 0; ; attempt++) {
    try {
      await qmp.execute('cont');
      return;
    } catch (error) {
      if (attempt >= 50 || !/not finalized/i.test((error as Error).message)) throw error;
      await sleep(1);
    }
  }
}

/**
 * OpenSSH `ssh backup 'cat > /dev/null'` fed `bytes` bytes, from the primary host. The checkpoint
 * channel is an SSH connection opened once, so the time OpenSSH spends connecting (`ssh backup
 * true`, measured just before) is not counted against the raw transfer.
 */
async function rawSshTransfer(ip: string, bytesToSend: number): Promise<{ bytes: number; durationMs: number; connectMs: number }> {
  const connectMs = await timeSsh(ip, 'true', 0);
  const totalMs = await timeSsh(ip, 'cat > /dev/null', bytesToSend);
  return { bytes: bytesToSend, durationMs: totalMs - connectMs, connectMs };
}

async function timeSsh(ip: string, command: string, bytesToSend: number): Promise<number> {
  const started = performance.now();
  await new Promise<void>((resolve, reject) => {
    const child = spawn('ssh', sshArgs(ip, command), { stdio: ['pipe', 'ignore', 'inherit'] });
    const chunk = Buffer.alloc(1024 * 1024, 0x5a);
    let sent = 0;
    const pump = () => {
      while (sent < bytesToSend) {
        const piece = chunk.subarray(0, Math.min(chunk.length, bytesToSend - sent));
        sent += piece.length;
        if (!child.stdin.write(piece)) return void child.stdin.once('drain', pump);
      }
      child.stdin.end();
    };
    pump();
    const timer = setTimeout(() => (child.kill('SIGKILL'), reject(new Error('raw ssh transfer timed out'))), 120_000);
    child.on('exit', (code) => (clearTimeout(timer), code === 0 ? resolve() : reject(new Error(`ssh exited ${code}`))));
  });
  return performance.now() - started;
}
