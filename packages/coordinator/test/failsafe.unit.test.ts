import { describe, expect, it } from 'vitest';
import { decide, type VmSnapshot } from '../src/agent/decide.js';
import { decideFailsafe, FailsafeLedger, mayConfirm, type ConfirmView, type FailsafeView } from '../src/agent/failsafe.js';

const primary = (patch: Partial<FailsafeView> = {}): FailsafeView => ({ runs: true, leaseHeld: false, inFailsafe: false, confirmedForMs: 0, backup: 'b', ...patch });
const backup = (patch: Partial<ConfirmView> = {}): ConfirmView => ({ self: 'b', record: { primary: 'a', backup: 'b' }, etcdUnreachable: true, primaryAsks: true, running: false, takingOver: false, ...patch });
/** The backup's decision for the VM once it can ask etcd again (cycles need etcd). */
const backupDecides = (patch: { owner?: string; peer: { alive: boolean; runsVm: boolean }; noTakeOverForMs: number }): VmSnapshot => ({
  self: 'b',
  closing: false,
  record: { primary: 'a', backup: 'b', protected: true, reason: 'protect' },
  owner: patch.owner,
  leaseHeld: true,
  peer: { name: 'a', ...patch.peer },
  local: { running: false, primaryActive: false, fenced: false, noTakeOverForMs: patch.noTakeOverForMs },
  staged: undefined,
  standby: 'present',
  newestEpoch: 100,
  checkpointFailures: 0,
});

describe('failsafe: the primary without its lease', () => {
  const rows: [string, FailsafeView, ReturnType<typeof decideFailsafe>['do']][] = [
    ['lease held: nothing to do', primary({ leaseHeld: true }), 'none'],
    ['does not run the VM: nothing to do', primary({ runs: false }), 'none'],
    ['no etcd, backup confirms: runs on', primary({ confirmedForMs: 800 }), 'failsafe'],
    ['no etcd, in failsafe, confirmation fresh: runs on', primary({ inFailsafe: true, confirmedForMs: 40 }), 'failsafe'],
    ['no etcd, backup silent (never confirmed): fence', primary(), 'fence'],
    ['no etcd, in failsafe, confirmation lapsed (backup cut off or reaches etcd again): fence', primary({ inFailsafe: true, confirmedForMs: 0 }), 'fence'],
    ['etcd back while in failsafe: re-take the key on the new lease', primary({ leaseHeld: true, inFailsafe: true, confirmedForMs: 0 }), 'reclaim'],
  ];
  for (const [situation, v, expected] of rows) {
    it(situation, () => {
      const action = decideFailsafe(v);
      expect(action.do).toBe(expected);
      expect(action.reason.length).toBeGreaterThan(5);
    });
  }
});

describe('failsafe: the backup confirms', () => {
  const rows: [string, ConfirmView, boolean][] = [
    ['cannot reach etcd, does not run or stage the VM: confirms', backup(), true],
    ['reaches etcd: does not confirm (the primary keeps its VM by its lease, or fences)', backup({ etcdUnreachable: false }), false],
    ['the primary does not ask (its lease renews, or it is silent): does not confirm, however slow etcd is here', backup({ primaryAsks: false }), false],
    ['runs the VM: does not confirm', backup({ running: true }), false],
    ['does not know whether it runs the VM (libvirt silent): does not confirm', backup({ running: undefined }), false],
    ['a take-over or staged restore under way: does not confirm', backup({ takingOver: true }), false],
    ['not the backup of the VM: does not confirm', backup({ record: { primary: 'a', backup: 'c' } }), false],
    ['the primary of the VM: does not confirm', backup({ self: 'a' }), false],
    ['no record: does not confirm', backup({ record: undefined }), false],
  ];
  for (const [situation, v, expected] of rows) {
    it(situation, () => expect(mayConfirm(v).confirm).toBe(expected));
  }
});

