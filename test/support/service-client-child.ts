/**
 * The probe guest's client, run inside a lab host (the witness) by service-client.ts: receives the
 * guest's counter datagrams and keeps one TCP connection to its service doing request/response.
 * Reads commands (NDJSON) on stdin — `{"cmd":"stats","id":N,"resetLatencies":bool,"rawLatencies":bool}`,
 * `{"cmd":"stop","id":N}` — and answers on stdout (`{"event":"ready"}`, `{"event":"stats",...}`). Knows
 * nothing of the lab: its only imports are node's and the wire format.
 *
 *   service-client-child.ts '<ClientConfig as JSON>'
 */
import dgram from 'node:dgram';
import net from 'node:net';
import readline from 'node:readline';
import { decodeDatagram, decodeResponse, encodeRequest, RESPONSE_SIZE } from './service-wire.js';

export interface ClientConfig {
  guestIp: string;
  udpPort: number;
  tcpPort: number;
  /** Undefined: the next request as soon as the answer is in. Else one request per interval. */
  tcpIntervalMs?: number;
  /** A request unanswered this long counts as an error and the connection is dropped. */
  requestTimeoutMs: number;
  connectTimeoutMs: number;
  /** Pause between a broken connection and the next attempt. */
  reconnectDelayMs: number;
}

/** A span of replies below what this client had already seen of the same boot: values lost. */
export interface RawRollback {
  via: 'udp-counter' | 'udp-seq' | 'tcp-counter';
  bootId: string;
  /** The highest value seen before the first lower one. */
  highestBefore: string;
  lowest: string;
  firstAtNs: string;
  /** Replies in the span (it ends with one above highestBefore). */
  replies: number;
  open: boolean;
}

const MAX_ROLLBACKS = 200;
const MAX_LATENCIES = 500_000;

const config = JSON.parse(process.argv[2] ?? '{}') as ClientConfig;
const wallNs = () => BigInt(Math.round((performance.timeOrigin + performance.now()) * 1e6));
const emit = (event: Record<string, unknown>) => process.stdout.write(`${JSON.stringify(event)}\n`);

interface Boot {
  udpCount: number;
  highestUdpCounter: bigint;
  highestUdpCounterAtNs: bigint;
  highestSeq: bigint;
  lastSeq: bigint;
  firstUdpAtNs: bigint;
  lastUdpAtNs: bigint;
  tcpResponses: number;
  highestTcpCounter: bigint;
  highestTcpCounterAtNs: bigint;
}
const boots = new Map<bigint, Boot>();
const boot = (id: bigint): Boot => {
  let b = boots.get(id);
  if (!b) {
    b = { udpCount: 0, highestUdpCounter: -1n, highestUdpCounterAtNs: 0n, highestSeq: 0n, lastSeq: 0n, firstUdpAtNs: 0n, lastUdpAtNs: 0n, tcpResponses: 0, highestTcpCounter: -1n, highestTcpCounterAtNs: 0n };
    boots.set(id, b);
  }
  return b;
};
let lastBootId: bigint | undefined;

const rollbacks: RawRollback[] = [];
const openRollback = new Map<string, RawRollback>();
/** Tracks a value that must never go below what was seen (within a boot). */
function checkMonotonic(via: RawRollback['via'], bootId: bigint, highest: bigint, got: bigint, at: bigint): void {
  const key = `${via}/${bootId}`;
  const open = openRollback.get(key);
  if (open) {
    if (got > BigInt(open.highestBefore)) {
      open.open = false;
      openRollback.delete(key);
    } else {
      open.replies++;
      if (got < BigInt(open.lowest)) open.lowest = String(got);
    }
    return;
  }
  if (highest < 0n || got >= highest) return;
  const span: RawRollback = { via, bootId: bootId.toString(16), highestBefore: String(highest), lowest: String(got), firstAtNs: String(at), replies: 1, open: true };
  openRollback.set(key, span);
  if (rollbacks.length < MAX_ROLLBACKS) rollbacks.push(span);
}

// ---- UDP -----------------------------------------------------------------------------------------
let udpCount = 0;
let udpBad = 0;
let udpLost = 0; // seq gaps (datagrams that never arrived), within a boot
let udpLastAtNs = 0n;
let udpMaxGapNs = 0n;
let udpMaxGapEndNs = 0n;

