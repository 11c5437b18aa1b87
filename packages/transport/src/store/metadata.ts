import type { CheckpointLayout, RamBlockExtent } from '../stream/chain.js';
import { invalidDiskList } from './disk-delta.js';

/** What a checkpoint's disk deltas apply on: the previous committed checkpoint's disk state, or a completed seed. */
export type DiskBase = { epoch: number } | { seed: string };

/** One disk's delta file of a checkpoint (`<epoch>.<disk>.delta`), as committed. */
export interface DiskDeltaMetadata {
  disk: string;
  sizeBytes: number;
  /** The delta file's size and checksum. */
  bytes: number;
  sha256: string;
  extents: number;
  /** Bytes of data in it (ZERO extents carry none). */
  dataBytes: number;
}

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
  /** The disks' writes since `diskBase`, one delta file per disk (present together with diskBase). */
  disks?: DiskDeltaMetadata[];
  diskBase?: DiskBase;
  /**
   * Set once the store compacted this checkpoint (CheckpointStore, compaction): its data is then
   * `dataFile` (`<epoch>.full-<pid>.ckpt`), one full stream with every page of its former chain,
   * whose checksum is `dataSha256`; `bytes` and `layout` describe that file, and `base` is gone.
   * `sha256` stays the checksum of the stream as committed: the identity an increment names as its
   * base. Absent: the data is `<epoch>.ckpt`, checked against `sha256`.
   */
  dataFile?: string;
  dataSha256?: string;
  /** When it was compacted (ISO 8601). */
  compactedAt?: string;
}

const REQUIRED: Record<
  Exclude<keyof CheckpointMetadata, 'base' | 'ramBlocks' | 'layout' | 'guestClockNs' | 'disks' | 'diskBase' | 'dataFile' | 'dataSha256'>,
  'string' | 'number' | 'optional-string'
> = {
  vm: 'string',
  epoch: 'number',
  stopNs: 'string',
  resumeNs: 'string',
  bytes: 'number',
  sha256: 'string',
  qemuVersion: 'string',
  domainXml: 'optional-string',
  committedAt: 'string',
  compactedAt: 'optional-string',
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
  const disks = record['disks'];
  if (disks !== undefined && (invalidDiskList(disks) !== undefined || !(disks as unknown[]).every(validDeltaMetadata))) return 'disks';
  const diskBase = record['diskBase'];
  if (diskBase !== undefined && !validDiskBase(diskBase, record['epoch'] as number)) return 'diskBase';
  if ((disks === undefined) !== (diskBase === undefined)) return disks === undefined ? 'disks' : 'diskBase';
  const dataFile = record['dataFile'];
  const dataSha256 = record['dataSha256'];
  if (dataFile !== undefined && (typeof dataFile !== 'string' || compactedDataEpoch(dataFile) !== record['epoch'])) return 'dataFile';
  if (dataSha256 !== undefined && !/^[0-9a-f]{64}$/.test(String(dataSha256))) return 'dataSha256';
  if ((dataFile === undefined) !== (dataSha256 === undefined)) return dataFile === undefined ? 'dataFile' : 'dataSha256';
  if (dataFile !== undefined && base !== undefined) return 'base'; // compacted: a full checkpoint
  return undefined;
}

/** `<epoch>.full-<pid>.ckpt`: a compacted checkpoint's data file. */
export const COMPACTED_DATA_NAME = /^(\d+)\.full-(\d+)\.ckpt$/;

/** The epoch a compacted data file's name says, or undefined if it is not such a name. */
export function compactedDataEpoch(name: string): number | undefined {
  const match = COMPACTED_DATA_NAME.exec(name);
  return match ? Number(match[1]) : undefined;
}

function validDeltaMetadata(value: unknown): boolean {
  const d = value as Record<string, unknown>;
  return (
    ['bytes', 'extents', 'dataBytes'].every((k) => Number.isSafeInteger(d[k]) && (d[k] as number) >= 0) &&
    (d['bytes'] as number) >= 8 &&
    /^[0-9a-f]{64}$/.test(String(d['sha256']))
  );
}

/** `{epoch}` of an earlier checkpoint, or `{seed}`: exactly one of them. */
export function validDiskBase(value: unknown, epoch?: number): value is DiskBase {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) return false;
  const keys = Object.keys(value);
  if (keys.length !== 1) return false;
  const base = value as Record<string, unknown>;
  if (keys[0] === 'epoch') return Number.isSafeInteger(base['epoch']) && (base['epoch'] as number) >= 0 && (epoch === undefined || (base['epoch'] as number) < epoch);
  return keys[0] === 'seed' && validSeedId(base['seed']);
}

/** A seed's id: 1–200 printable ASCII characters (it is written into the replica's marker and replies). */
export function validSeedId(value: unknown): value is string {
  return typeof value === 'string' && /^[\x21-\x7e]{1,200}$/.test(value);
}
