/**
 * A client of the probe guest's service, as a user of the protected VM would be: it runs inside a
 * lab host (the witness, on the service network), receives the guest's counter datagrams (one per
 * ms) and keeps one TCP connection to the guest's service doing request/response — back to back,
 * or one request per `tcpIntervalMs` for latency measurements. It records the highest counter
 * seen per boot, every span where the guest answered with less than it had already shown (values
 * a failover lost: output commit must make these impossible), TCP latencies, errors and
 * reconnections. The work happens in a child process (service-client-child.ts) in the host's
 * namespaces; this is the parent's handle on it.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createRequire } from 'node:module';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { inHostArgv, type LabHostName } from '../lab/lab.js';
import type { ClientConfig, RawRollback } from './service-client-child.js';
import { SERVICE_TCP_PORT, SERVICE_UDP_PORT } from './service-wire.js';

export { SERVICE_TCP_PORT, SERVICE_UDP_PORT } from './service-wire.js';

const CHILD = fileURLToPath(new URL('./service-client-child.ts', import.meta.url));
const tsxLoader = pathToFileURL(createRequire(import.meta.url).resolve('tsx')).href;

export interface ServiceClientOptions {
  /** The lab host the client runs in (default witness); 'root' runs it in this namespace (tests). */
  host?: LabHostName | 'root';
  udpPort?: number;
  tcpPort?: number;
  /** One TCP request per interval (rate-limited latency mode); default back to back. */
  tcpIntervalMs?: number;
  /** A request unanswered this long counts as an error and the connection is dropped (default 10 s). */
  requestTimeoutMs?: number;
  connectTimeoutMs?: number;
  reconnectDelayMs?: number;
  /** Spawn to the UDP port bound (default 20 s: node + tsx start slowly on a loaded host). */
  startTimeoutMs?: number;
}

export interface BootStats {
  udpCount: number;
  /** -1n until a datagram of this boot came. */
  highestUdpCounter: bigint;
  highestUdpCounterAtNs: bigint;
  highestSeq: bigint;
  firstUdpAtNs: bigint;
  lastUdpAtNs: bigint;
  tcpResponses: number;
  highestTcpCounter: bigint;
  highestTcpCounterAtNs: bigint;
}

/** The guest answered with less than it had already shown this client (same boot). */
export interface Rollback {
  /** Which value went back: the counter (in datagrams or TCP answers) or the datagram sequence. */
  via: 'udp-counter' | 'udp-seq' | 'tcp-counter';
  bootId: bigint;
  highestBefore: bigint;
  lowest: bigint;
  /** Values lost: highestBefore − lowest. */
  lost: bigint;
  firstAtNs: bigint;
  replies: number;
  /** Still below highestBefore at the time of the stats. */
  open: boolean;
}

export interface LatencySummary {
  count: number;
  p50?: number;
  p90?: number;
  p99?: number;
  max?: number;
  mean?: number;
  /** Every latency (µs), when asked for. */
  raw?: number[];
}

export interface ServiceStats {
  /** Wall clock (ns) when the child took these stats. */
  atNs: bigint;
  /** The boot of the newest datagram (or of the first TCP answer if no datagram came yet). */
  lastBootId: bigint | undefined;
  /** Of lastBootId's boot; undefined before anything came. */
  highestUdpCounter: bigint | undefined;
  highestTcpCounter: bigint | undefined;
  udpCount: number;
  /** Datagrams that never came (sequence gaps within a boot). */
  udpLost: number;
  udpBad: number;
  udpLastAtNs: bigint;
  /** Longest silence between two datagrams (ms) and when it ended. */
  udpMaxGapMs: number;
  udpMaxGapEndNs: bigint;
  tcpResponses: number;
  /** Requests that failed: timeout, closed, refused mid-connection, wrong answer. */
  tcpErrors: number;
  /** Connections made after the first (each one after a broken connection). */
  tcpReconnects: number;
  tcpConnects: number;
  tcpConnected: boolean;
  tcpLastError: string | undefined;
  tcpLastAtNs: bigint;
  tcpMaxGapMs: number;
  tcpMaxGapEndNs: bigint;
  /** TCP request → response (µs), since the start or the last reset. */
  latencyUs: LatencySummary;
  boots: Map<bigint, BootStats>;
  rollbacks: Rollback[];
}

