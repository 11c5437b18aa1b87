/**
 * The disk-delta codec: one checkpoint's writes to one disk, as the backup keeps them.
 *
 * File: magic `FTVMDLT1`, then records `be64 offset, be32 length, u8 flags, data` — data (`length`
 * bytes, at most 4 MiB) unless flags has ZERO (the range reads as zeros). The same 13-byte record
 * header is the payload header of a DiskExtent frame on the replication wire. The file carries no
 * checksum of its own: the checkpoint's metadata records its size, sha256 and counts, and the
 * reader checks all of them.
 */
import { createHash, type Hash } from 'node:crypto';
import fs from 'node:fs/promises';
import { formatOffset } from '../stream/errors.js';
import { WriteBehind } from './write-behind.js';

export const DELTA_MAGIC = Buffer.from('FTVMDLT1', 'latin1');
export const EXTENT_HEADER_BYTES = 13;
/** flags bit 0: no data follows, the range reads as zeros. */
export const EXTENT_ZERO = 0x01;
/** Most data one extent carries (a wire frame, a delta record). */
export const MAX_EXTENT_DATA = 4 * 1024 * 1024;
/** Longest ZERO extent one record can say (be32 length). */
export const MAX_ZERO_EXTENT = 0xffff_ffff;

/** A range of a disk: its bytes, or zeros when `data` is absent. */
export interface DiskExtent {
  offset: number;
  length: number;
  data?: Buffer;
}

/** One disk's extents, in a checkpoint or a seed. */
export interface DiskSection {
  disk: string;
  sizeBytes: number;
  extents: AsyncIterable<DiskExtent>;
}

/** What the store consumes (the same shape the sender produces). */
export type DiskSectionInput = DiskSection;

/** A disk as a checkpoint or seed names it. */
export interface DiskGeometry {
  disk: string;
  sizeBytes: number;
}

/** What the metadata records of a delta file, and what reading it back must find. */
export interface DiskDeltaSummary {
  /** File size, magic included. */
  bytes: number;
  sha256: string;
  extents: number;
  /** Bytes of data carried (ZERO extents carry none). */
  dataBytes: number;
}

export type DiskDeltaErrorCode = 'MISSING' | 'BAD_MAGIC' | 'TRUNCATED' | 'BAD_FLAGS' | 'BAD_LENGTH' | 'OUT_OF_RANGE' | 'SIZE_MISMATCH' | 'CHECKSUM_MISMATCH' | 'COUNT_MISMATCH';

export class DiskDeltaError extends Error {
  override readonly name = 'DiskDeltaError';
  constructor(
    readonly code: DiskDeltaErrorCode,
    /** Byte offset in the delta file (or extent stream) where the problem is. */
    readonly offset: number,
    detail: string,
    readonly file?: string,
  ) {
    super(`disk delta${file ? ` ${file}` : ''}: ${detail} at offset ${formatOffset(offset)} [${code}]`);
  }
}

/** Disk names become file names (`<epoch>.<disk>.delta`, `disks/<disk>.img`): libvirt targets (vda, sdb, hdc…). */
const DISK_NAME = /^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$/;

export function isValidDiskName(disk: unknown): disk is string {
  return typeof disk === 'string' && DISK_NAME.test(disk);
}

/** Why a disk list is unusable (bad names or sizes, duplicates), or undefined. */
export function invalidDiskList(disks: unknown): string | undefined {
  if (!Array.isArray(disks)) return 'not a list';
  const seen = new Set<string>();
  for (const d of disks as Partial<DiskGeometry>[]) {
    if (!isValidDiskName(d?.disk)) return `disk name ${JSON.stringify(d?.disk)} (letters, digits, _ and -, at most 64)`;
    if (!Number.isSafeInteger(d.sizeBytes) || d.sizeBytes! < 0) return `size of disk '${d.disk}': ${JSON.stringify(d.sizeBytes)}`;
    if (seen.has(d.disk)) return `disk '${d.disk}' listed twice`;
    seen.add(d.disk);
  }
  return undefined;
}

/**
 * Why an extent cannot be applied to a disk of `sizeBytes`, or undefined. `oneRecord`: it must
 * also fit one record (at most MAX_EXTENT_DATA of data; a sender splits longer ones).
 */
