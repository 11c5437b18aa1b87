import { DriftLedger, type HostClockOffset } from '@ftvm/kvmclock';
import type { LibvirtConnection } from '@ftvm/libvirt';
import type { QmpClient } from '@ftvm/qmp';
import type { AgentConfig } from '../config/agent-config.js';
import type { HeartbeatService } from '../heartbeat/index.js';
import type { HostLease } from '../lease/index.js';
import { compensates } from './backup-side.js';
import { mayResume } from './decide.js';
import { fenceLocal, fenceRemote } from './fence.js';
import { sshEndpointOf } from './ssh-pool.js';
import type { CompletedRestore, StagedRestore } from './staged-restore.js';
import type { MetricsSink } from './types.js';
import type { VmRecord } from './vm-records.js';
import type { VmSlot } from './vm-slot.js';

/** What a take-over uses of the agent. */
export interface TakeOverContext {
  config: AgentConfig;
  lease: HostLease;
  heartbeat: HeartbeatService;
  conn: LibvirtConnection;
  metrics: MetricsSink;
  stage(slot: VmSlot, kind: 'failover' | 'switchover'): Promise<StagedRestore | undefined>;
  newestEpoch(slot: VmSlot): Promise<number | undefined>;
  /** The record as etcd has it now (not as the watch last delivered it). */
  record(vm: string): Promise<VmRecord | undefined>;
  runningHere(vm: string): Promise<boolean>;
  finishMove(slot: VmSlot): Promise<void>;
  becomePrimary(slot: VmSlot, handover: { qmp: QmpClient; ledger: DriftLedger }): Promise<void>;
}

const nsToMs = (ns: bigint) => Number(ns) / 1e6;

/**
 * Claims the key and resumes the VM here from the newest committed checkpoint. Before the resume
 * everything is undone on failure (staged domain removed, key released); the resume is the point
 * of no return: after it the VM is never killed for a later failure, which is logged, retried
 * and shown in the status until it holds.
 */
