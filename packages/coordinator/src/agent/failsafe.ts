/**
 * Failsafe mode: what keeps a healthy VM running while etcd cannot be reached (Patroni's
 * `failsafe_mode` is the model). Pure decisions and bookkeeping; times are performance.now()
 * values passed in. The agent executes them (agent.ts), every row is a unit test
 * (failsafe.unit.test.ts), and the coordinator README carries the argument why no sequence of
 * etcd loss, link cuts and host loss gives two running copies.
 *
 * - The **primary** asks for confirmations (a flag in its beats) as soon as its own lease goes
 *   unanswered. The **backup** confirms a VM in its heartbeats only while its primary asks, it
 *   cannot reach etcd itself, does not run the VM, and stages or takes over nothing (only when
 *   asked: a backup whose etcd answers slowly under load would otherwise bind itself, and delay a
 *   failover, with nobody needing its word). A confirmation is a promise: from the beat's making
 *   on, this host does not take the VM over for confirmMs + marginMs (`FailsafeLedger.promise`),
 *   whatever etcd says meanwhile.
 * - The **primary** maps each confirmation to the send time of its own beat that the confirming
 *   beat echoes, and counts it valid until that send time + confirmMs. The backup received that
 *   beat after it was sent and made its promise after that, so the promise outlasts the validity
 *   by marginMs: the time to stop the VM, and any difference in the two hosts' clock rates.
 * - When its lease fences, the primary keeps a VM running only under a valid confirmation; it
 *   fences the VM the moment that lapses. Once etcd answers again it re-takes the VM's owner key
 *   on its new lease (`reclaim`), and only then leaves failsafe.
 */

export interface FailsafeTiming {
  /** A confirmation keeps the primary's VM running this long after the send of the beat it echoes. */
  confirmMs: number;
  /** The backup's promise outlasts the primary's use of it by this much. */
  marginMs: number;
}

/** Per VM: until when this host may run it on its backup's word (primary), or must not take it over (backup). */
export class FailsafeLedger {
  private readonly confirmedUntil = new Map<string, number>();
  private readonly promisedUntil = new Map<string, number>();

  constructor(readonly timing: FailsafeTiming) {
    if (!(timing.confirmMs > 0)) throw new Error(`failsafe: confirmMs must be positive, got ${timing.confirmMs}`);
    if (!(timing.marginMs > 0)) throw new Error(`failsafe: marginMs must be positive, got ${timing.marginMs}`);
  }

  /** Primary: the backup confirmed `vm` in a beat echoing this host's beat sent at `sentAt`. */
  confirmed(vm: string, sentAt: number): void {
    const until = sentAt + this.timing.confirmMs;
    if (until > (this.confirmedUntil.get(vm) ?? -Infinity)) this.confirmedUntil.set(vm, until);
  }

  /** Primary: how long the backup's confirmation of `vm` still holds (0: none, or lapsed). */
  confirmedForMs(vm: string, now: number): number {
    return Math.max(0, (this.confirmedUntil.get(vm) ?? -Infinity) - now);
  }

  /** Backup: this host confirms `vm` in a beat made at `now`. */
  promise(vm: string, now: number): void {
    const until = now + this.timing.confirmMs + this.timing.marginMs;
    if (until > (this.promisedUntil.get(vm) ?? -Infinity)) this.promisedUntil.set(vm, until);
  }

  /** Backup: how long this host is still bound not to take `vm` over (0: not bound). */
  promisedForMs(vm: string, now: number): number {
    return Math.max(0, (this.promisedUntil.get(vm) ?? -Infinity) - now);
  }

  forget(vm: string): void {
    this.confirmedUntil.delete(vm);
    this.promisedUntil.delete(vm);
  }
}

/** What the backup knows when it makes a heartbeat, for one VM. */
export interface ConfirmView {
  self: string;
  record: { primary: string; backup: string } | undefined;
  /** this host has gone without an etcd answer past its bound (see HostLease.silentForMs) */
  etcdUnreachable: boolean;
  /** the primary is alive and its newest beat asks for confirmations */
  primaryAsks: boolean;
  /** the domain runs here, as libvirt last said (undefined: not known) */
  running: boolean | undefined;
  /** a restore is staged here, or a take-over or switchover is under way */
  takingOver: boolean;
}

/** Backup: may this beat confirm the VM to its primary (and so promise not to take it over)? */
export function mayConfirm(v: ConfirmView): { confirm: boolean; reason: string } {
  if (!v.record || v.record.backup !== v.self || v.record.primary === v.self) return { confirm: false, reason: 'not the backup of this VM' };
  if (!v.primaryAsks) return { confirm: false, reason: `${v.record.primary} does not ask: its lease is renewed, or it is silent` };
  if (!v.etcdUnreachable) return { confirm: false, reason: 'etcd answers here: the primary keeps its VM by its lease, or fences' };
  if (v.running !== false) return { confirm: false, reason: v.running === undefined ? 'not known whether the VM runs here' : 'the VM runs here' };
  if (v.takingOver) return { confirm: false, reason: 'a take-over is under way here' };
  return { confirm: true, reason: `etcd unreachable here too, the VM does not run here: ${v.record.primary} may run it on` };
}

/** What the primary knows of one VM it runs, for the failsafe decision. */
export interface FailsafeView {
  /** this host checkpoints and runs the VM (PrimaryVm) */
  runs: boolean;
  /** this host's lease is held (etcd answers) */
  leaseHeld: boolean;
  /** the VM runs on in failsafe (since the lease fenced) */
  inFailsafe: boolean;
  /** how long the backup's confirmation still holds */
  confirmedForMs: number;
  backup: string;
}

export type FailsafeAction =
  | { do: 'none'; reason: string }
  /** the lease is gone but the backup confirms: the VM runs on */
  | { do: 'failsafe'; reason: string }
  /** the lease is gone and no valid confirmation: stop the VM now */
  | { do: 'fence'; reason: string }
  /** the lease is back: re-take the owner key on it, then leave failsafe */
  | { do: 'reclaim'; reason: string };

/** Primary: on a lease fence and then every few ms while in failsafe. */
export function decideFailsafe(v: FailsafeView): FailsafeAction {
  if (!v.runs) return { do: 'none', reason: 'the VM does not run here' };
  if (v.leaseHeld) return v.inFailsafe ? { do: 'reclaim', reason: 'etcd answers again: re-take the owner key on the new lease' } : { do: 'none', reason: 'the lease is held' };
  if (v.confirmedForMs > 0) {
    return { do: 'failsafe', reason: `etcd unreachable; backup ${v.backup} confirms it does not run the VM and cannot reach etcd either (for ${Math.round(v.confirmedForMs)} ms more)` };
  }
  return { do: 'fence', reason: v.inFailsafe ? `etcd still unreachable and backup ${v.backup}'s confirmation lapsed` : `etcd unreachable and backup ${v.backup} does not confirm` };
}
