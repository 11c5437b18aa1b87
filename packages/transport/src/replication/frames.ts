/**
 * The replication wire between the primary's sender and the backup's receiver, carried over one
 * SSH exec channel. Each frame: u8 type, be32 payload length, payload. A checkpoint is HEADER,
 * DATA…, then (if its header lists disks) per listed disk, in order, DISK_BEGIN DISK_EXTENT…
 * DISK_END, then TRAILER; the receiver answers each with one JSON line (ack or nack) on its
 * stdout. A seed travels outside any checkpoint: SEED_BEGIN, the disk sections, SEED_END,
 * answered by a seed-ack or seed-nack line.
 */
import {
  decodeExtentHeader,
  DiskDeltaError,
  encodeExtentHeader,
  EXTENT_HEADER_BYTES,
  MAX_EXTENT_DATA,
  type DiskExtent,
  type DiskGeometry,
} from '../store/disk-delta.js';
import type { DiskBase } from '../store/metadata.js';

export const FrameType = {
  /** JSON CheckpointHeader. */
  Header: 1,
  /** A slice of the migration stream. */
  Data: 2,
  /** JSON CheckpointTrailer: what is known only after the stream (the RESUME stamp). */
  Trailer: 3,
  /** The sender gave this checkpoint (or seed) up; the receiver discards it. */
  Abort: 4,
  /** JSON DiskBegin: a disk's section starts. */
  DiskBegin: 5,
  /** be64 offset, be32 length, u8 flags (bit 0 ZERO), then `length` bytes of data unless ZERO. */
  DiskExtent: 6,
  /** JSON DiskEnd: what the section carried, to check against what arrived. */
  DiskEnd: 7,
  /** JSON SeedBegin. */
  SeedBegin: 8,
  /** JSON `{}`: the seed's last section is sent. */
  SeedEnd: 9,
} as const;
export type FrameType = (typeof FrameType)[keyof typeof FrameType];

export interface CheckpointHeader {
  vm: string;
  epoch: number;
  qemuVersion: string;
  domainXml?: string;
  /** An incremental checkpoint: the committed one it applies on (see CheckpointStore). */
  base?: { epoch: number; sha256: string };
  /** The disks whose sections follow the data, in this order. */
  disks?: DiskGeometry[];
  /** What those sections apply on: the previous committed checkpoint's disk state, or a completed seed. */
  diskBase?: DiskBase;
}

export interface CheckpointTrailer {
  stopNs: string;
  resumeNs: string;
}

export type DiskBeginFrame = DiskGeometry;

export interface DiskEndFrame {
  /** DISK_EXTENT frames in the section. */
  extents: number;
  /** Bytes of data in them (ZERO extents carry none). */
  dataBytes: number;
}

export interface SeedBeginFrame {
  seed: string;
  disks: DiskGeometry[];
}

export type ReceiverReply =
  /** guestClockNs: the checkpoint's virtual clock at the freeze, when the receiver parsed a timer section. */
  | { type: 'ack'; epoch: number; bytes: number; sha256: string; guestClockNs?: string }
  | { type: 'nack'; epoch: number; code: string; message: string }
  /** bytes: the seed's data bytes written into the replica. */
  | { type: 'seed-ack'; seed: string; bytes: number }
  | { type: 'seed-nack'; seed: string; code: string; message: string };

export const FRAME_HEADER_BYTES = 5;
/** Upper bound on one frame's payload, so a corrupt length cannot make the receiver allocate GBs. */
export const MAX_FRAME_PAYLOAD = 16 * 1024 * 1024;

export function encodeFrameHeader(type: FrameType, length: number): Buffer {
  const header = Buffer.allocUnsafe(FRAME_HEADER_BYTES);
  header.writeUInt8(type, 0);
  header.writeUInt32BE(length, 1);
  return header;
}

export function encodeJsonFrame(type: FrameType, value: object): Buffer {
  const payload = Buffer.from(JSON.stringify(value), 'utf8');
  return Buffer.concat([encodeFrameHeader(type, payload.length), payload]);
}

/**
 * A DISK_EXTENT frame as two buffers: its frame and extent headers (18 bytes), and the data (the
 * caller's, not copied), absent for a ZERO extent.
 */
export function encodeDiskExtentFrame(extent: DiskExtent): [Buffer] | [Buffer, Buffer] {
  const dataBytes = extent.data?.length ?? 0;
  const head = Buffer.concat([encodeFrameHeader(FrameType.DiskExtent, EXTENT_HEADER_BYTES + dataBytes), encodeExtentHeader(extent)]);
  return extent.data ? [head, extent.data] : [head];
}

/** A DISK_EXTENT payload (whole, as FrameDecoder gives it, which has checked it) as an extent; data is a view. */
export function decodeDiskExtent(payload: Buffer): DiskExtent {
  const header = decodeExtentHeader(payload, 0);
  return header.zero ? { offset: header.offset, length: header.length } : { offset: header.offset, length: header.length, data: payload.subarray(EXTENT_HEADER_BYTES) };
}

export interface Frame {
  type: FrameType;
  payload: Buffer;
}

export type FrameErrorCode = 'UNKNOWN_TYPE' | 'TOO_LONG' | 'BAD_EXTENT';

export class FrameError extends Error {
  override name = 'FrameError';
  constructor(
    message: string,
    readonly code: FrameErrorCode = 'UNKNOWN_TYPE',
    /** Stream offset of the frame (or the field) that is wrong. */
    readonly offset?: number,
  ) {
    super(message);
  }
}

