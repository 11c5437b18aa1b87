/**
 * One injected failure of the protected VM's primary host and what the cluster did about it:
 * failover time (backup's last heartbeat from the primary → QEMU's RESUME on the backup), the
 * guest−host clock offset before and after, workload continuity, and whether two copies ever ran.
 */
import { ClusterStore, VmRecords, type VmRecord } from '@ftvm/coordinator';
import { cutLink, killHost, restoreLink } from '../lab/lab.js';
import { labEtcdEndpoints } from '../lab/etcd.js';
import { isAlive } from '../lab/procs.js';
import { sleep } from '../lab/wait.js';
import {
  agentLog,
  ETCD_PREFIX,
  agentLogEntries,
  clockOffset,
  controlClient,
  other,
  probeOn,
  qemuPidOf,
  reviveHost,
  tail,
  untilAgents,
  vmStatus,
  waitProtectedOn,
  type AgentHost,
  type Cluster,
} from './ft-cluster.js';
import { watchCopies } from './copies-watch.js';
import { waitForProbe } from './probe-client.js';

export type FaultKind = 'kill' | 'partition' | 'freeze';

export interface FaultRun {
  kind: FaultKind;
  from: AgentHost;
  to: AgentHost;
  /** Epoch (ms) of the checkpoint the backup resumed. */
  epoch: number;
  /** Backup's last heartbeat from the old primary → RESUME on the backup (s). */
  failoverS: number | undefined;
  /** The guest's outage: the resumed checkpoint's stop → the RESUME on the backup (ms). */
  outageMs: number;
  offsetBeforeMs: number;
  offsetAfterMs: number;
  /** after − before (target: within 5 ms). */
  offsetMs: number;
  probeErrorMs: number;
  counterAtCheckpointMin: string;
  counterBeforeFault: string;
  counterAfter: string;
  sameBoot: boolean;
  /** Same boot, counter not behind the last committed checkpoint's, and still counting. */
  continuityOk: boolean;
  /** The old copy stopped (STOP stamp, or its kill) before the new one resumed. */
  oldStoppedFirst: boolean | undefined;
  oldStopNs: string | undefined;
  resumeNs: string;
  /** Two copies were running at the same instant. */
  doubleActive: boolean;
  /** freeze: the SIGSTOPped QEMU was dead when SIGCONT came. */
  frozenNeverRanAgain?: boolean;
}

interface CounterSample {
  hostNs: bigint;
  counter: bigint;
  bootId: bigint;
}

const ms = (ns: bigint) => Math.round(Number(ns) / 1e3) / 1e3;

/** Samples the probe's workload counter (and its host receive time) until stopped. */
function sampleCounter(from: AgentHost): { stop(): Promise<CounterSample[]> } {
  const samples: CounterSample[] = [];
  let running = true;
  const loop = (async () => {
    while (running) {
      try {
        const o = await clockOffset(probeOn(from), { samples: 1, timeoutMs: 200 });
        samples.push({ hostNs: o.hostRealtimeNs, counter: o.workloadCounter, bootId: o.bootId });
      } catch {
        // the fault has begun
      }
      await sleep(20);
    }
  })();
  return {
    async stop() {
      running = false;
      await loop;
      return samples;
    },
  };
}

/** The VM's record as the agents wrote it (empty if there is none), read with a deadline. */
export async function readRecord(vm: string): Promise<Partial<VmRecord>> {
  const store = ClusterStore.open({ endpoints: labEtcdEndpoints(), requestTimeoutMs: 2_000 });
  try {
    return (await new VmRecords(store, ETCD_PREFIX).get(vm)) ?? {};
  } finally {
    await store.close();
  }
}

/** Changes the VM's record as an operator with etcd access would (compare-and-swap, with a deadline). */
export async function updateRecord(vm: string, patch: Partial<VmRecord>): Promise<VmRecord> {
  const store = ClusterStore.open({ endpoints: labEtcdEndpoints(), requestTimeoutMs: 2_000 });
  try {
    return await new VmRecords(store, ETCD_PREFIX).update(vm, () => patch);
  } finally {
    await store.close();
  }
}