const udp = dgram.createSocket({ type: 'udp4', recvBufferSize: 4 << 20 });
udp.on('message', (msg) => {
  const at = wallNs();
  const d = decodeDatagram(msg);
  if (!d) {
    udpBad++;
    return;
  }
  udpCount++;
  if (udpLastAtNs > 0n && at - udpLastAtNs > udpMaxGapNs) {
    udpMaxGapNs = at - udpLastAtNs;
    udpMaxGapEndNs = at;
  }
  udpLastAtNs = at;
  lastBootId = d.bootId;
  const b = boot(d.bootId);
  if (b.udpCount === 0) b.firstUdpAtNs = at;
  b.udpCount++;
  b.lastUdpAtNs = at;
  checkMonotonic('udp-counter', d.bootId, b.highestUdpCounter, d.counter, at);
  checkMonotonic('udp-seq', d.bootId, b.highestSeq, d.seq, at);
  if (b.lastSeq > 0n && d.seq > b.lastSeq + 1n) udpLost += Number(d.seq - b.lastSeq - 1n);
  b.lastSeq = d.seq;
  if (d.seq > b.highestSeq) b.highestSeq = d.seq;
  if (d.counter > b.highestUdpCounter) {
    b.highestUdpCounter = d.counter;
    b.highestUdpCounterAtNs = at;
  }
});

// ---- TCP -----------------------------------------------------------------------------------------
let tcpResponses = 0;
let tcpErrors = 0;
let tcpConnects = 0;
let tcpBad = 0;
let tcpLastError: string | undefined;
let tcpLastAtNs = 0n;
let tcpMaxGapNs = 0n;
let tcpMaxGapEndNs = 0n;
let connected = false;
let latenciesUs: number[] = [];
let latencyDropped = 0;
let stopping = false;
let socket: net.Socket | undefined;
let wake: (() => void) | undefined;

const sleep = (ms: number) =>
  new Promise<void>((resolve) => {
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      wake = undefined;
      resolve();
    }
    wake = done;
  });

/** Connects, or throws after connectTimeoutMs. */
function connect(): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const s = net.connect({ host: config.guestIp, port: config.tcpPort });
    const timer = setTimeout(() => {
      s.destroy();
      reject(new Error(`connect to ${config.guestIp}:${config.tcpPort}: no answer within ${config.connectTimeoutMs} ms`));
    }, config.connectTimeoutMs);
    s.once('connect', () => {
      clearTimeout(timer);
      s.setNoDelay(true);
      resolve(s);
    });
    s.once('error', (error) => {
      clearTimeout(timer);
      s.destroy();
      reject(error);
    });
  });
}

/** One request/response on `s`; throws on timeout, close or a wrong answer. */
function exchange(s: net.Socket, id: bigint, pending: { buf: Buffer }): Promise<{ counter: bigint; bootId: bigint }> {
  return new Promise((resolve, reject) => {
    const finish = (error?: Error, value?: { counter: bigint; bootId: bigint }) => {
      clearTimeout(timer);
      s.off('data', onData);
      s.off('close', onClose);
      s.off('error', onError);
      if (error) reject(error);
      else resolve(value!);
    };
    const onData = (chunk: Buffer) => {
      pending.buf = Buffer.concat([pending.buf, chunk]);
      if (pending.buf.length < RESPONSE_SIZE) return;
      const r = decodeResponse(pending.buf.subarray(0, RESPONSE_SIZE));
      pending.buf = pending.buf.subarray(RESPONSE_SIZE);
      if (!r) {
        tcpBad++;
        return finish(new Error('malformed response'));
      }
      if (r.requestId !== id) return finish(new Error(`response to request ${r.requestId}, expected ${id}`));
      finish(undefined, { counter: r.counter, bootId: r.bootId });
    };
    const onClose = () => finish(new Error('connection closed by the guest'));
    const onError = (error: Error) => finish(error);
    const timer = setTimeout(() => finish(new Error(`no response within ${config.requestTimeoutMs} ms`)), config.requestTimeoutMs);
    s.on('data', onData);
    s.once('close', onClose);
    s.once('error', onError);
    s.write(encodeRequest(id));
  });
}

