import {
  decodeKvmclockSection,
  decodeTimerSection,
  DeviceStateSet,
  encodedSize,
  encodeKvmclockSection,
  encodeRecords,
  encodeTimerSection,
  KVMCLOCK_SECTION_NAME,
  parseMigrationStream,
  TIMER_SECTION_NAME,
  type AssembledCheckpoint,
  type MigrationRecord,
} from '@ftvm/transport';

/** What a rewrite did to one clock section. */
export interface ClockSectionAdvance {
  section: 'timer' | 'kvmclock';
  deltaNs: bigint;
  /** TCG only: guest ticks added (Δ × the tick rate measured from the stream). */
  deltaTicks?: bigint;
  ticksPerNs?: number;
}

/**
 * Moves the guest clock of a stopped VM's device state forward by `deltaNs`, before QEMU loads it.
 *
 * - TCG `timer`: while stopped, cpu_ticks_offset and cpu_clock_offset hold the guest's absolute
 *   tick count and virtual-clock ns; both advance (the guest's TSC follows the ticks, its
 *   QEMU_CLOCK_VIRTUAL timers and HPET follow the ns), ticks scaled by their ratio in this very
 *   stream (exact integer arithmetic).
 * - KVM `kvmclock`: `clock` advances; `clock_is_reliable` must stay true, or QEMU recomputes the
 *   clock from guest memory and ignores the value (hw/i386/kvm/clock.c).
 *
 * What else carries time, checked (QEMU 7.2, TCG): the `cpu` section's env.tsc and env.tsc_offset
 * are 0 in every checkpoint (TCG's RDTSC is cpu_get_ticks() + the SVM tsc_offset, and WRMSR to
 * IA32_TSC is ignored), and the msr_tsc_adjust / msr_tscdeadline subsections are absent: nothing
 * there pins the TSC. An HPET the guest enabled keeps its offset to the virtual clock (hpet/offset
 * subsection), so it moves with cpu_clock_offset (a guest on HPET reads it as 32 bits at 100 MHz:
 * it drops a jump over 21.47 s, see test/guest/README.md). `mc146818rtc` runs on the host clock.
 * Measured with the probe guest on TSC: advances of 6 s to 1200 s land to within the resume error.
 *
 * What no device-state rewrite can do: move a guest whose kernel keeps time by counting ticks
 * (clocksource `jiffies`/`refined-jiffies`). Ticks that never fired are never counted, so such a
 * guest loses the whole gap whatever the stream says. Linux falls back to it when it cannot
 * calibrate the TSC — e.g. a domain without ACPI (no HPET, no PM timer) booted on a busy host,
 * where PIT calibration fails under TCG. Keep `<features><acpi/>` in the domain.
 */
export function advanceClockSections(state: DeviceStateSet, deltaNs: bigint): ClockSectionAdvance[] {
  const done: ClockSectionAdvance[] = [];
  const timer = state.findSection(TIMER_SECTION_NAME);
  if (timer) {
    const before = decodeTimerSection(timer);
    if (before.cpuClockOffsetNs <= 0n) throw new Error(`timer section holds a non-positive clock (${before.cpuClockOffsetNs} ns): not a stopped VM's state`);
    if (before.cpuTicksOffset <= 0n) throw new Error(`timer section holds a non-positive tick count (${before.cpuTicksOffset}): not a stopped VM's state`);
    const ticksPerNs = Number(before.cpuTicksOffset) / Number(before.cpuClockOffsetNs);
    // Δ × ticks / ns, rounded to the nearest tick, exactly (no float rounding on 64-bit values).
    const scaled = deltaNs * before.cpuTicksOffset;
    const half = before.cpuClockOffsetNs / 2n;
    const deltaTicks = (scaled >= 0n ? scaled + half : scaled - half) / before.cpuClockOffsetNs;
    state.replaceSectionBody(
      TIMER_SECTION_NAME,
      encodeTimerSection({ ...before, cpuTicksOffset: before.cpuTicksOffset + deltaTicks, cpuClockOffsetNs: before.cpuClockOffsetNs + deltaNs }),
    );
    done.push({ section: 'timer', deltaNs, deltaTicks, ticksPerNs });
  }
  const kvmclock = state.findSection(KVMCLOCK_SECTION_NAME);
  if (kvmclock) {
    const before = decodeKvmclockSection(kvmclock);
    if (before.clockIsReliable === false) {
      throw new Error('kvmclock section says clock_is_reliable=false: QEMU would ignore a rewritten clock');
    }
    state.replaceSectionBody(KVMCLOCK_SECTION_NAME, encodeKvmclockSection({ ...before, clockNs: before.clockNs + deltaNs }));
    done.push({ section: 'kvmclock', deltaNs });
  }
  if (done.length === 0) throw new Error('the stream has neither a TCG timer nor a kvmclock section: nothing to rewrite');
  return done;
}

/**
 * A checkpoint split for a late rewrite: `head` is the stream's bytes up to the device state
 * (RAM, sent to QEMU at once, as stored), `deviceState` the rest, held back until the clock
 * delta can be computed as late as possible.
 */
export interface SplitCheckpoint {
  head: Buffer;
  deviceState: DeviceStateSet;
  /** Encodes the (rewritten) device-state part: the stream's remaining bytes. */
  encodeTail(): Buffer;
}

/**
 * splitCheckpoint for a checkpoint the store assembled (a chain, in parts): the head stays the
 * parts as they are, and only the preamble and the device state are parsed — not the RAM.
 */
export function splitAssembledCheckpoint(checkpoint: AssembledCheckpoint): Omit<SplitCheckpoint, 'head'> & { head: Buffer[] } {
  const records = parseMigrationStream(Buffer.concat([checkpoint.preamble, checkpoint.deviceState]));
  const first = records.findIndex((r) => r.type === 'device-section');
  if (first < 0) throw new Error('checkpoint has no device state');
  const deviceState = new DeviceStateSet(records.slice(first));
  return { head: checkpoint.ram, deviceState, encodeTail: () => encodeRecords(deviceState.records) };
}

export function splitCheckpoint(stream: Buffer): SplitCheckpoint {
  const records = parseMigrationStream(stream);
  const first = records.findIndex((r) => r.type === 'device-section');
  if (first < 0) throw new Error('checkpoint has no device state');
  let headBytes = 0;
  for (const record of records.slice(0, first)) headBytes += encodedSize(record);
  const tail: MigrationRecord[] = records.slice(first);
  const deviceState = new DeviceStateSet(tail);
  return {
    head: stream.subarray(0, headBytes),
    deviceState,
    encodeTail: () => encodeRecords(deviceState.records),
  };
}
