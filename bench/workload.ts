/**
 * pnpm bench:workload → bench/results/workload.json   (run it under `flock /tmp/ftvm-lab.lock`)
 *
 * A real workload, as the thesis measured it: the Debian guest of test/workload (1 GiB, 1 vCPU,
 * root file system on a local qcow2 that ftvm replicates) runs rounds of [pgbench -T 30 -c 2 at
 * scale 1, a -j1 build of Lua], with a sequence client committing one row every 100 ms throughout.
 * In one boot, on the lab's primary with ftvm's QEMU and both agents running:
 *   1. unprotected: a warm-up round, then FTVM_WORKLOAD_ROUNDS measured rounds (default 1);
 *   2. `ftvm protect` (disk seed, checkpoints every second); the round under way is dropped, the
 *      next FTVM_WORKLOAD_ROUNDS are measured, with each checkpoint's pause from the agent;
 *   3. in the next round's pgbench, the primary's QEMU gets SIGKILL: the backup resumes the VM;
 *      PostgreSQL must keep serving there (the killed round's pgbench finishes, the client commits
 *      on, without an error), and the replica as the VM resumed on it (copied by the backup agent,
 *      FTVM_TEST_DISK_AUDIT) is booted in plain QEMU: PostgreSQL recovers with every commit the
 *      client saw acknowledged before the resumed checkpoint's stop instant, a hole-free seq
 *      table, pgbench's balances equal, amcheck clean.
 * Throughput: pgbench's transactions over the host's seconds between the guest's start and end
 * lines (the guest's own clock stands still during checkpoint pauses); pgbench's own tps is kept
 * beside it. Build: host seconds between its lines.
 */
import fs from 'node:fs';
import path from 'node:path';
import { labDown } from '../test/lab/lab.js';
import { agentLogEntries, CLUSTER_DIR, stopCluster, untilAgents, waitProtectedOn, type Cluster } from '../test/support/ft-cluster.js';
import { patchedQemu } from '../test/support/patched-qemu.js';
import { buildWorkloadImage } from '../test/workload/image.js';
import { killQemuAndTakeOver, protectWorkload, qemuGone, removeWorkloadVm, sampleCheckpoints, serialLogOf, startWorkloadCluster, type CheckpointSample } from '../test/workload/lab.js';
import { acksBefore, realtimeNs, roundFigures, SerialLog, type RoundFigures, type StampedLine } from '../test/workload/serial.js';
import { checkDisk, type DiskCheck } from '../test/workload/standalone.js';
import { describeEnvironment } from './environment.js';
import { round, summarize } from './stats.js';

const envInt = (name: string, fallback: number, min: number): number => {
  const raw = process.env[name];
  const value = raw === undefined ? fallback : Number(raw);
  if (!Number.isInteger(value) || value < min) throw new Error(`${name} must be an integer ≥ ${min}, got '${raw}'`);
  return value;
};
const ROUNDS = envInt('FTVM_WORKLOAD_ROUNDS', 1, 1);
const PGBENCH_S = envInt('FTVM_WORKLOAD_PGBENCH_S', 30, 5);
const MEMORY_MIB = envInt('FTVM_WORKLOAD_MEMORY_MIB', 1024, 256);
const INTERVAL_MS = envInt('FTVM_WORKLOAD_INTERVAL_MS', 1000, 100);
const SEQ_MS = 100;
const VM = 'ft-workload';
const AUDIT_DIR = path.join(CLUSTER_DIR, 'disk-audit');
const LOG_KEEP = '/tmp/ftvm-workload-logs';
const resultFile = new URL('./results/workload.json', import.meta.url);
const log = (line: string) => console.error(`bench:workload: ${line}`);
const seconds = (ns: bigint) => Number(ns) / 1e9;
const isEvent = (name: string, roundNo?: number) => (l: StampedLine) => l.line.kind === 'event' && l.line.event === name && (roundNo === undefined || l.line.fields['round'] === String(roundNo));

const image = await buildWorkloadImage({ log });
const emulator = patchedQemu();
// the agents inherit it: the backup copies the replica it resumes on into AUDIT_DIR; the primary's
// per-checkpoint hash of the whole 2 GiB disk is left out (it stretched checkpoints to ~6.6 s)
process.env['FTVM_TEST_DISK_AUDIT'] = AUDIT_DIR;
process.env['FTVM_TEST_DISK_AUDIT_FLEECE'] = '0';