export function invalidExtent(extent: DiskExtent, sizeBytes: number, oneRecord = true): string | undefined {
  const { offset, length, data } = extent;
  if (!Number.isSafeInteger(offset) || offset < 0) return `offset ${offset} is not a non-negative integer`;
  if (!Number.isSafeInteger(length) || length <= 0) return `length ${length} is not a positive integer`;
  if (offset + length > sizeBytes) return `extent ${offset}+${length} ends past the disk's ${sizeBytes} bytes`;
  if (data !== undefined && data.length !== length) return `extent at ${offset} says ${length} bytes but carries ${data.length}`;
  if (!oneRecord) return undefined;
  if (data !== undefined && length > MAX_EXTENT_DATA) return `extent at ${offset} carries ${length} bytes, more than ${MAX_EXTENT_DATA}`;
  if (data === undefined && length > MAX_ZERO_EXTENT) return `zero extent at ${offset} of ${length} bytes is longer than ${MAX_ZERO_EXTENT}`;
  return undefined;
}

export function encodeExtentHeader(extent: DiskExtent): Buffer {
  const header = Buffer.allocUnsafe(EXTENT_HEADER_BYTES);
  header.writeBigUInt64BE(BigInt(extent.offset), 0);
  header.writeUInt32BE(extent.length, 8);
  header.writeUInt8(extent.data === undefined ? EXTENT_ZERO : 0, 12);
  return header;
}

export interface ExtentHeader {
  offset: number;
  length: number;
  flags: number;
  zero: boolean;
}

/**
 * Reads and checks a 13-byte extent header at `at` of `buf` (`base`: the absolute offset of
 * `buf[0]`, for messages). Limits only; the disk's bounds are the caller's to check.
 */
export function decodeExtentHeader(buf: Buffer, at: number, base = 0, file?: string): ExtentHeader {
  if (buf.length - at < EXTENT_HEADER_BYTES) {
    throw new DiskDeltaError('TRUNCATED', base + at, `extent header cut short (${buf.length - at} of ${EXTENT_HEADER_BYTES} bytes)`, file);
  }
  const offset = buf.readBigUInt64BE(at);
  const length = buf.readUInt32BE(at + 8);
  const flags = buf.readUInt8(at + 12);
  if ((flags & ~EXTENT_ZERO) !== 0) throw new DiskDeltaError('BAD_FLAGS', base + at + 12, `unknown extent flags 0x${flags.toString(16)}`, file);
  const zero = (flags & EXTENT_ZERO) !== 0;
  if (length === 0) throw new DiskDeltaError('BAD_LENGTH', base + at + 8, 'extent of length 0', file);
  if (!zero && length > MAX_EXTENT_DATA) throw new DiskDeltaError('BAD_LENGTH', base + at + 8, `extent of ${length} bytes of data exceeds ${MAX_EXTENT_DATA}`, file);
  if (offset > BigInt(Number.MAX_SAFE_INTEGER - length)) throw new DiskDeltaError('OUT_OF_RANGE', base + at, `extent offset ${offset} is out of range`, file);
  return { offset: Number(offset), length, flags, zero };
}

/**
 * Writes one delta file: to `path` (the caller's temporary name) with O_EXCL, hashed as written,
 * batched and written back while more arrives (see WriteBehind); `finish()` fsyncs and closes.
 */
export class DiskDeltaWriter {
  private readonly hash: Hash = createHash('sha256');
  private bytes = 0;
  private extents = 0;
  private dataBytes = 0;
  private closed = false;

  private constructor(
    readonly path: string,
    private readonly sizeBytes: number,
    private readonly file: fs.FileHandle,
    private readonly writer: WriteBehind,
  ) {}

  static async create(path: string, sizeBytes: number): Promise<DiskDeltaWriter> {
    const file = await fs.open(path, 'wx');
    const writer = new DiskDeltaWriter(path, sizeBytes, file, new WriteBehind(file));
    await writer.put(DELTA_MAGIC);
    return writer;
  }

  /** Appends one extent; throws (a plain Error naming it) if it does not fit the disk. */
  async add(extent: DiskExtent): Promise<void> {
    const bad = invalidExtent(extent, this.sizeBytes);
    if (bad) throw new Error(bad);
    await this.put(encodeExtentHeader(extent));
    if (extent.data) {
      await this.put(extent.data);
      this.dataBytes += extent.length;
    }
    this.extents++;
  }

  /** Everything written, fsync'd and closed. */
  async finish(): Promise<DiskDeltaSummary> {
    try {
      await this.writer.finish();
    } finally {
      await this.close();
    }
    return { bytes: this.bytes, sha256: this.hash.digest('hex'), extents: this.extents, dataBytes: this.dataBytes };
  }

