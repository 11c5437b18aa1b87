/**
 * The workload guest's serial protocol (guest/ftvm-workload-init, guest/seq.c), read from the
 * console log file QEMU writes:
 *
 *   FTVM-WL <event> key=value … [free text]     the init script's reports
 *   FTVM-ACK <n>                                 the sequence client: commit n was acknowledged
 *
 * Other console lines (the kernel's) are skipped. The host stamps each line with its own realtime
 * clock when it reads it: a line read at t was written before t, so "acknowledged before a
 * checkpoint's stop instant" is decided conservatively (the guest's clock is not used: it stands
 * still while the VM is paused).
 */
import fs from 'node:fs';

export type WorkloadSerialErrorCode = 'BAD_ACK' | 'BAD_EVENT' | 'BAD_FIELD' | 'TIMEOUT' | 'GUEST_ERROR';

export class WorkloadSerialError extends Error {
  override readonly name = 'WorkloadSerialError';
  constructor(
    readonly code: WorkloadSerialErrorCode,
    /** Byte offset in the serial log of the line concerned (-1: none). */
    readonly offset: number,
    detail: string,
  ) {
    super(`workload serial log: ${detail}${offset >= 0 ? ` at offset ${offset}` : ''} [${code}]`);
  }
}

export type WorkloadLine =
  | { kind: 'ack'; n: number }
  | { kind: 'event'; event: string; fields: Record<string, string>; text: string };

export interface StampedLine {
  /** Host realtime (ns) when this process read the line. */
  hostNs: bigint;
  /** Byte offset of the line in the log. */
  offset: number;
  line: WorkloadLine;
}

const ACK = /FTVM-ACK (\S*)\s*$/;
const EVENT = /FTVM-WL (.*?)\s*$/;

/** One console line → the protocol line in it, or undefined if it has none. */
export function parseSerialLine(text: string, offset = -1): WorkloadLine | undefined {
  const ack = ACK.exec(text);
  if (ack) {
    const n = Number(ack[1]);
    if (!/^[0-9]+$/.test(ack[1]!) || !Number.isSafeInteger(n)) throw new WorkloadSerialError('BAD_ACK', offset, `FTVM-ACK of ${JSON.stringify(ack[1])}, not a sequence number`);
    return { kind: 'ack', n };
  }
  const event = EVENT.exec(text);
  if (!event) return undefined;
  const [name, ...words] = event[1]!.split(/\s+/).filter(Boolean);
  if (!name || !/^[a-z][a-z0-9-]*$/.test(name)) throw new WorkloadSerialError('BAD_EVENT', offset, `FTVM-WL line without an event name: ${JSON.stringify(text)}`);
  const fields: Record<string, string> = {};
  const rest: string[] = [];
  for (const word of words) {
    const eq = word.indexOf('=');
    // key=value pairs come first; the first word that is not one starts free text (messages)
    if (rest.length === 0 && eq > 0 && /^[a-z_]+$/.test(word.slice(0, eq))) fields[word.slice(0, eq)] = word.slice(eq + 1);
    else rest.push(word);
  }
  return { kind: 'event', event: name, fields, text: rest.join(' ') };
}

/** Host realtime in ns (the clock QEMU's and the agents' stamps use). */
export function realtimeNs(): bigint {
  return BigInt(Math.round((performance.timeOrigin + performance.now()) * 1e6));
}

/**
 * Follows a serial log file as QEMU appends to it, stamping each complete protocol line when read.
 * The file may not exist yet (the domain not started). Poll every `everyMs` (default 10).
 */
export class SerialLog {
  readonly lines: StampedLine[] = [];
  private offset = 0;
  private partial = '';
  private partialOffset = 0;
  private timer: NodeJS.Timeout | undefined;
  private readonly waiters = new Set<() => void>();

  constructor(
    readonly file: string,
    private readonly everyMs = 10,
  ) {}

  start(): this {
    // unref: a follower left running must not keep the process alive (waitFor's own timers do)
    if (!this.timer) this.timer = setInterval(() => this.poll(), this.everyMs).unref();
    return this;
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
    this.poll();
  }

  /** Reads what is new now (also done every `everyMs` once started). */
  poll(): void {
    let fd: number;
    try {
      fd = fs.openSync(this.file, 'r');
    } catch {
      return; // not there yet
    }
    try {
      const size = fs.fstatSync(fd).size;
      if (size <= this.offset) return;
      const buffer = Buffer.alloc(size - this.offset);
      const read = fs.readSync(fd, buffer, 0, buffer.length, this.offset);
      const hostNs = realtimeNs();
      const text = this.partial + buffer.subarray(0, read).toString('latin1');
      let start = 0;
      let lineOffset = this.partialOffset;
      for (;;) {
        const nl = text.indexOf('\n', start);
        if (nl < 0) break;
        const raw = text.slice(start, nl).replace(/\r/g, '');
        const line = parseSerialLine(raw, lineOffset);
        if (line) this.lines.push({ hostNs, offset: lineOffset, line });
        lineOffset += nl + 1 - start;
        start = nl + 1;
      }
      this.partial = text.slice(start);
      this.partialOffset = lineOffset;
      this.offset += read;
    } finally {
      fs.closeSync(fd);
    }
    for (const wake of this.waiters) wake();
  }

  events(name?: string): (StampedLine & { line: Extract<WorkloadLine, { kind: 'event' }> })[] {
    return this.lines.filter((l): l is StampedLine & { line: Extract<WorkloadLine, { kind: 'event' }> } => l.line.kind === 'event' && (name === undefined || l.line.event === name));
  }

