// An NBD client over any Duplex (a unix socket, an SSH channel): fixed newstyle handshake with
// structured replies, metadata contexts and NBD_OPT_GO, then pipelined NBD_CMD_READ and
// NBD_CMD_BLOCK_STATUS requests matched to their replies by cookie.
//
// Failure policy: the connection is the unit of failure. A protocol error, a request deadline, an
// error or close of the stream fails every request in flight at once with an error naming the
// cause, and the client is dead afterwards. A timed-out request cannot be abandoned alone: its
// reply may still arrive (in part), and the stream cannot be resynchronised without it.

import net from 'node:net';
import type { Duplex } from 'node:stream';
import {
  ClientFlag,
  Cmd,
  HandshakeFlag,
  Info,
  Opt,
  Rep,
  cmdName,
  errnoName,
  isRepError,
  optName,
  repName,
} from './constants.js';
import {
  encodeClientFlags,
  encodeGoOption,
  encodeMetaContextOption,
  encodeOption,
  encodeRequest,
  NbdReplyParser,
  type InFlight,
  type NbdExtent,
  type NbdServerMessage,
} from './codec.js';
import { NbdError, NbdProtocolError } from './errors.js';

/** The longest request the spec lets a client send without a block size negotiated (32 MiB). */
const DEFAULT_MAX_REQUEST = 32 * 1024 * 1024;

export interface NbdConnectOptions {
  /** Export name (QEMU's block-export-add `name`, qemu-nbd's `-x`; '' for qemu-nbd's default). */
  exportName: string;
  /** Metadata contexts to select, e.g. `base:allocation`, `qemu:dirty-bitmap:NAME`. Each must be offered. */
  metaContexts?: readonly string[];
  /** Deadline of the handshake and of each request, unless the specific options below say otherwise. */
  timeoutMs?: number;
  /** Deadline of connect + handshake. Default `timeoutMs`, else 10 s. */
  handshakeTimeoutMs?: number;
  /** Default deadline of each request. Default `timeoutMs`, else 30 s. */
  requestTimeoutMs?: number;
  /** How messages name the server when `target` is a stream (default 'stream'). */
  label?: string;
}

export interface NbdBlockSize {
  minimum: number;
  preferred: number;
  maximum: number;
}

export interface NbdRequestOptions {
  /** This request's deadline instead of the connection's default. */
  timeoutMs?: number;
}

interface Pending extends InFlight {
  cookie: number;
  what: string;
  timer: NodeJS.Timeout;
  resolve: (value: never) => void;
  reject: (error: Error) => void;
  settled: Promise<unknown>;
  /** The first error chunk (the reply goes on until DONE; the request fails then). */
  error?: NbdError;
  /** READ: the result, filled by data and hole chunks; the export ranges covered so far. */
  buf?: Buffer;
  covered?: [start: number, end: number][];
  /** BLOCK_STATUS: extents per context id. */
  status?: Map<number, NbdExtent[]>;
}

/** A unix socket path (`'/run/x.nbd'` or `{ path }`), or a connected stream (an SSH channel...). */
export type NbdTarget = string | { path: string } | Duplex;

function isDuplex(target: { path: string } | Duplex): target is Duplex {
  return typeof (target as Duplex).pipe === 'function';
}

type Waiter = { resolve: (m: NbdServerMessage) => void; reject: (e: Error) => void };

export class NbdClient {
  private exportSize = 0;
  private flags = 0;
  private sizes: NbdBlockSize | undefined;
  private readonly selected = new Map<string, number>();

  private readonly parser: NbdReplyParser;
  private readonly requests = new Map<number, Pending>();
  private nextCookie = 1;
  private failure: Error | undefined;
  private socketClosed = false;
  private closing: Promise<void> | undefined;
  private inbox: NbdServerMessage[] = [];
  private waiter: Waiter | undefined;
  private stage = 'connecting';
  private readonly requestTimeoutMs: number;

  private constructor(
    private readonly socket: Duplex,
    /** How messages name the server: `unix:/path` or the given label. */
    readonly label: string,
    readonly exportName: string,
    options: NbdConnectOptions,
  ) {
    this.requestTimeoutMs = options.requestTimeoutMs ?? options.timeoutMs ?? 30_000;
    this.parser = new NbdReplyParser({ lookup: (cookie) => this.requests.get(cookie) });
    socket.on('data', (chunk: Buffer) => {
      if (this.failure) return;
      try {
        this.parser.push(chunk, this.onMessage);
      } catch (e) {
        this.fatal(e as Error);
      }
    });
    socket.on('error', (e: Error) => this.fatal(new NbdError('DISCONNECTED', `NBD connection to ${this.label} failed (${this.stage}): ${e.message}`, { cause: e })));
    const gone = (): void => {
      this.socketClosed = true;
      let detail = '';
      try {
        this.parser.end();
      } catch (e) {
        detail = ` (${(e as Error).message})`;
      }
      this.fatal(new NbdError('DISCONNECTED', `NBD server ${this.label} closed the connection (${this.stage})${detail}`));
    };
    socket.on('end', gone);
    socket.on('close', gone);
  }

