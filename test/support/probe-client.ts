/**
 * Host side of the clock probe (test/guest/probe.c): measures guest CLOCK_REALTIME against host
 * CLOCK_REALTIME over UDP, NTP-style, drives the probe's STEP/SET/WORKLOAD/SPIN commands, and reads
 * the counters of its workloads. Wire format: test/guest/README.md.
 */
import { realtimeAnchorNs } from '@ftvm/kvmclock';
import dgram from 'node:dgram';
import { randomBytes } from 'node:crypto';

export interface ProbeTarget {
  host: string;
  port: number;
}

export const Command = { time: 1, step: 2, set: 3, workload: 4, spin: 5 } as const;
export type CommandCode = (typeof Command)[keyof typeof Command];
const commandName = (code: CommandCode): string => ['', 'TIME', 'STEP', 'SET', 'WORKLOAD', 'SPIN'][code] ?? String(code);

const MAGIC = Buffer.from('FTVP');
const VERSION = 1;
const REQUEST_SIZE = 24;
/** Replies of probes built before the disk workloads: the first 64 bytes of today's. */
const REPLY_SIZE_CLOCK_ONLY = 64;
const REPLY_SIZE = 128;
const REPLY_FLAG = 0x80;
/** Reply byte 127: flags over the top of the 56-bit spin count at 120 (0 from older probes). */
const SPIN_FLAGS_OFFSET = 127;
const SPIN_PRESENT = 1;
const SPIN_ON = 2;
const SPIN_COUNT_MASK = (1n << 56n) - 1n;

export const DISK_STATES = ['off', 'running', 'failed'] as const;
export type DiskState = (typeof DISK_STATES)[number];

/** The probe's disk workloads, as its reply reports them (bytes 64..127). */
export interface DiskCounters {
  ring: {
    /** off: no ring disk; failed: an I/O error stopped it (errno says which). */
    state: DiskState;
    errno: number;
    /** Slots of the ring on disk (0 until the ring is open). */
    slots: number;
    /** Counter of the newest write issued (set before its pwrite). */
    issued: bigint;
    /** Counter of the newest write completed (its O_DIRECT|O_DSYNC pwrite returned). completed ≤ issued. */
    completed: bigint;
    /** Summed duration of the completed pwrites, guest CLOCK_MONOTONIC ns. */
    writeNs: bigint;
    /** The guest's read-back checks of the ring (after every gap in its write loop, e.g. a failover's resume, and every 64th write). */
    checks: number;
    /** Checks that found the disk older than the guest's RAM (its last completed write missing) or newer (its next slot written already). */
    violations: number;
  };
  fs: {
    state: DiskState;
    errno: number;
    /** Cycles whose every write, fsync and rename returned. */
    cycles: bigint;
    /** Bytes written by the fs workload. */
    bytes: bigint;
  };
}

export interface ProbeReply {
  command: CommandCode;
  /** 0 ok, 1 bad argument, 2 the guest kernel refused the clock change. */
  status: number;
  id: bigint;
  /** Guest CLOCK_REALTIME when the request arrived (kernel receive stamp), before the command ran. */
  rxRealtimeNs: bigint;
  /** Guest CLOCK_REALTIME and CLOCK_MONOTONIC right before the reply was sent. */
  realtimeNs: bigint;
  monotonicNs: bigint;
  workloadCounter: bigint;
  workloadMiBps: number;
  badPackets: number;
  /** Random per guest boot: a workload counter is only comparable within one boot id. */
  bootId: bigint;
  /** Absent when the probe predates the disk workloads (a 64-byte reply). */
  disk?: DiskCounters;
  /**
   * The spin worker's iterations since boot (CPU-bound, SCHED_IDLE; grows only while it is on).
   * Absent, with spinOn, when the probe predates the spin worker.
   */
  spinCounter?: bigint;
  spinOn?: boolean;
}