export async function takeOver(ctx: TakeOverContext, slot: VmSlot, kind: 'failover' | 'switchover'): Promise<void> {
  const record = slot.record!;
  const self = ctx.config.host;
  const from = record.primary === self ? record.backup : record.primary;
  const lastBeat = ctx.heartbeat.peer(from)?.lastBeatAt;
  const lastBeatAt = Math.max(lastBeat?.udp ?? 0, lastBeat?.ssh ?? 0);
  const started = performance.now();
  let staged = slot.staged ?? (await ctx.stage(slot, kind));
  slot.staged = undefined;
  if (!staged) return;
  if (!(await ctx.lease.claim(slot.name))) {
    slot.log.info('another host took the VM first');
    await staged.abort('owner key taken');
    return;
  }
  slot.owner = self;
  slot.log.warn({ kind, from, epoch: staged.epoch }, 'owner key acquired: taking over');
  let done: CompletedRestore | undefined;
  try {
    // Fence the old primary through libvirt over SSH when it still answers (bounded); its lease
    // already stopped it if it is cut off.
    const fence = kind === 'failover' ? fenceRemote(sshEndpointOf(ctx.config, from), slot.name, ctx.config.hosts[from]!.libvirtUri, ctx.config.failover.fenceTimeoutMs) : Promise.resolve({ outcome: 'skipped', detail: 'switchover' });
    await staged.ready;
    for (;;) {
      // read afresh: an unprotect or a lost backup written a moment ago must stop this resume (a
      // record etcd cannot give now, or one that does not parse, leaves the watched one to judge)
      const current = await ctx.record(slot.name).catch((error: Error) => {
        slot.log.warn({ err: error.message }, 'the record cannot be read afresh before the resume: judging by the watched one');
        return slot.record;
      });
      if (current) slot.record = current;
      const gate = mayResume({ self, record: current, owner: await ctx.lease.owner(slot.name), leaseHeld: ctx.lease.state === 'held', stagedEpoch: staged.epoch, newestEpoch: await ctx.newestEpoch(slot) });
      if (gate.resume) break;
      if (!gate.restage) throw new Error(gate.reason);
      slot.log.warn({ staged: staged.epoch, reason: gate.reason }, 'restaging');
      await staged.abort(gate.reason);
      const again = await ctx.stage(slot, kind);
      if (!again) throw new Error('no checkpoint to restage');
      staged = again;
      await staged.ready;
    }
    const fenced = await fence;
    slot.log.info({ fence: fenced.outcome, detail: fenced.detail }, 'old primary fenced');
    done = await staged.complete(staged.mapped ? ctx.config.failover.mappedResumeMarginMs : ctx.config.failover.resumeMarginMs);
  } catch (error) {
    if (await ctx.runningHere(slot.name).catch(() => false)) {
      // past the point of no return after all (the resume happened, a later step failed)
      slot.log.error({ err: (error as Error).message }, 'the take-over failed after the VM resumed: keeping it');
      slot.unfinishedMove = movePatch(self, kind, from, staged.epoch);
      return;
    }
    const message = (error as Error).message;
    slot.takeOverFailures = { count: (slot.takeOverFailures?.count ?? 0) + 1, last: message };
    slot.log.error({ err: message, failures: slot.takeOverFailures.count }, 'take-over failed before the resume: undone');
    await staged.abort('take-over failed').catch(() => undefined);
    await fenceLocal(ctx.conn, slot.name);
    slot.running = false;
    await ctx.lease.release(slot.name).catch(() => undefined);
    slot.owner = undefined;
    return;
  }

  // ---- point of no return: the VM runs here ----
  slot.running = true;
  slot.takeOverFailures = undefined;
  const resumeMs = nsToMs(done.resume.resumeNs);
  for (const warning of done.restore.warnings) slot.log.warn({ warning }, 'the restored VM runs, but a step after its resume failed');
  const lastBeatWall = lastBeatAt ? Date.now() - (performance.now() - lastBeatAt) : undefined;
  slot.log.warn(
    {
      kind,
      epoch: done.epoch,
      deltaMs: nsToMs(done.deltaNs),
      resumeLateMs: nsToMs(done.resume.lateNs),
      ...(done.loadSlackNs !== undefined ? { loadSlackMs: nsToMs(done.loadSlackNs), mapped: done.mapped } : {}),
      firstStepMs: nsToMs(done.firstStepNs),
      ...(done.clockSteps
        ? { inPlaceSteps: done.clockSteps.steps.length, restMs: nsToMs(done.clockSteps.restNs), uncorrectedMs: nsToMs(done.clockSteps.uncorrectedNs) }
        : {}),
      lastBeatToResumeMs: lastBeatWall ? Math.round(resumeMs - lastBeatWall) : undefined,
      restoreMs: Math.round(performance.now() - started),
      ...(done.hostOffset ? { hostOffset: hostOffsetFields(done.hostOffset) } : {}),
    },
    'VM resumed from its last committed checkpoint',
  );
  ctx.metrics.failover(slot.name, kind, lastBeatWall ? (resumeMs - lastBeatWall) / 1000 : (performance.now() - started) / 1000);
  const ledger = new DriftLedger(slot.name);
  // the outage on this host's clock: the old primary's stop converted with the measured offset
  // (a stop after the resume means the hosts disagree by more than the outage: counted as none)
  const stopHereNs = done.stopHereNs <= done.resume.resumeNs ? done.stopHereNs : done.resume.resumeNs;
  const entry = ledger.recordPause(kind === 'failover' ? 'failover' : 'migration', stopHereNs, done.resume.resumeNs);
  if (done.hostOffset) ledger.recordHostOffset(done.hostOffset, entry);
  if (compensates(slot, kind)) ledger.recordCorrection({ actuator: 'stream-rewrite', appliedNs: done.firstStepNs }, entry);
  else ledger.recordUncorrected('not-in-policy', entry, { detail: `the clock policy does not compensate ${kind === 'failover' ? 'failover' : 'migration'}` });
  for (const step of done.clockSteps?.steps ?? []) {
    // each correcting stop/cont: its own pause and its step, both given back in place
    const fix = ledger.recordPause('failover', step.resumeNs - step.pauseNs, step.resumeNs);
    ledger.recordCorrection({ actuator: 'inplace', appliedNs: step.appliedNs, frozenNs: step.pauseNs }, fix);
  }
  if (done.clockSteps && done.clockSteps.uncorrectedNs > 0n && done.clockSteps.restNs > 0n) {
    ledger.recordUncorrected('clocksource-limit', entry, { detail: done.clockSteps.detail ?? 'not given back in place' });
  }
  const lastBeatNs = lastBeatWall !== undefined ? String(BigInt(Math.round(lastBeatWall * 1e3)) * 1000n) : undefined;
  slot.unfinishedMove = movePatch(self, kind, from, done.epoch, { stopNs: String(stopHereNs), resumeNs: String(done.resume.resumeNs), ...(lastBeatNs ? { lastBeatNs } : {}) });
  // the record first: it names this host primary (and, after a failover, unprotected) before the
  // checkpoint loop starts, so the new primary never checkpoints into its own store
  await ctx.finishMove(slot).catch((error: Error) => slot.log.error({ err: error.message }, 'cannot record the move yet (retried)'));
  await ctx.becomePrimary(slot, { qmp: done.restore.qmp, ledger }).catch(async (error: Error) => {
    slot.log.error({ err: error.message }, 'the resumed VM runs, but its watch and checkpoints cannot start yet (retried)');
    await done.restore.qmp.close().catch(() => undefined);
  });
}

/** A ledger's HostClockOffset for the log (JSON has no bigint): ms. */
function hostOffsetFields(offset: HostClockOffset): Record<string, unknown> {
  return {
    peer: offset.peer,
    applied: offset.applied,
    ...(offset.offsetNs !== undefined ? { offsetMs: nsToMs(offset.offsetNs) } : {}),
    ...(offset.errorNs !== undefined ? { errorMs: nsToMs(offset.errorNs) } : {}),
    ...(offset.ageMs !== undefined ? { ageMs: offset.ageMs } : {}),
    ...(offset.detail ? { detail: offset.detail } : {}),
  };
}

export function movePatch(self: string, kind: 'failover' | 'switchover', from: string, epoch: number, times: { stopNs?: string; resumeNs?: string; lastBeatNs?: string } = {}): Partial<VmRecord> {
  return {
    primary: self,
    backup: from,
    protected: kind === 'switchover',
    // the other host's store holds this VM's past: only checkpoints taken from here on count
    checkpointsSince: Date.now(),
    reason: kind,
    lastMove: { kind, from, to: self, epoch, stopNs: times.stopNs ?? '0', resumeNs: times.resumeNs ?? '0', at: new Date().toISOString(), ...(times.lastBeatNs ? { lastBeatNs: times.lastBeatNs } : {}) },
  };
}
