import { decodeTimerSection, DeviceStateSet, parseMigrationStream, TIMER_SECTION_NAME } from '@ftvm/transport';

/**
 * When did the guest clock of a checkpoint actually freeze?
 *
 * QEMU's STOP event is not that moment: do_vm_stop() freezes the clock (cpu_disable_ticks), then
 * waits for the vCPU threads to stop and runs the VM-state handlers, and only then stamps STOP.
 * Measured under TCG on a 2-core host: 0.35–1.2 ms late when idle, up to 6 ms with the host
 * busy — every bit of it a lag the restored guest keeps.
 *
 * The stream knows better. The `timer` section's cpu_clock_offset is the VM's virtual clock at the
 * freeze, and that clock runs at host CLOCK_MONOTONIC rate exactly while the VM runs and not at
 * all while it is stopped. QEMU's RESUME event is stamped shortly before the clock starts again
 * (vm_prepare_start: RESUME, then cpu_enable_ticks; in between QEMU writes the event to every
 * monitor, 0.10–1.34 ms measured with uprobes, by which the result is early — less than the STOP
 * stamp's 0.65–1.3 ms the other way). So with the last resume before this stop —
 * its RESUME stamp and the virtual clock it resumed with — the freeze is
 *
 *     stop = resume + (clock in this checkpoint − clock at that resume)
 *
 * (measured: the guest's lost time agreed with RESUME − this stop to ±40 µs over 8 pauses, where
 * the STOP stamp was 0.4–6 ms late). The virtual clock at a resume is known exactly when the VM
 * resumed from a checkpoint: that checkpoint's cpu_clock_offset (a checkpointer resumes the
 * primary after each one), or 0 at a VM's first start.
 */
export interface VirtualClockReference {
  /** Host CLOCK_REALTIME (ns) of the resume: QEMU's RESUME event stamp. */
  resumeNs: bigint;
  /** The virtual clock the VM resumed with: the cpu_clock_offset of the checkpoint it resumed from. */
  virtualClockNs: bigint;
}

export interface StopInstant {
  /** Host CLOCK_REALTIME (ns) at which the guest clock froze (best known). */
  stopNs: bigint;
  /** 'stream': derived from the checkpoint and a reference; 'stop-event': the STOP stamp (late by 0.3–6 ms). */
  source: 'stream' | 'stop-event';
  /** How much later than the derived freeze QEMU stamped STOP (source 'stream' only). */
  stopEventLatenessNs?: bigint;
  /** Why the reference was not used (source 'stop-event' with a reference given). */
  rejected?: string;
}

export interface StopInstantOptions {
  /** QEMU's STOP event stamp for this checkpoint (used when no reference fits, and to check one). */
  stopEventNs: bigint;
  /**
   * The last resume before this checkpoint. A pause in between (no checkpoint) would be counted
   * as running time; the result is checked against the STOP stamp to catch that.
   */
  reference?: VirtualClockReference;
  /**
   * A reference is rejected when the STOP stamp is later than the derived freeze by more than
   * this (an unseen pause in between). Default 50 ms (the largest lateness measured: 6 ms).
   */
  maxStopEventLatenessNs?: bigint;
}

/** RESUME stamps are whole µs: allow that much (and a little monotonic/realtime slew) the other way. */
const EARLY_TOLERANCE_NS = 50_000n;

/** The virtual clock (ns) of a stopped VM's checkpoint: the `timer` section's cpu_clock_offset. */
export function checkpointVirtualClockNs(checkpoint: DeviceStateSet | Buffer): bigint {
  const state = Buffer.isBuffer(checkpoint) ? new DeviceStateSet(parseMigrationStream(checkpoint)) : checkpoint;
  const timer = state.findSection(TIMER_SECTION_NAME);
  if (!timer) throw new Error('the checkpoint has no timer section');
  const clock = decodeTimerSection(timer).cpuClockOffsetNs;
  if (clock < 0n) throw new Error(`timer section holds a negative clock (${clock} ns): not a stopped VM's state`);
  return clock;
}

/** The instant the guest clock froze for `checkpoint` (see VirtualClockReference). */
export function checkpointStopInstant(checkpoint: DeviceStateSet | Buffer, options: StopInstantOptions): StopInstant {
  if (!options.reference) return { stopNs: options.stopEventNs, source: 'stop-event' };
  return stopInstantFromClock(checkpointVirtualClockNs(checkpoint), options);
}

/**
 * checkpointStopInstant for a checkpoint whose virtual clock is already known (e.g. the backup's
 * store read it while verifying the stream, and acknowledged it).
 *
 * Dated this way, consecutive checkpoints' pauses telescope: each is early by its reference
 * resume's event delay and late by its own, so over a run the sum of pauses is off by one such
 * delay, where STOP-stamped pauses are each short by the whole STOP lateness.
 */
export function stopInstantFromClock(clock: bigint, options: StopInstantOptions): StopInstant {
  const fallback = (rejected?: string): StopInstant => ({ stopNs: options.stopEventNs, source: 'stop-event', ...(rejected ? { rejected } : {}) });
  const ref = options.reference;
  if (!ref) return fallback();
  const ranNs = clock - ref.virtualClockNs;
  if (ranNs < 0n) return fallback(`the checkpoint's virtual clock (${clock}) is before the reference's (${ref.virtualClockNs}): not the same run`);
  const stopNs = ref.resumeNs + ranNs;
  const latenessNs = options.stopEventNs - stopNs;
  const maxLateness = options.maxStopEventLatenessNs ?? 50_000_000n;
  if (latenessNs < -EARLY_TOLERANCE_NS) {
    return fallback(`derived freeze ${stopNs} is ${-latenessNs} ns after the STOP stamp: the reference is not this VM's last resume`);
  }
  if (latenessNs > maxLateness) {
    return fallback(`STOP stamp ${latenessNs} ns after the derived freeze: a pause between the reference and this checkpoint?`);
  }
  return { stopNs, source: 'stream', stopEventLatenessNs: latenessNs };
}
