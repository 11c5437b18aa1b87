/**
 * pnpm bench:failover → bench/results/failover.json
 *
 * The protected probe guest (256 MiB, workload running) checkpointed every second by the real
 * agents in the lab; then, FTVM_FAILOVER_RUNS times each (default 10):
 *   kill       every process of the host running the VM gets SIGKILL (agent, libvirtd, QEMU, sshd)
 *   partition  that host's link is cut while everything on it keeps running
 *   freeze     its QEMU gets SIGSTOP
 * After each, the old host is brought back and `ftvm reprotect` makes it the new backup, so the
 * next fault hits the other host.
 */
import fs from 'node:fs';
import { labDown } from '../test/lab/lab.js';
import { startCluster, stopCluster, type Cluster } from '../test/support/ft-cluster.js';
import { runFault, type FaultKind, type FaultRun } from '../test/support/failover-runs.js';
import { patchedQemu } from '../test/support/patched-qemu.js';
import { describeEnvironment } from './environment.js';
import { round, summarize } from './stats.js';

const RUNS = Number(process.env.FTVM_FAILOVER_RUNS ?? 10);
const KINDS = (process.env.FTVM_FAILOVER_KINDS ?? 'kill,partition,freeze').split(',') as FaultKind[];

const emulator = patchedQemu();
let cluster: Cluster | undefined;
const runs: FaultRun[] = [];
const errors: string[] = [];
try {
  cluster = await startCluster({ emulator, workloadMiBps: 4, checkpointIntervalMs: 1000 });
  for (const kind of KINDS) {
    for (let i = 1; i <= RUNS; i++) {
      try {
        const run = await runFault(cluster, kind, (line) => console.error(line));
        runs.push(run);
        console.error(`${kind} ${i}/${RUNS}: failover ${run.failoverS} s, offset ${run.offsetMs} ms, continuity ${run.continuityOk}, old stopped first ${run.oldStoppedFirst}`);
      } catch (error) {
        errors.push(`${kind} ${i}: ${(error as Error).message}`);
        console.error(`${kind} ${i}/${RUNS} FAILED: ${(error as Error).message}`);
        break;
      }
    }
  }
} finally {
  await stopCluster(cluster).catch(() => undefined);
}

const kills = runs.filter((r) => r.kind === 'kill');
const failoverS = kills.map((r) => r.failoverS).filter((s): s is number => s !== undefined);
const offsets = kills.map((r) => Math.abs(r.offsetMs));
const byKind = (kind: FaultKind) => runs.filter((r) => r.kind === kind);
const result = {
  ...describeEnvironment(),
  emulator,
  runs_per_kind: RUNS,
  failover_s: { ...summarize(failoverS), note: "kill runs: backup's last heartbeat from the primary → QEMU RESUME on the backup" },
  offset_ms: { max_abs: offsets.length ? round(Math.max(...offsets)) : null, p50_abs: summarize(offsets).p50, note: 'kill runs: guest−host offset after resume minus the one measured just before the kill' },
  continuity_ok: kills.length === RUNS && kills.every((r) => r.continuityOk),
  double_active: runs.filter((r) => r.doubleActive).length,
  partition: {
    runs: byKind('partition').length,
    old_stopped_before_new_resumed: byKind('partition').filter((r) => r.oldStoppedFirst === true).length,
    failover_s: summarize(byKind('partition').map((r) => r.failoverS ?? Number.NaN)),
    offset_ms_max_abs: round(Math.max(0, ...byKind('partition').map((r) => Math.abs(r.offsetMs)))),
  },
  freeze: {
    runs: byKind('freeze').length,
    frozen_copy_never_ran_again: byKind('freeze').filter((r) => r.frozenNeverRanAgain === true).length,
    old_stopped_before_new_resumed: byKind('freeze').filter((r) => r.oldStoppedFirst === true).length,
    offset_ms_max_abs: round(Math.max(0, ...byKind('freeze').map((r) => Math.abs(r.offsetMs)))),
  },
  targets: { failover_s_p50: 2, offset_ms_max_abs: 5 },
  errors,
  runs,
};
fs.mkdirSync(new URL('./results/', import.meta.url), { recursive: true });
fs.writeFileSync(new URL('./results/failover.json', import.meta.url), `${JSON.stringify(result, null, 2)}\n`);
console.log(JSON.stringify({ ...result, runs: undefined }, null, 2));
if (process.env.FTVM_BENCH_LAB_DOWN) await labDown();
