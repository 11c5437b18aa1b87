import type { CheckpointLayout, RamBlockExtent } from '../stream/chain.js';

/** What the store keeps about each committed checkpoint, next to its data file. */
export interface CheckpointMetadata {
  vm: string;
  epoch: number;
  /** The primary's QMP STOP and RESUME stamps around this checkpoint (ns since the epoch, decimal). */
  stopNs: string;
  resumeNs: string;
  bytes: number;
  sha256: string;
  qemuVersion: string;
  domainXml?: string;
  /** Wall-clock time the backup committed it (ISO 8601). */
  committedAt: string;
  /**
   * An incremental checkpoint (x-ftvm-incremental) holds only the pages written since this
   * earlier epoch: loading it needs the whole chain back to a full one. Absent: a full checkpoint.
   */
  base?: number;
  /** The RAM blocks the stream announced (when the store verified it as a migration stream). */
  ramBlocks?: RamBlockExtent[];
  /** Where the stream's parts begin (idem): a chain is assembled from these without parsing. */
  layout?: CheckpointLayout;
  /** The VM's virtual clock at the freeze, ns, decimal (idem; the `timer` section's cpu_clock_offset). */
  guestClockNs?: string;
}

const REQUIRED: Record<Exclude<keyof CheckpointMetadata, 'base' | 'ramBlocks' | 'layout' | 'guestClockNs'>, 'string' | 'number' | 'optional-string'> = {
  vm: 'string',
  epoch: 'number',
  stopNs: 'string',
  resumeNs: 'string',
  bytes: 'number',
  sha256: 'string',
  qemuVersion: 'string',
  domainXml: 'optional-string',
  committedAt: 'string',
};

/** Validates parsed JSON as metadata; returns the name of the first bad field, or undefined. */
export function invalidMetadataField(value: unknown): string | undefined {
  if (typeof value !== 'object' || value === null) return '(root)';
  const record = value as Record<string, unknown>;
  for (const [field, kind] of Object.entries(REQUIRED)) {
    const v = record[field];
    if (kind === 'optional-string' ? v !== undefined && typeof v !== 'string' : typeof v !== kind) return field;
  }
  const base = record['base'];
  if (base !== undefined && (!Number.isSafeInteger(base) || (base as number) < 0 || (base as number) >= (record['epoch'] as number))) return 'base';
  const blocks = record['ramBlocks'];
  if (blocks !== undefined && (!Array.isArray(blocks) || !blocks.every((b) => typeof b?.id === 'string' && Number.isSafeInteger(b?.bytes)))) return 'ramBlocks';
  const layout = record['layout'] as Record<string, unknown> | undefined;
  if (layout !== undefined && (typeof layout !== 'object' || layout === null || !['ramSectionId', 'preambleEnd', 'ramSetupEnd', 'deviceStateStart'].every((k) => Number.isSafeInteger(layout[k])))) return 'layout';
  if (!Number.isSafeInteger(record['epoch']) || (record['epoch'] as number) < 0) return 'epoch';
  if (!/^[0-9a-f]{64}$/.test(String(record['sha256']))) return 'sha256';
  if (!/^-?\d+$/.test(String(record['stopNs'])) || !/^-?\d+$/.test(String(record['resumeNs']))) return 'stopNs/resumeNs';
  if (record['guestClockNs'] !== undefined && !/^\d+$/.test(String(record['guestClockNs']))) return 'guestClockNs';
  return undefined;
}
