// QEMU_VM_CONFIGURATION (savevm.c, vmstate_configuration): be32 length, machine type name, then
// the subsections whose .needed hook is true. Their layouts are fixed and few, so they are decoded
// here by name, the way vmstate_subsection_load recognises them: a 0x05 byte, then a name that
// starts with "configuration/". Anything else after the name belongs to the next record.

import { CONFIGURATION_SUBSECTION_PREFIX, FTVM_INCREMENTAL_SUBSECTION, SectionType } from './constants.js';
import type { ByteReader } from './reader.js';
import type { ConfigurationRecord, ConfigurationSubsection } from './records.js';

/** Longest machine type name accepted (QEMU's are ~20 bytes). */
const MAX_MACHINE_NAME = 4096;
/** More capabilities than QEMU has. */
const MAX_CAPABILITIES = 256;

/** Reads a subsection's field bytes for the subsections QEMU 7.2 can emit. */
function readSubsectionData(r: ByteReader, name: string, at: number): Buffer {
  const start = r.pos;
  switch (name) {
    case 'configuration/target-page-bits': {
      // VMSTATE_UINT32(target_page_bits); a page must hold the RAM flag bits and fit in a be16 length.
      const bits = r.u32();
      if (bits < 10 || bits > 16) r.fail('BAD_CONFIGURATION', `target page bits ${bits}`, at);
      break;
    }
    case 'configuration/capabilities': {
      // VMSTATE_UINT32 caps_count, then VMSTATE_VARRAY of vmstate_info_capability (u8 len + name).
      const count = r.u32();
      if (count > MAX_CAPABILITIES) r.fail('BAD_CONFIGURATION', `configuration lists ${count} capabilities`, at);
      for (let i = 0; i < count; i++) r.latin1(r.u8());
      break;
    }
    case 'configuration/uuid': // VMSTATE_UINT8_ARRAY_V(uuid.data, 16)
      r.bytes(16);
      break;
    case FTVM_INCREMENTAL_SUBSECTION: // ftvm's increment marker: no fields
      break;
    default:
      r.fail('UNSUPPORTED', `unknown configuration subsection '${name}'`, at);
  }
  return r.buf.subarray(start, r.pos);
}

export interface ReadConfigurationOptions {
  /** Refuse a stream marked as an increment (INCREMENTAL_STREAM at the marker's offset). */
  requireFull?: boolean;
}

/** Reads the configuration record; the cursor is on the 0x07 byte. */
export function readConfiguration(r: ByteReader, options: ReadConfigurationOptions = {}): ConfigurationRecord {
  r.u8(); // QEMU_VM_CONFIGURATION
  const lenAt = r.offset;
  const len = r.u32();
  if (len > MAX_MACHINE_NAME) r.fail('BAD_CONFIGURATION', `machine type name of ${len} bytes`, lenAt);
  const machineType = r.latin1(len);
  const subsections: ConfigurationSubsection[] = [];
  // vmstate_subsection_load: peek 0x05, the name length and the name; stop unless it is ours.
  while (r.peekU8() === SectionType.SUBSECTION) {
    const nameLen = r.peekU8(1);
    r.ensure(2 + nameLen);
    const name = r.buf.toString('latin1', r.pos + 2, r.pos + 2 + nameLen);
    if (!name.startsWith(CONFIGURATION_SUBSECTION_PREFIX)) break;
    const at = r.offset;
    r.pos += 2 + nameLen;
    const versionId = r.u32();
    if (name === FTVM_INCREMENTAL_SUBSECTION && options.requireFull) {
      r.fail(
        'INCREMENTAL_STREAM',
        'the stream is an x-ftvm-incremental increment (it carries only the pages written since the previous checkpoint) where a full image is required: assemble it with its base',
        at,
      );
    }
    subsections.push({ name, versionId, data: readSubsectionData(r, name, at) });
  }
  return { type: 'configuration', machineType, subsections };
}

/** The capability names of a configuration record's `configuration/capabilities` subsection. */
export function configurationCapabilities(record: ConfigurationRecord): string[] {
  const sub = record.subsections.find((s) => s.name === 'configuration/capabilities');
  if (!sub) return [];
  const caps: string[] = [];
  const count = sub.data.readUInt32BE(0);
  let p = 4;
  for (let i = 0; i < count; i++) {
    const n = sub.data[p]!;
    caps.push(sub.data.toString('latin1', p + 1, p + 1 + n));
    p += 1 + n;
  }
  return caps;
}

/** Whether the stream is an increment: its configuration carries ftvm's x-ftvm-incremental marker. */
export function configurationIncremental(record: ConfigurationRecord): boolean {
  return record.subsections.some((s) => s.name === FTVM_INCREMENTAL_SUBSECTION);
}

/** TARGET_PAGE_SIZE from `configuration/target-page-bits`, if the stream carries it. */
export function configurationPageSize(record: ConfigurationRecord): number | undefined {
  const sub = record.subsections.find((s) => s.name === 'configuration/target-page-bits');
  return sub ? 2 ** sub.data.readUInt32BE(0) : undefined;
}
