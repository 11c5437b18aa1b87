/**
 * The agent's decisions, as data. One call looks at a snapshot of everything this host knows of
 * one VM (the cluster's record, who holds the owner key, this host's lease, the peer's heartbeat,
 * the local QEMU, a staged restore, the newest committed checkpoint) and returns the one thing to
 * do next, with the reason. The agent executes the action and asks again, until the answer is to
 * do nothing. No I/O here: every row of the table is a unit test (decide.unit.test.ts).
 *
 * The rules it keeps:
 * - a copy of the VM may run only on the host whose lease holds the VM's owner key;
 * - a host gives its key up only once nothing of the VM runs there;
 * - a VM its user stopped (guest poweroff, `virsh shutdown`, `virsh destroy`) stays down;
 * - the backup takes the key only when the primary is gone (no heartbeat, or it says it no longer
 *   runs the VM) or has handed the VM over (switchover), and only from a verified checkpoint;
 * - never while it is bound by a failsafe confirmation it gave (failsafe.ts), which lets a primary
 *   run on without its lease while etcd is away.
 */

/** What this host shows for one VM (`ftvm status`). */
export type Phase =
  /** primary: checkpoints reach the backup; backup: warm standby fed by the primary */
  | 'protected'
  /** protected, but the backup is not reachable or its checkpoints fail */
  | 'degraded'
  /** runs without a backup (after a failover, `unprotect`, or an agent stop that could not hand it over) */
  | 'unprotected'
  /** the user stopped the VM: it stays down on both hosts */
  | 'stopped'
  /** this host loads the newest checkpoint while the primary's lease runs out */
  | 'staging'
  | 'failing-over'
  | 'switching-over'
  /** primary: etcd is unreachable, the VM runs on because its backup confirms it will not take over (failsafe.ts) */
  | 'failsafe'
  /** this host stopped its copy for good (failed VM, lease trouble) */
  | 'fenced'
  /** waiting for something outside this host (no checkpoint yet, a third host owns the key, …) */
  | 'waiting'
  | 'starting';

export interface RecordView {
  primary: string;
  backup: string;
  protected: boolean;
  /** why the record last changed (protect, failover, switchover, reprotect, …) */
  reason: string;
  /** the user stopped the VM (set by the host that saw it stop) */
  stopped?: { by: string; reason: string } | undefined;
  /** an agent stop (or a lost backup, with output commit) left the VM running on `by` without protection */
  suspended?: { by: string; why?: 'agent-stop' | 'backup-lost' | undefined } | undefined;
  /** the guest's output is held until its checkpoint is committed */
  outputCommit?: boolean | undefined;
}

export interface VmSnapshot {
  self: string;
  /** the agent is stopping: decide nothing */
  closing: boolean;
  record: RecordView | undefined;
  /** host whose lease holds the owner key (undefined: nobody) */
  owner: string | undefined;
  /** this host's lease is current (a host without one claims nothing) */
  leaseHeld: boolean;
  /**
   * the record's other host, as its heartbeats tell (downForMs: since its last beat, or since this
   * agent started; unheard: this agent started less than a heartbeat timeout ago and has not heard
   * it yet — not "gone")
   */
  peer: { name: string; alive: boolean; runsVm: boolean; downForMs?: number; unheard?: boolean } | undefined;
  local: {
    /** the domain runs here (libvirt); undefined when libvirt cannot be asked */
    running: boolean | undefined;
    /** this agent checkpoints and watches the local copy (PrimaryVm) */
    primaryActive: boolean;
    /** this host fenced its copy (failure or lease trouble) and must not run it again by itself */
    fenced: boolean;
    /** the local copy failed (QMP gone without a shutdown, hung, crashed) and is not fenced yet */
    failed?: string | undefined;
    /** the user stopped the local copy (QEMU reported a shutdown it was asked for) */
    stoppedByUser?: string | undefined;
    /** primary: the running domain's devices differ from the record's XML (hot-plug, unplug) */
    devicesChanged?: boolean;
    /** a take-over resumed the VM here but the record does not say so yet */
    unfinishedMove?: boolean;
    /** take-overs that failed before the resume, in a row (a refused checkpoint, a libvirt error) */
    takeOverFailures?: { count: number; last: string } | undefined;
    /** backup: this host confirmed the primary's failsafe and is bound not to take the VM over for this long */
    noTakeOverForMs?: number;
  };
  /** a restore staged on this host (paused, RAM loading) */
  staged: { epoch: number } | undefined;
  /** a warm standby: `stale` when it was defined from an older domain XML than the record's */
  standby: 'none' | 'present' | 'stale';
  /** backup of a VM with replicated disks: the primary's seed has filled this host's replicas (undefined: no such disks) */
  disksSeeded?: boolean;
  /** newest committed checkpoint here that is not known to be corrupt */
  newestEpoch: number | undefined;
  /** primary only: consecutive failed checkpoints */
  checkpointFailures: number;
}