  /**
   * Connects to a unix socket path (or uses an already connected Duplex), negotiates, and returns a
   * client in the transmission phase. Rejects with NbdError / NbdProtocolError naming the server,
   * the export and what went wrong; the stream is closed then.
   */
  static async connect(target: NbdTarget, options: NbdConnectOptions): Promise<NbdClient> {
    const path = typeof target === 'string' ? target : isDuplex(target) ? undefined : target.path;
    const label = path !== undefined ? `unix:${path}` : (options.label ?? 'stream');
    const socket = path !== undefined ? net.connect(path) : (target as Duplex);
    const client = new NbdClient(socket, label, options.exportName, options);
    const ms = options.handshakeTimeoutMs ?? options.timeoutMs ?? 10_000;
    const timer = setTimeout(() => {
      client.fatal(new NbdError('TIMEOUT', `NBD handshake with ${label} for export '${options.exportName}' did not finish within ${ms} ms (${client.stage})`));
    }, ms);
    try {
      await client.handshake(options.metaContexts ?? []);
      return client;
    } catch (e) {
      client.abort(e as Error);
      throw client.failure ?? e;
    } finally {
      clearTimeout(timer);
    }
  }

  /** Export size in bytes (NBD_INFO_EXPORT). */
  get size(): number {
    return this.exportSize;
  }

  /** Transmission flags (NBD_FLAG_*, see NbdTransmissionFlag). */
  get transmissionFlags(): number {
    return this.flags;
  }

  /** NBD_INFO_BLOCK_SIZE, when the server sent it. */
  get blockSize(): NbdBlockSize | undefined {
    return this.sizes;
  }

  /** Selected metadata contexts: name → id. */
  get contexts(): ReadonlyMap<string, number> {
    return this.selected;
  }

  /** Requests in flight. */
  get pending(): number {
    return this.requests.size;
  }

  /** Why the client is unusable, if it is. */
  get error(): Error | undefined {
    return this.failure;
  }

  /** The id of a selected metadata context; throws CONTEXT_UNAVAILABLE naming what was selected. */
  contextId(name: string): number {
    const id = this.contexts.get(name);
    if (id === undefined) {
      throw new NbdError(
        'CONTEXT_UNAVAILABLE',
        `metadata context '${name}' was not selected on export '${this.exportName}' at ${this.label} (selected: ${[...this.contexts.keys()].join(', ') || 'none'})`,
      );
    }
    return id;
  }

  /** Largest read the server accepts in one request. */
  get maxRead(): number {
    return Math.min(this.blockSize?.maximum || DEFAULT_MAX_REQUEST, DEFAULT_MAX_REQUEST);
  }

  /** Reads `length` bytes at `offset`; holes come back as zeros. One Buffer, one copy of the data. */
  read(offset: number, length: number, options: NbdRequestOptions = {}): Promise<Buffer> {
    if (length > this.maxRead) {
      return Promise.reject(new NbdError('BAD_REQUEST', `read of ${length} bytes at ${offset} on export '${this.exportName}': at most ${this.maxRead} bytes per request`));
    }
    return this.submit(Cmd.READ, 0, offset, length, options, (p) => {
      p.buf = Buffer.allocUnsafe(length);
      p.covered = [];
    });
  }

  /**
   * NBD_CMD_BLOCK_STATUS over [offset, offset+length): the extents of every selected context, by
   * context id. Each list starts at `offset` and may end before offset+length (the server decides
   * how far it looks) or, in its last extent, after it.
   */
  blockStatus(offset: number, length: number, options: NbdRequestOptions = {}): Promise<Map<number, NbdExtent[]>> {
    if (this.contexts.size === 0) {
      return Promise.reject(new NbdError('BAD_REQUEST', `block status on export '${this.exportName}' needs metadata contexts, and none were selected`));
    }
    return this.submit(Cmd.BLOCK_STATUS, 0, offset, length, options, (p) => {
      p.status = new Map();
    });
  }

