import { describe, expect, it } from 'vitest';
import { decide, mayResume, type ActionKind, type Phase, type TakeOverGate, type VmSnapshot } from '../src/agent/decide.js';

/** A protected VM seen from its backup `b` while `a` runs it and holds the key. */
const backupView = (): VmSnapshot => ({
  self: 'b',
  closing: false,
  record: { primary: 'a', backup: 'b', protected: true, reason: 'protect' },
  owner: 'a',
  leaseHeld: true,
  peer: { name: 'a', alive: true, runsVm: true },
  local: { running: false, primaryActive: false, fenced: false },
  staged: undefined,
  standby: 'present',
  newestEpoch: 100,
  checkpointFailures: 0,
});

/** The same VM seen from its primary `a`. */
const primaryView = (): VmSnapshot => ({
  ...backupView(),
  self: 'a',
  peer: { name: 'b', alive: true, runsVm: false },
  local: { running: true, primaryActive: true, fenced: false },
  standby: 'none',
  newestEpoch: undefined,
});

type Patch = Partial<Omit<VmSnapshot, 'local' | 'record'>> & { local?: Partial<VmSnapshot['local']>; record?: Partial<NonNullable<VmSnapshot['record']>> | null };
const view = (base: () => VmSnapshot, patch: Patch): VmSnapshot => {
  const b = base();
  const { local, record, ...rest } = patch;
  return { ...b, ...rest, local: { ...b.local, ...local }, record: record === null ? undefined : { ...b.record!, ...record } };
};

