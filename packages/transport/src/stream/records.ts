// The typed records a migration stream is made of. Each record holds exactly what is needed to
// write it back byte for byte (see writer.ts); strings from the wire are latin1-decoded so that
// any byte sequence round-trips.

import type { VmDescription } from './description.js';

/** `QEVM` + be32 version (qemu_savevm_state_header). */
export interface HeaderRecord {
  type: 'header';
  version: number;
}

/** One `configuration/...` vmstate subsection after the machine name, kept as raw field bytes. */
export interface ConfigurationSubsection {
  name: string;
  versionId: number;
  /** The subsection's field bytes (after the 0x05/name/version header). */
  data: Buffer;
}

/** QEMU_VM_CONFIGURATION: vmstate_configuration (be32 len, machine type name, subsections). */
export interface ConfigurationRecord {
  type: 'configuration';
  machineType: string;
  subsections: ConfigurationSubsection[];
}

/** QEMU_VM_COMMAND: be16 command, be16 length, data; MIG_CMD_PACKAGED is followed by its blob. */
export interface CommandRecord {
  type: 'command';
  command: number;
  data: Buffer;
  /** For MIG_CMD_PACKAGED only: the wrapped stream (not parsed). */
  packaged?: Buffer;
}

/** QEMU_VM_SECTION_START of an iterative section ("ram"). */
export interface SectionStartRecord {
  type: 'section-start';
  sectionId: number;
  idstr: string;
  instanceId: number;
  versionId: number;
}

/** QEMU_VM_SECTION_PART / _END of an iterative section: the id names an earlier START. */
export interface SectionPartRecord {
  type: 'section-part' | 'section-end';
  sectionId: number;
}

/** QEMU_VM_SECTION_FOOTER closing an iterative section. */
export interface SectionFooterRecord {
  type: 'section-footer';
  sectionId: number;
}

export interface RamBlockInfo {
  idstr: string;
  usedLength: number;
  /** Present when postcopy was advised and the block's page size differs from the host's. */
  pageSize?: number;
  /** Present with the x-ignore-shared capability: the block's memory-region address. */
  mrAddr?: number;
}

interface RamRecordBase {
  /** The address part of the be64 record header (offset in the block, or the total for MEM_SIZE). */
  addr: number;
  /** The flag bits of the header, exactly as on the wire (RamFlag). */
  flags: number;
}

/** RAM_SAVE_FLAG_MEM_SIZE: the block list at the start of "ram" (ram_save_setup). */
export interface RamMemSizeRecord extends RamRecordBase {
  type: 'ram-mem-size';
  blocks: RamBlockInfo[];
}

interface RamPageBase extends RamRecordBase {
  /** The RAM block this page belongs to; written on the wire only when CONTINUE is not set. */
  block: string;
}

export interface RamPageRecord extends RamPageBase {
  type: 'ram-page';
  data: Buffer;
}

export interface RamZeroRecord extends RamPageBase {
  type: 'ram-zero';
  /** The byte the whole page is filled with (always 0 from QEMU 7.2). */
  fill: number;
}

export interface RamCompressedRecord extends RamPageBase {
  type: 'ram-compressed';
  data: Buffer;
}

export interface RamXbzrleRecord extends RamPageBase {
  type: 'ram-xbzrle';
  encoding: number;
  data: Buffer;
}

export interface RamEosRecord extends RamRecordBase {
  type: 'ram-eos';
}

export type RamRecord =
  | RamMemSizeRecord
  | RamPageRecord
  | RamZeroRecord
  | RamCompressedRecord
  | RamXbzrleRecord
  | RamEosRecord;

/**
 * A non-iterative device section (QEMU_VM_SECTION_FULL) with its body kept opaque; header and
 * footer are implied.
 */
export interface DeviceSectionRecord {
  type: 'device-section';
  sectionId: number;
  idstr: string;
  instanceId: number;
  versionId: number;
  body: Buffer;
  /**
   * True when the body's extent was checked against the stream's VM description; false when the
   * stream had none and the extent was found by scanning for footers (see device-region.ts).
   */
  verified: boolean;
}

/** QEMU_VM_EOF. */
export interface EofRecord {
  type: 'eof';
}

/** QEMU_VM_VMDESCRIPTION: be32 length + JSON, after EOF. */
export interface VmDescriptionRecord {
  type: 'vm-description';
  /** The raw JSON bytes, for byte-exact writing. */
  data: Buffer;
  description: VmDescription;
}

export type MigrationRecord =
  | HeaderRecord
  | ConfigurationRecord
  | CommandRecord
  | SectionStartRecord
  | SectionPartRecord
  | SectionFooterRecord
  | RamRecord
  | DeviceSectionRecord
  | EofRecord
  | VmDescriptionRecord;

export type MigrationRecordType = MigrationRecord['type'];