  /** Closes without finishing (the caller removes the file). */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.writer.settled();
    await this.file.close();
  }

  private async put(chunk: Buffer): Promise<void> {
    this.hash.update(chunk);
    this.bytes += chunk.length;
    await this.writer.write(chunk);
  }
}

export interface ScanOptions {
  /** Checked against the file before and after reading it. */
  expected?: DiskDeltaSummary;
  /** Called for each record, in order, once it is whole (data: a view valid until the promise settles). */
  onRecord?: (extent: DiskExtent) => Promise<void> | void;
}

const READ_BUFFER_BYTES = MAX_EXTENT_DATA + 1024 * 1024;

/**
 * Reads a delta file once: checks its size against `expected` first, then hashes every byte and
 * parses every record (each in the disk's bounds), calling `onRecord`; at the end checks the
 * checksum and counts. Only a caller that has already scanned without `onRecord` knows a record
 * it applies is from an intact file — the store verifies a delta fully before applying it.
 */
export async function scanDiskDelta(file: string, sizeBytes: number, options: ScanOptions = {}): Promise<DiskDeltaSummary> {
  const { expected, onRecord } = options;
  const handle = await fs.open(file, 'r');
  try {
    const size = (await handle.stat()).size;
    if (expected && size !== expected.bytes) {
      throw new DiskDeltaError('SIZE_MISMATCH', Math.min(size, expected.bytes), `file is ${size} bytes, committed ${expected.bytes}`, file);
    }
    const hash = createHash('sha256');
    const buf = Buffer.allocUnsafe(READ_BUFFER_BYTES);
    let start = 0; // first unparsed byte in buf
    let end = 0; // end of valid bytes in buf
    let position = 0; // file offset of buf[0]
    let eof = false;
    /** Makes `n` bytes available from `start` (false: the file ends first). */
    const need = async (n: number): Promise<boolean> => {
      while (end - start < n && !eof) {
        if (start > 0) {
          buf.copy(buf, 0, start, end);
          position += start;
          end -= start;
          start = 0;
        }
        const { bytesRead } = await handle.read(buf, end, buf.length - end, position + end);
        if (bytesRead === 0) eof = true;
        hash.update(buf.subarray(end, end + bytesRead));
        end += bytesRead;
      }
      return end - start >= n;
    };
    if (!(await need(DELTA_MAGIC.length)) || !buf.subarray(0, DELTA_MAGIC.length).equals(DELTA_MAGIC)) {
      throw new DiskDeltaError('BAD_MAGIC', 0, `not a disk delta (magic ${JSON.stringify(buf.subarray(0, Math.min(end, 8)).toString('latin1'))})`, file);
    }
    start = DELTA_MAGIC.length;
    let extents = 0;
    let dataBytes = 0;
    while (await need(1)) {
      const at = position + start;
      if (!(await need(EXTENT_HEADER_BYTES))) throw new DiskDeltaError('TRUNCATED', at, `record header cut short (${end - start} bytes left)`, file);
      const header = decodeExtentHeader(buf, start, position, file);
      if (header.offset + header.length > sizeBytes) {
        throw new DiskDeltaError('OUT_OF_RANGE', at, `extent ${header.offset}+${header.length} ends past the disk's ${sizeBytes} bytes`, file);
      }
      start += EXTENT_HEADER_BYTES;
      let data: Buffer | undefined;
      if (!header.zero) {
        if (!(await need(header.length))) throw new DiskDeltaError('TRUNCATED', at, `record data cut short (${end - start} of ${header.length} bytes)`, file);
        data = buf.subarray(start, start + header.length);
        start += header.length;
        dataBytes += header.length;
      }
      extents++;
      if (onRecord) await onRecord({ offset: header.offset, length: header.length, ...(data ? { data } : {}) });
    }
    const summary = { bytes: position + end, sha256: hash.digest('hex'), extents, dataBytes };
    if (expected) {
      if (summary.sha256 !== expected.sha256) {
        throw new DiskDeltaError('CHECKSUM_MISMATCH', 0, `sha256 ${summary.sha256.slice(0, 12)}…, committed ${expected.sha256.slice(0, 12)}…`, file);
      }
      if (summary.extents !== expected.extents || summary.dataBytes !== expected.dataBytes) {
        throw new DiskDeltaError('COUNT_MISMATCH', summary.bytes, `${summary.extents} extents / ${summary.dataBytes} data bytes, committed ${expected.extents} / ${expected.dataBytes}`, file);
      }
    }
    return summary;
  } finally {
    await handle.close();
  }
}