// [situation, snapshot, expected action, expected phase]
const rows: [string, VmSnapshot, ActionKind, Phase][] = [
  // ---- the primary ----
  ['primary, steady, backup alive', view(primaryView, {}), 'none', 'protected'],
  ['primary, backup silent', view(primaryView, { peer: { name: 'b', alive: false, runsVm: false } }), 'none', 'degraded'],
  ['primary, backup refuses checkpoints (3 in a row)', view(primaryView, { checkpointFailures: 3 }), 'none', 'degraded'],
  ['primary, two failed checkpoints are not yet degraded', view(primaryView, { checkpointFailures: 2 }), 'none', 'protected'],
  ['primary after a failover: runs unprotected', view(primaryView, { record: { protected: false, reason: 'failover' } }), 'none', 'unprotected'],
  ['primary owns and runs it, not yet checkpointing', view(primaryView, { local: { primaryActive: false } }), 'run-primary', 'protected'],
  ['primary owns it but its copy is gone', view(primaryView, { local: { running: false, primaryActive: false } }), 'release', 'waiting'],
  ['primary owns it, copy gone, loops still on', view(primaryView, { local: { running: false } }), 'stop-primary', 'waiting'],
  ['primary, libvirt cannot be asked', view(primaryView, { local: { running: undefined } }), 'wait', 'waiting'],
  ['primary agent restarted: runs it, nobody owns it', view(primaryView, { owner: undefined, local: { primaryActive: false } }), 'claim', 'waiting'],
  ['primary agent restarted without a lease yet', view(primaryView, { owner: undefined, leaseHeld: false, local: { primaryActive: false } }), 'wait', 'waiting'],
  ['primary back from an agent stop that suspended protection', view(primaryView, { record: { protected: false, suspended: { by: 'a' }, reason: 'agent-stop' } }), 'resume-protection', 'protected'],
  ['output commit, backup silent a moment: held, degraded', view(primaryView, { record: { outputCommit: true }, peer: { name: 'b', alive: false, runsVm: false, downForMs: 2_000 } }), 'none', 'degraded'],
  ['output commit, backup silent past the limit: run unprotected', view(primaryView, { record: { outputCommit: true }, peer: { name: 'b', alive: false, runsVm: false, downForMs: 5_000 } }), 'suspend-protection', 'unprotected'],
  ['no output commit, backup silent long: nothing blocks, degraded', view(primaryView, { peer: { name: 'b', alive: false, runsVm: false, downForMs: 60_000 } }), 'none', 'degraded'],
  ['backup lost, still silent: stays unprotected', view(primaryView, { record: { outputCommit: true, protected: false, suspended: { by: 'a', why: 'backup-lost' }, reason: 'backup-lost' }, peer: { name: 'b', alive: false, runsVm: false, downForMs: 60_000 } }), 'none', 'unprotected'],
  ['backup lost, answers again: protect again', view(primaryView, { record: { outputCommit: true, protected: false, suspended: { by: 'a', why: 'backup-lost' }, reason: 'backup-lost' } }), 'resume-protection', 'protected'],
  ['backup of a VM whose primary lost it: no take-over', view(backupView, { owner: undefined, peer: { name: 'a', alive: false, runsVm: false }, record: { outputCommit: true, protected: false, suspended: { by: 'a', why: 'backup-lost' }, reason: 'backup-lost' } }), 'none', 'unprotected'],
  ['primary fenced its copy: never claims it back by itself', view(primaryView, { owner: undefined, local: { primaryActive: false, fenced: true } }), 'fence-local', 'fenced'],
  ['primary QEMU crashed (QMP gone, no shutdown)', view(primaryView, { local: { failed: 'QMP connection closed' } }), 'fence-local', 'fenced'],
  ['primary after fencing the crashed copy: gives the key up', view(primaryView, { local: { running: false, primaryActive: false, fenced: true, failed: 'QMP connection closed' } }), 'release', 'waiting'],
  ['guest poweroff seen here, key still held: record it first', view(primaryView, { local: { running: false, primaryActive: false, stoppedByUser: 'guest-shutdown' } }), 'record-stop', 'stopped'],
  ['user stop recorded: give the key up', view(primaryView, { record: { stopped: { by: 'a', reason: 'guest-shutdown' } }, local: { running: false, primaryActive: false, stoppedByUser: 'guest-shutdown' } }), 'release', 'stopped'],
  ['user stop recorded, key given up: stays down', view(primaryView, { owner: undefined, record: { stopped: { by: 'a', reason: 'host-signal' } }, local: { running: false, primaryActive: false } }), 'none', 'stopped'],
  ['user started it again on its primary', view(primaryView, { owner: undefined, record: { stopped: { by: 'a', reason: 'host-signal' } }, local: { primaryActive: false } }), 'claim', 'unprotected'],
  ['user started it again, key claimed: protect again', view(primaryView, { record: { stopped: { by: 'a', reason: 'host-signal' } }, local: { primaryActive: false } }), 'resume-protection', 'unprotected'],
  ['another host owns it: stop checkpointing', view(primaryView, { owner: 'b' }), 'stop-primary', 'waiting'],
  ['another host owns it and a copy runs here: fence', view(primaryView, { owner: 'b', local: { primaryActive: false } }), 'fence-local', 'fenced'],
  ['no longer a host of the VM', view(primaryView, { record: { primary: 'c', backup: 'b' }, owner: 'c' }), 'stop-primary', 'unprotected'],
  ['record deleted, key still ours', view(primaryView, { record: null, local: { primaryActive: false } }), 'release', 'unprotected'],
  // ---- the backup ----
  ['backup, steady, standby ready', view(backupView, {}), 'none', 'protected'],
  ['backup without a standby yet', view(backupView, { standby: 'none' }), 'keep-standby', 'protected'],
  ['backup without a standby, its disks seeded', view(backupView, { standby: 'none', disksSeeded: true }), 'keep-standby', 'protected'],
  ['backup without a standby: the primary has not seeded its disks here yet', view(backupView, { standby: 'none', disksSeeded: false }), 'none', 'protected'],
  ['backup: the domain XML in the record changed (hot-plug on the primary)', view(backupView, { standby: 'stale' }), 'drop-standby', 'protected'],
  ['backup of an unprotected VM drops its standby', view(backupView, { record: { protected: false, reason: 'unprotect' } }), 'drop-standby', 'unprotected'],
  ['backup: primary silent, its lease still holds: stage', view(backupView, { peer: { name: 'a', alive: false, runsVm: false } }), 'stage', 'staging'],
  ['backup: primary silent, nothing committed yet: nothing to stage', view(backupView, { peer: { name: 'a', alive: false, runsVm: false }, newestEpoch: undefined }), 'none', 'protected'],
  ['backup: staged, primary came back', view(backupView, { staged: { epoch: 100 } }), 'abort-staged', 'protected'],
  ['backup: staged, primary still silent', view(backupView, { staged: { epoch: 100 }, peer: { name: 'a', alive: false, runsVm: false } }), 'wait', 'staging'],
  ['backup: newer epoch committed while staging', view(backupView, { staged: { epoch: 100 }, newestEpoch: 101, peer: { name: 'a', alive: false, runsVm: false } }), 'abort-staged', 'staging'],
  ['backup: primary gone, key free: take over', view(backupView, { owner: undefined, peer: { name: 'a', alive: false, runsVm: false } }), 'take-over', 'failing-over'],
  ['backup: peer alive but says it does not run the VM, key free', view(backupView, { owner: undefined, peer: { name: 'a', alive: true, runsVm: false } }), 'take-over', 'failing-over'],
  ['backup: key free but the primary says it runs the VM', view(backupView, { owner: undefined }), 'wait', 'waiting'],
  ['backup: key free, no committed checkpoint', view(backupView, { owner: undefined, newestEpoch: undefined, peer: { name: 'a', alive: false, runsVm: false } }), 'wait', 'waiting'],
  ['backup: key free, staged but a newer one committed', view(backupView, { owner: undefined, staged: { epoch: 100 }, newestEpoch: 105, peer: { name: 'a', alive: false, runsVm: false } }), 'abort-staged', 'staging'],
  ['backup: key free but this host has no lease', view(backupView, { owner: undefined, leaseHeld: false, peer: { name: 'a', alive: false, runsVm: false } }), 'wait', 'waiting'],
  ['backup: key held by a third host', view(backupView, { owner: 'c' }), 'none', 'waiting'],
  // ---- failsafe (failsafe.ts): a confirmation binds the backup ----
  ['backup bound by its failsafe confirmation: key free, primary silent, no take-over yet', view(backupView, { owner: undefined, peer: { name: 'a', alive: false, runsVm: false }, local: { noTakeOverForMs: 900 } }), 'wait', 'waiting'],
  ['backup bound by its confirmation: primary says it no longer runs the VM, still no take-over', view(backupView, { owner: undefined, peer: { name: 'a', alive: true, runsVm: false }, local: { noTakeOverForMs: 1 } }), 'wait', 'waiting'],
  ['backup agent just started, primary not heard yet, key free (a failsafe primary re-taking it): no take-over yet', view(backupView, { owner: undefined, peer: { name: 'a', alive: false, runsVm: false, unheard: true } }), 'wait', 'waiting'],
  ['backup whose confirmation ran out: take over', view(backupView, { owner: undefined, peer: { name: 'a', alive: false, runsVm: false }, local: { noTakeOverForMs: 0 } }), 'take-over', 'failing-over'],
  ['backup bound by its confirmation, primary silent while its key still holds: staging (paused) is allowed', view(backupView, { peer: { name: 'a', alive: false, runsVm: false }, local: { noTakeOverForMs: 900 } }), 'stage', 'staging'],
  ['backup bound by its confirmation: no switchover either', view(backupView, { owner: undefined, record: { primary: 'b', backup: 'a', reason: 'switchover' }, peer: { name: 'a', alive: true, runsVm: false }, local: { noTakeOverForMs: 500 } }), 'wait', 'waiting'],
  ['backup: key held by a third host while staged', view(backupView, { owner: 'c', staged: { epoch: 100 } }), 'abort-staged', 'waiting'],
  ['backup: the user stopped the VM (key already given up)', view(backupView, { owner: undefined, record: { stopped: { by: 'a', reason: 'guest-shutdown' } }, peer: { name: 'a', alive: true, runsVm: false } }), 'drop-standby', 'stopped'],
  ['backup: the user stopped it and the primary host died after', view(backupView, { owner: undefined, standby: 'none', record: { stopped: { by: 'a', reason: 'guest-shutdown' } }, peer: { name: 'a', alive: false, runsVm: false } }), 'none', 'stopped'],
  ['backup: stopped VM while staged', view(backupView, { owner: undefined, staged: { epoch: 100 }, record: { stopped: { by: 'a', reason: 'host-signal' } } }), 'abort-staged', 'stopped'],
  ['backup: the primary agent suspended protection on its stop', view(backupView, { owner: undefined, standby: 'none', record: { protected: false, suspended: { by: 'a' }, reason: 'agent-stop' }, peer: { name: 'a', alive: false, runsVm: false } }), 'none', 'unprotected'],
  ['backup: a copy runs here that nobody owns', view(backupView, { owner: undefined, local: { running: true } }), 'fence-local', 'fenced'],
  ['backup: a copy runs here while the primary owns it', view(backupView, { local: { running: true } }), 'fence-local', 'fenced'],
  // ---- switchover and role confusion ----
  ['switchover: the record names this host primary, the old one released', view(backupView, { owner: undefined, record: { primary: 'b', backup: 'a', reason: 'switchover' }, peer: { name: 'a', alive: true, runsVm: false } }), 'take-over', 'switching-over'],
  ['switchover: the new primary keeps its warm standby while the old one takes the last checkpoint', view(backupView, { record: { primary: 'b', backup: 'a', reason: 'switchover' } }), 'none', 'switching-over'],
  ['switchover: the old primary still runs it', view(backupView, { owner: undefined, record: { primary: 'b', backup: 'a', reason: 'switchover' } }), 'wait', 'waiting'],
  ['both hosts think they are backup: the record primary does not take it', view(primaryView, { owner: undefined, local: { running: false, primaryActive: false }, peer: { name: 'b', alive: true, runsVm: false } }), 'none', 'waiting'],
  ['both hosts think they are backup: the record backup takes it', view(backupView, { owner: undefined, peer: { name: 'a', alive: true, runsVm: false } }), 'take-over', 'failing-over'],
  ['after a failover the old primary is the unprotected record backup', view(backupView, { record: { primary: 'a', backup: 'b', protected: false, reason: 'failover' }, standby: 'none' }), 'none', 'unprotected'],
  ['agent stopping', view(backupView, { closing: true, owner: undefined }), 'none', 'starting'],
  // ---- after the point of no return, and refused restores ----
  ['resumed here, the move not yet in the record', view(primaryView, { record: { primary: 'a', backup: 'b' }, self: 'b', owner: 'b', peer: { name: 'a', alive: false, runsVm: false }, local: { primaryActive: false, unfinishedMove: true } }), 'finish-move', 'degraded'],
  ['take-over refused twice: try again (fresh standby)', view(backupView, { owner: undefined, peer: { name: 'a', alive: false, runsVm: false }, local: { takeOverFailures: { count: 2, last: 'Unknown savevm section' } } }), 'take-over', 'failing-over'],
  ['take-over refused three times: stand down and say why', view(backupView, { owner: undefined, peer: { name: 'a', alive: false, runsVm: false }, local: { takeOverFailures: { count: 3, last: 'Unknown savevm section' } } }), 'none', 'waiting'],
];

