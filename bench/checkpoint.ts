/**
 * pnpm bench:checkpoint → bench/results/checkpoint.json
 *
 * The 256 MiB probe guest under TCG as a libvirt domain on the lab's `primary`, checkpointed
 * continuously into the store on `backup` over SSH. Measured in the same run on the same guest:
 * QEMU's own `migrate` to a local file (the baseline pause) and raw `ssh backup 'cat > /dev/null'`.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { Checkpointer } from '@ftvm/coordinator';
import type { QmpClient } from '@ftvm/qmp';
import { openRemoteReceiver } from '@ftvm/transport';
import { hostInfo, labKnownHosts, labSshKey, labUp } from '../test/lab/lab.js';
import { connectLabSsh } from '../test/support/lab-ssh.js';
import { startProbeVm } from '../test/support/probe-vm.js';
import { describeEnvironment } from './environment.js';
import { round, summarize } from './stats.js';

const CHECKPOINTS = Number(process.env.FTVM_BENCH_CHECKPOINTS ?? 30);
const INTERVAL_MS = Number(process.env.FTVM_BENCH_INTERVAL_MS ?? 1000);
const BASELINE_RUNS = Number(process.env.FTVM_BENCH_BASELINE_RUNS ?? 10);
const WORKLOAD_MIBPS = Number(process.env.FTVM_BENCH_WORKLOAD_MIBPS ?? 4);
const VM = 'bench-ckpt';
// Stock QEMU by default; FTVM_BENCH_EMULATOR=<ftvm's patched qemu> measures the self-resuming checkpoint.
const EMULATOR = process.env.FTVM_BENCH_EMULATOR;
const RESULT_NAME = process.env.FTVM_BENCH_RESULT ?? 'checkpoint.json';
const DOWNTIME_LIMIT_MS = process.env.FTVM_BENCH_DOWNTIME_MS === undefined ? undefined : Number(process.env.FTVM_BENCH_DOWNTIME_MS);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

await labUp();
const vm = await startProbeVm({ host: 'primary', name: VM, memoryMiB: 256, workloadMiBps: WORKLOAD_MIBPS, ...(EMULATOR ? { emulator: EMULATOR } : {}) });
const storeInside = `/var/lib/libvirt/ftvm/${VM}`;
fs.rmSync(path.join(hostInfo('backup').libvirtLibDir, 'ftvm', VM), { recursive: true, force: true });

try {
  // --- ftvm checkpoints ----------------------------------------------------------------------
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
  const pausesMs: number[] = [];
  const durationsMs: number[] = [];
  const bytes: number[] = [];
  const qemuDowntimesMs: number[] = [];
  let failures = 0;
  for (let epoch = 1; epoch <= CHECKPOINTS; epoch++) {
    const started = performance.now();
    try {
      const result = await checkpointer.checkpoint(epoch, receiver.sender);
      pausesMs.push(Number(result.resumeNs - result.stopNs) / 1e6);
      durationsMs.push(result.durationMs);
      bytes.push(result.bytes);
      if (result.qemuDowntimeMs !== undefined) qemuDowntimesMs.push(result.qemuDowntimeMs);
    } catch (error) {
      failures++;
      console.error(`checkpoint ${epoch} failed: ${(error as Error).message}; ${receiver.stderr()}`);
      if (!receiver.sender.isOpen) receiver = await openRemoteReceiver(ssh, { storeDir: storeInside, keep: 3 });
    }
    await sleep(Math.max(0, INTERVAL_MS - (performance.now() - started)));
  }
  await checkpointer.close();
  receiver.sender.close();
  ssh.close();
  const totalBytes = bytes.reduce((a, b) => a + b, 0);
  const checkpointMBps = totalBytes / 1e6 / (durationsMs.reduce((a, b) => a + b, 0) / 1000);

  // --- baseline: QEMU's own migrate to a local file ---------------------------------------
  const localPausesMs = await localMigratePauses(vm.qmp, vm.paths.run, BASELINE_RUNS);

  // --- raw ssh throughput on the same link ------------------------------------------------
  const rawBytes = Math.max(...bytes, 64e6);
  const rawMBps = await rawSshThroughput(hostInfo('backup').ip, rawBytes);

  const result = {
    ...describeEnvironment(),
    emulator: EMULATOR ?? 'stock (libvirt default)',
    self_resuming: checkpointer.selfResuming,
    downtime_limit_ms: DOWNTIME_LIMIT_MS ?? 'default (50)',
    guest: { memory_mib: 256, workload_mib_per_s: WORKLOAD_MIBPS, image: vm.image.dir, cmdline: vm.image.cmdline },
    checkpoints: { requested: CHECKPOINTS, committed: pausesMs.length, failed: failures, interval_ms: INTERVAL_MS },
    pause_ms: summarize(pausesMs),
    qemu_reported_downtime_ms: summarize(qemuDowntimesMs),
    checkpoint_duration_ms: summarize(durationsMs),
    checkpoint_bytes: summarize(bytes),
    checkpoint_mb_per_s: round(checkpointMBps),
    raw_ssh_mb_per_s: round(rawMBps),
    throughput_vs_raw_ssh: round(checkpointMBps / rawMBps),
    baseline: { local_migrate_pause_ms: summarize(localPausesMs), runs: BASELINE_RUNS },
    targets: { pause_ms_p50: 10, pause_ms_p99: 25, throughput_vs_raw_ssh: 0.8 },
  };
  fs.mkdirSync(new URL('./results/', import.meta.url), { recursive: true });
  fs.writeFileSync(new URL(`./results/${RESULT_NAME}`, import.meta.url), `${JSON.stringify(result, null, 2)}\n`);
  console.log(JSON.stringify(result, null, 2));
} finally {
  await vm.destroy();
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
    await qmp.execute('migrate', { uri: `unix:${runDir}/baseline.mig` });
    await completed;
    await qmp.execute('cont');
    const resume = await resumed;
    off();
    sink.close();
    pauses.push(Number(resume.timestampNs - stopNs) / 1e6);
    await sleep(500);
  }
  fs.rmSync('/tmp/ftvm-bench-local.mig', { force: true });
  return pauses;
}

/** OpenSSH `ssh backup 'cat > /dev/null'` fed `bytes` bytes, from the primary host. */
async function rawSshThroughput(ip: string, bytesToSend: number): Promise<number> {
  const started = performance.now();
  await new Promise<void>((resolve, reject) => {
    const child = spawn('ssh', ['-i', labSshKey(), '-o', `UserKnownHostsFile=${labKnownHosts()}`, '-o', 'StrictHostKeyChecking=yes', '-o', 'BatchMode=yes', `root@${ip}`, 'cat > /dev/null'], { stdio: ['pipe', 'ignore', 'inherit'] });
    const chunk = Buffer.alloc(1024 * 1024, 0x5a);
    let sent = 0;
    const pump = () => {
      while (sent < bytesToSend) {
        sent += chunk.length;
        if (!child.stdin.write(chunk)) return void child.stdin.once('drain', pump);
      }
      child.stdin.end();
    };
    pump();
    const timer = setTimeout(() => (child.kill('SIGKILL'), reject(new Error('raw ssh transfer timed out'))), 120_000);
    child.on('exit', (code) => (clearTimeout(timer), code === 0 ? resolve() : reject(new Error(`ssh exited ${code}`))));
  });
  return bytesToSend / 1e6 / ((performance.now() - started) / 1000);
}
