import type { QmpClient, QmpEvent } from '@ftvm/qmp';
import type { GuestClocksource } from './clocksource.js';
import { DEFAULT_LAG_MODEL, KVM_DEFAULT_CLOCKSOURCE, pauseLagNs, predictionCandidates, validateLagModel, type Accelerator, type LagModel } from './lag-model.js';

/** Why the VM was stopped. */
export type PauseCause = 'checkpoint' | 'user' | 'migration' | 'failover';
export type Actuator = 'inplace' | 'stream-rewrite' | 'agent';
/**
 * Why a pause's stopped time was not given back: the policy does not compensate its cause
 * (`not-in-policy`), it was longer than the policy's `maxStepMs` (`max-step`), this QEMU cannot
 * correct in place and the policy says record or fail (`impossible`), or the guest agent the
 * policy falls back to did not answer (`agent-failed`).
 */
export type UncorrectedReason = 'not-in-policy' | 'max-step' | 'impossible' | 'agent-failed' | 'clocksource-limit';

export interface Correction {
  actuator: Actuator;
  /** How far the guest clock was moved forward (negative: back). */
  appliedNs: bigint;
  /**
   * How long the guest clock was really frozen, when the VMM measured it (ftvm's QEMU reports it
   * with each in-place correction). QEMU's STOP stamp comes 0.3–6 ms after the freeze, so this
   * replaces the event-stamp length of the pause.
   */
  frozenNs?: bigint;
}

/**
 * A pause that spans two hosts (a failover or switchover: stopped on the old primary, resumed on
 * this host) is dated with two clocks. How the old primary's clock stood to this host's, as the
 * heartbeats measured it (NTP-style, see the coordinator's ClockOffsetEstimator), and whether the
 * rewrite used it to bring the stop instant onto this host's clock.
 */
export interface HostClockOffset {
  /** The host whose stop instant was converted (the old primary). */
  peer: string;
  /** The peer's realtime minus this host's (ns), as measured; absent when nothing was measured. */
  offsetNs?: bigint;
  /** |true offset − offsetNs| ≤ errorNs (half the best round trip plus a drift allowance for its age). */
  errorNs?: bigint;
  /** Age of the sample the measure came from, at the rewrite (ms). */
  ageMs?: number;
  /** The stop instant was converted with offsetNs: the pause's length is right to within errorNs. */
  applied: boolean;
  /** Why it was not applied (then the pause is off by however far the clocks disagreed). */
  detail?: string;
}

/** One stop→resume of the VM, from QEMU's own event stamps. */
export interface PauseEntry {
  cause: PauseCause;
  stopNs: bigint;
  resumeNs: bigint;
  pausedNs: bigint;
  correction?: Correction;
  /** QEMU's STOP stamp, when `stopNs` was re-dated to the freeze found otherwise (see redateStop). */
  stopEventNs?: bigint;
  /** The clock hook decided not to (or could not) give this pause back, and why. */
  uncorrected?: { reason: UncorrectedReason; detail?: string };
  /** A pause across two hosts: how their clocks stood (see HostClockOffset). */
  hostOffset?: HostClockOffset;
}

export interface ResidualMeasurement {
  /** Guest − host offset change since the ledger's reference, as measured (clock probe). */
  measuredLagNs: bigint;
  predictedLagNs: bigint;
  atNs: bigint;
}

export interface LedgerSummary {
  vm: string;
  pauses: number;
  pausedNs: bigint;
  correctedNs: bigint;
  /**
   * What the guest clock should lag real time by: the stopped time its clocksource lost, not given
   * back (see the ledger's model; under KVM with the clocksource unknown, kvm-clock's).
   */
  predictedLagNs: bigint;
  /** The model the prediction follows (see lag-model.ts). */
  model: { accelerator: Accelerator; clocksource: GuestClocksource | 'unknown' };
  /** Under KVM with the guest's clocksource unknown: the prediction for each clocksource it may use. */
  byClocksource?: Partial<Record<GuestClocksource, bigint>>;
  byCause: Record<PauseCause, { pauses: number; pausedNs: bigint }>;
  /** Pauses the clock hook left uncorrected (see PauseEntry.uncorrected), by reason. */
  uncorrected: Partial<Record<UncorrectedReason, { pauses: number; pausedNs: bigint }>>;
  lastResidual?: ResidualMeasurement;
  /** The host clock offset of the newest pause across two hosts. */
  lastHostOffset?: HostClockOffset;
}

/**
 * The drift ledger of one VM: every pause with its cause and length, every correction applied,
 * and the residual measured. Its prediction — stopped time minus corrections, as far as each
 * reaches the guest's clocksource on its accelerator (lag-model.ts) — is what the guest carries,
 * and what a measurement is compared against.
 */