export function encodeRequest(command: CommandCode, id: bigint, arg = 0n): Buffer {
  const buf = Buffer.alloc(REQUEST_SIZE);
  MAGIC.copy(buf, 0);
  buf.writeUInt8(VERSION, 4);
  buf.writeUInt8(command, 5);
  buf.writeBigUInt64LE(id, 8);
  buf.writeBigInt64LE(arg, 16);
  return buf;
}

/**
 * Returns undefined for anything that is not a well-formed reply (stray or garbled datagrams).
 * Takes both sizes: 64 bytes (a probe from before the disk workloads) and 128.
 */
export function decodeReply(buf: Buffer): ProbeReply | undefined {
  if (buf.length !== REPLY_SIZE && buf.length !== REPLY_SIZE_CLOCK_ONLY) return undefined;
  if (!buf.subarray(0, 4).equals(MAGIC) || buf.readUInt8(4) !== VERSION) return undefined;
  const raw = buf.readUInt8(5);
  const command = raw & ~REPLY_FLAG;
  if (!(raw & REPLY_FLAG) || !Object.values<number>(Command).includes(command)) return undefined;
  let disk: DiskCounters | undefined;
  let spin: { spinCounter: bigint; spinOn: boolean } | undefined;
  if (buf.length === REPLY_SIZE) {
    const spinFlags = buf.readUInt8(SPIN_FLAGS_OFFSET);
    if (spinFlags & SPIN_PRESENT) {
      spin = { spinCounter: buf.readBigUInt64LE(120) & SPIN_COUNT_MASK, spinOn: (spinFlags & SPIN_ON) !== 0 };
    }
    const ringState = DISK_STATES[buf.readUInt8(104)];
    const fsState = DISK_STATES[buf.readUInt8(105)];
    if (!ringState || !fsState) return undefined;
    disk = {
      ring: {
        state: ringState,
        errno: buf.readUInt16LE(108),
        slots: buf.readUInt16LE(106),
        issued: buf.readBigUInt64LE(64),
        completed: buf.readBigUInt64LE(72),
        writeNs: buf.readBigUInt64LE(80),
        checks: buf.readUInt32LE(112),
        violations: buf.readUInt32LE(116),
      },
      fs: { state: fsState, errno: buf.readUInt16LE(110), cycles: buf.readBigUInt64LE(88), bytes: buf.readBigUInt64LE(96) },
    };
  }
  return {
    command: command as CommandCode,
    status: buf.readUInt16LE(6),
    id: buf.readBigUInt64LE(8),
    rxRealtimeNs: buf.readBigInt64LE(16),
    realtimeNs: buf.readBigInt64LE(24),
    monotonicNs: buf.readBigInt64LE(32),
    workloadCounter: buf.readBigUInt64LE(40),
    workloadMiBps: buf.readUInt32LE(48),
    badPackets: buf.readUInt32LE(52),
    bootId: buf.readBigUInt64LE(56),
    ...(disk ? { disk } : {}),
    ...spin,
  };
}

export class ProbeError extends Error {
  override name = 'ProbeError';
}

// ---- host clock --------------------------------------------------------------------------------

// The realtime anchor is @ftvm/kvmclock's: one implementation of sub-ms host realtime.
export { realtimeAnchorNs };

/** Host CLOCK_REALTIME in ns from monotonic time and an anchor from realtimeAnchorNs(). */
export function hostRealtimeNs(anchor = realtimeAnchorNs()): bigint {
  return process.hrtime.bigint() + anchor;
}

// ---- client ------------------------------------------------------------------------------------

export interface RequestOptions {
  /** Per-attempt wait for the reply. */
  requestTimeoutMs?: number;
  /** Deadline for the whole call, retries included. */
  timeoutMs?: number;
}

export interface Exchange {
  reply: ProbeReply;
  /** Host monotonic ns at send and at receive. */
  sentMonoNs: bigint;
  receivedMonoNs: bigint;
}

type Pending = { resolve: (exchange: { reply: ProbeReply; receivedMonoNs: bigint }) => void };

const DEFAULT_REQUEST_TIMEOUT_MS = 300;
const DEFAULT_TIMEOUT_MS = 5_000;

