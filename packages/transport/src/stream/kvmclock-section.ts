// The KVM `kvmclock` section (hw/i386/kvm/clock.c, kvmclock_vmsd, version 1): be64 clock (ns),
// then, when needed (mach_use_reliable_get_clock), subsection "kvmclock/clock_is_reliable" with
// one bool byte. If that flag is false the destination recomputes the clock from guest memory and
// ignores `clock` (kvmclock_post_load / kvm_update_clock), so a rewrite must keep it true.

import { SectionType } from './constants.js';
import { DeviceStateError } from './errors.js';
import type { DeviceSectionRecord } from './records.js';

export const KVMCLOCK_SECTION_NAME = 'kvmclock';
export const KVMCLOCK_SECTION_VERSION = 1;
const RELIABLE_SUBSECTION = 'kvmclock/clock_is_reliable';

export interface KvmclockSectionState {
  /** KVMClockState.clock, ns (uint64). */
  clockNs: bigint;
  /** The clock_is_reliable subsection's flag; undefined when the subsection is absent. */
  clockIsReliable: boolean | undefined;
  /** The subsection's version id (1), kept for an exact rewrite. */
  subsectionVersion?: number;
}

export function decodeKvmclockSection(section: DeviceSectionRecord | Buffer): KvmclockSectionState {
  let body: Buffer;
  if (Buffer.isBuffer(section)) {
    body = section;
  } else {
    if (section.idstr !== KVMCLOCK_SECTION_NAME) throw new DeviceStateError(`section '${section.idstr}' is not the kvmclock section`);
    if (section.versionId !== KVMCLOCK_SECTION_VERSION) {
      throw new DeviceStateError(`kvmclock section version ${section.versionId}, only ${KVMCLOCK_SECTION_VERSION} is understood`);
    }
    body = section.body;
  }
  if (body.length < 8) throw new DeviceStateError(`kvmclock section body is ${body.length} bytes, expected at least 8`);
  const clockNs = body.readBigUInt64BE(0);
  if (body.length === 8) return { clockNs, clockIsReliable: undefined };
  const nameLen = RELIABLE_SUBSECTION.length;
  const expected = 8 + 2 + nameLen + 4 + 1;
  if (
    body.length !== expected ||
    body[8] !== SectionType.SUBSECTION ||
    body[9] !== nameLen ||
    body.toString('latin1', 10, 10 + nameLen) !== RELIABLE_SUBSECTION
  ) {
    throw new DeviceStateError(`kvmclock section body of ${body.length} bytes does not end with the '${RELIABLE_SUBSECTION}' subsection`);
  }
  return {
    clockNs,
    subsectionVersion: body.readUInt32BE(10 + nameLen),
    clockIsReliable: body[14 + nameLen] !== 0,
  };
}

export function encodeKvmclockSection(state: KvmclockSectionState): Buffer {
  const nameLen = RELIABLE_SUBSECTION.length;
  const body = Buffer.alloc(state.clockIsReliable === undefined ? 8 : 8 + 2 + nameLen + 4 + 1);
  body.writeBigUInt64BE(state.clockNs, 0);
  if (state.clockIsReliable !== undefined) {
    body[8] = SectionType.SUBSECTION;
    body[9] = nameLen;
    body.write(RELIABLE_SUBSECTION, 10, 'latin1');
    body.writeUInt32BE(state.subsectionVersion ?? 1, 10 + nameLen);
    body[14 + nameLen] = state.clockIsReliable ? 1 : 0;
  }
  return body;
}