interface ChildEvent {
  event: string;
  id?: number;
  udpPort?: number;
  stats?: RawStats;
  error?: string;
}

interface RawStats {
  atNs: string;
  lastBootId?: string;
  boots: Record<string, Record<keyof BootStats, string | number>>;
  udp: { count: number; bad: number; lost: number; lastAtNs: string; maxGapNs: string; maxGapEndNs: string };
  tcp: { responses: number; errors: number; connects: number; bad: number; connected: boolean; lastError?: string; lastAtNs: string; maxGapNs: string; maxGapEndNs: string; latencyUs: LatencySummary };
  rollbacks: RawRollback[];
}

export class ServiceClient {
  private readonly waiters = new Map<number, (event: ChildEvent) => void>();
  private nextId = 1;
  private stderr = '';
  private exit: string | undefined;
  /** The UDP port the client listens on (as asked, or the one the kernel gave for 0). */
  udpPort = 0;
  /** Settles on the child's `ready` event (resolved) or its exit before it (rejected). */
  private readonly ready: Promise<void>;
  private settleReady: ((exited?: string) => void) | undefined;

  private constructor(
    readonly guestIp: string,
    private readonly child: ChildProcess,
  ) {
    this.ready = new Promise<void>((resolve, reject) => {
      this.settleReady = (exited) => {
        this.settleReady = undefined;
        if (exited === undefined) resolve();
        else reject(new Error(`exited (${exited}) before it was ready`));
      };
    });
    this.ready.catch(() => undefined); // start() reports it
    let buffered = '';
    child.stdout!.setEncoding('utf8').on('data', (chunk: string) => {
      buffered += chunk;
      let newline: number;
      while ((newline = buffered.indexOf('\n')) >= 0) {
        const line = buffered.slice(0, newline).trim();
        buffered = buffered.slice(newline + 1);
        if (line) this.onLine(line);
      }
    });
    child.stderr!.setEncoding('utf8').on('data', (chunk: string) => {
      this.stderr = (this.stderr + chunk).slice(-4000);
    });
    child.stdin!.on('error', () => undefined); // a dead child: reported through `exit`
    child.once('exit', (code, signal) => {
      this.exit = signal ?? `code ${code}`;
      for (const waiter of this.waiters.values()) waiter({ event: 'exit' });
      this.settleReady?.(this.exit);
    });
  }