/** One connected UDP socket to one probe. Replies are matched to requests by id; others dropped. */
export class ProbeClient {
  private readonly pending = new Map<bigint, Pending>();
  private nextId = randomBytes(8).readBigUInt64LE(0) & ((1n << 63n) - 1n);

  private constructor(
    private readonly socket: dgram.Socket,
    readonly target: ProbeTarget,
  ) {
    socket.on('message', (msg) => {
      const receivedMonoNs = process.hrtime.bigint(); // first thing: this is t4
      const reply = decodeReply(msg);
      if (!reply) return;
      this.pending.get(reply.id)?.resolve({ reply, receivedMonoNs });
    });
    // A connected UDP socket reports ICMP errors (e.g. nobody listening yet); those are just loss.
    socket.on('error', () => {});
  }

  static async open(target: ProbeTarget): Promise<ProbeClient> {
    const socket = dgram.createSocket('udp4');
    // Connecting makes send() go straight to the kernel (no per-send address lookup), so the
    // send stamp taken just before it is tight.
    await new Promise<void>((resolve, reject) => {
      socket.once('error', reject);
      socket.connect(target.port, target.host, () => {
        socket.off('error', reject);
        resolve();
      });
    });
    return new ProbeClient(socket, target);
  }

  close(): void {
    this.socket.close();
  }

  private describe(): string {
    return `probe at ${this.target.host}:${this.target.port}`;
  }

  /** One attempt: resolves undefined if no reply within timeoutMs. */
  private attempt(command: CommandCode, id: bigint, arg: bigint, timeoutMs: number): Promise<Exchange | undefined> {
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        resolve(undefined);
      }, timeoutMs);
      const buf = encodeRequest(command, id, arg);
      let sentMonoNs = 0n;
      this.pending.set(id, {
        resolve: ({ reply, receivedMonoNs }) => {
          clearTimeout(timer);
          this.pending.delete(id);
          resolve({ reply, sentMonoNs, receivedMonoNs });
        },
      });
      sentMonoNs = process.hrtime.bigint(); // t1: the last thing before the send syscall
      this.socket.send(buf);
    });
  }

  /**
   * Sends a command until it is answered or the deadline passes. TIME gets a fresh id per attempt
   * so a late reply can never be paired with the wrong send stamp; mutating commands keep their id,
   * which the probe uses to run them at most once.
   */
  async request(command: CommandCode, arg = 0n, options: RequestOptions = {}): Promise<Exchange> {
    const deadline = performance.now() + (options.timeoutMs ?? DEFAULT_TIMEOUT_MS);
    const perAttempt = options.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS;
    let id = this.nextId++;
    let attempts = 0;
    while (performance.now() < deadline) {
      attempts++;
      const wait = Math.max(1, Math.min(perAttempt, deadline - performance.now()));
      const exchange = await this.attempt(command, id, arg, wait);
      if (exchange) {
        if (exchange.reply.status !== 0) {
          const why = exchange.reply.status === 1 ? 'bad argument' : 'the guest refused the clock change';
          throw new ProbeError(`${this.describe()}: ${commandName(command)} ${arg} failed: ${why}`);
        }
        return exchange;
      }
      if (command === Command.time) id = this.nextId++;
    }
    throw new ProbeError(
      `${this.describe()}: no answer to ${commandName(command)} within ${Math.round(options.timeoutMs ?? DEFAULT_TIMEOUT_MS)} ms (${attempts} attempts)`,
    );
  }

  /**
   * Switches the guest's CPU-bound spin worker on or off (retried with one id until answered or the
   * deadline passes, like WORKLOAD). Returns the reply, whose spinCounter was read after the switch.
   * A probe from before the spin worker drops the command, so this then fails at the deadline.
   */
  async setSpin(on: boolean, options: RequestOptions = {}): Promise<ProbeReply> {
    try {
      return (await this.request(Command.spin, on ? 1n : 0n, options)).reply;
    } catch (error) {
      if (!(error instanceof ProbeError) || !error.message.includes('no answer')) throw error;
      throw new ProbeError(`${error.message}; a probe built before the spin worker ignores SPIN`, { cause: error });
    }
  }

  async clockOffset(options: ClockOffsetOptions = {}): Promise<ClockOffset> {
    const wanted = options.samples ?? 16;
    const anchor = realtimeAnchorNs();
    const total = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    const deadline = performance.now() + total;
    let best: OffsetSample | undefined;
    let last: ProbeReply | undefined;
    let samples = 0;
    while (samples < wanted) {
      const left = deadline - performance.now();
      if (left <= 0) break;
      let exchange: Exchange;
      try {
        exchange = await this.request(Command.time, 0n, { ...options, timeoutMs: left });
      } catch (error) {
        if (samples > 0) break; // the deadline passed with some samples: report what we have
        throw new ProbeError(`${this.describe()}: no answer to TIME within ${total} ms`, { cause: error });
      }
      samples++;
      last = exchange.reply;
      const sample = offsetFromExchange(exchange, anchor);
      if (!best || sample.errorNs < best.errorNs) best = sample;
    }
    if (!best || !last) throw new ProbeError(`${this.describe()}: no sample within ${total} ms`);
    return {
      ...best,
      workloadCounter: last.workloadCounter,
      workloadMiBps: last.workloadMiBps,
      ...(last.disk ? { disk: last.disk } : {}),
      ...(last.spinCounter !== undefined ? { spinCounter: last.spinCounter, spinOn: last.spinOn === true } : {}),
      samples,
    };
  }
}