async function tcpLoop(): Promise<void> {
  let id = 0n;
  while (!stopping) {
    try {
      socket = await connect();
    } catch (error) {
      tcpLastError = (error as Error).message;
      await sleep(config.reconnectDelayMs);
      continue;
    }
    tcpConnects++;
    connected = true;
    const pending = { buf: Buffer.alloc(0) };
    let next = performance.now();
    try {
      while (!stopping) {
        const sent = process.hrtime.bigint();
        const r = await exchange(socket, ++id, pending);
        const at = wallNs();
        const us = Number(process.hrtime.bigint() - sent) / 1e3;
        if (latenciesUs.length < MAX_LATENCIES) latenciesUs.push(us);
        else latencyDropped++;
        tcpResponses++;
        if (tcpLastAtNs > 0n && at - tcpLastAtNs > tcpMaxGapNs) {
          tcpMaxGapNs = at - tcpLastAtNs;
          tcpMaxGapEndNs = at;
        }
        tcpLastAtNs = at;
        const b = boot(r.bootId);
        lastBootId ??= r.bootId;
        b.tcpResponses++;
        checkMonotonic('tcp-counter', r.bootId, b.highestTcpCounter, r.counter, at);
        if (r.counter > b.highestTcpCounter) {
          b.highestTcpCounter = r.counter;
          b.highestTcpCounterAtNs = at;
        }
        if (config.tcpIntervalMs !== undefined) {
          next += config.tcpIntervalMs;
          const now = performance.now();
          if (next <= now) next = now; // missed slots are skipped, not made up
          else await sleep(next - now);
        }
      }
    } catch (error) {
      if (!stopping) {
        tcpErrors++;
        tcpLastError = (error as Error).message;
      }
    }
    connected = false;
    socket.destroy();
    if (!stopping) await sleep(config.reconnectDelayMs);
  }
}

// ---- commands ------------------------------------------------------------------------------------
/** Percentiles (µs) of the latencies; the raw list only when asked (it can be long). */
function latencySummary(lat: number[], raw: boolean): Record<string, unknown> {
  const sorted = [...lat].sort((a, b) => a - b);
  const at = (q: number) => (sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))]! : undefined);
  const mean = sorted.length ? sorted.reduce((a, b) => a + b, 0) / sorted.length : undefined;
  return { count: sorted.length, p50: at(0.5), p90: at(0.9), p99: at(0.99), max: sorted.at(-1), mean, ...(raw ? { raw: lat } : {}) };
}

function stats(resetLatencies: boolean, rawLatencies: boolean): Record<string, unknown> {
  const lat = latenciesUs;
  if (resetLatencies) latenciesUs = [];
  return {
    atNs: String(wallNs()),
    lastBootId: lastBootId?.toString(16),
    boots: Object.fromEntries(
      [...boots].map(([id, b]) => [
        id.toString(16),
        {
          udpCount: b.udpCount,
          highestUdpCounter: String(b.highestUdpCounter),
          highestUdpCounterAtNs: String(b.highestUdpCounterAtNs),
          highestSeq: String(b.highestSeq),
          firstUdpAtNs: String(b.firstUdpAtNs),
          lastUdpAtNs: String(b.lastUdpAtNs),
          tcpResponses: b.tcpResponses,
          highestTcpCounter: String(b.highestTcpCounter),
          highestTcpCounterAtNs: String(b.highestTcpCounterAtNs),
        },
      ]),
    ),
    udp: { count: udpCount, bad: udpBad, lost: udpLost, lastAtNs: String(udpLastAtNs), maxGapNs: String(udpMaxGapNs), maxGapEndNs: String(udpMaxGapEndNs) },
    tcp: {
      responses: tcpResponses,
      errors: tcpErrors,
      connects: tcpConnects,
      bad: tcpBad,
      connected,
      lastError: tcpLastError,
      lastAtNs: String(tcpLastAtNs),
      maxGapNs: String(tcpMaxGapNs),
      maxGapEndNs: String(tcpMaxGapEndNs),
      latencyUs: latencySummary(lat, rawLatencies),
      latencyDropped,
    },
    rollbacks,
  };
}

udp.once('error', (error) => {
  emit({ event: 'fatal', error: `udp socket: ${error.message}` });
  process.exit(1);
});
udp.bind(config.udpPort, () => {
  emit({ event: 'ready', udpPort: udp.address().port });
  void tcpLoop();
});

readline.createInterface({ input: process.stdin }).on('line', (line) => {
  let command: { cmd?: string; id?: number; resetLatencies?: boolean; rawLatencies?: boolean };
  try {
    command = JSON.parse(line) as typeof command;
  } catch {
    emit({ event: 'error', error: `not JSON: ${line}` });
    return;
  }
  if (command.cmd === 'stats') emit({ event: 'stats', id: command.id, stats: stats(command.resetLatencies === true, command.rawLatencies === true) });
  else if (command.cmd === 'stop') {
    stopping = true;
    wake?.();
    socket?.destroy();
    emit({ event: 'stats', id: command.id, stats: stats(false, command.rawLatencies === true) });
    udp.close();
    // the stats line must reach the parent before the process goes
    process.stdout.write('', () => process.exit(0));
  } else emit({ event: 'error', error: `unknown command ${JSON.stringify(command.cmd)}` });
});
// the parent gone (stdin closed): nothing left to report to
process.stdin.once('end', () => process.exit(0));