  /** Starts the client (in the witness unless told otherwise); resolves once it listens for datagrams. */
  static async start(guestIp: string, options: ServiceClientOptions = {}): Promise<ServiceClient> {
    const config: ClientConfig = {
      guestIp,
      udpPort: options.udpPort ?? SERVICE_UDP_PORT,
      tcpPort: options.tcpPort ?? SERVICE_TCP_PORT,
      ...(options.tcpIntervalMs !== undefined ? { tcpIntervalMs: options.tcpIntervalMs } : {}),
      requestTimeoutMs: options.requestTimeoutMs ?? 10_000,
      connectTimeoutMs: options.connectTimeoutMs ?? 2_000,
      reconnectDelayMs: options.reconnectDelayMs ?? 100,
    };
    const argv = [process.execPath, '--import', tsxLoader, CHILD, JSON.stringify(config)];
    const host = options.host ?? 'witness';
    const [program, ...args] = host === 'root' ? argv : inHostArgv(host, argv);
    const client = new ServiceClient(guestIp, spawn(program!, args, { stdio: ['pipe', 'pipe', 'pipe'] }));
    const timeoutMs = options.startTimeoutMs ?? 20_000;
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`did not bind UDP port ${config.udpPort} within ${timeoutMs} ms`)), timeoutMs);
    });
    try {
      await Promise.race([client.ready, timeout]);
    } catch (error) {
      client.kill();
      throw new Error(`service client (in ${host}): ${(error as Error).message}\n${client.describe()}`);
    } finally {
      clearTimeout(timer);
    }
    return client;
  }

  private onLine(line: string): void {
    let event: ChildEvent;
    try {
      event = JSON.parse(line) as ChildEvent;
    } catch {
      this.stderr = `${this.stderr}(stdout, not JSON) ${line}\n`.slice(-4000);
      return;
    }
    if (event.event === 'ready') {
      this.udpPort = event.udpPort ?? 0;
      this.settleReady?.();
    }
    else if (event.event === 'stats' && event.id !== undefined) this.waiters.get(event.id)?.(event);
    else if (event.event === 'fatal' || event.event === 'error') this.stderr = `${this.stderr}${event.error}\n`.slice(-4000);
  }

  get pid(): number {
    return this.child.pid!;
  }

  /** What the client saw so far. `resetLatencies` starts a new latency window after this one. */
  async stats(options: { resetLatencies?: boolean; rawLatencies?: boolean; timeoutMs?: number } = {}): Promise<ServiceStats> {
    return this.request('stats', options);
  }

  /**
   * Polls stats until `predicate` holds; past `timeoutMs` the error says what was awaited and shows
   * the last stats.
   */
  async waitFor(what: string, predicate: (s: ServiceStats) => boolean, timeoutMs: number, everyMs = 200): Promise<ServiceStats> {
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      const s = await this.stats();
      if (predicate(s)) return s;
      if (performance.now() > deadline) throw new Error(`service client: timed out after ${timeoutMs} ms waiting for ${what}; last stats ${describeStats(s)}\n${this.describe()}`);
      await new Promise((resolve) => setTimeout(resolve, everyMs));
    }
  }

  /** Stops the client: the final stats (undefined if it was gone already). Kills it past the deadline. */
  async stop(timeoutMs = 5_000): Promise<ServiceStats | undefined> {
    if (this.exit !== undefined) return undefined;
    try {
      return await this.request('stop', { timeoutMs });
    } catch {
      return undefined;
    } finally {
      if (this.exit === undefined) {
        const gone = new Promise<void>((resolve) => this.child.once('exit', () => resolve()));
        const timer = setTimeout(() => this.kill(), timeoutMs);
        await gone;
        clearTimeout(timer);
      }
    }
  }

  /** SIGKILL, for cleanup paths. */
  kill(): void {
    if (this.exit === undefined) this.child.kill('SIGKILL');
  }

  private request(cmd: 'stats' | 'stop', options: { resetLatencies?: boolean; rawLatencies?: boolean; timeoutMs?: number }): Promise<ServiceStats> {
    if (this.exit !== undefined) return Promise.reject(new Error(`service client exited (${this.exit})\n${this.describe()}`));
    const id = this.nextId++;
    const timeoutMs = options.timeoutMs ?? 5_000;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters.delete(id);
        reject(new Error(`service client: no ${cmd} answer within ${timeoutMs} ms\n${this.describe()}`));
      }, timeoutMs);
      this.waiters.set(id, (event) => {
        clearTimeout(timer);
        this.waiters.delete(id);
        if (event.stats) resolve(parseStats(event.stats));
        else reject(new Error(`service client exited (${this.exit}) before answering ${cmd}\n${this.describe()}`));
      });
      this.child.stdin!.write(`${JSON.stringify({ cmd, id, resetLatencies: options.resetLatencies === true, rawLatencies: options.rawLatencies === true })}\n`);
    });
  }

  describe(): string {
    return `service client pid ${this.child.pid}${this.exit ? `, exited (${this.exit})` : ''}; stderr:\n${this.stderr || '(none)'}`;
  }
}

const big = (v: string | number) => BigInt(v);

