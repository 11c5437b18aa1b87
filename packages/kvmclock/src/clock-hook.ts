import type { QmpClient } from '@ftvm/qmp';
import { InPlaceActuator } from './actuators.js';
import type { DriftLedger, PauseCause, PauseEntry } from './ledger.js';
import { PauseTracker } from './ledger.js';
import { DEFAULT_POLICY, type ClockPolicy } from './policy.js';

export interface ClockHookOptions {
  qmp: QmpClient;
  ledger: DriftLedger;
  policy?: ClockPolicy;
  log?: (message: string) => void;
}

/**
 * The clock-correction hook of one VM. Whoever stops the VM calls `arm(cause)` — while the VM is
 * stopped, right before `cont`, or (with ftvm's QEMU, where a checkpoint resumes by itself) before
 * the stop; the hook arms the in-place correction for that pause when the policy says so, and after the RESUME records in the ledger what QEMU applied. A QEMU
 * without ftvm's patch is detected once, said once, and the ledger keeps recording the drift.
 */
export class ClockHook {
  readonly tracker: PauseTracker;
  private readonly policy: ClockPolicy;
  private armedFor: PauseCause | undefined;
  private warnedImpossible = false;

  private constructor(
    private readonly options: ClockHookOptions,
    private readonly actuator: InPlaceActuator | undefined,
  ) {
    this.policy = options.policy ?? DEFAULT_POLICY;
    this.tracker = new PauseTracker(options.qmp, options.ledger);
    this.tracker.onPause((entry) => void this.recordApplied(entry));
  }

  static async create(options: ClockHookOptions): Promise<ClockHook> {
    return new ClockHook(options, await InPlaceActuator.detect(options.qmp));
  }

  get canCorrectInPlace(): boolean {
    return this.actuator !== undefined;
  }

  /** The next stop is for `cause`. */
  expect(cause: PauseCause): void {
    this.tracker.expect(cause);
  }

  /** Announces the pause's cause and arms its correction (while stopped, or before the stop). */
  async arm(cause: PauseCause): Promise<void> {
    if (this.tracker.stoppedAtNs === undefined) this.tracker.expect(cause);
    if (!this.policy.compensate.includes(cause)) return;
    if (!this.actuator) {
      if (!this.warnedImpossible) {
        this.options.log?.(`clock: this QEMU has no in-place correction (ftvm patch missing); recording drift only`);
        this.warnedImpossible = true;
      }
      if (this.policy.onImpossible === 'fail') throw new Error('clock policy: in-place correction impossible on this QEMU');
      return;
    }
    const stoppedAt = this.tracker.stoppedAtNs;
    const maxStepNs = BigInt(Math.round(this.policy.maxStepMs * 1e6));
    if (stoppedAt !== undefined && BigInt(Date.now()) * 1_000_000n - stoppedAt > maxStepNs) {
      this.options.log?.(`clock: pause of ${cause} longer than maxStepMs (${this.policy.maxStepMs}); not corrected`);
      return;
    }
    await this.actuator.arm();
    this.armedFor = cause;
  }

  close(): void {
    this.tracker.close();
  }

  private async recordApplied(entry: PauseEntry): Promise<void> {
    if (!this.actuator || this.armedFor === undefined) return;
    this.armedFor = undefined;
    const applied = await this.actuator.lastApplied().catch(() => undefined);
    if (!applied) return;
    this.options.ledger.recordCorrection({ actuator: 'inplace', appliedNs: applied.appliedNs, frozenNs: applied.stoppedNs }, entry);
  }
}
