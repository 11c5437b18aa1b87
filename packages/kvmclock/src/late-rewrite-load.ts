import { once } from 'node:events';
import type { Writable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import type { QmpClient } from '@ftvm/qmp';
import { realtimeClock, type RealtimeClock } from './realtime.js';
import { firstStepNs as firstStep, followUpAfterRestore, type ClockFollowUp } from './in-place-steps.js';
import { advanceClockSections, splitCheckpoint, type ClockSectionAdvance } from './stream-rewrite.js';

export interface LateRewriteResult {
  deltaNs: bigint;
  advances: ClockSectionAdvance[];
  headBytes: number;
  tailBytes: number;
}

/**
 * Streams a checkpoint into a QEMU waiting for it (`-incoming`), RAM first, and only then — with
 * the RAM already loaded — asks `deltaNs()` for the clock delta, rewrites the clock sections and
 * sends the device state. Computing the delta this late leaves only the last few milliseconds
 * (device-state load, `cont`) to be predicted rather than measured.
 *
 * The caller still has to predict that remainder, and it is not small or steady: 2.5–5 ms on an
 * idle 2-core host, 12–28 ms with the host's CPUs busy (measured, TCG, 135 KB of device state).
 * When the guest must come back within a few ms, use `loadAndResumeOnTime`, which schedules the
 * resume instead of predicting it.
 */
export async function loadWithLateClockRewrite(
  sink: Writable,
  checkpoint: Buffer,
  deltaNs: () => bigint,
  timeoutMs = 60_000,
): Promise<LateRewriteResult> {
  const signal = AbortSignal.timeout(timeoutMs); // QEMU may stop reading: never wait forever
  const split = splitCheckpoint(checkpoint);
  if (!sink.write(split.head)) await once(sink, 'drain', { signal });
  const delta = deltaNs();
  const advances = advanceClockSections(split.deviceState, delta);
  const tail = split.encodeTail();
  sink.end(tail);
  await once(sink, 'finish', { signal });
  return { deltaNs: delta, advances, headBytes: split.head.length, tailBytes: tail.length };
}

export interface ResumeOnTimeOptions {
  /**
   * QMP of the incoming QEMU: started paused (`-S`, as libvirt does), the `events` migration
   * capability on, `migrate-incoming` already issued — and no `cont` before the load, which would
   * arm QEMU's autostart and resume the VM at whatever moment the load happens to complete.
   */
  qmp: QmpClient;
  /** The incoming migration channel (ended by this function). */
  sink: Writable;
  checkpoint: Buffer;
  /** Host CLOCK_REALTIME (ns) at which the checkpointed VM stopped: the primary's STOP event. */
  stopNs: bigint;
  /**
   * Time from the clock rewrite to the scheduled resume. It must cover sending and loading the
   * device state (2.5–5 ms idle, up to ~30 ms on a busy host, measured); it is added to the
   * downtime. If the load takes longer, the guest comes back late by the overrun (reported).
   * Default 50 ms.
   */
  marginNs?: bigint;
  /**
   * `cont` is sent this long before the target instant, for the QMP round to QEMU's `vm_start`.
   * Default: the shortest of three `query-status` round trips measured right before.
   */
  contLeadNs?: bigint;
  /** Host realtime clock (default: one anchored at the call). */
  clock?: RealtimeClock;
  /** Deadline for the whole load (default 60 s). */
  loadTimeoutMs?: number;
  /**
   * The largest step the guest may take at once (machineClocks().stepNs): the clock sections move
   * by at most this; the rest is given back in place in such steps after the resume (ftvm's
   * QEMU), or left uncorrected and reported (`uncorrectedNs`) where QEMU cannot; with ftvm's QEMU
   * a late resume's lateness is given back with them. Default: no limit, nothing in place.
   */
  stepNs?: bigint;
}

export interface ResumeOnTimeResult extends LateRewriteResult {
  /** When Δ was computed (host realtime): the device state was sent right after. */
  rewriteNs: bigint;
  /** The host instant the rewritten clock is right for: stop + Δ = rewriteNs + margin. */
  targetNs: bigint;
  /** QEMU's stamp of MIGRATION completed (the device state loaded). */
  loadedNs: bigint;
  /** Shortest `query-status` round trip measured after the load. */
  qmpRoundTripNs: bigint;
  /** When `cont` was written to QMP (host realtime). */
  contSentNs: bigint;
  /** QEMU's RESUME stamp; the guest's clock starts right after it (cpu_enable_ticks). */
  resumeNs: bigint;
  /** When `cont`'s reply arrived: the guest's clock started between resumeNs and this. */
  contAnsweredNs: bigint;
  /**
   * resumeNs − targetNs: how far behind (positive) the guest came back, as far as the host can
   * tell. What it cannot see: the primary's STOP event is stamped after the vCPU stopped and the
   * clock froze (~0.5 ms later under TCG), which makes the guest that much further behind.
   */
  lateNs: bigint;
  /** The load completed after the target instant: `marginNs` was too small. */
  overrun: boolean;
  /** The part of Δ the clock sections carried (Δ capped at `stepNs`). */
  firstStepNs: bigint;
  /** The rest of Δ (and the resume's lateness), given back in place after the resume (with `stepNs`). */
  inPlace?: ClockFollowUp;
  /** What stays uncorrected: the rest of Δ (and a late resume's lateness) on a QEMU without in-place correction, or after a failed step. */
  uncorrectedNs: bigint;
}

/**
 * Restores a checkpoint with the guest clock advanced by exactly the time that passed, on stock
 * QEMU: RAM first; then the clock sections are rewritten for a resume at `target = now + margin`;
 * the device state is sent; once QEMU reports the load complete (the VM still paused, its clock
 * frozen at the rewritten value) `cont` is issued so that the VM resumes at `target`.
 *
 * Compared with autostart (`cont` before the load) this trades `margin` of extra downtime for an
 * error that no longer depends on how long QEMU takes to load the device state — under TCG that
 * load time is not predictable to within 5 ms on a loaded host, and every ms of it the guest lost.
 */
export async function loadAndResumeOnTime(options: ResumeOnTimeOptions): Promise<ResumeOnTimeResult> {
  const { qmp, sink, checkpoint, stopNs } = options;
  const clock = options.clock ?? realtimeClock();
  const marginNs = options.marginNs ?? 50_000_000n;
  if (marginNs < 0n) throw new RangeError(`marginNs must not be negative (${marginNs})`);
  const loadTimeoutMs = options.loadTimeoutMs ?? 60_000;

  const split = splitCheckpoint(checkpoint);
  const loaded = qmp.waitForEvent<{ status: string }>('MIGRATION', {
    timeoutMs: loadTimeoutMs,
    predicate: (e) => e.data.status === 'completed' || e.data.status === 'failed',
  });
  loaded.catch(() => undefined); // awaited below; a failed write must not leave it unhandled
  if (!sink.write(split.head)) await once(sink, 'drain', { signal: AbortSignal.timeout(loadTimeoutMs) });

  const rewriteNs = clock();
  const targetNs = rewriteNs + marginNs;
  const deltaNs = targetNs - stopNs;
  if (deltaNs <= 0n) throw new RangeError(`the checkpoint stopped at ${stopNs}, after the resume target ${targetNs}: wrong stop stamp or clock`);
  const firstStepNs = firstStep(deltaNs, options.stepNs);
  const advances = advanceClockSections(split.deviceState, firstStepNs);
  const tail = split.encodeTail();
  sink.end(tail);

  const outcome = await loaded;
  if (outcome.data.status !== 'completed') throw new Error(`the incoming QEMU reports the load ${outcome.data.status}`);
  const status = await qmp.execute<{ status: string; running: boolean }>('query-status');
  if (status.running) {
    throw new Error("the VM was already running when its load completed: autostart was armed (a 'cont' before the load, or no -S); its clock started at an unplanned moment");
  }

  const timing = await resumeOnTime(qmp, targetNs, { clock, ...(options.contLeadNs !== undefined ? { contLeadNs: options.contLeadNs } : {}) });
  const { qmpRoundTripNs, contSentNs, resumeNs, contAnsweredNs, overrun } = timing;
  const restNs = deltaNs - firstStepNs;
  const inPlace = options.stepNs === undefined ? undefined : await followUpAfterRestore(qmp, { restNs, lateNs: timing.lateNs, stepNs: options.stepNs });
  const uncorrectedNs = inPlace?.uncorrectedNs ?? restNs;
  return {
    firstStepNs,
    ...(inPlace ? { inPlace } : {}),
    uncorrectedNs,
    deltaNs,
    advances,
    headBytes: split.head.length,
    tailBytes: tail.length,
    rewriteNs,
    targetNs,
    loadedNs: outcome.timestampNs,
    qmpRoundTripNs,
    contSentNs,
    resumeNs,
    contAnsweredNs,
    lateNs: resumeNs - targetNs,
    overrun,
  };
}

export interface OnTimeResume {
  /** Shortest `query-status` round trip measured right before. */
  qmpRoundTripNs: bigint;
  /** When `cont` was written to QMP (host realtime). */
  contSentNs: bigint;
  /** QEMU's RESUME stamp. */
  resumeNs: bigint;
  /**
   * When `cont`'s reply arrived (host realtime). QEMU stamps RESUME before it starts the guest's
   * clock and replies after, so the clock started in [resumeNs, contAnsweredNs]: how far off the
   * stamp can be on this resume (a preempted QEMU or host makes it wider).
   */
  contAnsweredNs: bigint;
  /** resumeNs − targetNs. */
  lateNs: bigint;
  /** It was already past the moment `cont` had to be sent. */
  overrun: boolean;
}

/**
 * Resumes a paused, fully loaded VM so that QEMU's RESUME lands at `targetNs` (host realtime):
 * measures the QMP round trip, sleeps, spins the last stretch and sends `cont` one round trip early.
 * The restore paths use it after rewriting the clock for a resume at `targetNs`.
 */
export async function resumeOnTime(
  qmp: Pick<QmpClient, 'execute' | 'waitForEvent'>,
  targetNs: bigint,
  options: { clock?: RealtimeClock; contLeadNs?: bigint } = {},
): Promise<OnTimeResume> {
  const clock = options.clock ?? realtimeClock();
  // QMP latency to QEMU's vm_start: a command goes reader → main-loop dispatch → handler, which is
  // most of a round trip (the reply is the cheap part). Measured on the lab: with half a
  // `query-status` round trip as lead the resume came 0.6–1.6 ms late, with the whole one 0–0.6 ms
  // (when neither this process nor QEMU's main loop was preempted on the way).
  let qmpRoundTripNs = 0n;
  for (let i = 0; i < 3; i++) {
    const sent = clock();
    await qmp.execute('query-status');
    const rtt = clock() - sent;
    if (i === 0 || rtt < qmpRoundTripNs) qmpRoundTripNs = rtt;
  }
  const leadNs = options.contLeadNs ?? qmpRoundTripNs;
  const sendAt = targetNs - leadNs;
  const overrun = clock() > sendAt;
  if (!overrun) {
    // Timers are coarse (and late by ms on a busy host): sleep to ~10 ms before, then spin.
    // Whatever this process is late by (preempted on a busy host), the guest is late by too.
    const sleepMs = Number(sendAt - clock() - 10_000_000n) / 1e6;
    if (sleepMs > 0) await sleep(sleepMs);
    while (clock() < sendAt) {
      // spin
    }
  }
  const resumed = qmp.waitForEvent('RESUME', { timeoutMs: 10_000 });
  resumed.catch(() => undefined);
  const contSentNs = clock();
  await qmp.execute('cont');
  const contAnsweredNs = clock();
  const resumeNs = (await resumed).timestampNs;
  return { qmpRoundTripNs, contSentNs, resumeNs, contAnsweredNs, lateNs: resumeNs - targetNs, overrun };
}
