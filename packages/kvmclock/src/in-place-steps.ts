/**
 * The part of a correction the resume could not carry, given back to a running guest in place:
 * for each step, arm x-ftvm-clock-compensate with the step, stop, cont — a pause of a few ms whose
 * own length is given back with it. Before each step the guest runs long enough to read its
 * clocksource (its timers are due after a forward step, so it does so at once), which is what
 * lets a guest on a narrow counter (acpi_pm) count a gap larger than that counter can show.
 * That includes the first step: a restore has just moved the clock by one safe step itself. Two
 * steps the guest does not see apart add up beyond what the counter can show; Linux then takes
 * every read for a counter gone backwards until it comes round, and the guest loses a whole wrap
 * (4.69 s on acpi_pm; seen under TCG when the first step came a few ms after the restore).
 */
import type { QmpClient } from '@ftvm/qmp';
import { InPlaceActuator } from './actuators.js';
import { planSteps } from './clocksource.js';

export interface InPlaceStep {
  /** The step asked for (beside the step's own pause). */
  offsetNs: bigint;
  /** What QEMU added to the guest clock at that resume: its own pause plus the step. */
  appliedNs: bigint;
  /** The pause the step took (QEMU's own measure). */
  pauseNs: bigint;
  /** QEMU's RESUME stamp ending it. */
  resumeNs: bigint;
}

export interface InPlaceStepsResult {
  steps: InPlaceStep[];
  /** The sum of the steps' offsets actually applied (what the guest was behind). */
  givenNs: bigint;
}

export interface InPlaceStepsOptions {
  /** At most this per step (undefined: all at once). */
  stepNs: bigint | undefined;
  /** How long the guest runs before each step (default 100 ms: a TCG guest just restored translates its code afresh). */
  settleMs?: number;
  /** Per QMP exchange and per RESUME wait (default 10 s). */
  timeoutMs?: number;
}

export class InPlaceStepError extends Error {
  override name = 'InPlaceStepError';
  constructor(
    message: string,
    /** The steps that were applied before the failure. */
    readonly done: InPlaceStep[],
    options?: ErrorOptions,
  ) {
    super(message, options);
  }
}

/**
 * Moves a running guest's clock forward by `totalNs` in steps (ftvm's QEMU only; throws an
 * InPlaceStepError naming what was applied when a step fails). Resolves with every step.
 */
export async function stepClockInPlace(qmp: QmpClient, actuator: InPlaceActuator, totalNs: bigint, options: InPlaceStepsOptions): Promise<InPlaceStepsResult> {
  const timeoutMs = options.timeoutMs ?? 10_000;
  const settleMs = options.settleMs ?? 100;
  const steps: InPlaceStep[] = [];
  const plan = planSteps(totalNs, options.stepNs);
  for (const [i, offsetNs] of plan.entries()) {
    await new Promise((resolve) => setTimeout(resolve, settleMs));
    try {
      // someone else stopped it meanwhile (a user, a fence): never `cont` a VM we did not stop
      const status = await qmp.execute<{ running: boolean; status: string }>('query-status', undefined, { timeoutMs });
      if (!status.running) throw new Error(`the VM is not running (${status.status}): the remaining steps are not applied`);
      await actuator.arm({ includeStoppedTime: true, offsetNs });
      const resumed = qmp.waitForEvent('RESUME', { timeoutMs });
      resumed.catch(() => undefined);
      await qmp.execute('stop', undefined, { timeoutMs });
      await qmp.execute('cont', undefined, { timeoutMs });
      const resumeNs = (await resumed).timestampNs;
      const applied = await actuator.lastApplied();
      steps.push({ offsetNs: applied?.offsetNs ?? offsetNs, appliedNs: applied?.appliedNs ?? 0n, pauseNs: applied?.stoppedNs ?? 0n, resumeNs });
    } catch (error) {
      throw new InPlaceStepError(`in-place clock step ${i + 1} of ${plan.length} (${offsetNs} ns) failed: ${(error as Error).message}`, steps, { cause: error });
    }
  }
  return { steps, givenNs: steps.reduce((sum, s) => sum + s.offsetNs, 0n) };
}

/** Below this a scheduled resume counts as on time (the probe's own error is ~0.2 ms). */
export const LATENESS_TOLERANCE_NS = 300_000n;

/** The part of a restore's clock move the clock sections carry: all of it, or one safe step. */
export function firstStepNs(deltaNs: bigint, stepNs: bigint | undefined): bigint {
  return stepNs !== undefined && deltaNs > stepNs ? stepNs : deltaNs;
}

export interface ClockFollowUp {
  /** How late the scheduled resume came (given back with the rest when above LATENESS_TOLERANCE_NS). */
  lateNs: bigint;
  /** The part of the outage the clock sections did not carry. */
  restNs: bigint;
  /** The in-place steps: each a pause of a few ms, given back together with its step. */
  steps: InPlaceStep[];
  /** What the guest still lags (no in-place command, or a step failed), and why. */
  uncorrectedNs: bigint;
  detail?: string;
}

/**
 * After a restore's scheduled resume: the outage the clock sections did not carry (`restNs`) and
 * the resume's lateness, given back in place in steps of at most `stepNs` (ftvm's QEMU). Never
 * throws for a step: what was not given back is `uncorrectedNs`, with the reason in `detail`.
 * Undefined when there is nothing to give back.
 */
export async function followUpAfterRestore(qmp: QmpClient, options: { restNs: bigint; lateNs: bigint; stepNs: bigint | undefined }): Promise<ClockFollowUp | undefined> {
  const { restNs, lateNs, stepNs } = options;
  const totalNs = restNs + (lateNs > LATENESS_TOLERANCE_NS ? lateNs : 0n);
  if (totalNs <= 0n) return undefined;
  const actuator = await InPlaceActuator.detect(qmp);
  if (!actuator) {
    const detail = restNs > 0n ? `this QEMU cannot step the clock in place; the machine's clocksources take at most ${Number(stepNs ?? 0n) / 1e6} ms at once` : "this QEMU cannot give the resume's lateness back in place";
    return { lateNs, restNs, steps: [], uncorrectedNs: totalNs, detail };
  }
  try {
    const done = await stepClockInPlace(qmp, actuator, totalNs, { stepNs });
    return { lateNs, restNs, steps: done.steps, uncorrectedNs: totalNs - done.givenNs };
  } catch (error) {
    const steps = error instanceof InPlaceStepError ? error.done : [];
    return { lateNs, restNs, steps, uncorrectedNs: totalNs - steps.reduce((sum, s) => sum + s.offsetNs, 0n), detail: (error as Error).message };
  }
}