interface Base {
  phase: Phase;
  reason: string;
}
export type Action =
  | (Base & { do: 'none' })
  /** nothing to do now, but look again soon: a take-over may become possible */
  | (Base & { do: 'wait'; recheckMs: number })
  | (Base & { do: 'run-primary' })
  | (Base & { do: 'stop-primary' })
  | (Base & { do: 'claim' })
  | (Base & { do: 'release' })
  | (Base & { do: 'fence-local' })
  | (Base & { do: 'keep-standby' })
  | (Base & { do: 'drop-standby' })
  | (Base & { do: 'stage' })
  | (Base & { do: 'abort-staged' })
  | (Base & { do: 'take-over'; kind: 'failover' | 'switchover' })
  /** devices changed on the running VM: the record's domain XML follows (the backup rebuilds its standby) */
  | (Base & { do: 'update-xml' })
  /** the VM resumed here after a take-over: write the move into the record (retried until it holds) */
  | (Base & { do: 'finish-move' })
  /** write the user's stop into the record (before the key is given up) */
  | (Base & { do: 'record-stop'; stopReason: string })
  /** the VM runs here again (user start, agent back, backup back): clear the stop or suspension, protect again */
  | (Base & { do: 'resume-protection' })
  /** the backup is lost and output commit would block the VM: run on unprotected, release the output */
  | (Base & { do: 'suspend-protection' });

export type ActionKind = Action['do'];

/**
 * With output commit on, a backup silent this long is taken as lost: the primary records its VM
 * unprotected (no take-over can happen from then on) and lets the held output go, rather than
 * block the VM's network until the backup returns. Long enough that a blip (heartbeat timeout
 * 500 ms by default) does not end protection.
 */
export const BACKUP_LOST_AFTER_MS = 5_000;

/** Checkpoint failures in a row after which a protected primary says degraded. */
export const DEGRADED_AFTER_FAILURES = 3;
/** How often a backup that may take over looks again while the primary's lease runs out. */
export const TAKE_OVER_POLL_MS = 20;
/** Take-overs that failed before the resume after which this host stands down and says why. */
export const MAX_TAKE_OVER_FAILURES = 3;

const act = <K extends ActionKind>(kind: K, phase: Phase, reason: string, extra?: Omit<Extract<Action, { do: K }>, 'do' | 'phase' | 'reason'>): Action =>
  ({ do: kind, phase, reason, ...extra }) as Action;

