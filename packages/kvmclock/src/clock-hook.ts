import type { GuestAgentClient, QmpClient, QmpEvent } from '@ftvm/qmp';
import { machineClocks } from './clocksource.js';
import { lagModelFor } from './lag-model.js';
import { GuestAgentActuator, InPlaceActuator } from './actuators.js';
import type { DriftLedger, PauseCause, PauseEntry, UncorrectedReason } from './ledger.js';
import { PauseTracker } from './ledger.js';
import { DEFAULT_POLICY, PolicyError, validatePolicy, type ClockPolicy } from './policy.js';

export interface ClockHookOptions {
  qmp: QmpClient;
  ledger: DriftLedger;
  /** The VM's clock policy (validated here); DEFAULT_POLICY when absent. */
  policy?: ClockPolicy;
  /**
   * Connects to the VM's guest agent. Required by `onImpossible: agent` (the hook opens no socket
   * itself); called only when a pause needs the agent, and again after a failed correction.
   */
  agent?: () => Promise<GuestAgentClient>;
  /** Deadline of one agent correction (connect + guest-set-time). Default 2 s. */
  agentTimeoutMs?: number;
  log?: (message: string) => void;
  /** What a user must act on (a machine whose guest clock ftvm cannot correct). Default: `log`. */
  warn?: (message: string) => void;
}

/** What the hook decided for the pause under way (or about to start). */
type Plan =
  | { kind: 'inplace'; cause: PauseCause }
  | { kind: 'agent'; cause: PauseCause }
  | { kind: 'uncorrected'; cause: PauseCause; reason: UncorrectedReason; detail?: string };

/** The policy asks for something the hook cannot do for this pause (`onImpossible: fail`). */
export class ClockCorrectionImpossibleError extends Error {
  override name = 'ClockCorrectionImpossibleError';
}

const nowNs = () => BigInt(Date.now()) * 1_000_000n;
const nsToMs = (ns: bigint) => (Number(ns) / 1e6).toFixed(1);

/**
 * The clock-correction hook of one VM, applying its policy (`compensate`, `maxStepMs`,
 * `onImpossible`). Whoever stops the VM calls `arm(cause)` — while the VM is stopped, right before
 * `cont`, or (with ftvm's QEMU, where a checkpoint resumes by itself) before the stop; a stop
 * nobody announced is the user's, and the hook arms it itself when the policy compensates `user`.
 * After the RESUME the hook writes in the ledger what was given back, or why nothing was.
 */
export class ClockHook {
  readonly tracker: PauseTracker;
  readonly policy: ClockPolicy;
  private readonly maxStepNs: bigint;
  private plan: Plan | undefined;
  /** QEMU holds an arming we made that no resume has consumed yet. */
  private armedInQemu = false;
  private guard: { timer: NodeJS.Timeout; stoppedAtNs: bigint } | undefined;
  private agentClient: Promise<GuestAgentClient> | undefined;
  /** Agent corrections run one at a time, in pause order. */
  private agentQueue: Promise<void> = Promise.resolve();
  private warnedImpossible = false;
  private readonly unsubscribe: () => void;
  private closed = false;

  private constructor(
    private readonly options: ClockHookOptions,
    private readonly actuator: InPlaceActuator | undefined,
  ) {
    this.policy = validatePolicy(options.policy ?? DEFAULT_POLICY);
    this.maxStepNs = BigInt(Math.round(this.policy.maxStepMs * 1e6));
    if (this.policy.onImpossible === 'agent' && !options.agent) {
      throw new PolicyError('onImpossible', "agent needs the VM's guest-agent channel (ftvm metadata <ftvm:paths agent=…>, makeFtReady's agent: true)");
    }
    this.tracker = new PauseTracker(options.qmp, options.ledger);
    // after the tracker's listener: on STOP, the tracker already holds the stop and its cause
    this.unsubscribe = options.qmp.onEvent((event) => this.onEvent(event));
    this.tracker.onPause((entry) => void this.settle(entry));
  }

  /** Validates the policy (PolicyError) and detects whether this QEMU can correct in place. */
  static async create(options: ClockHookOptions): Promise<ClockHook> {
    validatePolicy(options.policy ?? DEFAULT_POLICY);
    // what a pause costs the guest depends on the accelerator and the clocksources it may use
    try {
      const clocks = await machineClocks(options.qmp);
      options.ledger.setModel(lagModelFor(clocks));
      for (const warning of clocks.warnings) (options.warn ?? options.log)?.(`clock: ${warning}`);
    } catch (error) {
      options.log?.(`clock: cannot read the machine's accelerator and clocks (${(error as Error).message}); the ledger keeps its model (${options.ledger.model.accelerator})`);
    }
    return new ClockHook(options, await InPlaceActuator.detect(options.qmp));
  }

  get canCorrectInPlace(): boolean {
    return this.actuator !== undefined;
  }