/** Injects `kind` on the host running the VM, waits for the take-over, measures, and re-protects. */
export async function runFault(
  cluster: Cluster,
  kind: FaultKind,
  log: (line: string) => void = () => undefined,
  /** Wait this long after a committed checkpoint before the fault (longer outages; default: right after it). */
  options: { afterCommitMs?: number; onFault?: () => void } = {},
): Promise<FaultRun> {
  const { vm } = cluster;
  const from = cluster.primary;
  const to = other(from);
  await waitProtectedOn(from, vm, { timeoutMs: 60_000 });
  // the backup must be hearing the primary before we break it
  const deadline = performance.now() + 20_000;
  while (!(await controlClient(to).status()).peers.find((p) => p.name === from)?.alive) {
    if (performance.now() > deadline) throw new Error(`${to} does not hear ${from}`);
    await sleep(100);
  }
  // and a steady state: its standby started (a mapped one filled), not a failover that first
  // waits seconds for a standby domain the reprotect has just asked for
  await untilAgents(`${to}'s standby ready`, async () => {
    const standby = (await vmStatus(to, vm))?.standby;
    return standby?.ready && standby.ram !== 'cold' ? true : undefined;
  });
  // sample the workload from before the checkpoint the backup will resume, so its counter is bounded
  const sampler = sampleCounter(from);
  await waitProtectedOn(from, vm, { timeoutMs: 60_000, committedAfter: Date.now() + 200 });
  const before = await clockOffset(probeOn(from), { samples: 16 });
  const previousMove = (await readRecord(vm)).lastMove?.resumeNs;
  if (options.afterCommitMs) {
    // from the commit of a fresh checkpoint: the outage is then afterCommitMs + the take-over
    const seen = (await waitProtectedOn(from, vm, { timeoutMs: 60_000 })).lastCheckpoint?.epoch;
    const fresh = await untilAgents('a fresh checkpoint', async () => {
      const epoch = (await controlClient(from).status()).vms.find((v) => v.name === vm)?.lastCheckpoint?.epoch;
      return epoch !== undefined && epoch !== seen ? epoch : undefined;
    }, 30_000, 20);
    log(`fault ${options.afterCommitMs} ms after checkpoint ${fresh} committed`);
    await sleep(options.afterCommitMs);
  }

  let frozenPid: number | undefined;
  if (kind === 'kill') await killHost(from);
  else if (kind === 'partition') await cutLink(from);
  else {
    frozenPid = await qemuPidOf(from, vm);
    if (!frozenPid) throw new Error(`no QEMU of ${vm} on ${from}`);
    process.kill(frozenPid, 'SIGSTOP');
  }
  const faultAt = performance.now();
  options.onFault?.();
  log(`${kind}: ${from} → ${to}`);

  // the backup takes over
  const takeoverDeadline = performance.now() + 60_000;
  let record = await readRecord(vm);
  while (!(record.lastMove && record.lastMove.resumeNs !== previousMove && record.lastMove.to === to)) {
    if (performance.now() > takeoverDeadline) throw new Error(`${to} did not take ${vm} over within 60 s after ${kind} of ${from}\n${tail(agentLog(to))}`);
    await sleep(50);
    record = await readRecord(vm).catch(() => record);
  }
  const move = record.lastMove!;
  const samples = await sampler.stop();
  const after = await clockOffset(probeOn(to), { samples: 16 });
  await sleep(300);
  const later = await clockOffset(probeOn(to), { samples: 1 });
  log(`${kind}: resumed on ${to} ${Math.round(performance.now() - faultAt)} ms after the fault`);

  // continuity: not behind the last committed checkpoint, same boot, still counting
  const stopNs = BigInt(move.stopNs);
  const beforeCheckpoint = samples.filter((s) => s.hostNs < stopNs);
  const counterAtCheckpointMin = beforeCheckpoint.length ? beforeCheckpoint[beforeCheckpoint.length - 1]!.counter : 0n;
  const lastBefore = samples.at(-1);
  const sameBoot = after.bootId === before.bootId;
  const continuityOk = sameBoot && after.workloadCounter >= counterAtCheckpointMin && later.workloadCounter > after.workloadCounter && beforeCheckpoint.length > 0;

  // safety: when did the old copy stop?
  const resumeNs = BigInt(move.resumeNs);
  let oldStopNs: bigint | undefined;
  let frozenNeverRanAgain: boolean | undefined;
  if (kind === 'kill') {
    oldStopNs = BigInt(Math.round((Date.now() - (performance.now() - faultAt)) * 1e6));
  } else {
    // the old primary's own record of its fence: QMP STOP stamp when QEMU answered, else its SIGKILL
    const faultNs = BigInt(Math.round((Date.now() - (performance.now() - faultAt)) * 1e6));
    const fenceDeadline = performance.now() + 10_000;
    let fenced: Record<string, unknown> | undefined;
    while (!(fenced = agentLogEntries(from, 'fenced').find((e) => BigInt(String(e['killedNs'])) > faultNs - 1_000_000_000n))) {
      if (performance.now() > fenceDeadline) break;
      await sleep(100);
    }
    if (fenced) oldStopNs = BigInt(String(fenced['stopNs'] ?? fenced['killedNs']));
    if (kind === 'freeze' && frozenPid) {
      try {
        process.kill(frozenPid, 'SIGCONT');
      } catch {
        // already gone: the fence killed it
      }
      await sleep(500);
      frozenNeverRanAgain = !isAlive(frozenPid);
    }
  }
  const oldStoppedFirst = oldStopNs === undefined ? undefined : oldStopNs < resumeNs;
  const oldStillRuns = kind === 'kill' ? false : (await qemuPidOf(from, vm)) !== undefined;

  // recover the old primary and make it the backup
  if (kind === 'kill') await reviveHost(from, cluster);
  else if (kind === 'partition') await restoreLink(from);
  cluster.primary = to;
  const reprotectAt = Date.now();
  await controlClient(to)
    .reprotect(vm, from, () => undefined)
    .catch((error: Error) => {
      throw new Error(`reprotect of ${vm} on ${to} with backup ${from}: ${error.message}\n--- ${to} agent\n${tail(agentLog(to))}\n--- ${from} agent\n${tail(agentLog(from))}`);
    });
  await waitProtectedOn(to, vm, { timeoutMs: 60_000, committedAfter: reprotectAt });
  const fromStatus = await vmStatus(from, vm);
  if (fromStatus?.role === 'primary' || fromStatus?.domainState === 'running') throw new Error(`${from} runs ${vm} again after the fault: ${JSON.stringify(fromStatus)}`);

  return {
    kind,
    from,
    to,
    epoch: move.epoch,
    outageMs: Math.round(Number(resumeNs - stopNs) / 1e3) / 1e3,
    failoverS: move.lastBeatNs ? Math.round(Number(resumeNs - BigInt(move.lastBeatNs)) / 1e6) / 1e3 : undefined,
    offsetBeforeMs: ms(before.offsetNs),
    offsetAfterMs: ms(after.offsetNs),
    offsetMs: ms(after.offsetNs - before.offsetNs),
    probeErrorMs: ms(before.errorNs + after.errorNs),
    counterAtCheckpointMin: String(counterAtCheckpointMin),
    counterBeforeFault: String(lastBefore?.counter ?? 'none'),
    counterAfter: String(after.workloadCounter),
    sameBoot,
    continuityOk,
    oldStoppedFirst,
    oldStopNs: oldStopNs?.toString(),
    resumeNs: move.resumeNs,
    doubleActive: oldStoppedFirst === false || oldStillRuns,
    ...(frozenNeverRanAgain !== undefined ? { frozenNeverRanAgain } : {}),
  };
}