export class DriftLedger {
  readonly entries: PauseEntry[] = [];
  readonly residuals: ResidualMeasurement[] = [];

  private lagModel: LagModel;

  /**
   * `model`: the accelerator and the guest's clocksource, which decide what a pause costs the
   * guest (lag-model.ts). Default: TCG, clocksource unknown — every pause lags by its stopped time.
   */
  constructor(
    readonly vm: string,
    model: LagModel = DEFAULT_LAG_MODEL,
  ) {
    this.lagModel = validateLagModel({ ...model });
  }

  get model(): Readonly<LagModel> {
    return this.lagModel;
  }

  /** Sets the model once known (e.g. from machineClocks() after QEMU started); the prediction follows it, past pauses included. */
  setModel(model: LagModel): void {
    this.lagModel = validateLagModel({ ...model });
  }

  recordPause(cause: PauseCause, stopNs: bigint, resumeNs: bigint): PauseEntry {
    if (resumeNs < stopNs) throw new RangeError(`pause of ${this.vm} resumes (${resumeNs}) before it stops (${stopNs})`);
    const entry: PauseEntry = { cause, stopNs, resumeNs, pausedNs: resumeNs - stopNs };
    this.entries.push(entry);
    return entry;
  }

  /** Attaches a correction to a pause (the last one by default). */
  recordCorrection(correction: Correction, entry: PauseEntry | undefined = this.entries.at(-1)): void {
    if (!entry) throw new Error(`no pause of ${this.vm} to attach a ${correction.actuator} correction to`);
    entry.correction = correction;
    if (correction.frozenNs !== undefined) entry.pausedNs = correction.frozenNs;
  }

  /**
   * Marks a pause (the last one by default) as left uncorrected, and why. `frozenNs`, when the
   * VMM measured the frozen interval (ftvm's QEMU does at every resume), replaces the stamps'.
   */
  recordUncorrected(
    reason: UncorrectedReason,
    entry: PauseEntry | undefined = this.entries.at(-1),
    options: { frozenNs?: bigint; detail?: string } = {},
  ): void {
    if (!entry) throw new Error(`no pause of ${this.vm} to mark uncorrected (${reason})`);
    entry.uncorrected = options.detail === undefined ? { reason } : { reason, detail: options.detail };
    if (options.frozenNs !== undefined && options.frozenNs > 0n && entry.correction === undefined) entry.pausedNs = options.frozenNs;
  }

  /**
   * The pause QEMU stamped STOP at `stopEventNs` froze the guest clock at `frozeAtNs` (derived from
   * the checkpoint's stream, see stopInstantFromClock): its length is counted from there. A pause
   * whose frozen time the VMM measured itself (correction.frozenNs) keeps that. Returns the entry,
   * or undefined when no pause has that STOP stamp.
   */
  redateStop(stopEventNs: bigint, frozeAtNs: bigint): PauseEntry | undefined {
    const entry = this.entries.findLast((e) => (e.stopEventNs ?? e.stopNs) === stopEventNs);
    if (!entry) return undefined;
    if (frozeAtNs > entry.resumeNs) throw new RangeError(`pause of ${this.vm} re-dated to freeze (${frozeAtNs}) after its resume (${entry.resumeNs})`);
    entry.stopEventNs = stopEventNs;
    entry.stopNs = frozeAtNs;
    if (entry.correction?.frozenNs === undefined) entry.pausedNs = entry.resumeNs - frozeAtNs;
    return entry;
  }

  /**
   * Notes on a pause across two hosts (the last one by default) how their clocks stood. The
   * pause's stamps must already be on this host's clock (converted when `applied`).
   */
  recordHostOffset(offset: HostClockOffset, entry: PauseEntry | undefined = this.entries.at(-1)): void {
    if (!entry) throw new Error(`no pause of ${this.vm} to note the clock offset to ${offset.peer} on`);
    if (offset.applied && (offset.offsetNs === undefined || offset.errorNs === undefined)) {
      throw new Error(`clock offset to ${offset.peer} marked applied without a measured offset and error bound`);
    }
    entry.hostOffset = { ...offset };
  }

  recordResidual(measuredLagNs: bigint, atNs: bigint): ResidualMeasurement {
    const residual = { measuredLagNs, predictedLagNs: this.predictedLagNs, atNs };
    this.residuals.push(residual);
    return residual;
  }

  get pausedNs(): bigint {
    return this.entries.reduce((sum, e) => sum + e.pausedNs, 0n);
  }

  get correctedNs(): bigint {
    return this.entries.reduce((sum, e) => sum + (e.correction?.appliedNs ?? 0n), 0n);
  }

