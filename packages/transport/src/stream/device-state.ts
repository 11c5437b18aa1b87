// The device-state part of a parsed stream as a small editable set: find a section by idstr and
// swap its body. The clock-correction code uses it on the `timer` (TCG) and `kvmclock` (KVM)
// sections; everything else stays opaque.

import { DeviceStateError } from './errors.js';
import type { DeviceSectionRecord, MigrationRecord } from './records.js';

export interface ReplaceSectionOptions {
  /** Which instance of the section (default: the first with that name). */
  instanceId?: number;
  /**
   * Accept a body of a different length. The stream's VM description then no longer matches the
   * section (QEMU's loader skips the description, but this parser will reject the stream).
   */
  allowLengthChange?: boolean;
}

export class DeviceStateSet {
  private readonly list: MigrationRecord[];

  /**
   * Wraps records of a parsed stream — the whole stream, or only its device-state part (device
   * sections, EOF, description). The records are copied into a new array; replacing a body
   * replaces the record object in that array, never mutates the original.
   */
  constructor(records: Iterable<MigrationRecord>) {
    this.list = [...records];
  }

  /** The records with replacements applied, in stream order, ready for the writer. */
  get records(): readonly MigrationRecord[] {
    return this.list;
  }

  /** The device sections, in stream order. */
  get sections(): DeviceSectionRecord[] {
    return this.list.filter((r): r is DeviceSectionRecord => r.type === 'device-section');
  }

  private indexOf(name: string, instanceId: number | undefined): number {
    return this.list.findIndex(
      (r) => r.type === 'device-section' && r.idstr === name && (instanceId === undefined || r.instanceId === instanceId),
    );
  }

  /** The section with idstr `name` (e.g. "timer", "kvmclock", "0000:00:01.0/PIIX3"). */
  findSection(name: string, instanceId?: number): DeviceSectionRecord | undefined {
    const i = this.indexOf(name, instanceId);
    return i < 0 ? undefined : (this.list[i] as DeviceSectionRecord);
  }

  /** Replaces the body of section `name`; returns the new section record. */
  replaceSectionBody(name: string, body: Buffer, options: ReplaceSectionOptions = {}): DeviceSectionRecord {
    const i = this.indexOf(name, options.instanceId);
    if (i < 0) {
      const inst = options.instanceId === undefined ? '' : ` instance ${options.instanceId}`;
      throw new DeviceStateError(`no device section '${name}'${inst} in this stream`);
    }
    const old = this.list[i] as DeviceSectionRecord;
    if (body.length !== old.body.length && !options.allowLengthChange) {
      throw new DeviceStateError(
        `new body of section '${name}' is ${body.length} bytes, the old one ${old.body.length}: the VM description would no longer match (pass allowLengthChange to force)`,
      );
    }
    const next: DeviceSectionRecord = { ...old, body };
    this.list[i] = next;
    return next;
  }
}
