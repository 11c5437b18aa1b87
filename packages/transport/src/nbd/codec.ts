// The NBD wire codec: serializers for what the client sends (options, requests), serializers for
// what a server sends (used by tests and fakes), and one incremental parser for everything the
// server sends — greeting, option replies, simple replies and structured reply chunks — fed
// Buffers of any size, down to one byte.
//
// The parser follows the connection's phases by itself (greeting → options → transmission after the
// NBD_REP_ACK to NBD_OPT_GO), so bytes that arrive together across a phase change are parsed right.
// Every message except OFFSET_DATA is taken whole (lengths are capped); OFFSET_DATA payloads are
// streamed as views of the incoming chunks, so a 32 MiB read is never buffered twice: the client
// copies each piece once, into the read's result.

import {
  CHUNK_HEADER_SIZE,
  Cmd,
  GREETING_SIZE,
  IHAVEOPT,
  Info,
  MAX_STRING_SIZE,
  NBD_MAGIC,
  OLDSTYLE_MAGIC,
  OPTION_HEADER_SIZE,
  OPTION_REPLY_HEADER_SIZE,
  OPTION_REPLY_MAGIC,
  Opt,
  REQUEST_MAGIC,
  REQUEST_SIZE,
  Rep,
  ReplyFlag,
  ReplyType,
  SIMPLE_REPLY_MAGIC,
  SIMPLE_REPLY_SIZE,
  STRUCTURED_REPLY_MAGIC,
  cmdName,
  isReplyTypeError,
  optName,
  repName,
  replyTypeName,
} from './constants.js';
import { NbdError, NbdProtocolError } from './errors.js';

const TWO_POW_32 = 0x1_0000_0000;
const EMPTY = Buffer.alloc(0);

// ---- small helpers ------------------------------------------------------------------------------

function writeU64(buf: Buffer, value: number, at: number): void {
  buf.writeUInt32BE(Math.floor(value / TWO_POW_32), at);
  buf.writeUInt32BE(value >>> 0, at + 4);
}

/** be64 as a Number, or undefined past 2^53 (no export, offset or cookie of ours gets there). */
function readU64(buf: Buffer, at: number): number | undefined {
  const hi = buf.readUInt32BE(at);
  if (hi > 0x1f_ffff) return undefined;
  return hi * TWO_POW_32 + buf.readUInt32BE(at + 4);
}

function hex64(buf: Buffer, at: number): string {
  return `0x${buf.toString('hex', at, at + 8)}`;
}

/** A protocol string (export name, context query) as UTF-8, checked against the protocol's limits. */
export function encodeString(value: string, what: string): Buffer {
  const bytes = Buffer.from(value, 'utf8');
  if (bytes.length > MAX_STRING_SIZE) throw new NbdError('BAD_REQUEST', `${what} is ${bytes.length} bytes; NBD allows at most ${MAX_STRING_SIZE}`);
  if (bytes.includes(0)) throw new NbdError('BAD_REQUEST', `${what} ${JSON.stringify(value)} contains a NUL byte`);
  return bytes;
}

function checkU64(value: number, what: string): void {
  if (!Number.isSafeInteger(value) || value < 0) throw new NbdError('BAD_REQUEST', `${what} ${value} is not a non-negative safe integer`);
}

function checkU32(value: number, what: string): void {
  if (!Number.isInteger(value) || value < 0 || value >= TWO_POW_32) throw new NbdError('BAD_REQUEST', `${what} ${value} does not fit in 32 bits`);
}

// ---- client → server ----------------------------------------------------------------------------

/** The 32-bit client flags sent after the greeting. */
export function encodeClientFlags(flags: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(flags >>> 0, 0);
  return b;
}

