// The TCG `timer` section (softmmu/cpu-timers.c, vmstate_timers, version 2): be64
// cpu_ticks_offset, 8 unused bytes (VMSTATE_UNUSED), be64 cpu_clock_offset. While the VM is
// stopped (always so when a migration completes: cpu_disable_ticks ran) they hold the absolute
// guest tick count and guest virtual-clock ns. With icount, subsection "timer/icount" follows;
// it is kept as raw bytes.

import { DeviceStateError } from './errors.js';
import type { DeviceSectionRecord } from './records.js';

export const TIMER_SECTION_NAME = 'timer';
export const TIMER_SECTION_VERSION = 2;
const TIMER_FIELDS_SIZE = 24;

export interface TimerSectionState {
  /** cpu_ticks_offset: guest ticks (host TSC rate) — int64. */
  cpuTicksOffset: bigint;
  /** The 8 VMSTATE_UNUSED bytes (zero from QEMU), kept for an exact rewrite. */
  unused: Buffer;
  /** cpu_clock_offset: guest virtual clock in ns — int64. */
  cpuClockOffsetNs: bigint;
  /** Subsections after the fields (icount), raw; empty without icount. */
  subsections: Buffer;
}

/** Decodes a timer section's body; checks it is the TCG timer section, version 2. */
export function decodeTimerSection(section: DeviceSectionRecord | Buffer): TimerSectionState {
  let body: Buffer;
  if (Buffer.isBuffer(section)) {
    body = section;
  } else {
    if (section.idstr !== TIMER_SECTION_NAME) throw new DeviceStateError(`section '${section.idstr}' is not the timer section`);
    if (section.versionId !== TIMER_SECTION_VERSION) {
      throw new DeviceStateError(`timer section version ${section.versionId}, only ${TIMER_SECTION_VERSION} is understood`);
    }
    body = section.body;
  }
  if (body.length < TIMER_FIELDS_SIZE) throw new DeviceStateError(`timer section body is ${body.length} bytes, expected at least ${TIMER_FIELDS_SIZE}`);
  return {
    cpuTicksOffset: body.readBigInt64BE(0),
    unused: body.subarray(8, 16),
    cpuClockOffsetNs: body.readBigInt64BE(16),
    subsections: body.subarray(TIMER_FIELDS_SIZE),
  };
}

/** Encodes a timer section body (the inverse of decodeTimerSection). */
export function encodeTimerSection(state: TimerSectionState): Buffer {
  if (state.unused.length !== 8) throw new DeviceStateError(`timer 'unused' field must be 8 bytes, got ${state.unused.length}`);
  const body = Buffer.alloc(TIMER_FIELDS_SIZE + state.subsections.length);
  body.writeBigInt64BE(state.cpuTicksOffset, 0);
  state.unused.copy(body, 8);
  body.writeBigInt64BE(state.cpuClockOffsetNs, 16);
  state.subsections.copy(body, TIMER_FIELDS_SIZE);
  return body;
}
