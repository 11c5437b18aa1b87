/**
 * pnpm bench:disk-faults → bench/results/disk-faults.json
 *
 * Issue #15's "Byte equality" and "Guest view" under faults: the probe guest with its two local
 * qcow2 disks (an O_DIRECT counter ring, ext4 under file writes), protected by the real agents
 * in the lab with 1 s checkpoints. FTVM_DISK_FAULTS_RUNS faults (default 36) cycle through
 *   kill modes   kill (SIGKILL of every process of the primary host), partition (its link cut,
 *                restored after the take-over), freeze (SIGSTOP of its QEMU)
 *   kill points  delta-read (primary, after the first extent of the delta), before-disk-frames
 *                (primary, memory sent, disks not yet), before-meta-rename / after-meta-rename
 *                (backup store, committing), mid-apply (backup replica, between deltas), random
 * — every pair once per 18 faults. A pause point holds the process there for
 * FTVM_DISK_FAULTS_PAUSE_MS (default 4000) and the fault goes in during it (test/support/disk-faults.ts).
 * After each: the backup's replica hashes as the primary's fleece did at the resumed checkpoint
 * (both disks), the guest's own ring read-back after the resume finds no disk/RAM mismatch and it
 * writes on, the ring replica lost no write, e2fsck of the ext4 replica is clean; then the old
 * primary is brought back and reseeded as the backup.
 *
 * FTVM_DISK_FAULTS_MODES / FTVM_DISK_FAULTS_POINTS (comma lists) narrow the cycle.
 */
import fs from 'node:fs';
import { labDown } from '../test/lab/lab.js';
import { clearDiskFaultEnv, diskFaultEnv, KILL_MODES, KILL_POINTS, runDiskFault, type DiskFaultRun, type KillMode, type KillPoint } from '../test/support/disk-faults.js';
import { startCluster, stopCluster, type Cluster } from '../test/support/ft-cluster.js';
import { patchedQemu } from '../test/support/patched-qemu.js';
import { describeEnvironment } from './environment.js';
import { summarize } from './stats.js';

const FAULTS = Number(process.env.FTVM_DISK_FAULTS_RUNS ?? 36);
const PAUSE_MS = Number(process.env.FTVM_DISK_FAULTS_PAUSE_MS ?? 4000);
const MODES = list('FTVM_DISK_FAULTS_MODES', KILL_MODES);
const POINTS = list('FTVM_DISK_FAULTS_POINTS', KILL_POINTS);
/** A fault whose run throws (something never came) restarts the cluster; this many times at most. */
const MAX_RESTARTS = 3;
if (!Number.isInteger(FAULTS) || FAULTS < 1) throw new Error(`FTVM_DISK_FAULTS_RUNS must be a positive integer, got '${process.env.FTVM_DISK_FAULTS_RUNS}'`);
if (!Number.isInteger(PAUSE_MS) || PAUSE_MS < 1000) throw new Error(`FTVM_DISK_FAULTS_PAUSE_MS must be an integer ≥ 1000, got '${process.env.FTVM_DISK_FAULTS_PAUSE_MS}'`);
const resultFile = new URL('./results/disk-faults.json', import.meta.url);

function list<T extends string>(name: string, all: readonly T[]): T[] {
  const value = process.env[name];
  if (!value) return [...all];
  const picked = value.split(',').map((s) => s.trim());
  for (const p of picked) if (!all.includes(p as T)) throw new Error(`${name}: unknown '${p}' (${all.join(', ')})`);
  return picked as T[];
}