  /** Pauses for `cause` move the guest clock at their resume (in place, when short enough). */
  correctsInPlace(cause: PauseCause): boolean {
    return this.actuator !== undefined && this.policy.compensate.includes(cause);
  }

  /** The next stop is for `cause`. */
  expect(cause: PauseCause): void {
    this.tracker.expect(cause);
  }

  /**
   * Announces the pause's cause (when called before the stop) and prepares its correction as the
   * policy says. Throws ClockCorrectionImpossibleError when the policy compensates `cause`, this
   * QEMU cannot correct in place and `onImpossible` is `fail`.
   */
  async arm(cause: PauseCause): Promise<void> {
    if (this.tracker.stoppedAtNs === undefined) this.tracker.expect(cause);
    const stoppedAt = this.tracker.stoppedAtNs;
    if (!this.policy.compensate.includes(cause)) {
      await this.leaveUncorrected({ kind: 'uncorrected', cause, reason: 'not-in-policy' });
      return;
    }
    if (!this.actuator) {
      this.sayImpossibleOnce();
      if (this.policy.onImpossible === 'agent') {
        this.plan = { kind: 'agent', cause };
        return;
      }
      this.plan = { kind: 'uncorrected', cause, reason: 'impossible' };
      if (this.policy.onImpossible === 'fail') {
        throw new ClockCorrectionImpossibleError(`clock policy (onImpossible: fail): this QEMU cannot give a ${cause} pause back in place (no ftvm patch)`);
      }
      return;
    }
    if (stoppedAt !== undefined && nowNs() - stoppedAt >= this.maxStepNs) {
      await this.refuseMaxStep(cause, nowNs() - stoppedAt);
      return;
    }
    this.plan = { kind: 'inplace', cause };
    // set before the reply: a resume (e.g. another monitor's cont) may land before it does
    this.armedInQemu = true;
    try {
      await this.actuator.arm();
    } catch (error) {
      this.plan = { kind: 'uncorrected', cause, reason: 'impossible', detail: `arming failed: ${(error as Error).message}` };
      throw error;
    }
    // armed while stopped: the step grows until the resume, so keep watching it
    if (stoppedAt !== undefined && this.tracker.stoppedAtNs === stoppedAt) this.startGuard(stoppedAt);
  }

  /**
   * The pause announced (`expect`, `arm`) did not come: a checkpoint that failed before its stop.
   * With ftvm's QEMU an arming made while the VM runs waits for the next stop, whatever its
   * cause: drop it and the announcement, so a later pause is the user's and gets what the policy
   * gives a user pause. A no-op once the VM stopped (that stop's resume takes the arming).
   */
  async disarm(): Promise<void> {
    if (this.tracker.stoppedAtNs !== undefined) return;
    this.tracker.expect(undefined);
    this.plan = undefined;
    this.stopGuard();
    if (this.armedInQemu && this.actuator) {
      this.armedInQemu = false;
      await this.actuator.disarm();
    }
  }

  close(): void {
    this.closed = true;
    this.stopGuard();
    this.unsubscribe();
    this.tracker.close();
    const agent = this.agentClient;
    this.agentClient = undefined;
    void agent?.then((client) => client.close()).catch(() => undefined);
  }

  private onEvent(event: QmpEvent): void {
    if (event.event !== 'STOP') return;
    if (this.plan?.kind === 'inplace') {
      this.startGuard(event.timestampNs);
    } else if (this.plan === undefined && this.tracker.expectedCause === undefined) {
      // nobody announced this stop: the user's (virsh suspend, the fence, …)
      this.arm('user').catch((error: Error) => this.options.log?.(`clock: user pause: ${error.message}`));
    }
  }

  /** No correction for this pause; an arming of ours still in QEMU must not apply to it. */
  private async leaveUncorrected(plan: Plan & { kind: 'uncorrected' }): Promise<void> {
    this.plan = plan;
    this.stopGuard();
    if (this.armedInQemu && this.actuator) {
      // a zero-step arming replaces ours (x-ftvm-clock-compensate keeps the last arguments)
      await this.actuator.arm({ includeStoppedTime: false, offsetNs: 0n });
    }
  }

  private async refuseMaxStep(cause: PauseCause, stoppedNs: bigint): Promise<void> {
    const detail = `stopped ${nsToMs(stoppedNs)} ms, over maxStepMs ${this.policy.maxStepMs}`;
    this.options.log?.(`clock: ${cause} pause not corrected: ${detail}`);
    await this.leaveUncorrected({ kind: 'uncorrected', cause, reason: 'max-step', detail });
  }