// ---- measurement -------------------------------------------------------------------------------

export interface ClockOffsetOptions extends RequestOptions {
  /** Exchanges to make; the one with the smallest network delay wins. Default 16. */
  samples?: number;
}

export interface ClockOffset {
  /** Guest CLOCK_REALTIME minus host CLOCK_REALTIME (positive: guest ahead). */
  offsetNs: bigint;
  /** The true offset is within offsetNs ± errorNs (half the network delay of the kept sample). */
  errorNs: bigint;
  /** Host-observed round trip of the kept sample, guest turnaround included. */
  rttNs: bigint;
  /** Guest time in the kept sample's reply. */
  guestRealtimeNs: bigint;
  guestMonotonicNs: bigint;
  /** Host CLOCK_REALTIME when the kept sample's reply arrived. */
  hostRealtimeNs: bigint;
  /** From the last reply. */
  workloadCounter: bigint;
  workloadMiBps: number;
  /** From the last reply; absent from probes that predate the disk workloads. */
  disk?: DiskCounters;
  /** From the last reply; absent from probes that predate the spin worker. */
  spinCounter?: bigint;
  spinOn?: boolean;
  bootId: bigint;
  samples: number;
}

/** One exchange's estimate; clockOffset() keeps the best of several. */
export type OffsetSample = Omit<ClockOffset, 'samples' | 'workloadCounter' | 'workloadMiBps' | 'disk' | 'spinCounter' | 'spinOn'>;

/**
 * t1 host send, t2 guest receive, t3 guest send, t4 host receive. The guest stamps bound the
 * offset: t2 − t1 ≥ offset ≥ t3 − t4, so the midpoint is off by at most half of
 * (t4 − t1) − (t3 − t2): the round trip minus the guest's own turnaround. If the receive stamp is
 * unusable (turnaround outside [0, rtt]) this falls back to the three-stamp form t3 − (t1+t4)/2,
 * error rtt/2.
 */
export function offsetFromExchange(exchange: Exchange, anchorNs: bigint): OffsetSample {
  const { reply } = exchange;
  const t1 = exchange.sentMonoNs + anchorNs;
  const t4 = exchange.receivedMonoNs + anchorNs;
  const rttNs = t4 - t1;
  let t2 = reply.rxRealtimeNs;
  const t3 = reply.realtimeNs;
  if (t3 - t2 < 0n || t3 - t2 > rttNs) t2 = t3;
  const delay = rttNs - (t3 - t2);
  return {
    offsetNs: (t2 - t1 + (t3 - t4)) / 2n,
    errorNs: (delay + 1n) / 2n,
    rttNs,
    guestRealtimeNs: t3,
    guestMonotonicNs: reply.monotonicNs,
    hostRealtimeNs: t4,
    bootId: reply.bootId,
  };
}