const emulator = patchedQemu();
const clusterOptions = { vm: 'ft-disk', emulator, checkpointIntervalMs: 1000, fullEvery: 30, disks: { format: 'qcow2' as const, ringMiB: 4, fsMiB: 32 } };
const runs: DiskFaultRun[] = [];
const errors: string[] = [];
const started = performance.now();
let cluster: Cluster | undefined;
diskFaultEnv();
try {
  cluster = await startCluster(clusterOptions);
  let restarts = 0;
  for (let i = 0; i < FAULTS; i++) {
    const mode: KillMode = MODES[i % MODES.length]!;
    const point: KillPoint = POINTS[Math.floor(i / MODES.length) % POINTS.length]!;
    try {
      const run = await runDiskFault(cluster, mode, point, { pauseMs: PAUSE_MS, log: (line) => console.error(line) });
      runs.push(run);
      console.error(
        `${i + 1}/${FAULTS} ${mode} at ${point}: epoch ${run.epoch}, failover ${run.failoverS} s, equal ${run.equal}, fsck ${run.fsckClean}, ` +
          `violations ${run.counterViolations}, guest writes ${run.guestWrites}, reseeded ${run.reseeded}, cycle ${run.cycleS} s`,
      );
    } catch (error) {
      errors.push(`${i + 1} ${mode} at ${point}: ${(error as Error).message.slice(0, 4000)}`);
      console.error(`${i + 1}/${FAULTS} ${mode} at ${point} FAILED: ${(error as Error).message}`);
      if (++restarts > MAX_RESTARTS) break;
      await stopCluster(cluster).catch(() => undefined);
      cluster = await startCluster(clusterOptions);
    }
  }
} finally {
  await stopCluster(cluster).catch(() => undefined);
  clearDiskFaultEnv();
}

const count = (p: (r: DiskFaultRun) => boolean) => runs.filter(p).length;
const tally = <K extends string>(keys: readonly K[], key: (r: DiskFaultRun) => K) => Object.fromEntries(keys.map((k) => [k, count((r) => key(r) === k)]));
const result = {
  ...describeEnvironment(),
  emulator,
  checkpoint_interval_ms: clusterOptions.checkpointIntervalMs,
  pause_ms: PAUSE_MS,
  faults: runs.length,
  mismatches: count((r) => !r.equal),
  fsck_clean: count((r) => r.fsckClean),
  fsck_runs: runs.length,
  counter_violations: runs.reduce((n, r) => n + r.counterViolations, 0),
  guest_kept_writing: count((r) => r.guestWrites),
  reseeded_after_reprotect: count((r) => r.reseeded),
  by_mode: tally(MODES, (r) => r.mode),
  by_point: tally(POINTS, (r) => r.point),
  failover_s: summarize(runs.map((r) => r.failoverS).filter((s): s is number => s !== undefined)),
  failover_s_by_mode: Object.fromEntries(MODES.map((m) => [m, summarize(runs.filter((r) => r.mode === m && r.failoverS !== undefined).map((r) => r.failoverS!))])),
  duration_s: Math.round((performance.now() - started) / 1000),
  notes: {
    byte_equality: "sha256 of each replica the backup resumed on (its agent, at failover) against the primary's fleecing export at that checkpoint's stop instant (its agent, per checkpoint)",
    counter_violations: "the guest's ring read-backs finding the disk older or newer than its RAM (after the resume), plus ring replicas with a lost write, >1 torn slot, or a counter above the guest's issued one",
    failover_s: "backup's last heartbeat from the old primary → QEMU RESUME on the backup (includes any pause the fault struck in that delays the take-over, e.g. a receiver mid-apply holding the replica lock)",
  },
  errors,
  rows: runs.map((r) => ({
    mode: r.mode,
    point: r.point,
    from: r.from,
    to: r.to,
    paused_epoch: r.hit?.epoch ?? null,
    ...(r.hit?.target !== undefined ? { paused_target: r.hit.target } : {}),
    epoch: r.epoch,
    failover_s: r.failoverS ?? null,
    equal: r.equal,
    fsck: r.fsckClean,
    violations: r.counterViolations,
    guest_violations: r.guestViolations,
    guest_writes: r.guestWrites,
    ring: r.ring,
    reseeded: r.reseeded,
    cycle_s: r.cycleS,
    disks: r.disks,
    ...(r.stagings > 1 ? { stagings: r.stagings } : {}),
    ...(r.fsckClean ? {} : { fsck_output: r.fsckOutput }),
  })),
};
fs.mkdirSync(new URL('./results/', import.meta.url), { recursive: true });
fs.writeFileSync(resultFile, `${JSON.stringify(result, null, 2)}\n`);
console.log(JSON.stringify({ ...result, rows: undefined }, null, 2));
if (process.env.FTVM_BENCH_LAB_DOWN) await labDown();
if (errors.length > 0 || result.mismatches > 0 || result.counter_violations > 0 || result.fsck_clean < result.fsck_runs) process.exitCode = 1;
