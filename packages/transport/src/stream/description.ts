// The JSON VM description QEMU appends after QEMU_VM_EOF (savevm.c,
// qemu_savevm_state_complete_precopy_non_iterable) and the exact body sizes it implies.
//
// Why the sizes are exact: vmstate_save_state_v (vmstate.c) records each field's "size" as the
// bytes its put() actually wrote (vmsd_desc_field_end gets written_bytes), nested structs
// included; a compressible array is described once with "array_len" and the first element's size
// (vmsd_desc_field_start / vmsd_can_compress); subsections (vmstate_subsection_save) are listed
// under "subsections" and each costs 0x05, u8 name length, name, be32 version on the wire on top
// of its fields. Old-style handlers (vmstate_save_old_style) appear as one "data" field with the
// written size. scripts/analyze-migration.py walks streams with the same rules.

export interface VmDescriptionField {
  name: string;
  type?: string;
  size: number;
  array_len?: number;
  index?: number;
  struct?: VmDescriptionVmsd;
}

export interface VmDescriptionVmsd {
  vmsd_name: string;
  version: number;
  fields?: VmDescriptionField[];
  subsections?: VmDescriptionVmsd[];
}

export interface VmDescriptionDevice extends VmDescriptionVmsd {
  /** The section idstr. */
  name: string;
  instance_id: number;
}

export interface VmDescription {
  page_size?: number;
  devices: VmDescriptionDevice[];
}

/** A description that does not have the shape QEMU writes. */
export class DescriptionShapeError extends Error {}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function isCount(v: unknown): v is number {
  return typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
}

/**
 * Parses the description bytes; returns undefined if they are not JSON with a `devices` array
 * (used to tell the real description from look-alike bytes inside device state).
 */
export function parseVmDescription(data: Buffer): VmDescription | undefined {
  let value: unknown;
  try {
    value = JSON.parse(data.toString('utf8'));
  } catch {
    return undefined;
  }
  if (!isRecord(value) || !Array.isArray(value.devices)) return undefined;
  return value as unknown as VmDescription;
}

function fieldsSize(fields: unknown, where: string): number {
  if (fields === undefined) return 0;
  if (!Array.isArray(fields)) throw new DescriptionShapeError(`${where}: "fields" is not an array`);
  let total = 0;
  for (const f of fields as unknown[]) {
    if (!isRecord(f) || !isCount(f.size)) throw new DescriptionShapeError(`${where}: a field has no numeric "size"`);
    const n = f.array_len === undefined ? 1 : f.array_len;
    if (!isCount(n)) throw new DescriptionShapeError(`${where}: field ${String(f.name)} has a bad "array_len"`);
    total += f.size * n;
  }
  return total;
}

/** Wire size of a vmsd's fields plus its subsections (recursively), as vmstate_save_state_v wrote them. */
export function describedVmsdSize(vmsd: unknown, where: string): number {
  if (!isRecord(vmsd)) throw new DescriptionShapeError(`${where}: not an object`);
  let total = fieldsSize(vmsd.fields, where);
  if (vmsd.subsections !== undefined) {
    if (!Array.isArray(vmsd.subsections)) throw new DescriptionShapeError(`${where}: "subsections" is not an array`);
    for (const sub of vmsd.subsections as unknown[]) {
      if (!isRecord(sub) || typeof sub.vmsd_name !== 'string') {
        throw new DescriptionShapeError(`${where}: a subsection has no "vmsd_name"`);
      }
      const nameLen = Buffer.byteLength(sub.vmsd_name, 'utf8');
      // QEMU_VM_SUBSECTION byte, u8 length, name, be32 version_id.
      total += 1 + 1 + nameLen + 4 + describedVmsdSize(sub, `${where}/${sub.vmsd_name}`);
    }
  }
  return total;
}

export interface DescribedSection {
  idstr: string;
  instanceId: number;
  bodySize: number;
}

/** The expected sequence of FULL sections, with body sizes, from a description. */
export function describedSections(desc: VmDescription): DescribedSection[] {
  return desc.devices.map((dev: unknown, i) => {
    if (!isRecord(dev) || typeof dev.name !== 'string' || !isCount(dev.instance_id)) {
      throw new DescriptionShapeError(`devices[${i}] has no "name"/"instance_id"`);
    }
    return { idstr: dev.name, instanceId: dev.instance_id, bodySize: describedVmsdSize(dev, `devices[${i}] ${dev.name}`) };
  });
}

export function describeMismatch(expected: DescribedSection, detail: string): string {
  return `VM description disagrees with the stream for section '${expected.idstr}' (instance ${expected.instanceId}): ${detail}`;
}