/** `IHAVEOPT`, be32 option, be32 length, data. */
export function encodeOption(option: number, data: Buffer = EMPTY): Buffer {
  const b = Buffer.allocUnsafe(OPTION_HEADER_SIZE + data.length);
  IHAVEOPT.copy(b, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(data.length, 12);
  data.copy(b, OPTION_HEADER_SIZE);
  return b;
}

/** NBD_OPT_GO (or NBD_OPT_INFO): be32 name length, name, be16 count, be16 info type each. */
export function encodeGoOption(exportName: string, infos: readonly number[] = [], option: number = Opt.GO): Buffer {
  const name = encodeString(exportName, 'export name');
  const data = Buffer.allocUnsafe(4 + name.length + 2 + 2 * infos.length);
  data.writeUInt32BE(name.length, 0);
  name.copy(data, 4);
  data.writeUInt16BE(infos.length, 4 + name.length);
  infos.forEach((info, i) => data.writeUInt16BE(info, 6 + name.length + 2 * i));
  return encodeOption(option, data);
}

/** NBD_OPT_SET_META_CONTEXT (or LIST): be32 name length, name, be32 count, (be32 length, query) each. */
export function encodeMetaContextOption(exportName: string, queries: readonly string[], option: number = Opt.SET_META_CONTEXT): Buffer {
  const name = encodeString(exportName, 'export name');
  const qs = queries.map((q) => encodeString(q, 'metadata context query'));
  const data = Buffer.allocUnsafe(4 + name.length + 4 + qs.reduce((n, q) => n + 4 + q.length, 0));
  let p = data.writeUInt32BE(name.length, 0);
  p += name.copy(data, p);
  p = data.writeUInt32BE(qs.length, p);
  for (const q of qs) {
    p = data.writeUInt32BE(q.length, p);
    p += q.copy(data, p);
  }
  return encodeOption(option, data);
}

export interface NbdRequest {
  /** NBD_CMD_*. */
  command: number;
  /** NBD_CMD_FLAG_*. */
  flags?: number;
  /** The 64-bit handle the server echoes; ours are small integers. */
  cookie: number;
  offset: number;
  length: number;
}

/** be32 magic, be16 flags, be16 type, be64 cookie, be64 offset, be32 length (no write payloads here). */
export function encodeRequest(request: NbdRequest): Buffer {
  checkU64(request.cookie, 'cookie');
  checkU64(request.offset, 'offset');
  checkU32(request.length, 'length');
  const b = Buffer.allocUnsafe(REQUEST_SIZE);
  b.writeUInt32BE(REQUEST_MAGIC, 0);
  b.writeUInt16BE(request.flags ?? 0, 4);
  b.writeUInt16BE(request.command, 6);
  writeU64(b, request.cookie, 8);
  writeU64(b, request.offset, 16);
  b.writeUInt32BE(request.length, 24);
  return b;
}

/** Parses a request header (what a server reads; used by fakes). */
export function decodeRequest(b: Buffer, at = 0): Required<NbdRequest> {
  if (b.length < REQUEST_SIZE) throw new NbdProtocolError('TRUNCATED', at + b.length, `a request needs ${REQUEST_SIZE} bytes, got ${b.length}`);
  if (b.readUInt32BE(0) !== REQUEST_MAGIC) throw new NbdProtocolError('BAD_MAGIC', at, `request magic 0x${b.readUInt32BE(0).toString(16)}`);
  const cookie = readU64(b, 8);
  const offset = readU64(b, 16);
  if (cookie === undefined || offset === undefined) throw new NbdProtocolError('BAD_REPLY', at + 8, 'cookie or offset beyond 2^53');
  return { flags: b.readUInt16BE(4), command: b.readUInt16BE(6), cookie, offset, length: b.readUInt32BE(24) };
}

// ---- server → client (for tests and fakes) ------------------------------------------------------

export function encodeGreeting(handshakeFlags: number): Buffer {
  const b = Buffer.allocUnsafe(GREETING_SIZE);
  NBD_MAGIC.copy(b, 0);
  IHAVEOPT.copy(b, 8);
  b.writeUInt16BE(handshakeFlags, 16);
  return b;
}

export function encodeOptionReply(option: number, reply: number, data: Buffer = EMPTY): Buffer {
  const b = Buffer.allocUnsafe(OPTION_REPLY_HEADER_SIZE + data.length);
  OPTION_REPLY_MAGIC.copy(b, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(reply >>> 0, 12);
  b.writeUInt32BE(data.length, 16);
  data.copy(b, OPTION_REPLY_HEADER_SIZE);
  return b;
}

/** NBD_REP_INFO payload of NBD_INFO_EXPORT: be16 type, be64 size, be16 transmission flags. */
export function encodeInfoExport(size: number, transmissionFlags: number): Buffer {
  const b = Buffer.allocUnsafe(12);
  b.writeUInt16BE(Info.EXPORT, 0);
  writeU64(b, size, 2);
  b.writeUInt16BE(transmissionFlags, 10);
  return b;
}

export function encodeInfoBlockSize(minimum: number, preferred: number, maximum: number): Buffer {
  const b = Buffer.allocUnsafe(14);
  b.writeUInt16BE(Info.BLOCK_SIZE, 0);
  b.writeUInt32BE(minimum, 2);
  b.writeUInt32BE(preferred, 6);
  b.writeUInt32BE(maximum, 10);
  return b;
}

/** NBD_REP_META_CONTEXT payload: be32 context id, name. */
export function encodeMetaContext(id: number, name: string): Buffer {
  const n = Buffer.from(name, 'utf8');
  const b = Buffer.allocUnsafe(4 + n.length);
  b.writeUInt32BE(id, 0);
  n.copy(b, 4);
  return b;
}

export function encodeSimpleReply(cookie: number, error: number): Buffer {
  const b = Buffer.allocUnsafe(SIMPLE_REPLY_SIZE);
  b.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error, 4);
  writeU64(b, cookie, 8);
  return b;
}

/** A structured reply chunk: be32 magic, be16 flags, be16 type, be64 cookie, be32 length, payload. */
export function encodeChunk(cookie: number, type: number, payload: Buffer, done: boolean): Buffer {
  const b = Buffer.allocUnsafe(CHUNK_HEADER_SIZE + payload.length);
  b.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(done ? ReplyFlag.DONE : 0, 4);
  b.writeUInt16BE(type, 6);
  writeU64(b, cookie, 8);
  b.writeUInt32BE(payload.length, 16);
  payload.copy(b, CHUNK_HEADER_SIZE);
  return b;
}

export function encodeOffsetData(cookie: number, offset: number, data: Buffer, done: boolean): Buffer {
  const p = Buffer.allocUnsafe(8 + data.length);
  writeU64(p, offset, 0);
  data.copy(p, 8);
  return encodeChunk(cookie, ReplyType.OFFSET_DATA, p, done);
}

export function encodeOffsetHole(cookie: number, offset: number, length: number, done: boolean): Buffer {
  const p = Buffer.allocUnsafe(12);
  writeU64(p, offset, 0);
  p.writeUInt32BE(length, 8);
  return encodeChunk(cookie, ReplyType.OFFSET_HOLE, p, done);
}

export function encodeBlockStatus(cookie: number, contextId: number, extents: readonly NbdExtent[], done: boolean): Buffer {
  const p = Buffer.allocUnsafe(4 + 8 * extents.length);
  p.writeUInt32BE(contextId, 0);
  extents.forEach((e, i) => {
    p.writeUInt32BE(e.length, 4 + 8 * i);
    p.writeUInt32BE(e.flags, 8 + 8 * i);
  });
  return encodeChunk(cookie, ReplyType.BLOCK_STATUS, p, done);
}

/** NBD_REPLY_TYPE_ERROR (or ERROR_OFFSET when `offset` is given): be32 errno, be16 length, message[, be64 offset]. */
export function encodeErrorChunk(cookie: number, errno: number, message: string, done: boolean, offset?: number): Buffer {
  const m = Buffer.from(message, 'utf8');
  const p = Buffer.allocUnsafe(6 + m.length + (offset === undefined ? 0 : 8));
  p.writeUInt32BE(errno, 0);
  p.writeUInt16BE(m.length, 4);
  m.copy(p, 6);
  if (offset !== undefined) writeU64(p, offset, 6 + m.length);
  return encodeChunk(cookie, offset === undefined ? ReplyType.ERROR : ReplyType.ERROR_OFFSET, p, done);
}

// ---- parsed messages ----------------------------------------------------------------------------

export interface NbdExtent {
  length: number;
  flags: number;
}

export type NbdInfo =
  | { type: 'export'; size: number; transmissionFlags: number }
  | { type: 'name'; name: string }
  | { type: 'description'; description: string }
  | { type: 'block-size'; minimum: number; preferred: number; maximum: number }
  | { type: 'unknown'; infoType: number; data: Buffer };

/** Every message carries `at`: the absolute offset of its first byte in the server's stream. */
export type NbdServerMessage =
  | { type: 'greeting'; at: number; handshakeFlags: number }
  | {
      type: 'option-reply';
      at: number;
      option: number;
      reply: number;
      /** The raw payload (a view). */
      data: Buffer;
      /** Decoded payload of NBD_REP_INFO. */
      info?: NbdInfo;
      /** Decoded payload of NBD_REP_META_CONTEXT. */
      context?: { id: number; name: string };
      /** The message of an NBD_REP_ERR_* (may be empty). */
      message?: string;
    }
  | { type: 'simple'; at: number; cookie: number; error: number }
  /** A piece of an OFFSET_DATA chunk (a view into the input); `done` only on the last piece of a final chunk. */
  | { type: 'data'; at: number; cookie: number; offset: number; data: Buffer; done: boolean }
  | { type: 'hole'; at: number; cookie: number; offset: number; length: number; done: boolean }
  | { type: 'none'; at: number; cookie: number; done: true }
  | { type: 'block-status'; at: number; cookie: number; contextId: number; extents: NbdExtent[]; done: boolean }
  | {
      type: 'error';
      at: number;
      cookie: number;
      chunkType: number;
      errno: number;
      message: string;
      /** The export offset of ERROR_OFFSET. */
      errorOffset?: number;
      done: boolean;
    };

/** What the parser needs to know about a request in flight to check its replies. */
export interface InFlight {
  command: number;
  offset: number;
  length: number;
}

export type NbdPhase = 'greeting' | 'options' | 'transmission';

export interface NbdReplyParserOptions {
  /** The request in flight for a cookie, or undefined if none. Without it cookies are not checked. */
  lookup?: (cookie: number) => InFlight | undefined;
  /** Largest option reply payload accepted. Default 64 KiB (strings are at most 4 KiB). */
  maxOptionReply?: number;
  /** Largest BLOCK_STATUS payload accepted. Default 16 MiB (QEMU sends at most 1 MiB per context). */
  maxStatusPayload?: number;
  /** Largest error chunk payload accepted. Default 64 KiB. */
  maxErrorPayload?: number;
  /** Phase to start in (tests). Default 'greeting'. */
  phase?: NbdPhase;
}

interface DataState {
  at: number;
  cookie: number;
  next: number;
  left: number;
  done: boolean;
}

// ---- the parser ---------------------------------------------------------------------------------

export class NbdReplyParser {
  private phaseNow: NbdPhase;
  /** Absolute offset of the next unconsumed byte. */
  private base = 0;
  /** Bytes of an incomplete message, starting at `base`. */
  private chunks: Buffer[] = [];
  private buffered = 0;
  /** Bytes needed from `base` before the pending message can be retried (> buffered while any are). */
  private need = 1;
  private data: DataState | undefined;
  private failure: NbdProtocolError | undefined;
  private out: NbdServerMessage | undefined;
  private readonly lookup: ((cookie: number) => InFlight | undefined) | undefined;
  private readonly maxOptionReply: number;
  private readonly maxStatusPayload: number;
  private readonly maxErrorPayload: number;

  constructor(options: NbdReplyParserOptions = {}) {
    this.lookup = options.lookup;
    this.phaseNow = options.phase ?? 'greeting';
    this.maxOptionReply = options.maxOptionReply ?? 64 * 1024;
    this.maxStatusPayload = options.maxStatusPayload ?? 16 * 1024 * 1024;
    this.maxErrorPayload = options.maxErrorPayload ?? 64 * 1024;
  }

  get phase(): NbdPhase {
    return this.phaseNow;
  }

  /** Absolute offset of the first byte not yet turned into a message. */
  get offset(): number {
    return this.base;
  }

  /** True when no message is partly received. */
  get idle(): boolean {
    return this.buffered === 0 && this.data === undefined;
  }

  /**
   * Feeds bytes; calls `onMessage` for every message (or data piece) they complete, in order and
   * synchronously, so a callback that retires a cookie affects the check of the next message.
   * Message buffers (data pieces, option payloads) may be views into `chunk`: do not reuse its
   * memory afterwards. Throws NbdProtocolError (and stays failed).
   */
  push(chunk: Uint8Array, onMessage: (m: NbdServerMessage) => void): void {
    if (this.failure) throw this.failure;
    let buf = Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.length);
    while (buf.length > 0) {
      if (this.buffered === 0) return this.consume(buf, onMessage);
      // A message is pending across chunks: join only the bytes it still needs.
      const missing = this.need - this.buffered;
      if (buf.length < missing) {
        this.chunks.push(buf);
        this.buffered += buf.length;
        return;
      }
      const head = Buffer.concat([...this.chunks, buf.subarray(0, missing)], this.need);
      this.chunks = [];
      this.buffered = 0;
      buf = buf.subarray(missing);
      this.consume(head, onMessage);
    }
  }

  /** Declares the end of input: throws TRUNCATED if it cuts a message. */
  end(): void {
    if (this.failure) throw this.failure;
    if (this.data) {
      this.fail('TRUNCATED', this.base, `the stream ends ${this.data.left} bytes before the end of the OFFSET_DATA chunk at ${this.data.at}`);
    }
    if (this.buffered > 0) {
      this.fail('TRUNCATED', this.base, `the stream ends ${this.buffered} bytes into a message (it needs at least ${this.need})`);
    }
  }

  private fail(code: NbdProtocolError['code'], offset: number, detail: string): never {
    this.failure = new NbdProtocolError(code, offset, detail);
    throw this.failure;
  }

  /** Parses what it can of `buf` (which starts at `base`) and keeps an incomplete tail. */
  private consume(buf: Buffer, onMessage: (m: NbdServerMessage) => void): void {
    let pos = 0;
    while (pos < buf.length) {
      const d = this.data;
      if (d) {
        const n = Math.min(d.left, buf.length - pos);
        const piece = buf.subarray(pos, pos + n);
        const offset = d.next;
        d.next += n;
        d.left -= n;
        pos += n;
        this.base += n;
        if (d.left === 0) this.data = undefined;
        onMessage({ type: 'data', at: d.at, cookie: d.cookie, offset, data: piece, done: d.left === 0 && d.done });
        continue;
      }
      const r = this.step(buf, pos);
      if (r < 0) {
        this.need = -r;
        break;
      }
      pos += r;
      this.base += r;
      const m = this.out;
      this.out = undefined;
      if (m) onMessage(m);
    }
    if (pos < buf.length) {
      this.chunks = [buf.subarray(pos)];
      this.buffered = buf.length - pos;
    } else {
      this.need = 1;
    }
  }

  /** Reads one message at buf[pos] (absolute offset `base`): bytes consumed, or -(bytes needed). */
  private step(buf: Buffer, pos: number): number {
    switch (this.phaseNow) {
      case 'greeting':
        return this.readGreeting(buf, pos);
      case 'options':
        return this.readOptionReply(buf, pos);
      case 'transmission':
        return this.readReply(buf, pos);
    }
  }

  /**
   * Checks the bytes of a magic that have arrived, so garbage is reported at its first wrong byte;
   * returns how many bytes to wait for (one more) while the magic is incomplete, else 0.
   */
  private checkMagic(buf: Buffer, pos: number, magic: Buffer, at: number, what: string): number {
    const avail = Math.min(buf.length - pos, magic.length);
    for (let i = 0; i < avail; i++) {
      if (buf[pos + i] !== magic[i]) this.fail('BAD_MAGIC', at + i, `${what}: expected ${magic.toString('hex')}, found ${buf.toString('hex', pos, pos + avail)}`);
    }
    return avail < magic.length ? avail + 1 : 0;
  }

  private readGreeting(buf: Buffer, pos: number): number {
    const at = this.base;
    const avail = buf.length - pos;
    const want = this.checkMagic(buf, pos, NBD_MAGIC, at, 'not an NBD server (no NBDMAGIC)');
    if (want) return -want;
    if (buf[pos + 8] !== undefined && buf[pos + 8] !== IHAVEOPT[0]) {
      // Oldstyle servers send cliserv_magic here: name it rather than calling it garbage.
      const n = Math.min(avail - 8, 8);
      if (buf.compare(OLDSTYLE_MAGIC, 0, n, pos + 8, pos + 8 + n) === 0) {
        if (n < 8) return -(avail + 1);
        this.fail('UNSUPPORTED', at + 8, 'the server uses oldstyle negotiation (no export names, no options); only fixed newstyle is supported');
      }
    }
    const want2 = this.checkMagic(buf, pos + 8, IHAVEOPT, at + 8, 'greeting: not a newstyle NBD server (no IHAVEOPT)');
    if (want2) return -(8 + want2);
    if (avail < GREETING_SIZE) return -GREETING_SIZE;
    this.out = { type: 'greeting', at, handshakeFlags: buf.readUInt16BE(pos + 16) };
    this.phaseNow = 'options';
    return GREETING_SIZE;
  }

  private readOptionReply(buf: Buffer, pos: number): number {
    const at = this.base;
    const want = this.checkMagic(buf, pos, OPTION_REPLY_MAGIC, at, 'option reply magic');
    if (want) return -want;
    if (buf.length - pos < OPTION_REPLY_HEADER_SIZE) return -OPTION_REPLY_HEADER_SIZE;
    const option = buf.readUInt32BE(pos + 8);
    const reply = buf.readUInt32BE(pos + 12);
    const length = buf.readUInt32BE(pos + 16);
    const what = `${repName(reply)} to ${optName(option)}`;
    if (length > this.maxOptionReply) this.fail('LIMIT_EXCEEDED', at + 16, `${what} claims ${length} bytes of data (limit ${this.maxOptionReply})`);
    if (reply === Rep.ACK && length !== 0) this.fail('BAD_LENGTH', at + 16, `${what} carries ${length} bytes; an ACK has none`);
    const total = OPTION_REPLY_HEADER_SIZE + length;
    if (buf.length - pos < total) return -total;
    const data = buf.subarray(pos + OPTION_REPLY_HEADER_SIZE, pos + total);
    const dataAt = at + OPTION_REPLY_HEADER_SIZE;
    const m: Extract<NbdServerMessage, { type: 'option-reply' }> = { type: 'option-reply', at, option, reply, data };
    if (reply === Rep.INFO) m.info = this.decodeInfo(data, dataAt, what);
    else if (reply === Rep.META_CONTEXT) {
      if (length < 4) this.fail('BAD_LENGTH', at + 16, `${what} of ${length} bytes; it needs a 4-byte context id`);
      if (length - 4 > MAX_STRING_SIZE) this.fail('BAD_LENGTH', at + 16, `${what} names a context of ${length - 4} bytes (limit ${MAX_STRING_SIZE})`);
      m.context = { id: data.readUInt32BE(0), name: data.toString('utf8', 4) };
    } else if (reply >= 0x8000_0000) m.message = data.toString('utf8');
    // The server enters transmission right after acknowledging NBD_OPT_GO.
    if (option === Opt.GO && reply === Rep.ACK) this.phaseNow = 'transmission';
    this.out = m;
    return total;
  }

  private decodeInfo(data: Buffer, at: number, what: string): NbdInfo {
    if (data.length < 2) this.fail('BAD_LENGTH', at - 4, `${what} of ${data.length} bytes; it needs a 2-byte info type`);
    const infoType = data.readUInt16BE(0);
    const exact = (n: number, name: string): void => {
      if (data.length !== n) this.fail('BAD_LENGTH', at - 4, `${what} ${name} of ${data.length} bytes; it is ${n}`);
    };
    switch (infoType) {
      case Info.EXPORT: {
        exact(12, 'NBD_INFO_EXPORT');
        const size = readU64(data, 2);
        if (size === undefined) this.fail('BAD_REPLY', at + 2, `export size ${hex64(data, 2)} is beyond 2^53`);
        return { type: 'export', size, transmissionFlags: data.readUInt16BE(10) };
      }
      case Info.BLOCK_SIZE:
        exact(14, 'NBD_INFO_BLOCK_SIZE');
        return { type: 'block-size', minimum: data.readUInt32BE(2), preferred: data.readUInt32BE(6), maximum: data.readUInt32BE(10) };
      case Info.NAME:
        return { type: 'name', name: data.toString('utf8', 2) };
      case Info.DESCRIPTION:
        return { type: 'description', description: data.toString('utf8', 2) };
      default:
        return { type: 'unknown', infoType, data: data.subarray(2) };
    }
  }

  private readReply(buf: Buffer, pos: number): number {
    const at = this.base;
    const avail = buf.length - pos;
    if (avail < 4) return -4;
    const magic = buf.readUInt32BE(pos);
    if (magic === SIMPLE_REPLY_MAGIC) return this.readSimple(buf, pos, at);
    if (magic === STRUCTURED_REPLY_MAGIC) return this.readChunk(buf, pos, at);
    return this.fail('BAD_MAGIC', at, `reply magic 0x${magic.toString(16).padStart(8, '0')} is neither simple (0x67446698) nor structured (0x668e33ef)`);
  }

  private request(buf: Buffer, pos: number, at: number): { cookie: number; req: InFlight | undefined } {
    const cookie = readU64(buf, pos + 8);
    const req = cookie === undefined ? undefined : this.lookup?.(cookie);
    if (this.lookup && !req) this.fail('UNKNOWN_COOKIE', at + 8, `reply for cookie ${hex64(buf, pos + 8)}, which no request in flight carries`);
    return { cookie: cookie ?? -1, req };
  }

  private readSimple(buf: Buffer, pos: number, at: number): number {
    if (buf.length - pos < SIMPLE_REPLY_SIZE) return -SIMPLE_REPLY_SIZE;
    const error = buf.readUInt32BE(pos + 4);
    const { cookie, req } = this.request(buf, pos, at);
    if (req && req.command === Cmd.READ && error === 0) {
      this.fail('UNEXPECTED_REPLY', at, 'a simple reply without error to NBD_CMD_READ: with structured replies negotiated its data would have no framing');
    }
    this.out = { type: 'simple', at, cookie, error };
    return SIMPLE_REPLY_SIZE;
  }

  private readChunk(buf: Buffer, pos: number, at: number): number {
    const avail = buf.length - pos;
    if (avail < CHUNK_HEADER_SIZE) return -CHUNK_HEADER_SIZE;
    const done = (buf.readUInt16BE(pos + 4) & ReplyFlag.DONE) !== 0;
    const type = buf.readUInt16BE(pos + 6);
    const length = buf.readUInt32BE(pos + 16);
    const { cookie, req } = this.request(buf, pos, at);
    const what = `${replyTypeName(type)} chunk of ${length} bytes`;
    const forCommand = (command: number): void => {
      if (req && req.command !== command) this.fail('UNEXPECTED_REPLY', at + 6, `${replyTypeName(type)} chunk in the reply to ${cmdName(req.command)}`);
    };
    const inRange = (offset: number | undefined, len: number, fieldAt: number): number => {
      if (offset === undefined || (req && (offset < req.offset || offset + len > req.offset + req.length))) {
        const range = req ? `[${req.offset}, ${req.offset + req.length})` : '2^53';
        this.fail('BAD_REPLY', fieldAt, `${replyTypeName(type)} chunk covers ${len} bytes at ${offset ?? hex64(buf, fieldAt - at + pos)}, outside the request ${range}`);
      }
      return offset;
    };
    const payload = pos + CHUNK_HEADER_SIZE;
    const total = CHUNK_HEADER_SIZE + length;

    switch (type) {
      case ReplyType.NONE:
        if (length !== 0) this.fail('BAD_LENGTH', at + 16, `${what}; NONE has no payload`);
        if (!done) this.fail('BAD_REPLY', at + 4, 'NBD_REPLY_TYPE_NONE without NBD_REPLY_FLAG_DONE');
        this.out = { type: 'none', at, cookie, done: true };
        return CHUNK_HEADER_SIZE;

      case ReplyType.OFFSET_DATA: {
        forCommand(Cmd.READ);
        if (length < 9) this.fail('BAD_LENGTH', at + 16, `${what}; it needs an 8-byte offset and at least one byte of data`);
        if (req && length - 8 > req.length) this.fail('BAD_LENGTH', at + 16, `${what} answers a read of ${req.length} bytes`);
        if (avail < CHUNK_HEADER_SIZE + 8) return -(CHUNK_HEADER_SIZE + 8);
        const offset = inRange(readU64(buf, payload), length - 8, at + CHUNK_HEADER_SIZE);
        this.data = { at, cookie, next: offset, left: length - 8, done };
        return CHUNK_HEADER_SIZE + 8;
      }

      case ReplyType.OFFSET_HOLE: {
        forCommand(Cmd.READ);
        if (length !== 12) this.fail('BAD_LENGTH', at + 16, `${what}; OFFSET_HOLE is 12 bytes`);
        if (avail < total) return -total;
        const size = buf.readUInt32BE(payload + 8);
        if (size === 0) this.fail('BAD_REPLY', at + CHUNK_HEADER_SIZE + 8, 'OFFSET_HOLE of 0 bytes');
        const offset = inRange(readU64(buf, payload), size, at + CHUNK_HEADER_SIZE);
        this.out = { type: 'hole', at, cookie, offset, length: size, done };
        return total;
      }

      case ReplyType.BLOCK_STATUS: {
        forCommand(Cmd.BLOCK_STATUS);
        if (length < 12 || (length - 4) % 8 !== 0) this.fail('BAD_LENGTH', at + 16, `${what}; it is a 4-byte context id and 8 bytes per extent (at least one)`);
        if (length > this.maxStatusPayload) this.fail('LIMIT_EXCEEDED', at + 16, `${what} (limit ${this.maxStatusPayload})`);
        if (avail < total) return -total;
        const contextId = buf.readUInt32BE(payload);
        const extents: NbdExtent[] = new Array((length - 4) / 8);
        for (let i = 0, p = payload + 4; p < pos + total; i++, p += 8) {
          const extentLength = buf.readUInt32BE(p);
          if (extentLength === 0) this.fail('BAD_REPLY', at + (p - pos), `extent ${i} of context ${contextId} has length 0`);
          extents[i] = { length: extentLength, flags: buf.readUInt32BE(p + 4) };
        }
        this.out = { type: 'block-status', at, cookie, contextId, extents, done };
        return total;
      }

      default: {
        if (!isReplyTypeError(type)) this.fail('UNKNOWN_CHUNK_TYPE', at + 6, `unknown structured reply chunk type ${type} (0x${type.toString(16)})`);
        // ERROR, ERROR_OFFSET, and (as the spec asks) any unknown error type: errno, message first.
        if (length < 6) this.fail('BAD_LENGTH', at + 16, `${what}; an error chunk needs 6 bytes (errno, message length)`);
        if (length > this.maxErrorPayload) this.fail('LIMIT_EXCEEDED', at + 16, `${what} (limit ${this.maxErrorPayload})`);
        if (avail < total) return -total;
        const errno = buf.readUInt32BE(payload);
        const messageLength = buf.readUInt16BE(payload + 4);
        const tail = type === ReplyType.ERROR_OFFSET ? 8 : 0;
        if (6 + messageLength + tail > length || (type === ReplyType.ERROR_OFFSET && 6 + messageLength + 8 !== length)) {
          this.fail('BAD_LENGTH', at + CHUNK_HEADER_SIZE + 4, `error message length ${messageLength} does not fit the ${what}`);
        }
        if (errno === 0) this.fail('BAD_REPLY', at + CHUNK_HEADER_SIZE, `${replyTypeName(type)} chunk with errno 0`);
        const message = buf.toString('utf8', payload + 6, payload + 6 + messageLength);
        const m: Extract<NbdServerMessage, { type: 'error' }> = { type: 'error', at, cookie, chunkType: type, errno, message, done };
        if (type === ReplyType.ERROR_OFFSET) {
          const fieldAt = CHUNK_HEADER_SIZE + 6 + messageLength;
          const errorOffset = readU64(buf, pos + fieldAt);
          m.errorOffset = req && req.command === Cmd.READ ? inRange(errorOffset, 1, at + fieldAt) : errorOffset;
        }
        this.out = m;
        return total;
      }
    }
  }
}