/** The one thing to do next for this VM, and why. */
export function decide(s: VmSnapshot): Action {
  if (s.closing) return act('none', 'starting', 'the agent is stopping');
  const r = s.record;
  const self = s.self;
  const running = s.local.running === true;

  if (!r || (r.primary !== self && r.backup !== self)) {
    const why = r ? `hosts are ${r.primary} and ${r.backup}` : 'no record';
    if (s.local.primaryActive) return act('stop-primary', 'unprotected', `not a host of this VM any more (${why}): stop checkpointing, leave the domain as it is`);
    if (s.owner === self) return act('release', 'unprotected', `not a host of this VM any more (${why})`);
    if (s.staged) return act('abort-staged', 'unprotected', `not a host of this VM any more (${why})`);
    if (s.standby !== 'none') return act('drop-standby', 'unprotected', `not a host of this VM any more (${why})`);
    return act('none', 'unprotected', `not a host of this VM (${why})`);
  }
  const other = r.primary === self ? r.backup : r.primary;

  // The user stopped the copy here: say so in the record while this host still holds the key, so
  // the backup never reads the stop as a failure.
  if (s.local.stoppedByUser !== undefined && s.owner === self && !r.stopped) {
    return act('record-stop', 'stopped', `the user stopped the VM here (${s.local.stoppedByUser})`, { stopReason: s.local.stoppedByUser });
  }
  if (s.local.failed !== undefined && !s.local.fenced && (running || s.local.primaryActive)) {
    return act('fence-local', 'fenced', `the VM failed here (${s.local.failed}): stop it for good before the key goes to ${other}`);
  }

  if (r.stopped) {
    const why = `stopped by the user (${r.stopped.reason}, seen on ${r.stopped.by})`;
    if (s.staged) return act('abort-staged', 'stopped', `${why}: no take-over`);
    if (s.standby !== 'none') return act('drop-standby', 'stopped', `${why}: no standby`);
    if (running && r.primary === self && s.owner === self) return act('resume-protection', 'unprotected', 'started again on its primary after the user stopped it');
    if (running && r.primary === self && s.owner === undefined && s.leaseHeld) return act('claim', 'unprotected', 'started again on its primary after the user stopped it');
    if (s.local.primaryActive && !running) return act('stop-primary', 'stopped', why);
    if (s.owner === self && !running) return act('release', 'stopped', `${why}: nothing runs here`);
    if (running && s.owner !== self) return act('fence-local', 'stopped', `${why}, yet a copy runs here without the owner key`);
    return act('none', 'stopped', why);
  }

  if (s.owner === self) {
    if (s.staged) return act('abort-staged', 'waiting', 'this host holds the key outside a take-over: a staged restore is stale');
    if (s.standby !== 'none') return act('drop-standby', 'waiting', 'this host owns the VM: no standby here');
    if (s.local.running === undefined) return act('wait', 'waiting', 'libvirt cannot be asked whether the VM runs here', { recheckMs: 1_000 });
    if (running && s.local.unfinishedMove) return act('finish-move', 'degraded', 'the VM resumed here: the record must say so before checkpoints start');
    if (!running) {
      if (s.local.primaryActive) return act('stop-primary', 'waiting', 'this host owns the VM but its copy is gone');
      return act('release', 'waiting', `this host owns the VM but does not run it: the key goes back for ${other}`);
    }
    if (!s.local.primaryActive) return act('run-primary', primaryPhase(s, r), 'this host owns the VM and runs it');
    if (r.suspended?.by === self && r.suspended.why === 'backup-lost') {
      if (s.peer?.alive) return act('resume-protection', 'protected', `backup ${other} answers again: protection resumes`);
      return act('none', 'unprotected', `backup ${other} lost: runs unprotected, output not held, until it answers again`);
    }
    if (r.suspended?.by === self) return act('resume-protection', 'protected', 'the agent is back: protection resumes');
    if (protectedNow(r) && r.outputCommit && s.peer && !s.peer.alive && (s.peer.downForMs ?? 0) >= BACKUP_LOST_AFTER_MS) {
      return act('suspend-protection', 'unprotected', `backup ${other} silent for more than ${BACKUP_LOST_AFTER_MS / 1000} s with output commit on: run unprotected rather than hold the VM's output`);
    }
    if (s.local.devicesChanged) return act('update-xml', primaryPhase(s, r), 'devices changed on the running VM: the record takes its domain XML, the backup rebuilds its standby');
    return act('none', primaryPhase(s, r), primaryReason(s, r));
  }

  if (s.owner !== undefined) {
    if (s.local.primaryActive) return act('stop-primary', 'waiting', `${s.owner} owns the VM: stop checkpointing here`);
    if (running) return act('fence-local', 'fenced', `a copy runs here while ${s.owner} owns the VM`);
    if (s.owner !== r.primary && s.owner !== r.backup) {
      if (s.staged) return act('abort-staged', 'waiting', `the owner key is held by ${s.owner}, not a host of this VM`);
      return act('none', 'waiting', `the owner key is held by ${s.owner}, which is not a host of this VM (${r.primary}, ${r.backup}): not touching it`);
    }
    if (s.staged) {
      if (s.peer?.alive) return act('abort-staged', backupPhase(r, self), `${s.owner} still owns the VM and answers heartbeats`);
      if (s.newestEpoch !== undefined && s.newestEpoch > s.staged.epoch) return act('abort-staged', 'staging', `checkpoint ${s.newestEpoch} was committed after ${s.staged.epoch} was staged`);
      return act('wait', 'staging', `${s.owner} is silent: checkpoint ${s.staged.epoch} staged while its lease runs out`, { recheckMs: TAKE_OVER_POLL_MS });
    }
    if (r.backup === self && protectedNow(r) && s.owner === r.primary && s.peer && !s.peer.alive && s.newestEpoch !== undefined) {
      return act('stage', 'staging', `${s.owner} is silent: load checkpoint ${s.newestEpoch} while its lease runs out`);
    }
    if (r.backup === self && protectedNow(r)) {
      if (s.standby === 'stale') return act('drop-standby', 'protected', `the record's domain XML changed (a device added or removed on ${s.owner}): rebuild the standby`);
      if (s.standby === 'none' && s.disksSeeded === false) return act('none', 'protected', `backup of ${s.owner}: its disks are not seeded here yet, no standby before they are`);
      if (s.standby === 'none') return act('keep-standby', 'protected', `backup of ${s.owner}: keep a warm standby`);
      return act('none', 'protected', `backup of ${s.owner}, warm standby ready`);
    }
    if (r.primary === self && r.reason === 'switchover' && s.owner === r.backup) {
      return act('none', 'switching-over', `${s.owner} hands the VM over: waiting for its last checkpoint (the standby stays warm)`);
    }
    if (s.standby !== 'none') return act('drop-standby', 'unprotected', 'not protected: no standby');
    return act('none', r.backup === self ? 'unprotected' : 'waiting', r.backup === self ? 'not protected (no checkpoints to this host)' : `${s.owner} runs the VM`);
  }

  // Nobody holds the key.
  if (!s.leaseHeld) return act('wait', 'waiting', 'this host has no current lease: it claims nothing', { recheckMs: 250 });
  if (running) {
    if (r.primary === self && !s.local.fenced) return act('claim', 'waiting', 'the VM runs here and nobody owns it');
    return act('fence-local', 'fenced', r.primary === self ? 'this host fenced its copy: it does not take the key back by itself' : 'a copy runs here that nobody owns and this host is not its primary');
  }
  if (s.local.primaryActive) return act('stop-primary', 'waiting', 'nobody owns the VM and it does not run here');
  const switchover = r.primary === self && r.reason === 'switchover';
  if (!protectedNow(r)) {
    if (s.staged) return act('abort-staged', 'unprotected', 'not protected: no take-over');
    return act('none', r.primary === self ? 'waiting' : 'unprotected', r.suspended ? `protection suspended by ${r.suspended.by}'s agent stop` : 'not protected: nobody takes it over');
  }
  if (r.backup !== self && !switchover) {
    return act('none', 'waiting', `nobody owns the VM and it does not run here; ${other} is its backup`);
  }
  if (s.peer?.alive && s.peer.runsVm) return act('wait', 'waiting', `${other} says it still runs the VM`, { recheckMs: TAKE_OVER_POLL_MS });
  if (s.peer?.unheard) return act('wait', 'waiting', `this agent has just started: listening for ${other}'s heartbeats before deciding it is gone`, { recheckMs: 100 });
  const bound = s.local.noTakeOverForMs ?? 0;
  if (bound > 0) {
    return act('wait', 'waiting', `this host confirmed ${other}'s failsafe while etcd was away: no take-over for ${Math.ceil(bound)} ms more`, { recheckMs: Math.min(Math.ceil(bound), 250) });
  }
  if (s.staged && s.newestEpoch !== undefined && s.newestEpoch > s.staged.epoch) {
    return act('abort-staged', 'staging', `checkpoint ${s.newestEpoch} was committed after ${s.staged.epoch} was staged`);
  }
  if (!s.staged && s.newestEpoch === undefined) return act('wait', 'waiting', 'no committed checkpoint yet: nothing to take over from', { recheckMs: 500 });
  const failures = s.local.takeOverFailures;
  if (failures && failures.count >= MAX_TAKE_OVER_FAILURES) {
    return act('none', 'waiting', `take-over failed ${failures.count} times (last: ${failures.last}): standing down; the VM runs nowhere until an operator acts`);
  }
  const kind = switchover ? 'switchover' : 'failover';
  return act('take-over', kind === 'switchover' ? 'switching-over' : 'failing-over', switchover ? `${other} handed the VM over` : `${other} is gone (${s.peer?.alive ? 'says it no longer runs the VM' : 'no heartbeat'}) and nobody owns the VM`, { kind });
}