describe('decide: one action per situation', () => {
  for (const [situation, snapshot, expected, phase] of rows) {
    it(situation, () => {
      const action = decide(snapshot);
      expect({ do: action.do, phase: action.phase }).toEqual({ do: expected, phase });
      expect(action.reason.length).toBeGreaterThan(5);
    });
  }

  it('a take-over says whether it is a failover or a switchover', () => {
    const failover = decide(view(backupView, { owner: undefined, peer: { name: 'a', alive: false, runsVm: false } }));
    expect(failover).toMatchObject({ do: 'take-over', kind: 'failover' });
    const switchover = decide(view(backupView, { owner: undefined, record: { primary: 'b', backup: 'a', reason: 'switchover' }, peer: { name: 'a', alive: true, runsVm: false } }));
    expect(switchover).toMatchObject({ do: 'take-over', kind: 'switchover' });
  });

  it('no situation lets two hosts run the VM: a host that runs it without the key fences it or claims a free key', () => {
    for (const [, snapshot] of rows) {
      const action = decide(snapshot);
      if (snapshot.local.running && snapshot.owner !== undefined && snapshot.owner !== snapshot.self && snapshot.record && !snapshot.closing) {
        expect(['fence-local', 'stop-primary']).toContain(action.do);
      }
      if (action.do === 'take-over') expect(snapshot.owner).toBeUndefined();
      if (action.do === 'claim') expect(snapshot.local.running).toBe(true);
    }
  });
});