  acks(): { hostNs: bigint; n: number }[] {
    return this.lines.flatMap((l) => (l.line.kind === 'ack' ? [{ hostNs: l.hostNs, n: l.line.n }] : []));
  }

  /**
   * Resolves with the first line (from index `from`) that `match` accepts. Rejects on a deadline,
   * and at once on an "FTVM-WL error" line (the guest gave up) or when `gone()` says the writer is
   * gone (QEMU exited) and nothing matched.
   */
  async waitFor(what: string, match: (l: StampedLine) => boolean, options: { timeoutMs: number; from?: number; gone?: () => string | undefined }): Promise<StampedLine> {
    const deadline = performance.now() + options.timeoutMs;
    let index = options.from ?? 0;
    for (;;) {
      this.poll();
      for (; index < this.lines.length; index++) {
        const l = this.lines[index]!;
        if (match(l)) return l;
        if (l.line.kind === 'event' && l.line.event === 'error') throw new WorkloadSerialError('GUEST_ERROR', l.offset, `the guest reports an error while waiting for ${what}: ${l.line.text}`);
      }
      const gone = options.gone?.();
      if (gone !== undefined) throw new WorkloadSerialError('TIMEOUT', -1, `${what}: ${gone}; last lines:\n${this.tail()}`);
      if (performance.now() > deadline) throw new WorkloadSerialError('TIMEOUT', -1, `no ${what} within ${options.timeoutMs} ms; last lines:\n${this.tail()}`);
      await new Promise<void>((resolve) => {
        const wake = () => {
          this.waiters.delete(wake);
          clearTimeout(timer);
          resolve();
        };
        const timer = setTimeout(wake, Math.min(200, Math.max(1, deadline - performance.now())));
        this.waiters.add(wake);
      });
    }
  }

  /** The last bytes of the file as text (for error messages). */
  tail(bytes = 2000): string {
    try {
      const text = fs.readFileSync(this.file, 'latin1');
      return text.slice(-bytes);
    } catch {
      return `(no ${this.file})`;
    }
  }
}

// ---- what the lines say ------------------------------------------------------------------------------

export interface RoundFigures {
  round: number;
  pgbench: {
    /** Host stamps of the pgbench-start and pgbench-end lines. */
    startNs: bigint;
    endNs: bigint;
    /** Host seconds between them (the guest's clock stands still during checkpoint pauses). */
    hostS: number;
    guestS: number;
    /** pgbench's own figure (transactions over the guest's seconds). */
    tpsGuest: number;
    transactions: number;
    failed: number;
    latencyMs: number;
    /** Transactions over host seconds: what a client outside the VM would see. */
    tpsHost: number;
  };
  build: { startNs: bigint; endNs: bigint; hostS: number; guestS: number };
}

const field = (l: StampedLine & { line: Extract<WorkloadLine, { kind: 'event' }> }, key: string): number => {
  const value = Number(l.line.fields[key]);
  if (l.line.fields[key] === undefined || !Number.isFinite(value)) throw new WorkloadSerialError('BAD_FIELD', l.offset, `${l.line.event}: ${key}=${l.line.fields[key] ?? '(missing)'} is not a number`);
  return value;
};

/** The figures of round `round` (throws if a part of it failed or is not in the log yet). */
export function roundFigures(log: SerialLog, round: number): RoundFigures {
  const one = (event: string) => {
    const found = log.events(event).filter((l) => l.line.fields['round'] === String(round));
    if (found.length !== 1) throw new WorkloadSerialError('BAD_EVENT', -1, `round ${round}: ${found.length} ${event} lines`);
    return found[0]!;
  };
  const [ps, pe, bs, be] = [one('pgbench-start'), one('pgbench-end'), one('build-start'), one('build-end')];
  if (field(pe, 'rc') !== 0) throw new WorkloadSerialError('GUEST_ERROR', pe.offset, `round ${round}: pgbench exited ${pe.line.fields['rc']}`);
  if (field(be, 'rc') !== 0) throw new WorkloadSerialError('GUEST_ERROR', be.offset, `round ${round}: the build exited ${be.line.fields['rc']}`);
  const seconds = (a: bigint, b: bigint) => Number(b - a) / 1e9;
  const hostS = seconds(ps.hostNs, pe.hostNs);
  const transactions = field(pe, 'tx');
  return {
    round,
    pgbench: {
      startNs: ps.hostNs,
      endNs: pe.hostNs,
      hostS,
      guestS: field(pe, 's'),
      tpsGuest: field(pe, 'tps'),
      transactions,
      failed: field(pe, 'failed'),
      latencyMs: field(pe, 'latency_ms'),
      tpsHost: transactions / hostS,
    },
    build: { startNs: bs.hostNs, endNs: be.hostNs, hostS: seconds(bs.hostNs, be.hostNs), guestS: field(be, 's') },
  };
}

export interface AckSummary {
  /** Acknowledgements read before `beforeNs`. */
  count: number;
  /** The highest n among them (0: none). */
  highest: number;
  /** Those n are first, first+1, … with no gap or repeat. */
  contiguous: boolean;
}

/** The sequence client's acknowledgements the host had read before `beforeNs`. */
export function acksBefore(acks: { hostNs: bigint; n: number }[], beforeNs: bigint): AckSummary {
  const seen = acks.filter((a) => a.hostNs < beforeNs).map((a) => a.n);
  const contiguous = seen.every((n, i) => i === 0 || n === seen[i - 1]! + 1);
  return { count: seen.length, highest: seen.length ? Math.max(...seen) : 0, contiguous };
}