  /**
   * Waits for the requests in flight (each has its deadline), sends NBD_CMD_DISC and closes the
   * stream, destroying it if it does not close within `timeoutMs`.
   */
  close(timeoutMs = 5_000): Promise<void> {
    this.closing ??= (async () => {
      await Promise.allSettled([...this.requests.values()].map((p) => p.settled));
      if (!this.failure) {
        this.failure = new NbdError('DISCONNECTED', `NBD client for export '${this.exportName}' at ${this.label} was closed`);
        this.socket.write(encodeRequest({ command: Cmd.DISC, cookie: this.nextCookie++, offset: 0, length: 0 }));
        this.socket.end();
      }
      await this.waitClosed(timeoutMs);
    })();
    return this.closing;
  }

  /** Drops the connection now: everything in flight fails with `reason`. */
  destroy(reason?: Error): void {
    this.fatal(reason ?? new NbdError('DISCONNECTED', `NBD client for export '${this.exportName}' at ${this.label} was destroyed`));
  }

  // ---- handshake --------------------------------------------------------------------------------

  private async handshake(metaContexts: readonly string[]): Promise<void> {
    this.stage = 'waiting for the server greeting';
    const greeting = await this.next();
    if (greeting.type !== 'greeting') throw new Error('unreachable: the parser starts with the greeting');
    if (!(greeting.handshakeFlags & HandshakeFlag.FIXED_NEWSTYLE)) {
      throw new NbdProtocolError('UNSUPPORTED', greeting.at + 16, `server ${this.label} does not offer fixed newstyle negotiation (handshake flags 0x${greeting.handshakeFlags.toString(16)})`);
    }
    const noZeroes = (greeting.handshakeFlags & HandshakeFlag.NO_ZEROES) !== 0;
    this.socket.write(encodeClientFlags(ClientFlag.FIXED_NEWSTYLE | (noZeroes ? ClientFlag.NO_ZEROES : 0)));

    // Structured replies: required, reads of sparse exports and block status depend on them.
    const sr = await this.option(Opt.STRUCTURED_REPLY, encodeOption(Opt.STRUCTURED_REPLY));
    if (sr.reply !== Rep.ACK) throw this.refused(sr, ' (this client needs structured replies)');

    if (metaContexts.length > 0) {
      let m = await this.option(Opt.SET_META_CONTEXT, encodeMetaContextOption(this.exportName, metaContexts));
      for (; m.reply === Rep.META_CONTEXT; m = await this.nextOptionReply(Opt.SET_META_CONTEXT)) {
        if (m.context) this.selected.set(m.context.name, m.context.id);
      }
      if (m.reply !== Rep.ACK) throw this.refused(m);
      const missing = metaContexts.filter((c) => !this.contexts.has(c));
      if (missing.length > 0) {
        throw new NbdError(
          'CONTEXT_UNAVAILABLE',
          `export '${this.exportName}' at ${this.label} does not offer metadata context${missing.length > 1 ? 's' : ''} ${missing.map((c) => `'${c}'`).join(', ')} (the server selected: ${[...this.contexts.keys()].join(', ') || 'none'})`,
        );
      }
    }

    let m = await this.option(Opt.GO, encodeGoOption(this.exportName, [Info.BLOCK_SIZE]));
    let haveExport = false;
    for (; m.reply === Rep.INFO; m = await this.nextOptionReply(Opt.GO)) {
      const info = m.info!;
      if (info.type === 'export') {
        this.exportSize = info.size;
        this.flags = info.transmissionFlags;
        haveExport = true;
      } else if (info.type === 'block-size') {
        this.sizes = { minimum: info.minimum, preferred: info.preferred, maximum: info.maximum };
      }
    }
    if (m.reply !== Rep.ACK) throw this.refused(m);
    if (!haveExport) throw new NbdProtocolError('UNEXPECTED_REPLY', m.at, `NBD_OPT_GO for export '${this.exportName}' acknowledged without NBD_INFO_EXPORT (no size)`);
    this.stage = 'transmission';
  }

  private async option(option: number, bytes: Buffer): Promise<Extract<NbdServerMessage, { type: 'option-reply' }>> {
    this.socket.write(bytes);
    return this.nextOptionReply(option);
  }

