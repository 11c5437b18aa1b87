/**
 * The replication wire between the primary's sender and the backup's receiver, carried over one
 * SSH exec channel. Each frame: u8 type, be32 payload length, payload. A checkpoint is HEADER,
 * DATA…, TRAILER; the receiver answers each with one JSON line (ack or nack) on its stdout.
 */
export const FrameType = {
  /** JSON CheckpointHeader. */
  Header: 1,
  /** A slice of the migration stream. */
  Data: 2,
  /** JSON CheckpointTrailer: what is known only after the stream (the RESUME stamp). */
  Trailer: 3,
  /** The sender gave this checkpoint up (migration failed); the receiver discards it. */
  Abort: 4,
} as const;
export type FrameType = (typeof FrameType)[keyof typeof FrameType];

export interface CheckpointHeader {
  vm: string;
  epoch: number;
  qemuVersion: string;
  domainXml?: string;
  /** An incremental checkpoint: the committed one it applies on (see CheckpointStore). */
  base?: { epoch: number; sha256: string };
}

export interface CheckpointTrailer {
  stopNs: string;
  resumeNs: string;
}

export type ReceiverReply =
  /** guestClockNs: the checkpoint's virtual clock at the freeze, when the receiver parsed a timer section. */
  | { type: 'ack'; epoch: number; bytes: number; sha256: string; guestClockNs?: string }
  | { type: 'nack'; epoch: number; code: string; message: string };

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

export interface Frame {
  type: FrameType;
  payload: Buffer;
}

export class FrameError extends Error {
  override name = 'FrameError';
}

/**
 * Incremental frame parser: push chunks, get frames. DATA is passed through as it arrives — one
 * frame may come out as several DATA pieces, each a view of an input chunk, so the migration
 * stream is never copied here (this runs over every byte of every checkpoint on the backup).
 * HEADER, TRAILER and ABORT are small and come out whole.
 */
export class FrameDecoder {
  /** Bytes of the DATA frame still to pass through. */
  private dataLeft = 0;
  /** A frame header, or a whole small frame, split across chunks. */
  private partial: Buffer[] = [];
  private partialBytes = 0;
  private offset = 0;

  push(chunk: Buffer): Frame[] {
    const frames: Frame[] = [];
    let at = 0;
    while (at < chunk.length) {
      if (this.dataLeft > 0) {
        const n = Math.min(this.dataLeft, chunk.length - at);
        frames.push({ type: FrameType.Data, payload: chunk.subarray(at, at + n) });
        this.dataLeft -= n;
        this.offset += n;
        at += n;
        continue;
      }
      const rest = chunk.subarray(at);
      const joined = this.partialBytes > 0 ? Buffer.concat([...this.partial, rest]) : rest;
      if (joined.length < FRAME_HEADER_BYTES) return this.keep(frames, rest);
      const type = joined.readUInt8(0);
      const length = joined.readUInt32BE(1);
      this.checkHeader(type, length);
      const headerFromChunk = FRAME_HEADER_BYTES - this.partialBytes;
      if (type === FrameType.Data) {
        this.partial = [];
        this.partialBytes = 0;
        this.offset += FRAME_HEADER_BYTES;
        this.dataLeft = length;
        at += headerFromChunk;
        continue;
      }
      if (joined.length < FRAME_HEADER_BYTES + length) return this.keep(frames, rest);
      frames.push({ type: type as FrameType, payload: Buffer.from(joined.subarray(FRAME_HEADER_BYTES, FRAME_HEADER_BYTES + length)) });
      at += FRAME_HEADER_BYTES + length - this.partialBytes;
      this.offset += FRAME_HEADER_BYTES + length;
      this.partial = [];
      this.partialBytes = 0;
    }
    return frames;
  }

  /** Bytes of an unfinished frame (non-zero at the end of the input means it was cut short). */
  get pendingBytes(): number {
    return this.partialBytes + this.dataLeft;
  }

  private keep(frames: Frame[], rest: Buffer): Frame[] {
    this.partial.push(rest);
    this.partialBytes += rest.length;
    return frames;
  }

  private checkHeader(type: number, length: number): void {
    if (type < FrameType.Header || type > FrameType.Abort) {
      throw new FrameError(`unknown frame type ${type} at stream offset ${this.offset}`);
    }
    if (length > MAX_FRAME_PAYLOAD) {
      throw new FrameError(`frame of ${length} bytes at stream offset ${this.offset} exceeds ${MAX_FRAME_PAYLOAD}`);
    }
  }
}