let cluster: Cluster | undefined;
const errors: string[] = [];
let unprotected: RoundFigures[] = [];
let protectedRounds: RoundFigures[] = [];
let checkpoints: CheckpointSample[] = [];
let protectS: number | undefined;
let protectNote: string | undefined;
let kill: Record<string, unknown> | undefined;
let resumed: Record<string, unknown> | undefined;
let replica: DiskCheck | undefined;
let resumedOk = false;
let sampler: ReturnType<typeof sampleCheckpoints> | undefined;
const followers: SerialLog[] = [];
try {
  log(`image ${image.dir}; starting ${VM} (${MEMORY_MIB} MiB) on primary`);
  cluster = await startWorkloadCluster(image, { vm: VM, emulator, memoryMiB: MEMORY_MIB, checkpointIntervalMs: INTERVAL_MS, params: { mode: 'bench', pgbenchS: PGBENCH_S, seqMs: SEQ_MS } });
  const serial = new SerialLog(serialLogOf('primary', VM)).start();
  followers.push(serial);
  const roundTimeoutMs = 20 * 60_000;
  const gone = () => qemuGone('primary', VM);
  await serial.waitFor('the guest ready', isEvent('ready'), { timeoutMs: 10 * 60_000, gone });

  // 1. unprotected: round 1 warms up
  for (let r = 2; r <= ROUNDS + 1; r++) {
    await serial.waitFor(`unprotected round ${r}`, isEvent('build-end', r), { timeoutMs: roundTimeoutMs, gone });
    unprotected.push(roundFigures(serial, r));
    log(`unprotected round ${r}: ${unprotected.at(-1)!.pgbench.tpsHost.toFixed(1)} tps, build ${unprotected.at(-1)!.build.hostS.toFixed(1)} s`);
  }

  // 2. protected
  const protectFrom = realtimeNs();
  const { protectAnswer } = await protectWorkload(cluster, INTERVAL_MS);
  const protectedAt = realtimeNs();
  protectS = seconds(protectedAt - protectFrom);
  if (protectAnswer !== 'ok') protectNote = `ftvm protect answered: ${protectAnswer}; the first checkpoint came later`;
  log(`protected in ${protectS.toFixed(1)} s (disk seed and first checkpoint)${protectNote ? `; ${protectNote}` : ''}`);
  sampler = sampleCheckpoints('primary', VM);
  const startedBefore = serial.events('pgbench-start').filter((l) => l.hostNs <= protectedAt).length;
  const first = startedBefore + 1;
  for (let r = first; r < first + ROUNDS; r++) {
    await serial.waitFor(`protected round ${r}`, isEvent('build-end', r), { timeoutMs: roundTimeoutMs, gone });
    protectedRounds.push(roundFigures(serial, r));
    log(`protected round ${r}: ${protectedRounds.at(-1)!.pgbench.tpsHost.toFixed(1)} tps, build ${protectedRounds.at(-1)!.build.hostS.toFixed(1)} s`);
  }
  const windowFrom = protectedRounds[0]!.pgbench.startNs;
  const windowTo = protectedRounds.at(-1)!.build.endNs;
  checkpoints = sampler.samples.filter((s) => s.seenNs >= windowFrom && s.seenNs <= windowTo + 1_000_000_000n);

  // 3. kill during pgbench
  const killRound = first + ROUNDS;
  const started = await serial.waitFor(`pgbench of round ${killRound}`, isEvent('pgbench-start', killRound), { timeoutMs: roundTimeoutMs, gone });
  await new Promise((r) => setTimeout(r, (PGBENCH_S * 1000) / 3));
  await waitProtectedOn('primary', VM, { timeoutMs: 30_000 });
  await sampler.stop();
  const took = await killQemuAndTakeOver(cluster);
  serial.stop();
  const move = took.record.lastMove!;
  const stopNs = BigInt(move.stopNs);
  const acked = acksBefore(serial.acks(), stopNs);
  const ackedAtKill = acksBefore(serial.acks(), took.killNs);
  const lastAckRead = serial.acks().at(-1)?.n ?? 0;
  kill = {
    round: killRound,
    into_pgbench_s: round(seconds(took.killNs - started.hostNs)),
    epoch: move.epoch,
    checkpoint_stop_before_kill_ms: round(Number(took.killNs - stopNs) / 1e6),
    // includes the backup agent's audit copy of the 2 GiB replica (FTVM_TEST_DISK_AUDIT), which a
    // production failover does not make
    resumed_after_kill_s: round(seconds(BigInt(move.resumeNs) - took.killNs)),
    acked_before_stop: acked,
    acked_before_kill: ackedAtKill,
  };
  log(`killed ${seconds(took.killNs - started.hostNs).toFixed(1)} s into pgbench; resumed epoch ${move.epoch} on ${cluster.primary}; ${acked.count} acks before its stop (highest ${acked.highest})`);

  // the resumed VM: PostgreSQL keeps serving (the client commits on, the killed round's pgbench ends)
  const now = cluster.primary;
  const goneNow = () => qemuGone(now, VM);
  const after = new SerialLog(serialLogOf(now, VM)).start();
  followers.push(after);
  const firstAck = await after.waitFor('a commit acknowledged on the resumed VM', (l) => l.line.kind === 'ack', { timeoutMs: 120_000, gone: goneNow });
  const end = await after.waitFor(`the end of round ${killRound}'s pgbench on the resumed VM`, isEvent('pgbench-end', killRound), { timeoutMs: roundTimeoutMs, gone: goneNow });
  await after.waitFor('20 more commits', (l) => l.line.kind === 'ack' && firstAck.line.kind === 'ack' && l.line.n >= firstAck.line.n + 20, { timeoutMs: 120_000, gone: goneNow });
  after.stop();
  const afterAcks = after.acks().map((a) => a.n);
  const seqErrors = after.events('seq-error').map((l) => l.line.text);
  const contiguous = afterAcks.every((n, i) => i === 0 || n === afterAcks[i - 1]! + 1);
  const pgbenchRc = end.line.kind === 'event' ? end.line.fields['rc'] : undefined;
  // the client's RAM and the disk are of the same instant: it goes on right after what it knew
  resumedOk = seqErrors.length === 0 && contiguous && afterAcks[0]! > acked.highest && pgbenchRc === '0';
  resumed = {
    first_ack: afterAcks[0],
    // acknowledged on the old primary after the resumed checkpoint: lost with that epoch (the
    // client's memory of them too) and committed again on the resumed VM
    redone_after_failover: afterAcks[0] !== undefined ? Math.max(0, lastAckRead - afterAcks[0] + 1) : null,
    acks: afterAcks.length,
    acks_contiguous: contiguous,
    seq_errors: seqErrors,
    pgbench_rc: pgbenchRc,
    pgbench_tps_guest: end.line.kind === 'event' ? Number(end.line.fields['tps']) : undefined,
    ok: resumedOk,
  };
  log(`resumed VM: ${JSON.stringify(resumed)}`);

  // the replica as the VM resumed on it, booted on its own
  const audit = await untilAgents(`${cluster.primary} copies its replica of epoch ${move.epoch}`, async () =>
    agentLogEntries(cluster!.primary, 'disk audit').find((a) => a['role'] === 'replica' && a['epoch'] === move.epoch && a['disk'] === 'vda'),
  );
  const copy = path.join(AUDIT_DIR, path.basename(String(audit['copy'])));
  log(`booting the replica copy ${copy} in check mode`);
  replica = await checkDisk(image, { path: copy, format: 'raw' }, acked.highest, { dir: path.join(CLUSTER_DIR, 'replica-check') });
  log(`replica: ${replica.ok ? 'ok' : replica.problems.join('; ')}`);
  fs.rmSync(copy, { force: true });
} catch (error) {
  errors.push((error as Error).message);
  log(`FAILED: ${(error as Error).message}`);
} finally {
  followers.forEach((f) => f.stop());
  await sampler?.stop();
  // the agents' logs outlive CLUSTER_DIR, which the next lab user clears
  fs.mkdirSync(LOG_KEEP, { recursive: true });
  for (const f of fs.existsSync(CLUSTER_DIR) ? fs.readdirSync(CLUSTER_DIR).filter((f) => f.endsWith('.agent.log')) : []) fs.copyFileSync(path.join(CLUSTER_DIR, f), path.join(LOG_KEEP, f));
  await stopCluster(cluster).catch(() => undefined);
  await removeWorkloadVm(VM).catch(() => undefined);
  fs.rmSync(AUDIT_DIR, { recursive: true, force: true });
  delete process.env['FTVM_TEST_DISK_AUDIT'];
  delete process.env['FTVM_TEST_DISK_AUDIT_FLEECE'];
}