describe('mayResume: the last look before the point of no return', () => {
  const gate = (patch: Partial<TakeOverGate> = {}): TakeOverGate => ({
    self: 'b',
    record: { primary: 'a', backup: 'b', protected: true, reason: 'protect' },
    owner: 'b',
    leaseHeld: true,
    stagedEpoch: 100,
    newestEpoch: 100,
    ...patch,
  });
  const table: [string, TakeOverGate, ReturnType<typeof mayResume>['resume'], boolean?][] = [
    ['all in order', gate(), true],
    ['lease lost mid take-over', gate({ leaseHeld: false }), false, false],
    ['owner key gone', gate({ owner: undefined }), false, false],
    ['owner key taken by a third host', gate({ owner: 'c' }), false, false],
    ['newer epoch committed while staging', gate({ newestEpoch: 101 }), false, true],
    ['the user stopped the VM meanwhile', gate({ record: { primary: 'a', backup: 'b', protected: true, reason: 'stop', stopped: { by: 'a', reason: 'host-signal' } } }), false, false],
    ['record moved to other hosts', gate({ record: { primary: 'c', backup: 'd', protected: true, reason: 'protect' } }), false, false],
    ['unprotected meanwhile', gate({ record: { primary: 'a', backup: 'b', protected: false, reason: 'unprotect' } }), false, false],
    ['the primary lost its backup meanwhile (output let go)', gate({ record: { primary: 'a', backup: 'b', protected: false, reason: 'backup-lost', suspended: { by: 'a', why: 'backup-lost' } } }), false, false],
  ];
  for (const [situation, g, resume, restage] of table) {
    it(situation, () => {
      const answer = mayResume(g);
      expect(answer.resume).toBe(resume);
      if (!answer.resume) {
        expect(answer.restage).toBe(restage);
        expect(answer.reason.length).toBeGreaterThan(5);
      }
    });
  }
});
