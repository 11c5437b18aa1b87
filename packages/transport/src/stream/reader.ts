// A byte cursor over one contiguous Buffer that knows its absolute stream offset. Every read is
// bounds-checked first and throws NeedMoreData instead of letting Buffer's RangeError escape, so a
// parser step either completes or can be retried from its start once more bytes arrived.

import { MigrationStreamError, NeedMoreData, type MigrationStreamErrorCode } from './errors.js';

const TWO_POW_32 = 0x1_0000_0000;

export class ByteReader {
  constructor(
    readonly buf: Buffer,
    public pos: number,
    /** Absolute stream offset of buf[0]. */
    readonly base: number,
  ) {}

  /** Absolute stream offset of the next byte to read. */
  get offset(): number {
    return this.base + this.pos;
  }

  get available(): number {
    return this.buf.length - this.pos;
  }

  /** Throws NeedMoreData unless `n` more bytes are buffered. */
  ensure(n: number): void {
    if (this.pos + n > this.buf.length) throw new NeedMoreData(this.base + this.pos + n);
  }

  u8(): number {
    this.ensure(1);
    return this.buf[this.pos++]!;
  }

  u16(): number {
    this.ensure(2);
    const v = this.buf.readUInt16BE(this.pos);
    this.pos += 2;
    return v;
  }

  u32(): number {
    this.ensure(4);
    const v = this.buf.readUInt32BE(this.pos);
    this.pos += 4;
    return v;
  }

  /** be64 as [high, low] 32-bit halves, for callers that split flags from addresses. */
  u64Parts(): [hi: number, lo: number] {
    this.ensure(8);
    const hi = this.buf.readUInt32BE(this.pos);
    const lo = this.buf.readUInt32BE(this.pos + 4);
    this.pos += 8;
    return [hi, lo];
  }

  /** be64 as a Number; values past 2^53 are reported as `code` errors naming `what`. */
  u64(what: string, code: MigrationStreamErrorCode): number {
    const at = this.offset;
    const [hi, lo] = this.u64Parts();
    if (hi > 0x1f_ffff) throw new MigrationStreamError(code, at, `${what} 0x${hi.toString(16)}${lo.toString(16).padStart(8, '0')} is beyond 2^53`);
    return hi * TWO_POW_32 + lo;
  }

  /** A view (no copy) of the next n bytes. */
  bytes(n: number): Buffer {
    this.ensure(n);
    const v = this.buf.subarray(this.pos, this.pos + n);
    this.pos += n;
    return v;
  }

  /** n bytes as latin1 text: every byte maps to one char, so the string writes back identically. */
  latin1(n: number): string {
    this.ensure(n);
    const v = this.buf.toString('latin1', this.pos, this.pos + n);
    this.pos += n;
    return v;
  }

  /** The byte `ahead` bytes past the cursor, without consuming it. */
  peekU8(ahead = 0): number {
    this.ensure(ahead + 1);
    return this.buf[this.pos + ahead]!;
  }

  /** The be64 `ahead` bytes past the cursor as [hi, lo], without consuming it. */
  peekU64Parts(ahead = 0): [hi: number, lo: number] {
    this.ensure(ahead + 8);
    return [this.buf.readUInt32BE(this.pos + ahead), this.buf.readUInt32BE(this.pos + ahead + 4)];
  }

  fail(code: MigrationStreamErrorCode, detail: string, at: number = this.offset): never {
    throw new MigrationStreamError(code, at, detail);
  }
}