  /** What the guest should lag real time by, under the ledger's model. */
  get predictedLagNs(): bigint {
    const { clocksource } = this.lagModel;
    return this.predictedLagFor(clocksource === 'unknown' && this.lagModel.accelerator === 'kvm' ? KVM_DEFAULT_CLOCKSOURCE : clocksource);
  }

  /** What a guest on `clocksource` should lag real time by, on the ledger's accelerator. */
  predictedLagFor(clocksource: GuestClocksource | 'unknown'): bigint {
    return this.entries.reduce((sum, e) => sum + pauseLagNs(this.lagModel.accelerator, clocksource, e), 0n);
  }

  summary(): LedgerSummary {
    const byCause = Object.fromEntries(
      (['checkpoint', 'user', 'migration', 'failover'] as const).map((cause) => {
        const of = this.entries.filter((e) => e.cause === cause);
        return [cause, { pauses: of.length, pausedNs: of.reduce((s, e) => s + e.pausedNs, 0n) }];
      }),
    ) as LedgerSummary['byCause'];
    const uncorrected: LedgerSummary['uncorrected'] = {};
    for (const e of this.entries) {
      if (!e.uncorrected) continue;
      const sum = (uncorrected[e.uncorrected.reason] ??= { pauses: 0, pausedNs: 0n });
      sum.pauses++;
      sum.pausedNs += e.pausedNs;
    }
    const lastResidual = this.residuals.at(-1);
    const lastHostOffset = this.entries.findLast((e) => e.hostOffset !== undefined)?.hostOffset;
    const candidates = predictionCandidates(this.lagModel);
    const byClocksource = candidates.length ? Object.fromEntries(candidates.map((c) => [c, this.predictedLagFor(c)])) : undefined;
    return {
      vm: this.vm,
      pauses: this.entries.length,
      pausedNs: this.pausedNs,
      correctedNs: this.correctedNs,
      predictedLagNs: this.predictedLagNs,
      model: { accelerator: this.lagModel.accelerator, clocksource: this.lagModel.clocksource },
      ...(byClocksource ? { byClocksource } : {}),
      byCause,
      uncorrected,
      ...(lastResidual ? { lastResidual } : {}),
      ...(lastHostOffset ? { lastHostOffset } : {}),
    };
  }

  /** summary() as JSON can carry it (what `ftvm drift` shows): ns as decimal strings, beyond 2^53. */
  summaryJson(): Jsonified<LedgerSummary> {
    return jsonified(this.summary());
  }
}

/** A value with its bigints as decimal strings. */
export type Jsonified<T> = T extends bigint ? string : T extends (infer U)[] ? Jsonified<U>[] : T extends object ? { [K in keyof T]: Jsonified<T[K]> } : T;

function jsonified<T>(value: T): Jsonified<T> {
  if (typeof value === 'bigint') return value.toString() as Jsonified<T>;
  if (Array.isArray(value)) return value.map(jsonified) as Jsonified<T>;
  if (value && typeof value === 'object') return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, jsonified(v)])) as Jsonified<T>;
  return value as Jsonified<T>;
}

/**
 * Feeds a ledger from a VM's QMP events. Whoever stops the VM says why beforehand
 * (`expect('checkpoint')`); a stop nobody announced is the user's.
 */
export class PauseTracker {
  private stoppedAt: bigint | undefined;
  private nextCause: PauseCause | undefined;
  private readonly unsubscribe: () => void;
  private readonly listeners = new Set<(entry: PauseEntry) => void>();

  constructor(
    qmp: QmpClient,
    readonly ledger: DriftLedger,
  ) {
    this.unsubscribe = qmp.onEvent((event: QmpEvent) => this.onEvent(event));
  }

  /** QEMU's stamp of the current stop, while the VM is stopped. */
  get stoppedAtNs(): bigint | undefined {
    return this.stoppedAt;
  }

  /** The next stop is for this cause (undefined: withdrawn, a stop now is the user's). */
  expect(cause: PauseCause | undefined): void {
    this.nextCause = cause;
  }

  /** The cause announced for the next (or current) pause; undefined: a stop now is the user's. */
  get expectedCause(): PauseCause | undefined {
    return this.nextCause;
  }

  onPause(listener: (entry: PauseEntry) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  close(): void {
    this.unsubscribe();
  }

  private onEvent(event: QmpEvent): void {
    if (event.event === 'STOP') {
      this.stoppedAt = event.timestampNs;
    } else if (event.event === 'RESUME' && this.stoppedAt !== undefined) {
      const entry = this.ledger.recordPause(this.nextCause ?? 'user', this.stoppedAt, event.timestampNs);
      this.stoppedAt = undefined;
      this.nextCause = undefined;
      for (const listener of [...this.listeners]) listener(entry);
    }
  }
}