/**
 * SIGKILLs the QEMU of the VM where it runs, waits until the other host has resumed it (watching
 * both hosts' probes for two copies meanwhile), and makes that host the cluster's primary. Throws
 * when no QEMU runs there or the take-over does not come within 60 s.
 */
export async function killQemuAndFailOver(cluster: Cluster): Promise<{ record: Partial<VmRecord>; doubles: number }> {
  const { vm } = cluster;
  const from = cluster.primary;
  const to = other(from);
  const before = (await readRecord(vm)).lastMove?.at;
  const watch = watchCopies({ primary: probeOn('primary'), backup: probeOn('backup') });
  const pid = await qemuPidOf(from, vm);
  if (!pid) throw new Error(`no QEMU of ${vm} on ${from}`);
  process.kill(pid, 'SIGKILL');
  const record = await untilAgents(`${to} takes ${vm} over`, async () => {
    const r = await readRecord(vm);
    return r.lastMove && r.lastMove.at !== before && r.lastMove.to === to ? r : undefined;
  });
  await waitForProbe(probeOn(to), 30_000);
  const report = await watch.stop();
  cluster.primary = to;
  return { record, doubles: report.doubles.length };
}

/** `ftvm reprotect` with the other host as backup; returns once a checkpoint is committed there. */
export async function reprotectToOther(cluster: Cluster): Promise<void> {
  const at = Date.now();
  await controlClient(cluster.primary).reprotect(cluster.vm, other(cluster.primary), () => undefined);
  await waitProtectedOn(cluster.primary, cluster.vm, { committedAfter: at });
}