const mean = (values: number[]) => (values.length ? round(values.reduce((a, b) => a + b, 0) / values.length) : null);
const tps = (rounds: RoundFigures[]) => mean(rounds.map((r) => r.pgbench.tpsHost));
const buildS = (rounds: RoundFigures[]) => mean(rounds.map((r) => r.build.hostS));
const ratio = (a: number | null, b: number | null) => (a !== null && b !== null && b !== 0 ? round(a / b) : null);
const roundJson = (r: RoundFigures) => ({
  round: r.round,
  pgbench: { tps_host: round(r.pgbench.tpsHost), tps_guest: r.pgbench.tpsGuest, transactions: r.pgbench.transactions, failed: r.pgbench.failed, latency_ms: r.pgbench.latencyMs, host_s: round(r.pgbench.hostS), guest_s: r.pgbench.guestS },
  build: { host_s: round(r.build.hostS), guest_s: r.build.guestS },
});
const pauses = checkpoints.map((c) => c.pauseMs);
const result = {
  ...describeEnvironment(),
  emulator,
  image: { hash: image.manifest.hash, kernel: image.manifest.kernelVersion, packages: image.manifest.packages, build_source: image.manifest.buildSource, qcow2_bytes: fs.statSync(image.disk).size },
  vm: { memory_mib: MEMORY_MIB, vcpus: 1, disk: 'root ext4 on a local qcow2 (cache=none), replicated', checkpoint_interval_ms: INTERVAL_MS },
  workload: { pgbench: `pgbench -n -T ${PGBENCH_S} -c 2 -j 1, scale 1 (tpcb-like)`, build: 'make -j1 linux MYCFLAGS=-O0 of Lua 5.4 (Debian source)', seq_client_interval_ms: SEQ_MS, rounds_measured: ROUNDS },
  db: {
    tps_unprotected: tps(unprotected),
    tps_protected: tps(protectedRounds),
    ratio: ratio(tps(protectedRounds), tps(unprotected)),
    tps_guest_unprotected: mean(unprotected.map((r) => r.pgbench.tpsGuest)),
    tps_guest_protected: mean(protectedRounds.map((r) => r.pgbench.tpsGuest)),
    note: "tps_*: pgbench's transactions over host seconds between the guest's pgbench start and end lines; tps_guest_*: pgbench's own figure (the guest's clock, which stands still while the VM is paused)",
  },
  build: {
    s_unprotected: buildS(unprotected),
    s_protected: buildS(protectedRounds),
    ratio: ratio(buildS(protectedRounds), buildS(unprotected)),
    note: 'host seconds between the guest lines around the build',
  },
  checkpoint: {
    pause_ms: pauses.length ? summarize(pauses) : null,
    bytes: checkpoints.length ? summarize(checkpoints.map((c) => c.bytes)) : null,
    // epochs are the checkpoints' start times (ms): the cadence actually reached, which a slow
    // checkpoint (bytes through ssh on shared cores) stretches past the configured interval
    interval_ms: checkpoints.length > 1 ? summarize(checkpoints.slice(1).map((c, i) => c.epoch - checkpoints[i]!.epoch)) : null,
    paused_ms_total: round(pauses.reduce((a, b) => a + b, 0)),
    paused_fraction: protectedRounds.length && pauses.length ? round(pauses.reduce((a, b) => a + b, 0) / 1000 / seconds(protectedRounds.at(-1)!.build.endNs - protectedRounds[0]!.pgbench.startNs), 6) : null,
    protect_s: protectS === undefined ? null : round(protectS),
    ...(protectNote ? { protect_note: protectNote } : {}),
    note: "each committed checkpoint during the protected rounds, from the primary agent's status (lastCheckpoint: pause = QEMU STOP → RESUME); protect_s: ftvm protect → first committed checkpoint (disk seed + first full checkpoint)",
  },
  kill: kill ?? null,
  resumed: resumed ?? null,
  replica_check: replica ?? null,
  db_recovered_after_kill: resumedOk && replica?.ok === true,
  rounds: { unprotected: unprotected.map(roundJson), protected: protectedRounds.map(roundJson) },
  errors,
};
fs.mkdirSync(new URL('./results/', import.meta.url), { recursive: true });
fs.writeFileSync(resultFile, `${JSON.stringify(result, null, 2)}\n`);
console.log(JSON.stringify({ ...result, rounds: undefined }, null, 2));
if (process.env['FTVM_BENCH_LAB_DOWN']) await labDown();
if (errors.length) process.exitCode = 1;
