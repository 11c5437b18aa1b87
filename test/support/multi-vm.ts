/**
 * Many VMs per host pair: four probe guests (128 MiB each), two with their primary on each host,
 * protected by the same two agents. One kill of a host fails its two VMs over to the other host
 * while the other host's two keep running without their backup (and say so in `ftvm status`);
 * the killed host comes back, `ftvm reprotect` makes it the backup of the two that moved, and all
 * four are protected again. Used by test/failover/multi-vm.int.test.ts and `pnpm bench:failover`.
 */
import { Etcd3 } from 'etcd3';
import { killHost, labEtcdEndpoint, labUp } from '../lab/lab.js';
import { isAlive } from '../lab/procs.js';
import { sleep } from '../lab/wait.js';
import { watchCopies, type CopiesReport } from './copies-watch.js';
import { readRecord } from './failover-runs.js';
import {
  AGENT_HOSTS,
  ETCD_PREFIX,
  addProtectedVm,
  agentLog,
  controlClient,
  killStrayAgents,
  other,
  probeOn,
  qemuPidOf,
  removeVm,
  reviveHost,
  startCluster,
  tail,
  vmStatus,
  waitProtectedOn,
  type AgentHost,
  type Cluster,
} from './ft-cluster.js';
import { clockOffset, hostRealtimeNs } from './probe-client.js';

export interface MultiVmSpec {
  name: string;
  /** The host it is booted and protected on (its backup is the other one). */
  home: AgentHost;
  /** Host UDP port its probe is forwarded from: every copy of it on a host holds this port. */
  probePort: number;
}

export const MULTI_VMS: readonly MultiVmSpec[] = [
  { name: 'ft-m1', home: 'primary', probePort: 5561 },
  { name: 'ft-m2', home: 'primary', probePort: 5562 },
  { name: 'ft-m3', home: 'backup', probePort: 5563 },
  { name: 'ft-m4', home: 'backup', probePort: 5564 },
];

export interface MultiClusterOptions {
  emulator?: string;
  /** Default 128 MiB per VM. */
  memoryMiB?: number;
  /** Default 1 MiB/s per VM (four guests share two TCG cores with both agents). */
  workloadMiBps?: number;
  /** Default 1000 ms. */
  checkpointIntervalMs?: number;
}

export interface MultiCluster {
  /** The agents (reviveHost restarts them through it); `cluster.vm` is the first of `vms`. */
  cluster: Cluster;
  vms: readonly MultiVmSpec[];
  /** The host each VM runs on now. */
  runsOn: Record<string, AgentHost>;
}

/** The lab's agents with the four VMs of MULTI_VMS booted and protected (first checkpoint committed). */
export async function startMultiCluster(options: MultiClusterOptions = {}): Promise<MultiCluster> {
  const vmOptions = {
    ...(options.emulator ? { emulator: options.emulator } : {}),
    memoryMiB: options.memoryMiB ?? 128,
    workloadMiBps: options.workloadMiBps ?? 1,
    checkpointIntervalMs: options.checkpointIntervalMs ?? 1000,
  };
  await labUp();
  await killStrayAgents();
  // A fresh cluster: records other test clusters left under the test prefix (their agents are
  // gone, their checkpoints still on disk) would have these agents take those VMs over.
  const etcd = new Etcd3({ hosts: [labEtcdEndpoint()] });
  try {
    await etcd.delete().prefix(`${ETCD_PREFIX}/vms/`);
  } finally {
    etcd.close();
  }
  for (const vm of MULTI_VMS) await removeVm(vm.name);
  const [first, ...rest] = MULTI_VMS;
  if (first!.home !== 'primary') throw new Error('startCluster boots the first VM on primary');
  const cluster = await startCluster({ ...vmOptions, vm: first!.name, probePort: first!.probePort, peer: 'backup' });
  const runsOn: Record<string, AgentHost> = { [first!.name]: 'primary' };
  // one at a time: four TCG boots at once on two cores would only make each slower
  for (const vm of rest) {
    await addProtectedVm(cluster, { ...vmOptions, vm: vm.name, primary: vm.home, probePort: vm.probePort });
    runsOn[vm.name] = vm.home;
  }
  return { cluster, vms: MULTI_VMS, runsOn };
}