  /**
   * QEMU has no cap on the step it applies, so the hook enforces maxStepMs: once the pause has
   * lasted that long (counted from QEMU's STOP stamp) the arming is replaced with a zero step.
   * A resume that comes in the few ms that takes still gets the whole step (the ledger says so).
   */
  private startGuard(stoppedAtNs: bigint): void {
    this.stopGuard();
    const remainingMs = Math.max(0, Number(stoppedAtNs + this.maxStepNs - nowNs()) / 1e6);
    const timer = setTimeout(() => {
      if (this.guard?.timer !== timer) return;
      this.guard = undefined;
      if (this.tracker.stoppedAtNs !== stoppedAtNs || this.plan?.kind !== 'inplace') return;
      this.refuseMaxStep(this.plan.cause, nowNs() - stoppedAtNs).catch((error: Error) => this.options.log?.(`clock: refusing a step over maxStepMs failed: ${error.message}`));
    }, remainingMs);
    timer.unref();
    this.guard = { timer, stoppedAtNs };
  }

  private stopGuard(): void {
    if (this.guard) clearTimeout(this.guard.timer);
    this.guard = undefined;
  }

  private sayImpossibleOnce(): void {
    if (this.warnedImpossible) return;
    this.warnedImpossible = true;
    const then = { record: 'recording drift only', agent: 'correcting through the guest agent after each resume', fail: 'failing each pause the policy compensates' }[this.policy.onImpossible];
    this.options.log?.(`clock: this QEMU has no in-place correction (ftvm patch missing); ${then} (onImpossible: ${this.policy.onImpossible})`);
  }

  /** After the RESUME: what this pause got, in the ledger. */
  private async settle(entry: PauseEntry): Promise<void> {
    const plan = this.plan;
    this.plan = undefined;
    this.stopGuard();
    const wasArmed = this.armedInQemu;
    this.armedInQemu = false;
    if (!plan) return;
    const { ledger } = this.options;
    if (plan.kind === 'agent') {
      this.agentQueue = this.agentQueue.then(() => this.correctWithAgent(entry));
      return;
    }
    // ftvm's QEMU reports every resume (armed or not): its frozen interval beats the stamps
    const lastApplied = this.actuator ? await this.actuator.lastApplied().catch(() => undefined) : undefined;
    if (wasArmed && lastApplied && lastApplied.appliedNs > 0n) {
      if (plan.kind !== 'inplace') this.options.log?.(`clock: a ${plan.cause} pause was given back ${nsToMs(lastApplied.appliedNs)} ms although ${plan.reason}: the resume came before the refusal`);
      ledger.recordCorrection({ actuator: 'inplace', appliedNs: lastApplied.appliedNs, frozenNs: lastApplied.stoppedNs }, entry);
      return;
    }
    if (plan.kind === 'inplace') return; // armed, yet QEMU reports nothing applied: nothing to add
    ledger.recordUncorrected(plan.reason, entry, {
      ...(lastApplied ? { frozenNs: lastApplied.stoppedNs } : {}),
      ...(plan.detail === undefined ? {} : { detail: plan.detail }),
    });
  }

  /**
   * guest-set-time with the host's clock: the guest's CLOCK_REALTIME is then on real time, so the
   * correction is everything the ledger still had outstanding, this pause included.
   */
  private async correctWithAgent(entry: PauseEntry): Promise<void> {
    const timeoutMs = this.options.agentTimeoutMs ?? 2_000;
    try {
      if (this.closed) throw new Error('the clock hook is closed');
      this.agentClient ??= withDeadline(this.options.agent!(), timeoutMs, 'connecting to the guest agent');
      const client = await this.agentClient;
      await new GuestAgentActuator(client).correct(timeoutMs);
      const outstanding = this.options.ledger.predictedLagNs;
      this.options.ledger.recordCorrection({ actuator: 'agent', appliedNs: outstanding > 0n ? outstanding : 0n }, entry);
    } catch (error) {
      const stale = this.agentClient;
      this.agentClient = undefined; // reconnect next time
      void stale?.then((client) => client.close()).catch(() => undefined);
      const detail = (error as Error).message;
      this.options.log?.(`clock: guest-agent correction of a ${entry.cause} pause failed: ${detail}`);
      this.options.ledger.recordUncorrected('agent-failed', entry, { detail });
    }
  }
}

/** Connects within `ms`; a connection that completes after the deadline is closed, not leaked. */
function withDeadline(connecting: Promise<GuestAgentClient>, ms: number, what: string): Promise<GuestAgentClient> {
  return new Promise<GuestAgentClient>((resolve, reject) => {
    let late = false;
    const timer = setTimeout(() => {
      late = true;
      reject(new Error(`${what}: no answer within ${ms} ms`));
    }, ms);
    connecting.then(
      (client) => {
        clearTimeout(timer);
        if (late) void client.close().catch(() => undefined);
        else resolve(client);
      },
      (error: unknown) => {
        clearTimeout(timer);
        reject(error instanceof Error ? error : new Error(String(error)));
      },
    );
  });
}