  private async nextOptionReply(option: number): Promise<Extract<NbdServerMessage, { type: 'option-reply' }>> {
    this.stage = `waiting for the reply to ${optName(option)}`;
    const m = await this.next();
    if (m.type !== 'option-reply') throw new Error(`unreachable: ${m.type} during option haggling`);
    if (m.option !== option) {
      throw new NbdProtocolError('UNEXPECTED_REPLY', m.at + 8, `${repName(m.reply)} answers ${optName(m.option)}, but ${optName(option)} was sent`);
    }
    if (!isRepError(m.reply) && m.reply !== Rep.ACK && m.reply !== Rep.INFO && m.reply !== Rep.META_CONTEXT) {
      throw new NbdProtocolError('UNEXPECTED_REPLY', m.at + 12, `${repName(m.reply)} in reply to ${optName(option)}`);
    }
    if ((m.reply === Rep.INFO && option !== Opt.GO) || (m.reply === Rep.META_CONTEXT && option !== Opt.SET_META_CONTEXT)) {
      throw new NbdProtocolError('UNEXPECTED_REPLY', m.at + 12, `${repName(m.reply)} in reply to ${optName(option)}`);
    }
    return m;
  }

  private refused(m: Extract<NbdServerMessage, { type: 'option-reply' }>, why = ''): NbdError {
    const server = m.message ? `: ${m.message}` : '';
    if (m.reply === Rep.ERR_UNKNOWN) {
      return new NbdError('EXPORT_UNKNOWN', `NBD server ${this.label} has no export '${this.exportName}' (${optName(m.option)} answered ${repName(m.reply)}${server})`, { reply: m.reply });
    }
    return new NbdError('OPTION_REFUSED', `NBD server ${this.label} refused ${optName(m.option)} for export '${this.exportName}' with ${repName(m.reply)}${server}${why}`, { reply: m.reply });
  }

  private next(): Promise<NbdServerMessage> {
    if (this.failure) return Promise.reject(this.failure);
    const m = this.inbox.shift();
    if (m) return Promise.resolve(m);
    return new Promise((resolve, reject) => {
      this.waiter = { resolve, reject };
    });
  }

  /** A failed handshake: tell the server politely if the stream still works, then close it. */
  private abort(error: Error): void {
    if (!this.failure && this.parser.phase === 'options') {
      this.socket.write(encodeOption(Opt.ABORT));
      this.socket.end();
    }
    this.fatal(error);
  }

  // ---- transmission -----------------------------------------------------------------------------

