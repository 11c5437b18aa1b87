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
  | { type: 'ack'; epoch: number; bytes: number; sha256: string }
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

/** Incremental frame parser: push chunks, get whole frames. */
export class FrameDecoder {
  private buffer: Buffer = Buffer.alloc(0);
  private offset = 0;

  push(chunk: Buffer): Frame[] {
    this.buffer = this.buffer.length === 0 ? chunk : Buffer.concat([this.buffer, chunk]);
    const frames: Frame[] = [];
    for (;;) {
      if (this.buffer.length < FRAME_HEADER_BYTES) break;
      const type = this.buffer.readUInt8(0);
      const length = this.buffer.readUInt32BE(1);
      if (type < FrameType.Header || type > FrameType.Abort) {
        throw new FrameError(`unknown frame type ${type} at stream offset ${this.offset}`);
      }
      if (length > MAX_FRAME_PAYLOAD) {
        throw new FrameError(`frame of ${length} bytes at stream offset ${this.offset} exceeds ${MAX_FRAME_PAYLOAD}`);
      }
      if (this.buffer.length < FRAME_HEADER_BYTES + length) break;
      frames.push({ type: type as FrameType, payload: this.buffer.subarray(FRAME_HEADER_BYTES, FRAME_HEADER_BYTES + length) });
      this.buffer = this.buffer.subarray(FRAME_HEADER_BYTES + length);
      this.offset += FRAME_HEADER_BYTES + length;
    }
    return frames;
  }

  /** Bytes of an unfinished frame still buffered (non-zero at end of input means truncation). */
  get pendingBytes(): number {
    return this.buffer.length;
  }
}