export interface TakeOverGate {
  self: string;
  record: RecordView | undefined;
  owner: string | undefined;
  leaseHeld: boolean;
  stagedEpoch: number;
  newestEpoch: number | undefined;
}

/**
 * The last look before the point of no return (the resume of the restored VM). Until then a
 * take-over is undone cleanly; after it the VM is never killed for a later failure.
 */
export function mayResume(g: TakeOverGate): { resume: true } | { resume: false; restage: boolean; reason: string } {
  if (!g.leaseHeld) return { resume: false, restage: false, reason: 'this host lost its lease before the resume' };
  if (g.owner !== g.self) return { resume: false, restage: false, reason: g.owner ? `${g.owner} holds the owner key` : 'the owner key is gone' };
  if (!g.record || (g.record.primary !== g.self && g.record.backup !== g.self)) return { resume: false, restage: false, reason: 'no longer a host of this VM' };
  if (g.record.stopped) return { resume: false, restage: false, reason: `the user stopped the VM (${g.record.stopped.reason})` };
  // unprotected meanwhile (unprotect, a lost backup): the primary may already have let go of output
  if (!protectedNow(g.record)) return { resume: false, restage: false, reason: `the VM is no longer protected (${g.record.reason})` };
  if (g.newestEpoch !== undefined && g.newestEpoch > g.stagedEpoch) return { resume: false, restage: true, reason: `checkpoint ${g.newestEpoch} was committed after ${g.stagedEpoch} was staged` };
  return { resume: true };
}

function protectedNow(r: RecordView): boolean {
  return r.protected && !r.suspended && !r.stopped;
}

function backupPhase(r: RecordView, self: string): Phase {
  return r.backup === self && protectedNow(r) ? 'protected' : 'unprotected';
}

function primaryPhase(s: VmSnapshot, r: RecordView): Phase {
  if (!r.protected) return 'unprotected';
  if (s.peer && !s.peer.alive) return 'degraded';
  if (s.checkpointFailures >= DEGRADED_AFTER_FAILURES) return 'degraded';
  return 'protected';
}

function primaryReason(s: VmSnapshot, r: RecordView): string {
  if (!r.protected) return `runs here without a backup (${r.reason})`;
  if (s.peer && !s.peer.alive) return `backup ${r.backup} answers no heartbeats`;
  if (s.checkpointFailures >= DEGRADED_AFTER_FAILURES) return `the last ${s.checkpointFailures} checkpoints to ${r.backup} failed`;
  return `checkpointed into ${r.backup}`;
}
