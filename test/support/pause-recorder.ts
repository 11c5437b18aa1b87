import type { QmpClient, QmpEvent } from '@ftvm/qmp';
import { clockOffset, type ClockOffset, type ProbeTarget } from './probe-client.js';

/** One stretch of time the VM spent stopped, from QEMU's own STOP and RESUME event stamps. */
export interface RecordedPause {
  stopNs: bigint;
  resumeNs: bigint;
}

/**
 * Pairs STOP and RESUME events into pauses. The sum of their lengths is the lag an uncorrected
 * guest must carry: its clock stands still exactly while QEMU has the VM stopped.
 */
export class PauseRecorder {
  readonly pauses: RecordedPause[] = [];
  private stoppedAt: bigint | undefined;
  private readonly unsubscribe: () => void;

  constructor(qmp: QmpClient) {
    this.unsubscribe = qmp.onEvent((event: QmpEvent) => {
      if (event.event === 'STOP') this.stoppedAt = event.timestampNs;
      else if (event.event === 'RESUME' && this.stoppedAt !== undefined) {
        this.pauses.push({ stopNs: this.stoppedAt, resumeNs: event.timestampNs });
        this.stoppedAt = undefined;
      }
    });
  }

  get totalPausedNs(): bigint {
    return this.pauses.reduce((sum, p) => sum + (p.resumeNs - p.stopNs), 0n);
  }

  stop(): void {
    this.unsubscribe();
  }
}

/** Pauses the VM `count` times for `pauseMs` each (stop → STOP event → sleep → cont → RESUME). */
export async function pauseRepeatedly(
  qmp: QmpClient,
  { count, pauseMs, gapMs = 300 }: { count: number; pauseMs: number; gapMs?: number },
): Promise<void> {
  for (let i = 0; i < count; i++) {
    const stopped = qmp.waitForEvent('STOP', { timeoutMs: 5_000 });
    await qmp.execute('stop');
    await stopped;
    await sleep(pauseMs);
    const resumed = qmp.waitForEvent('RESUME', { timeoutMs: 5_000 });
    await qmp.execute('cont');
    await resumed;
    await sleep(gapMs);
  }
}

export const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

export interface PauseLagMeasurement {
  before: ClockOffset;
  after: ClockOffset;
  pauses: RecordedPause[];
  /** How much further behind the guest is after the pauses, by the probe. */
  measuredLagNs: bigint;
  /** The same, predicted from QEMU's STOP/RESUME stamps. */
  predictedLagNs: bigint;
}

/** Measures the guest offset, pauses the VM, measures again: the lag the pauses left. */
export async function measurePauseLag(
  qmp: QmpClient,
  probe: ProbeTarget,
  pauses: { count: number; pauseMs: number },
): Promise<PauseLagMeasurement> {
  const before = await clockOffset(probe, { samples: 32 });
  const recorder = new PauseRecorder(qmp);
  try {
    await pauseRepeatedly(qmp, pauses);
  } finally {
    recorder.stop();
  }
  const after = await clockOffset(probe, { samples: 32 });
  return {
    before,
    after,
    pauses: recorder.pauses,
    measuredLagNs: before.offsetNs - after.offsetNs,
    predictedLagNs: recorder.totalPausedNs,
  };
}