/** Stops the agents (no handover wanted) and removes all four VMs from both hosts and etcd. */
export async function stopMultiCluster(mc: MultiCluster | undefined): Promise<void> {
  for (const host of AGENT_HOSTS) {
    const pid = mc?.cluster.agentPids[host];
    if (pid && isAlive(pid)) process.kill(pid, 'SIGKILL');
  }
  await killStrayAgents();
  for (const vm of MULTI_VMS) await removeVm(vm.name);
}

export interface FailedOverVm {
  vm: string;
  from: AgentHost;
  to: AgentHost;
  /** Epoch (ms) of the checkpoint resumed. */
  epoch: number;
  /** The new host's last heartbeat from the old primary → QEMU RESUME there (s). */
  failoverS: number | undefined;
  offsetBeforeMs: number;
  offsetAfterMs: number;
  /** after − before */
  offsetMs: number;
  probeErrorMs: number;
  counterAtCheckpointMin: string;
  counterAfter: string;
  sameBoot: boolean;
  /** Same boot, counter not behind the last committed checkpoint's, still counting. */
  continuityOk: boolean;
  resumeNs: string;
  /** Overlapping probe answers from both hosts over the whole run. */
  doubles: number;
  /** Its QEMU on the killed host outlived the kill. */
  oldQemuAlive: boolean;
  doubleActive: boolean;
}

export interface BystanderVm {
  vm: string;
  host: AgentHost;
  /** Its phase on `host` just before the kill. */
  phaseBefore: string;
  /** Distinct phase/reason pairs its host's agent reported while the other host was down. */
  said: { phase: string; reason: string }[];
  /** It said degraded or unprotected, with a reason, while its backup was gone. */
  saidUnprotected: boolean;
  /** From the kill until all four were protected again. */
  probeRounds: number;
  silentRounds: number;
  longestSilenceMs: number;
  answeredFrom: string[];
  sameBoot: boolean;
  counterBefore: string;
  counterAfter: string;
  /** Answered only from its host, same boot, counter went on. */
  keptRunning: boolean;
}

export interface MultiKillRun {
  killed: AgentHost;
  survivor: AgentHost;
  failedOver: FailedOverVm[];
  bystanders: BystanderVm[];
  /** kill → all four protected again (revive and reprotect included), s */
  recoveredS: number;
}

interface CounterSample {
  hostNs: bigint;
  counter: bigint;
}

const ms = (ns: bigint) => Math.round(Number(ns) / 1e3) / 1e3;

