import { QmpProtocolError } from './errors.js';

/** One decoded message, with the exact line it came from (for integers beyond 2^53). */
export interface Frame {
  readonly value: unknown;
  readonly raw: string;
}

/**
 * The guest agent writes this byte before the reply to `guest-sync-delimited`, so a client can
 * skip whatever stale output precedes it (QEMU qga/main.c, QGA_SENTINEL_BYTE).
 */
export const SENTINEL_BYTE = 0xff;

export type FrameSink = {
  frame(frame: Frame): void;
  sentinel(): void;
  error(error: QmpProtocolError): void;
};

/**
 * Splits a byte stream into newline-delimited JSON messages, as QMP and the guest agent send them.
 * Chunks may split a message anywhere (even inside a UTF-8 sequence): bytes are buffered until a
 * newline arrives. A line that is not a JSON object is reported to the sink, not thrown, so that
 * the owner decides whether the connection survives.
 */
export class JsonLineDecoder {
  private pending: Buffer[] = [];
  private pendingBytes = 0;

  constructor(
    private readonly sink: FrameSink,
    private readonly maxLineBytes = 16 * 1024 * 1024,
  ) {}

  push(chunk: Buffer): void {
    let start = 0;
    for (let i = 0; i < chunk.length; i++) {
      const byte = chunk[i];
      if (byte === SENTINEL_BYTE) {
        // Only meaningful between messages; anything buffered before it is stale output.
        this.reset();
        start = i + 1;
        this.sink.sentinel();
      } else if (byte === 0x0a) {
        this.append(chunk.subarray(start, i));
        start = i + 1;
        this.flushLine();
      }
    }
    this.append(chunk.subarray(start));
  }

  private append(part: Buffer): void {
    if (part.length === 0) return;
    this.pending.push(part);
    this.pendingBytes += part.length;
    if (this.pendingBytes > this.maxLineBytes) {
      this.reset();
      this.sink.error(new QmpProtocolError(`message longer than ${this.maxLineBytes} bytes without a newline`));
    }
  }

  private flushLine(): void {
    const raw = Buffer.concat(this.pending, this.pendingBytes).toString('utf8').trim();
    this.reset();
    if (raw.length === 0) return;
    let value: unknown;
    try {
      value = JSON.parse(raw);
    } catch {
      this.sink.error(new QmpProtocolError('peer sent a line that is not JSON', raw));
      return;
    }
    if (typeof value !== 'object' || value === null || Array.isArray(value)) {
      this.sink.error(new QmpProtocolError('peer sent JSON that is not an object', raw));
      return;
    }
    this.sink.frame({ value, raw });
  }

  private reset(): void {
    this.pending = [];
    this.pendingBytes = 0;
  }
}

/** JSON.stringify that writes bigints as plain JSON integers (QMP takes 64-bit ints, e.g. guest-set-time). */
export function encodeMessage(message: object): string {
  const marker = '\u0000bigint:';
  const text = JSON.stringify(message, (_key, value: unknown) =>
    typeof value === 'bigint' ? `${marker}${value.toString()}` : value,
  );
  return `${text.replace(/"\\u0000bigint:(-?\d+)"/g, '$1')}\n`;
}