describe('failsafe: both hosts, the situations of the argument', () => {
  it('no etcd, backup alive: the backup confirms, the primary runs on; nobody can claim without etcd', () => {
    expect(mayConfirm(backup()).confirm).toBe(true);
    expect(decideFailsafe(primary({ confirmedForMs: 900 })).do).toBe('failsafe');
  });

  it('no etcd, backup silent: the primary fences; the backup takes over only once etcd is back and its promise has run out', () => {
    expect(decideFailsafe(primary({ inFailsafe: true, confirmedForMs: 0 })).do).toBe('fence');
    expect(decide(backupDecides({ peer: { alive: false, runsVm: false }, noTakeOverForMs: 700 })).do).toBe('wait');
    expect(decide(backupDecides({ peer: { alive: false, runsVm: false }, noTakeOverForMs: 0 })).do).toBe('take-over');
  });

  it('etcd back while both alive: the primary re-takes its key; the backup stops confirming and never takes over from a running primary', () => {
    expect(decideFailsafe(primary({ leaseHeld: true, inFailsafe: true })).do).toBe('reclaim');
    expect(mayConfirm(backup({ etcdUnreachable: false })).confirm).toBe(false);
    // the old key lapsed before the primary re-took it: the backup still sees a primary that runs the VM
    expect(decide(backupDecides({ peer: { alive: true, runsVm: true }, noTakeOverForMs: 0 })).do).toBe('wait');
    expect(decide(backupDecides({ owner: 'a', peer: { alive: true, runsVm: true }, noTakeOverForMs: 0 })).do).toBe('none');
  });

  it('etcd back only on the backup side: the backup stops confirming, the primary fences when the last confirmation lapses, then the backup takes over', () => {
    expect(mayConfirm(backup({ etcdUnreachable: false })).confirm).toBe(false);
    expect(decideFailsafe(primary({ inFailsafe: true, confirmedForMs: 300 })).do).toBe('failsafe');
    expect(decide(backupDecides({ peer: { alive: true, runsVm: true }, noTakeOverForMs: 1_200 })).do).toBe('wait');
    expect(decideFailsafe(primary({ inFailsafe: true, confirmedForMs: 0 })).do).toBe('fence');
    expect(decide(backupDecides({ peer: { alive: true, runsVm: false }, noTakeOverForMs: 400 })).do).toBe('wait');
    expect(decide(backupDecides({ peer: { alive: true, runsVm: false }, noTakeOverForMs: 0 })).do).toBe('take-over');
  });

  it('a partition isolates the primary from etcd and the backup: the primary fences, the backup (reaching etcd) confirms nothing and takes over', () => {
    expect(decideFailsafe(primary()).do).toBe('fence');
    expect(mayConfirm(backup({ etcdUnreachable: false })).confirm).toBe(false);
    expect(decide({ ...backupDecides({ owner: 'a', peer: { alive: false, runsVm: false }, noTakeOverForMs: 0 }) }).do).toBe('stage');
    expect(decide(backupDecides({ peer: { alive: false, runsVm: false }, noTakeOverForMs: 0 })).do).toBe('take-over');
  });
});

describe('FailsafeLedger', () => {
  const timing = { confirmMs: 1_000, marginMs: 500 };

  it('a confirmation holds confirmMs from the send of the beat it echoes, and only grows', () => {
    const ledger = new FailsafeLedger(timing);
    expect(ledger.confirmedForMs('vm', 0)).toBe(0);
    ledger.confirmed('vm', 100);
    expect(ledger.confirmedForMs('vm', 600)).toBe(500);
    ledger.confirmed('vm', 50); // an older beat echoed late: no step back
    expect(ledger.confirmedForMs('vm', 600)).toBe(500);
    expect(ledger.confirmedForMs('vm', 1_100)).toBe(0);
    expect(ledger.confirmedForMs('other', 600)).toBe(0);
  });

  it('the promise outlasts every confirmation it can back by marginMs', () => {
    // the primary sends at s, the backup receives after s and promises at p ≥ s: the promise runs
    // to p + confirm + margin, the primary's use of it to s + confirm
    for (const [s, p] of [[0, 0], [0, 3], [100, 950]] as const) {
      const a = new FailsafeLedger(timing);
      const b = new FailsafeLedger(timing);
      b.promise('vm', p);
      a.confirmed('vm', s);
      const primaryRunsUntil = s + a.confirmedForMs('vm', s);
      const backupBoundUntil = p + b.promisedForMs('vm', p);
      expect(backupBoundUntil - primaryRunsUntil).toBeGreaterThanOrEqual(timing.marginMs);
    }
  });

  it('refuses a zero timing, naming it', () => {
    expect(() => new FailsafeLedger({ confirmMs: 0, marginMs: 500 })).toThrow(/confirmMs/);
    expect(() => new FailsafeLedger({ confirmMs: 1_000, marginMs: 0 })).toThrow(/marginMs/);
  });
});