function parseStats(raw: RawStats): ServiceStats {
  const boots = new Map<bigint, BootStats>();
  for (const [id, b] of Object.entries(raw.boots)) {
    boots.set(BigInt(`0x${id}`), {
      udpCount: Number(b.udpCount),
      highestUdpCounter: big(b.highestUdpCounter),
      highestUdpCounterAtNs: big(b.highestUdpCounterAtNs),
      highestSeq: big(b.highestSeq),
      firstUdpAtNs: big(b.firstUdpAtNs),
      lastUdpAtNs: big(b.lastUdpAtNs),
      tcpResponses: Number(b.tcpResponses),
      highestTcpCounter: big(b.highestTcpCounter),
      highestTcpCounterAtNs: big(b.highestTcpCounterAtNs),
    });
  }
  const lastBootId = raw.lastBootId !== undefined ? BigInt(`0x${raw.lastBootId}`) : undefined;
  const last = lastBootId !== undefined ? boots.get(lastBootId) : undefined;
  const seen = (v: bigint | undefined) => (v === undefined || v < 0n ? undefined : v);
  return {
    atNs: big(raw.atNs),
    lastBootId,
    highestUdpCounter: seen(last?.highestUdpCounter),
    highestTcpCounter: seen(last?.highestTcpCounter),
    udpCount: raw.udp.count,
    udpLost: raw.udp.lost,
    udpBad: raw.udp.bad,
    udpLastAtNs: big(raw.udp.lastAtNs),
    udpMaxGapMs: Number(raw.udp.maxGapNs) / 1e6,
    udpMaxGapEndNs: big(raw.udp.maxGapEndNs),
    tcpResponses: raw.tcp.responses,
    tcpErrors: raw.tcp.errors,
    tcpReconnects: Math.max(0, raw.tcp.connects - 1),
    tcpConnects: raw.tcp.connects,
    tcpConnected: raw.tcp.connected,
    tcpLastError: raw.tcp.lastError,
    tcpLastAtNs: big(raw.tcp.lastAtNs),
    tcpMaxGapMs: Number(raw.tcp.maxGapNs) / 1e6,
    tcpMaxGapEndNs: big(raw.tcp.maxGapEndNs),
    latencyUs: raw.tcp.latencyUs,
    boots,
    rollbacks: raw.rollbacks.map((r) => ({
      via: r.via,
      bootId: BigInt(`0x${r.bootId}`),
      highestBefore: big(r.highestBefore),
      lowest: big(r.lowest),
      lost: big(r.highestBefore) - big(r.lowest),
      firstAtNs: big(r.firstAtNs),
      replies: r.replies,
      open: r.open,
    })),
  };
}

/** One line for logs and error messages. */
export function describeStats(s: ServiceStats): string {
  const lat = s.latencyUs;
  const ms = (us: number | undefined) => (us === undefined ? '-' : (us / 1000).toFixed(2));
  return [
    `udp ${s.udpCount} (lost ${s.udpLost}, max gap ${s.udpMaxGapMs.toFixed(1)} ms, highest counter ${s.highestUdpCounter ?? '-'})`,
    `tcp ${s.tcpResponses} answers (errors ${s.tcpErrors}, reconnects ${s.tcpReconnects}, connected ${s.tcpConnected}, max gap ${s.tcpMaxGapMs.toFixed(1)} ms, highest counter ${s.highestTcpCounter ?? '-'}${s.tcpLastError && (s.tcpErrors > 0 || !s.tcpConnected) ? `, last error: ${s.tcpLastError}` : ''})`,
    `latency ms p50 ${ms(lat.p50)} p90 ${ms(lat.p90)} p99 ${ms(lat.p99)} max ${ms(lat.max)} (${lat.count})`,
    `rollbacks ${s.rollbacks.map((r) => `${r.via} −${r.lost}${r.open ? ' (open)' : ''}`).join(', ') || 'none'}`,
  ].join('; ');
}