/** Samples a probe's workload counter (with the host receive time) until stopped. */
function sampleCounter(target: Parameters<typeof clockOffset>[0]): { stop(): Promise<CounterSample[]> } {
  const samples: CounterSample[] = [];
  let running = true;
  const loop = (async () => {
    while (running) {
      try {
        const o = await clockOffset(target, { samples: 1, timeoutMs: 200 });
        samples.push({ hostNs: o.hostRealtimeNs, counter: o.workloadCounter });
      } catch {
        // the host is gone
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

/** Polls one host's `ftvm status` for some VMs, collecting what it says, until stopped. */
function watchStatus(host: AgentHost, vms: string[]): { said(vm: string): { phase: string; reason: string }[]; stop(): Promise<void> } {
  const said = new Map<string, Map<string, { phase: string; reason: string }>>(vms.map((vm) => [vm, new Map()]));
  let running = true;
  const loop = (async () => {
    while (running) {
      try {
        const status = await controlClient(host).status();
        for (const v of status.vms) said.get(v.name)?.set(`${v.phase}\u0000${v.reason}`, { phase: v.phase, reason: v.reason });
      } catch {
        // an answer missed is not a finding: the copies watch tells whether the VM ran
      }
      await sleep(100);
    }
  })();
  return {
    said: (vm) => [...(said.get(vm)?.values() ?? [])],
    async stop() {
      running = false;
      await loop;
    },
  };
}

/**
 * Kills every process of `killed` (as runFault does) while VMs run on both hosts: those on
 * `killed` fail over, the others keep running. Measures each, brings `killed` back, reprotects the
 * moved ones with `killed` as their backup and waits until all four are protected again.
 */
export async function runMultiKill(mc: MultiCluster, killed: AgentHost = 'primary', log: (line: string) => void = () => undefined): Promise<MultiKillRun> {
  const survivor = other(killed);
  const victims = mc.vms.filter((v) => mc.runsOn[v.name] === killed);
  const bystanders = mc.vms.filter((v) => mc.runsOn[v.name] === survivor);
  if (victims.length === 0) throw new Error(`no VM runs on ${killed}`);
  for (const v of mc.vms) await waitProtectedOn(mc.runsOn[v.name]!, v.name, { timeoutMs: 60_000 });
  const heardDeadline = performance.now() + 20_000;
  while (!(await controlClient(survivor).status()).peers.find((p) => p.name === killed)?.alive) {
    if (performance.now() > heardDeadline) throw new Error(`${survivor} does not hear ${killed}`);
    await sleep(100);
  }

  // watch every VM on both hosts from before the kill to the end of the recovery
  const copies = new Map(mc.vms.map((v) => [v.name, watchCopies({ primary: probeOn('primary', v.probePort), backup: probeOn('backup', v.probePort) })]));
  const samplers = new Map(victims.map((v) => [v.name, sampleCounter(probeOn(killed, v.probePort))]));
  let statusWatch: ReturnType<typeof watchStatus> | undefined;
  try {
    // a checkpoint of each victim committed after its counter sampling began bounds its counter
    const committedAfter = Date.now() + 200;
    await Promise.all(victims.map((v) => waitProtectedOn(killed, v.name, { timeoutMs: 60_000, committedAfter })));
    const before = new Map<string, Awaited<ReturnType<typeof clockOffset>>>();
    for (const v of mc.vms) before.set(v.name, await clockOffset(probeOn(mc.runsOn[v.name]!, v.probePort), { samples: 16 }));
    const phaseBefore = new Map<string, string>();
    for (const v of bystanders) phaseBefore.set(v.name, (await vmStatus(survivor, v.name))?.phase ?? 'absent');
    const previousMove = new Map<string, string | undefined>();
    const oldPids = new Map<string, number | undefined>();
    for (const v of victims) {
      previousMove.set(v.name, (await readRecord(v.name)).lastMove?.resumeNs);
      oldPids.set(v.name, await qemuPidOf(killed, v.name));
    }

    statusWatch = watchStatus(survivor, bystanders.map((v) => v.name));
    await killHost(killed);
    // every process of the host is dead once killHost returns: no old copy runs after this instant
    const killedNs = hostRealtimeNs();
    const killedAt = performance.now();
    log(`kill ${killed}: ${victims.map((v) => v.name).join(', ')} → ${survivor}; ${bystanders.map((v) => v.name).join(', ') || 'nothing'} stay on ${survivor}`);

    // each victim resumes on the survivor
    const moves = new Map<string, NonNullable<Awaited<ReturnType<typeof readRecord>>['lastMove']>>();
    const takeoverDeadline = performance.now() + 60_000;
    while (moves.size < victims.length) {
      for (const v of victims) {
        if (moves.has(v.name)) continue;
        const move = (await readRecord(v.name).catch(() => ({}) as Awaited<ReturnType<typeof readRecord>>)).lastMove;
        if (move && move.resumeNs !== previousMove.get(v.name) && move.to === survivor) {
          moves.set(v.name, move);
          log(`${v.name} resumed on ${survivor} ${Math.round(performance.now() - killedAt)} ms after the kill`);
        }
      }
      if (moves.size === victims.length) break;
      if (performance.now() > takeoverDeadline) {
        const missing = victims.filter((v) => !moves.has(v.name)).map((v) => v.name);
        throw new Error(`${survivor} did not take ${missing.join(', ')} over within 60 s of the kill of ${killed}\n${tail(agentLog(survivor), 6000)}`);
      }
      await sleep(50);
    }

    const failedOver: FailedOverVm[] = [];
    for (const v of victims) {
      const move = moves.get(v.name)!;
      const samples = await samplers.get(v.name)!.stop();
      const target = probeOn(survivor, v.probePort);
      const after = await clockOffset(target, { samples: 16 });
      await sleep(300);
      const later = await clockOffset(target, { samples: 1 });
      const b = before.get(v.name)!;
      const atCheckpoint = samples.filter((s) => s.hostNs < BigInt(move.stopNs));
      const counterAtCheckpointMin = atCheckpoint.at(-1)?.counter ?? 0n;
      const sameBoot = after.bootId === b.bootId;
      const oldPid = oldPids.get(v.name);
      failedOver.push({
        vm: v.name,
        from: killed,
        to: survivor,
        epoch: move.epoch,
        failoverS: move.lastBeatNs ? Math.round(Number(BigInt(move.resumeNs) - BigInt(move.lastBeatNs)) / 1e6) / 1e3 : undefined,
        offsetBeforeMs: ms(b.offsetNs),
        offsetAfterMs: ms(after.offsetNs),
        offsetMs: ms(after.offsetNs - b.offsetNs),
        probeErrorMs: ms(b.errorNs + after.errorNs),
        counterAtCheckpointMin: String(counterAtCheckpointMin),
        counterAfter: String(after.workloadCounter),
        sameBoot,
        continuityOk: sameBoot && atCheckpoint.length > 0 && after.workloadCounter >= counterAtCheckpointMin && later.workloadCounter > after.workloadCounter,
        resumeNs: move.resumeNs,
        doubles: 0,
        oldQemuAlive: oldPid !== undefined && isAlive(oldPid),
        // set below, once the copies watch has seen the whole run
        doubleActive: false,
      });
    }

    // the bystanders have lost their backup: give their agent time to say so before it returns
    const saidDeadline = performance.now() + 10_000;
    const unprotectedSaid = (vm: string) => statusWatch!.said(vm).some((s) => (s.phase === 'degraded' || s.phase === 'unprotected') && s.reason.length > 0);
    while (!bystanders.every((v) => unprotectedSaid(v.name)) && performance.now() < saidDeadline) await sleep(100);
    await statusWatch.stop();

    // the killed host returns; the moved VMs get it as their backup again
    await reviveHost(killed, mc.cluster);
    const revivedAt = Date.now();
    for (const v of victims) {
      await controlClient(survivor).reprotect(v.name, killed, () => undefined);
      mc.runsOn[v.name] = survivor;
    }
    for (const v of mc.vms) await waitProtectedOn(survivor, v.name, { timeoutMs: 60_000, committedAfter: revivedAt });
    for (const v of victims) {
      const status = await vmStatus(killed, v.name);
      if (status?.role === 'primary' || status?.domainState === 'running') throw new Error(`${killed} runs ${v.name} again after it came back: ${JSON.stringify(status)}`);
    }
    const recoveredS = Math.round(performance.now() - killedAt) / 1e3;
    log(`all ${mc.vms.length} protected on ${survivor} again ${recoveredS} s after the kill`);

    const reports = new Map<string, CopiesReport>();
    for (const [vm, watch] of copies) reports.set(vm, await watch.stop());
    for (const f of failedOver) {
      f.doubles = reports.get(f.vm)!.doubles.length;
      f.doubleActive = f.doubles > 0 || f.oldQemuAlive || BigInt(f.resumeNs) <= killedNs;
    }
    const bystanderRuns: BystanderVm[] = [];
    for (const v of bystanders) {
      const report = reports.get(v.name)!;
      const b = before.get(v.name)!;
      const after = await clockOffset(probeOn(survivor, v.probePort), { samples: 4 });
      const said = statusWatch.said(v.name);
      const sameBoot = after.bootId === b.bootId;
      bystanderRuns.push({
        vm: v.name,
        host: survivor,
        phaseBefore: phaseBefore.get(v.name)!,
        said,
        saidUnprotected: unprotectedSaid(v.name),
        probeRounds: report.rounds,
        silentRounds: report.silentRounds,
        longestSilenceMs: Math.round(report.longestSilenceMs),
        answeredFrom: report.answeredFrom,
        sameBoot,
        counterBefore: String(b.workloadCounter),
        counterAfter: String(after.workloadCounter),
        keptRunning: sameBoot && after.workloadCounter > b.workloadCounter && report.doubles.length === 0 && report.answeredFrom.join() === survivor,
      });
    }
    return { killed, survivor, failedOver, bystanders: bystanderRuns, recoveredS };
  } finally {
    for (const s of samplers.values()) await s.stop();
    for (const w of copies.values()) await w.stop();
    await statusWatch?.stop();
  }
}

/** Planned switchover of every VM that is away from its home host back there (protected again). */
export async function sendHome(mc: MultiCluster): Promise<void> {
  for (const v of mc.vms) {
    const on = mc.runsOn[v.name]!;
    if (on === v.home) continue;
    const at = Date.now();
    await controlClient(on).switchover(v.name, () => undefined);
    mc.runsOn[v.name] = v.home;
    await waitProtectedOn(v.home, v.name, { timeoutMs: 60_000, committedAfter: at });
  }
}