// ---- one-shot helpers (open, run, close) -------------------------------------------------------

async function withProbe<T>(target: ProbeTarget, run: (client: ProbeClient) => Promise<T>): Promise<T> {
  const client = await ProbeClient.open(target);
  try {
    return await run(client);
  } finally {
    client.close();
  }
}

export function clockOffset(target: ProbeTarget, options?: ClockOffsetOptions): Promise<ClockOffset> {
  return withProbe(target, (client) => client.clockOffset(options));
}

/** Steps guest CLOCK_REALTIME by deltaNs, atomically inside the guest (ADJ_SETOFFSET). */
export function stepGuestClock(target: ProbeTarget, deltaNs: bigint, options?: RequestOptions): Promise<ProbeReply> {
  return withProbe(target, async (client) => (await client.request(Command.step, deltaNs, options)).reply);
}

/** Sets guest CLOCK_REALTIME to ns (as the guest receives the request). */
export function setGuestClock(target: ProbeTarget, ns: bigint, options?: RequestOptions): Promise<ProbeReply> {
  return withProbe(target, async (client) => (await client.request(Command.set, ns, options)).reply);
}

/**
 * Brings the guest clock onto host time: a coarse SET (host now plus half a measured round trip,
 * which fixes any error from seconds to years), then a STEP by the measured residual (exact inside
 * the guest, so the result is as good as the measurement). Returns the verifying measurement.
 */
export function syncGuestClock(target: ProbeTarget, options?: ClockOffsetOptions): Promise<ClockOffset> {
  return withProbe(target, async (client) => {
    const probe = await client.clockOffset({ ...options, samples: 4 });
    await client.request(Command.set, hostRealtimeNs() + probe.rttNs / 2n, options);
    const residual = await client.clockOffset(options);
    if (residual.offsetNs > residual.errorNs || -residual.offsetNs > residual.errorNs) {
      await client.request(Command.step, -residual.offsetNs, options);
    }
    return client.clockOffset(options);
  });
}

/** Starts (mibPerSec > 0) or stops (0) the guest's memory-dirtying workload. */
export function startWorkload(target: ProbeTarget, mibPerSec: number, options?: RequestOptions): Promise<ProbeReply> {
  return withProbe(target, async (client) => (await client.request(Command.workload, BigInt(mibPerSec), options)).reply);
}

/** Switches the guest's CPU-bound spin worker on or off; see ProbeClient.setSpin. */
export function setSpin(target: ProbeTarget, on: boolean, options?: RequestOptions): Promise<ProbeReply> {
  return withProbe(target, (client) => client.setSpin(on, options));
}

/**
 * The disk workloads' counters from one TIME reply, with the reply's boot id and guest monotonic
 * time (rates are best taken on the guest's clock). Throws if the probe predates them.
 */
export function diskCounters(target: ProbeTarget, options?: RequestOptions): Promise<DiskCounters & { bootId: bigint; monotonicNs: bigint }> {
  return withProbe(target, async (client) => {
    const { reply } = await client.request(Command.time, 0n, options);
    if (!reply.disk) throw new ProbeError(`probe at ${target.host}:${target.port}: its replies have no disk counters (a probe built before the disk workloads)`);
    return { ...reply.disk, bootId: reply.bootId, monotonicNs: reply.monotonicNs };
  });
}

/** Polls with TIME until the probe answers; throws after timeoutMs. */
export function waitForProbe(target: ProbeTarget, timeoutMs: number): Promise<ProbeReply> {
  return withProbe(target, async (client) => (await client.request(Command.time, 0n, { timeoutMs, requestTimeoutMs: 250 })).reply);
}