/**
 * Incremental frame parser: push chunks, get frames. DATA is passed through as it arrives — one
 * frame may come out as several DATA pieces, each a view of an input chunk, so the migration
 * stream is never copied here (this runs over every byte of every checkpoint on the backup).
 * Every other frame comes out whole: a DISK_EXTENT as a view of its chunk when it lies in one
 * (else joined once, when its last byte arrives), checked (flags, length, data size); the small
 * JSON frames as copies.
 */
export class FrameDecoder {
  /** Bytes of the DATA frame still to pass through. */
  private dataLeft = 0;
  /** Header bytes of the next frame, or payload bytes of a whole frame being gathered, split across chunks. */
  private partial: Buffer[] = [];
  private partialBytes = 0;
  /** The frame being gathered once its header is read. */
  private gathering: { type: FrameType; length: number; offset: number } | undefined;
  /** Stream offset of the first byte of the chunk being parsed. */
  private position = 0;

  push(chunk: Buffer): Frame[] {
    const frames: Frame[] = [];
    let at = 0;
    for (;;) {
      if (this.dataLeft > 0) {
        if (at >= chunk.length) break;
        const n = Math.min(this.dataLeft, chunk.length - at);
        frames.push({ type: FrameType.Data, payload: chunk.subarray(at, at + n) });
        this.dataLeft -= n;
        at += n;
        continue;
      }
      if (this.gathering) {
        const { type, length, offset } = this.gathering;
        const want = length - this.partialBytes;
        if (chunk.length - at < want) {
          this.keep(chunk.subarray(at));
          break;
        }
        const piece = chunk.subarray(at, at + want);
        // a DISK_EXTENT in one chunk stays a view (Node never reuses a stream chunk's memory);
        // small JSON frames are copied so they do not pin a large chunk
        const payload = this.partialBytes > 0 ? Buffer.concat([...this.partial, piece]) : type === FrameType.DiskExtent ? piece : Buffer.from(piece);
        at += want;
        this.partial = [];
        this.partialBytes = 0;
        this.gathering = undefined;
        if (type === FrameType.DiskExtent) checkExtentPayload(payload, offset + FRAME_HEADER_BYTES);
        frames.push({ type, payload });
        continue;
      }
      if (at >= chunk.length) break;
      // a frame header, perhaps split across chunks
      const have = this.partialBytes;
      const offset = this.position + at - have;
      const take = Math.min(FRAME_HEADER_BYTES - have, chunk.length - at);
      if (have + take < FRAME_HEADER_BYTES) {
        this.keep(chunk.subarray(at, at + take));
        break;
      }
      const header = have > 0 ? Buffer.concat([...this.partial, chunk.subarray(at, at + take)]) : chunk.subarray(at, at + FRAME_HEADER_BYTES);
      at += take;
      this.partial = [];
      this.partialBytes = 0;
      const type = header.readUInt8(0);
      const length = header.readUInt32BE(1);
      this.checkHeader(type, length, offset);
      if (type === FrameType.Data) this.dataLeft = length;
      else this.gathering = { type: type as FrameType, length, offset };
    }
    this.position += chunk.length;
    return frames;
  }

  /** Bytes of an unfinished frame (non-zero at the end of the input means it was cut short). */
  get pendingBytes(): number {
    return this.partialBytes + this.dataLeft + (this.gathering ? FRAME_HEADER_BYTES : 0);
  }

  private keep(rest: Buffer): void {
    if (rest.length === 0) return;
    this.partial.push(rest);
    this.partialBytes += rest.length;
  }

  private checkHeader(type: number, length: number, offset: number): void {
    if (type < FrameType.Header || type > FrameType.SeedEnd) {
      throw new FrameError(`unknown frame type ${type} at stream offset ${offset}`, 'UNKNOWN_TYPE', offset);
    }
    if (length > MAX_FRAME_PAYLOAD) {
      throw new FrameError(`frame of ${length} bytes at stream offset ${offset} exceeds ${MAX_FRAME_PAYLOAD}`, 'TOO_LONG', offset);
    }
    if (type === FrameType.DiskExtent && (length < EXTENT_HEADER_BYTES || length > EXTENT_HEADER_BYTES + MAX_EXTENT_DATA)) {
      throw new FrameError(`disk extent frame of ${length} bytes at stream offset ${offset}: an extent is ${EXTENT_HEADER_BYTES} bytes plus at most ${MAX_EXTENT_DATA} of data`, 'BAD_EXTENT', offset);
    }
  }
}

/** The extent header is valid and the payload carries exactly its data (none for ZERO). */
function checkExtentPayload(payload: Buffer, offset: number): void {
  let header;
  try {
    header = decodeExtentHeader(payload, 0, offset);
  } catch (error) {
    if (error instanceof DiskDeltaError) throw new FrameError(`bad disk extent frame: ${error.message}`, 'BAD_EXTENT', error.offset);
    throw error;
  }
  const dataBytes = payload.length - EXTENT_HEADER_BYTES;
  if (dataBytes !== (header.zero ? 0 : header.length)) {
    throw new FrameError(
      `disk extent frame at stream offset ${offset - FRAME_HEADER_BYTES}: ${header.zero ? 'a ZERO extent' : `an extent of ${header.length} bytes`} with ${dataBytes} bytes of data`,
      'BAD_EXTENT',
      offset - FRAME_HEADER_BYTES,
    );
  }
}
