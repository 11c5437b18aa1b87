/**
 * Witness faults on a protected VM (issue 20): etcd on the witness killed and brought back on its
 * data, or the witness's link cut, while the probe guest runs on its primary. Measured from the
 * outside: the guest's probe polled every 50 ms on both hosts (unavailability, two copies, one
 * boot, a counter that never goes back), the VM's record (no failover), and how soon after the
 * witness is back the primary's agent says `protected` again with a fresh checkpoint — without
 * any `ftvm reprotect`. Shared by the integration test and `pnpm bench:failover` (its `witness`
 * section).
 */
import { cutLink, restoreLink } from '../lab/lab.js';
import { startLabEtcd, stopLabEtcd } from '../lab/etcd.js';
import { sleep } from '../lab/wait.js';
import { watchCopies, type CopiesReport } from './copies-watch.js';
import { readRecord } from './failover-runs.js';
import { agentLogEntries, controlClient, other, probeOn, untilAgents, vmStatus, waitProtectedOn, type Cluster } from './ft-cluster.js';

export const WITNESS_FAULTS = ['etcd_kill', 'link_cut_2s', 'link_cut_10s'] as const;
export type WitnessFault = (typeof WITNESS_FAULTS)[number];

/** The probe watch's period: a copy that answers every round shows gaps of about this much. */
const WATCH_EVERY_MS = 50;
/** How long etcd stays dead in an etcd_kill run (the 30 s; FTVM_WITNESS_ETCD_DOWN_MS to shorten). */
export const ETCD_DOWN_MS = Number(process.env.FTVM_WITNESS_ETCD_DOWN_MS ?? 30_000);

export interface WitnessRun {
  fault: WitnessFault;
  /** how long the fault lasted (s) */
  outageS: number;
  /** the longest time no copy of the VM answered, less the watch's period (s): 0 when it never stopped */
  unavailableS: number;
  /** the VM moved to the other host (a failover: must not happen) */
  failedOver: boolean;
  doubles: number;
  bootIds: number;
  counterRegressions: number;
  /** hosts whose copy answered */
  answeredFrom: string[];
  /** the primary's agent ran the VM on in failsafe during the fault */
  failsafeEntered: boolean;
  /** checkpoints the primary committed on its backup while the witness was away */
  checkpointsDuringOutage: number;
  /** from the witness's return to the primary's `protected` with a checkpoint committed after it (s); undefined: not within 60 s */
  protectedAgainS: number | undefined;
}

/**
 * One witness fault on the cluster's VM, measured. Throws only when the lab cannot be driven
 * (etcd does not start again); what the agents did is in the result, for the caller to judge.
 */
export async function runWitnessFault(cluster: Cluster, fault: WitnessFault, log: (line: string) => void = () => undefined): Promise<WitnessRun> {
  const { vm } = cluster;
  const from = cluster.primary;
  await waitProtectedOn(from, vm, { timeoutMs: 60_000, committedAfter: Date.now() });
  await untilAgents(`${other(from)} hears ${from}`, async () => ((await controlClient(other(from)).status()).peers.find((p) => p.name === from)?.alive ? true : undefined), 20_000);
  const moveBefore = (await readRecord(vm)).lastMove?.resumeNs;
  const failsafeBefore = agentLogEntries(from, 'failsafe: the VM runs on without the lease').length;
  const watch = watchCopies({ primary: probeOn('primary'), backup: probeOn('backup') }, { everyMs: WATCH_EVERY_MS });
  await sleep(500);

  const epochAtFault = (await vmStatus(from, vm))?.lastCheckpoint?.epoch ?? 0;
  const faultAt = performance.now();
  if (fault === 'etcd_kill') await stopLabEtcd('witness', 'SIGKILL');
  else await cutLink('witness');
  // checkpoints go on meanwhile (over SSH, not through etcd): count the epochs the primary reports
  const epochs = new Set<number>();
  const outageEnds = faultAt + (fault === 'etcd_kill' ? ETCD_DOWN_MS : fault === 'link_cut_2s' ? 2_000 : 10_000);
  while (performance.now() < outageEnds) {
    const epoch = (await vmStatus(from, vm).catch(() => undefined))?.lastCheckpoint?.epoch;
    if (epoch !== undefined && epoch > epochAtFault) epochs.add(epoch);
    await sleep(Math.min(200, Math.max(0, outageEnds - performance.now())));
  }
  if (fault === 'etcd_kill') await startLabEtcd('witness');
  else await restoreLink('witness');
  const backAt = performance.now();
  const backAtMs = Date.now();
  log(`${fault}: witness back after ${Math.round(backAt - faultAt)} ms`);

  // protected again by itself: the primary's own status, a checkpoint committed after the return
  let protectedAgainS: number | undefined;
  const deadline = backAt + 60_000;
  while (performance.now() < deadline) {
    const status = await vmStatus(from, vm).catch(() => undefined);
    if (status?.role === 'primary' && status.phase === 'protected' && status.leaseHolder === from && (status.lastCheckpoint?.epoch ?? 0) > backAtMs) {
      protectedAgainS = (performance.now() - backAt) / 1e3;
      break;
    }
    await sleep(50);
  }
  await sleep(1_000);
  const report: CopiesReport = await watch.stop();
  const record = await readRecord(vm);
  const run: WitnessRun = {
    fault,
    outageS: round3((backAt - faultAt) / 1e3),
    unavailableS: round3(Math.max(0, report.longestSilenceMs - WATCH_EVERY_MS) / 1e3),
    failedOver: record.lastMove?.resumeNs !== moveBefore || record.primary !== from,
    doubles: report.doubles.length,
    bootIds: report.bootIds.length,
    counterRegressions: report.counterRegressions,
    answeredFrom: report.answeredFrom,
    failsafeEntered: agentLogEntries(from, 'failsafe: the VM runs on without the lease').length > failsafeBefore,
    checkpointsDuringOutage: epochs.size,
    protectedAgainS: protectedAgainS === undefined ? undefined : round3(protectedAgainS),
  };
  log(`${fault}: unavailable ${run.unavailableS} s, failover ${run.failedOver}, doubles ${run.doubles}, failsafe ${run.failsafeEntered}, ${run.checkpointsDuringOutage} checkpoints during it, protected again after ${run.protectedAgainS ?? 'never'} s`);
  return run;
}

const round3 = (x: number) => Math.round(x * 1e3) / 1e3;