  private submit<T>(command: number, flags: number, offset: number, length: number, options: NbdRequestOptions, init: (p: Pending) => void): Promise<T> {
    const what = `${cmdName(command)} of ${length} bytes at ${offset}`;
    if (this.failure) return Promise.reject(new NbdError('DISCONNECTED', `${what}: ${this.failure.message}`, { cause: this.failure }));
    if (this.stage !== 'transmission') return Promise.reject(new Error(`${what} before the handshake finished`));
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length <= 0 || length > 0xffff_ffff) {
      return Promise.reject(new NbdError('BAD_REQUEST', `${what}: offset and length must be integers, length in [1, 2^32)`));
    }
    if (offset + length > this.size) {
      return Promise.reject(new NbdError('BAD_REQUEST', `${what} reaches past the end of export '${this.exportName}' (${this.size} bytes)`));
    }
    const cookie = this.nextCookie++;
    const ms = options.timeoutMs ?? this.requestTimeoutMs;
    let resolve!: (v: never) => void;
    let reject!: (e: Error) => void;
    const promise = new Promise<T>((res, rej) => {
      resolve = res as (v: never) => void;
      reject = rej;
    });
    const p: Pending = {
      cookie,
      command,
      offset,
      length,
      what,
      resolve,
      reject,
      settled: promise.catch(() => undefined),
      timer: setTimeout(() => {
        this.fatal(
          new NbdError('TIMEOUT', `${what} on export '${this.exportName}' at ${this.label} got no complete reply within ${ms} ms; the connection is dropped`),
          p,
        );
      }, ms),
    };
    init(p);
    this.requests.set(cookie, p);
    this.socket.write(encodeRequest({ command, flags, cookie, offset, length }));
    return promise;
  }

  private readonly onMessage = (m: NbdServerMessage): void => {
    if (m.type === 'greeting' || m.type === 'option-reply') {
      const w = this.waiter;
      this.waiter = undefined;
      if (w) w.resolve(m);
      else this.inbox.push(m);
      return;
    }
    // The parser only passes cookies of requests in flight.
    const p = this.requests.get(m.cookie)!;
    switch (m.type) {
      case 'simple':
        if (m.error !== 0) p.error = this.commandError(p, m.error, '');
        else if (p.command === Cmd.BLOCK_STATUS) {
          throw new NbdProtocolError('UNEXPECTED_REPLY', m.at, `a simple reply without error to ${p.what}: block status needs a structured reply`);
        }
        return this.finish(p, m.at);
      case 'data': {
        m.data.copy(p.buf!, m.offset - p.offset);
        this.cover(p, m.offset, m.data.length, m.at);
        break;
      }
      case 'hole':
        p.buf!.fill(0, m.offset - p.offset, m.offset - p.offset + m.length);
        this.cover(p, m.offset, m.length, m.at);
        break;
      case 'none':
        break;
      case 'block-status': {
        const known = [...this.contexts.values()].includes(m.contextId);
        if (!known) throw new NbdProtocolError('BAD_REPLY', m.at + 20, `block status for context id ${m.contextId}, which was not selected`);
        if (p.status!.has(m.contextId)) throw new NbdProtocolError('BAD_REPLY', m.at + 20, `a second block status chunk for context id ${m.contextId} in one reply`);
        p.status!.set(m.contextId, m.extents);
        break;
      }
      case 'error': {
        const where = m.errorOffset === undefined ? '' : ` at offset ${m.errorOffset}`;
        p.error ??= this.commandError(p, m.errno, `${where}${m.message ? `: ${m.message}` : ''}`);
        break;
      }
    }
    if (m.done) this.finish(p, m.at);
  };

  private commandError(p: Pending, errno: number, detail: string): NbdError {
    return new NbdError('COMMAND_FAILED', `${p.what} on export '${this.exportName}' at ${this.label} failed: ${errnoName(errno)}${detail}`, { errno });
  }

  /** Records the export range a content chunk covered (merging with the previous piece). */
  private cover(p: Pending, start: number, length: number, at: number): void {
    const covered = p.covered!;
    const last = covered[covered.length - 1];
    if (last && last[1] === start) last[1] += length;
    else covered.push([start, start + length]);
    if (covered.length > 1_000_000) throw new NbdProtocolError('LIMIT_EXCEEDED', at, `more than 10^6 discontiguous chunks in the reply to ${p.what}`);
  }

  private finish(p: Pending, at: number): void {
    this.requests.delete(p.cookie);
    clearTimeout(p.timer);
    if (p.error) return p.reject(p.error);
    let bad: NbdProtocolError | undefined;
    if (p.command === Cmd.READ) {
      // Content chunks must tile the request exactly: no gap (unknown bytes), no overlap.
      const covered = p.covered!.sort((a, b) => a[0] - b[0]);
      let end = p.offset;
      for (const [s, e] of covered) {
        if (s !== end) {
          bad = new NbdProtocolError('BAD_REPLY', at, `the reply to ${p.what} ${s < end ? 'overlaps itself' : 'leaves a gap'} at ${Math.min(s, end)}`);
          break;
        }
        end = e;
      }
      if (!bad && end !== p.offset + p.length) bad = new NbdProtocolError('BAD_REPLY', at, `the reply to ${p.what} ends at ${end}, short of ${p.offset + p.length}`);
    } else if (p.command === Cmd.BLOCK_STATUS) {
      for (const [name, id] of this.contexts) {
        if (!p.status!.has(id)) {
          bad = new NbdProtocolError('BAD_REPLY', at, `the reply to ${p.what} has no extents for context '${name}' (id ${id})`);
          break;
        }
      }
    }
    if (bad) {
      // This request fails with the protocol error itself; the rest fail as the connection drops.
      p.reject(bad);
      throw bad;
    }
    p.resolve((p.command === Cmd.READ ? p.buf : p.command === Cmd.BLOCK_STATUS ? p.status : undefined) as never);
  }

  /** The connection is dead: fail everything in flight, drop the stream. */
  private fatal(error: Error, culprit?: Pending): void {
    if (this.failure) return;
    this.failure = error;
    const w = this.waiter;
    this.waiter = undefined;
    w?.reject(error);
    const pending = [...this.requests.values()];
    this.requests.clear();
    for (const p of pending) {
      clearTimeout(p.timer);
      p.reject(p === culprit ? error : new NbdError('DISCONNECTED', `${p.what} failed: ${error.message}`, { cause: error }));
    }
    if (!this.socket.destroyed) {
      // Let a polite NBD_OPT_ABORT / NBD_CMD_DISC already written go out first.
      if (this.socket.writableEnded) setTimeout(() => this.socket.destroy(), 1_000).unref();
      else this.socket.destroy();
    }
  }

  private waitClosed(timeoutMs: number): Promise<void> {
    if (this.socketClosed || this.socket.destroyed) return Promise.resolve();
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.socket.destroy();
        resolve();
      }, timeoutMs);
      this.socket.once('close', () => {
        clearTimeout(timer);
        resolve();
      });
    });
  }
}

