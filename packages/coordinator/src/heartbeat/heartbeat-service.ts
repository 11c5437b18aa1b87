import dgram from 'node:dgram';
import net from 'node:net';
import type { SshConnection } from '@ftvm/transport';
import { hostRealtimeNs } from '../host-clock.js';
import { ClockOffsetEstimator, type ClockOffsetEstimate, type ClockOffsetOptions } from './clock-offset.js';
import { PeerTracker, type HeartbeatPath } from './peer-tracker.js';
import { encodeHeartbeat, MAX_HEARTBEAT_BYTES, parseHeartbeat, type Heartbeat, type HeartbeatEcho } from './wire.js';

/** Beats whose send times sentAt() remembers (all peers together): seconds of beats at any sane interval. */
const SENT_BEATS_KEPT = 512;

export type HeartbeatLog = (level: 'info' | 'warn' | 'error', msg: string, fields?: object) => void;

type Channel = Awaited<ReturnType<SshConnection['forwardOut']>>;

/** The same as HeartbeatServiceOptions. */
export type HeartbeatOptions = HeartbeatServiceOptions;

export interface HeartbeatServiceOptions {
  /** This host's name (the `from` of its beats). */
  host: string;
  /**
   * UDP on udpAddress:port (the lab/cluster network); TCP on tcpAddress:port, by default the
   * loopback, which peers reach only through SSH (direct-tcpip to this host's 127.0.0.1:port).
   */
  listen: { udpAddress: string; port: number; tcpAddress?: string };
  intervalMs: number;
  /** A peer is down when neither path delivered a beat for this long. */
  timeoutMs: number;
  /** What this host says about its VMs in each beat. */
  payload: () => Heartbeat['vms'];
  log?: HeartbeatLog;
  /** This host's realtime in ns, for the clock-offset rounds (default: hostRealtimeNs, see host-clock.ts). */
  clock?: () => bigint;
  /** The clock-offset filter of each peer (window, drift allowance). */
  clockOffset?: ClockOffsetOptions;
}

export interface HeartbeatPeer {
  name: string;
  /** UDP target: the peer's address and heartbeat port; the SSH path goes to its 127.0.0.1:port. */
  address: string;
  port: number;
  /** The current SSH connection to the peer, if any (asked at every beat; may change or vanish). */
  ssh?: () => SshConnection | undefined;
}

/** What `peer(name)` tells. */
export interface PeerState {
  alive: boolean;
  /** performance.now() of the newest beat received on each path. */
  lastBeatAt: { udp?: number; ssh?: number };
  /** The newest beat (by the sender's sequence). */
  last?: Heartbeat;
  /** Our SSH path to the peer: a forwarded channel of ours, the peer's channel to us, or none. */
  sshPath: 'channel' | 'inbound' | 'none';
  /** The peer's realtime minus ours, measured over the beats (absent: no round in the window). */
  clockOffset?: ClockOffsetEstimate;
}

interface SshSide {
  conn: SshConnection | undefined;
  channel: Channel | undefined;
  writable: boolean;
  opening: boolean;
  nextAttemptAt: number;
  /** The error of the current failure streak (logged once), if any. */
  failing: string | undefined;
}

interface PeerEntry {
  config: HeartbeatPeer;
  state: PeerTracker;
  ssh: SshSide;
  udpFailing: string | undefined;
  clock: ClockOffsetEstimator;
  /** The newest beat from the peer, echoed back in our beats to it. */
  echo: HeartbeatEcho | undefined;
  /** Clock samples refused and clock fields dropped, logged at most once a minute. */
  clockTrouble: { loggedAt: number; sinceLog: number };
}

interface Inbound {
  socket: net.Socket;
  writable: boolean;
}

/**
 * Heartbeats between agents over two independent paths, so that one broken path (a dropped SSH
 * connection, a firewall eating UDP) never makes a live peer look dead:
 *
 * - **UDP**: one datagram per beat to `<peer address>:<port>`.
 * - **SSH**: one NDJSON line per beat on a TCP connection carried by the SSH connection to the
 *   peer (an ssh2 `forwardOut` channel to the peer's `127.0.0.1:<port>`, where its service listens
 *   on TCP). The channel is (re)opened whenever a connection is available, without ever holding up
 *   the UDP path. A peer that has no SSH connection to us answers over our channel instead: beats
 *   go both ways on one channel.
 *
 * Every intervalMs one beat (`seq` + 1) goes to every peer on both paths. A timer checks every
 * intervalMs/2: a peer that was up is **down** once neither path delivered a beat for more than
 * timeoutMs (so down is reported timeoutMs to timeoutMs + intervalMs/2 after its last beat), and
 * **up** again at its next beat. A peer never heard from is `alive: false`, with no event. Incoming data that is not a valid heartbeat is dropped and logged (the
 * first, then a count at most once a minute per path).
 *
 * The beats also measure each peer's clock: every beat carries its send time (`sentAtNs`) and
 * echoes the newest beat received from that peer, so each beat that comes back completes an
 * NTP-style round (see ClockOffsetEstimator); `peer(name).clockOffset` is the current estimate.
 */
export class HeartbeatService {
  private readonly peers = new Map<string, PeerEntry>();
  private readonly inbound = new Map<string, Inbound>();
  private readonly inboundSockets = new Set<net.Socket>();
  private readonly downListeners = new Set<(name: string, lastBeatAt: number) => void>();
  private readonly upListeners = new Set<(name: string) => void>();
  private readonly beatListeners = new Set<(name: string, path: HeartbeatPath, beat: Heartbeat) => void>();
  private readonly invalid = { udp: { count: 0, loggedAt: -Infinity, sinceLog: 0 }, ssh: { count: 0, loggedAt: -Infinity, sinceLog: 0 } };
  private readonly unknownSenders = new Set<string>();
  private readonly log: HeartbeatLog;
  private readonly clock: () => bigint;
  private readonly sshRetryMs: number;
  private seq = 0;
  /** performance.now() at the send of each recent beat, by its sentAtNs (what a peer's echo names). */
  private readonly sentAtByNs = new Map<bigint, number>();
  private sendTimer: NodeJS.Timeout | undefined;
  private checkTimer: NodeJS.Timeout | undefined;
  private closing: Promise<void> | undefined;

  private constructor(
    private readonly options: HeartbeatServiceOptions,
    private readonly udp: dgram.Socket,
    private readonly tcp: net.Server,
  ) {
    this.log = options.log ?? (() => undefined);
    this.clock = options.clock ?? hostRealtimeNs;
    this.sshRetryMs = Math.max(options.intervalMs, Math.min(1_000, options.timeoutMs));
  }

  /** Binds UDP and TCP and starts beating. Rejects with a clear error if a port is taken. */
  static async start(options: HeartbeatServiceOptions): Promise<HeartbeatService> {
    if (!(options.intervalMs > 0) || !(options.timeoutMs > options.intervalMs)) {
      throw new Error(`heartbeat: need 0 < intervalMs < timeoutMs, got intervalMs ${options.intervalMs}, timeoutMs ${options.timeoutMs}`);
    }
    const { udpAddress, port } = options.listen;
    const tcpAddress = options.listen.tcpAddress ?? '127.0.0.1';
    const udp = dgram.createSocket({ type: net.isIPv6(udpAddress) ? 'udp6' : 'udp4' });
    await new Promise<void>((resolve, reject) => {
      udp.once('error', (error) => reject(new Error(`heartbeat: cannot listen on UDP ${udpAddress}:${port}: ${error.message}`)));
      udp.bind({ address: udpAddress, port }, () => resolve());
    });
    const tcp = net.createServer();
    try {
      await new Promise<void>((resolve, reject) => {
        tcp.once('error', (error) => reject(new Error(`heartbeat: cannot listen on TCP ${tcpAddress}:${port}: ${error.message}`)));
        tcp.listen({ host: tcpAddress, port }, () => resolve());
      });
    } catch (error) {
      udp.close();
      throw error;
    }
    const service = new HeartbeatService(options, udp, tcp);
    service.run();
    return service;
  }

  /** Starts beating to the peer on both paths; adding it again updates its address, port or SSH getter. */
  addPeer(peer: HeartbeatPeer): void {
    if (peer.name === this.options.host) throw new Error(`heartbeat: ${peer.name} is this host`);
    const existing = this.peers.get(peer.name);
    if (existing) {
      const moved = existing.config.address !== peer.address || existing.config.port !== peer.port;
      existing.config = peer;
      if (moved) {
        this.closeChannel(existing);
        // another address may be another machine, with its own clock
        existing.clock.reset();
        existing.echo = undefined;
      }
      return;
    }
    this.peers.set(peer.name, {
      config: peer,
      state: new PeerTracker(peer.name),
      ssh: { conn: undefined, channel: undefined, writable: false, opening: false, nextAttemptAt: 0, failing: undefined },
      udpFailing: undefined,
      clock: new ClockOffsetEstimator(this.options.clockOffset),
      echo: undefined,
      clockTrouble: { loggedAt: -Infinity, sinceLog: 0 },
    });
    this.log('info', 'heartbeat: peer added', { peer: peer.name, address: peer.address, port: peer.port, ssh: peer.ssh !== undefined });
    this.beatTo(this.peers.get(peer.name)!, this.nextBeat());
  }

  removePeer(name: string): void {
    const entry = this.peers.get(name);
    if (!entry) return;
    this.peers.delete(name);
    this.closeChannel(entry);
    this.log('info', 'heartbeat: peer removed', { peer: name });
  }

  peer(name: string): PeerState | undefined {
    const entry = this.peers.get(name);
    if (!entry) return undefined;
    const { state } = entry;
    const clockOffset = entry.clock.estimate(performance.now());
    return {
      alive: state.alive,
      lastBeatAt: { ...state.lastBeatAt },
      ...(state.last ? { last: state.last } : {}),
      sshPath: entry.ssh.channel ? 'channel' : this.inbound.has(name) ? 'inbound' : 'none',
      ...(clockOffset ? { clockOffset } : {}),
    };
  }

  /** A peer that was up: neither path delivered a beat for timeoutMs; lastBeatAt is performance.now() of its last one. */
  onPeerDown(listener: (name: string, lastBeatAt: number) => void): () => void {
    this.downListeners.add(listener);
    return () => this.downListeners.delete(listener);
  }

  /** The first beat of a peer, or the first after it was down. */
  onPeerUp(listener: (name: string) => void): () => void {
    this.upListeners.add(listener);
    return () => this.upListeners.delete(listener);
  }

  /**
   * When (performance.now()) this host sent the beat stamped `sentAtNs` — the beat a peer's echo
   * names; undefined for a beat older than the last few hundred, or never sent.
   */
  sentAt(sentAtNs: bigint): number | undefined {
    return this.sentAtByNs.get(sentAtNs);
  }

  /** Every valid beat from a known peer, on each path (the same beat usually arrives twice). */
  onBeat(listener: (name: string, path: HeartbeatPath, beat: Heartbeat) => void): () => void {
    this.beatListeners.add(listener);
    return () => this.beatListeners.delete(listener);
  }

  /** Invalid messages dropped so far, per path. */
  get invalidCount(): { udp: number; ssh: number } {
    return { udp: this.invalid.udp.count, ssh: this.invalid.ssh.count };
  }

  close(): Promise<void> {
    this.closing ??= (async () => {
      clearInterval(this.sendTimer);
      clearInterval(this.checkTimer);
      for (const entry of this.peers.values()) this.closeChannel(entry);
      this.peers.clear();
      for (const socket of this.inboundSockets) socket.destroy();
      this.inboundSockets.clear();
      this.inbound.clear();
      await Promise.all([
        new Promise<void>((resolve) => this.udp.close(() => resolve())),
        new Promise<void>((resolve) => this.tcp.close(() => resolve())),
      ]);
    })();
    return this.closing;
  }

  private run(): void {
    this.udp.on('message', (data, remote) => this.received(data, 'udp', `${remote.address}:${remote.port}`));
    this.udp.on('error', (error) => this.log('error', 'heartbeat: UDP socket error', { error: error.message }));
    this.tcp.on('connection', (socket) => this.acceptInbound(socket));
    this.tcp.on('error', (error) => this.log('error', 'heartbeat: TCP server error', { error: error.message }));
    this.sendTimer = setInterval(() => {
      const beat = this.nextBeat();
      for (const entry of this.peers.values()) this.beatTo(entry, beat);
    }, this.options.intervalMs);
    this.checkTimer = setInterval(() => this.checkPeers(), Math.max(5, this.options.intervalMs / 2));
  }

  private nextBeat(): Omit<Heartbeat, 'sentAtMs'> {
    let vms: Heartbeat['vms'];
    try {
      vms = this.options.payload();
    } catch (error) {
      this.log('error', 'heartbeat: payload() threw; beating without VMs', { error: String(error) });
      vms = {};
    }
    return { from: this.options.host, seq: ++this.seq, vms };
  }

  /** One beat to one peer on both paths: stamped now, echoing the peer's newest beat. */
  private beatTo(entry: PeerEntry, beat: Omit<Heartbeat, 'sentAtMs'>): void {
    const sentAtNs = this.clock();
    this.sentAtByNs.set(sentAtNs, performance.now());
    if (this.sentAtByNs.size > SENT_BEATS_KEPT) this.sentAtByNs.delete(this.sentAtByNs.keys().next().value!);
    const line = encodeHeartbeat({ ...beat, sentAtMs: Number(sentAtNs / 1_000_000n), sentAtNs, ...(entry.echo ? { echo: entry.echo } : {}) });
    this.sendUdp(entry, line);
    this.sendSsh(entry, line);
  }

  private sendUdp(entry: PeerEntry, line: string): void {
    if (Buffer.byteLength(line) > MAX_HEARTBEAT_BYTES) {
      this.udpFailed(entry, `beat of ${Buffer.byteLength(line)} bytes is too large for a datagram`);
      return;
    }
    const { address, port } = entry.config;
    this.udp.send(line, port, address, (error) => {
      if (error) this.udpFailed(entry, error.message);
      else if (entry.udpFailing !== undefined) {
        this.log('info', 'heartbeat: UDP sends work again', { peer: entry.config.name });
        entry.udpFailing = undefined;
      }
    });
  }

  private udpFailed(entry: PeerEntry, error: string): void {
    if (entry.udpFailing === undefined) this.log('warn', 'heartbeat: UDP send failed', { peer: entry.config.name, error });
    entry.udpFailing = error;
  }

  private sendSsh(entry: PeerEntry, line: string): void {
    const side = entry.ssh;
    const conn = entry.config.ssh?.();
    if (side.channel && (side.conn !== conn || !conn?.isOpen)) this.closeChannel(entry); // replaced or gone
    if (!side.channel && conn?.isOpen && !side.opening && performance.now() >= side.nextAttemptAt) this.openChannel(entry, conn);
    if (side.channel) {
      if (side.writable) side.writable = side.channel.write(`${line}\n`);
      return;
    }
    // No channel of ours: answer over the peer's channel to us, if it has one.
    const inbound = this.inbound.get(entry.config.name);
    if (inbound && inbound.writable) inbound.writable = inbound.socket.write(`${line}\n`);
  }

  private openChannel(entry: PeerEntry, conn: SshConnection): void {
    const side = entry.ssh;
    side.opening = true;
    const target = `127.0.0.1:${entry.config.port}`;
    conn.forwardOut('127.0.0.1', entry.config.port).then(
      (channel) => {
        side.opening = false;
        if (this.closing || this.peers.get(entry.config.name) !== entry || entry.config.ssh?.() !== conn) {
          channel.close();
          return;
        }
        side.conn = conn;
        side.channel = channel;
        side.writable = true;
        if (side.failing !== undefined) this.log('info', 'heartbeat: SSH path open again', { peer: entry.config.name });
        else this.log('info', 'heartbeat: SSH path open', { peer: entry.config.name, target });
        side.failing = undefined;
        channel.on('drain', () => (side.writable = true));
        // The peer may answer on our channel (when it has no SSH connection to us).
        channel.on('data', this.lineReader('ssh', `${entry.config.name} (our channel)`, () => channel.close()));
        channel.on('error', (error: Error) => this.log('warn', 'heartbeat: SSH channel error', { peer: entry.config.name, error: error.message }));
        channel.on('close', () => {
          if (side.channel !== channel) return;
          side.channel = undefined;
          side.nextAttemptAt = performance.now() + this.sshRetryMs;
          if (!this.closing) this.log('warn', 'heartbeat: SSH path closed; reopening when a connection is there', { peer: entry.config.name });
        });
      },
      (error: Error) => {
        side.opening = false;
        side.nextAttemptAt = performance.now() + this.sshRetryMs;
        if (side.failing === undefined && !this.closing) {
          this.log('warn', 'heartbeat: cannot open the SSH path; retrying', { peer: entry.config.name, target, error: error.message, retryMs: this.sshRetryMs });
        }
        side.failing = error.message;
      },
    );
  }

  private closeChannel(entry: PeerEntry): void {
    const channel = entry.ssh.channel;
    entry.ssh.channel = undefined;
    entry.ssh.conn = undefined;
    entry.ssh.writable = false;
    if (channel) {
      try {
        channel.close();
      } catch {
        // already gone
      }
    }
  }

  private acceptInbound(socket: net.Socket): void {
    this.inboundSockets.add(socket);
    socket.setNoDelay(true);
    const source = `${socket.remoteAddress}:${socket.remotePort} (tcp)`;
    let from: string | undefined;
    const record: Inbound = { socket, writable: true };
    socket.on('drain', () => (record.writable = true));
    socket.on(
      'data',
      this.lineReader('ssh', source, () => socket.destroy(), (beat) => {
        if (from === beat.from) return;
        from = beat.from;
        this.inbound.set(from, record);
      }),
    );
    socket.on('error', () => undefined); // 'close' follows
    socket.on('close', () => {
      this.inboundSockets.delete(socket);
      if (from !== undefined && this.inbound.get(from) === record) this.inbound.delete(from);
    });
  }

  /** Splits a stream into NDJSON lines of heartbeats; `abort` is called on a line too long to be one. */
  private lineReader(path: HeartbeatPath, source: string, abort: () => void, onBeat?: (beat: Heartbeat) => void): (chunk: Buffer) => void {
    let buffered = '';
    return (chunk: Buffer) => {
      buffered += chunk.toString('utf8');
      let newline: number;
      while ((newline = buffered.indexOf('\n')) >= 0) {
        const line = buffered.slice(0, newline);
        buffered = buffered.slice(newline + 1);
        if (line.trim() === '') continue;
        const beat = this.received(line, path, source);
        if (beat && onBeat) onBeat(beat);
      }
      if (buffered.length > MAX_HEARTBEAT_BYTES) {
        this.invalidMessage(path, source, `a line of more than ${MAX_HEARTBEAT_BYTES} bytes: closing the connection`);
        buffered = '';
        abort();
      }
    };
  }

  private received(data: Buffer | string, path: HeartbeatPath, source: string): Heartbeat | undefined {
    const receivedAtNs = this.clock(); // t4 of the round: first, before any parsing
    const parsed = parseHeartbeat(data);
    if ('error' in parsed) {
      this.invalidMessage(path, source, parsed.error);
      return undefined;
    }
    const { beat } = parsed;
    if (beat.from === this.options.host) return undefined; // our own, looped back
    const entry = this.peers.get(beat.from);
    if (!entry) {
      if (!this.unknownSenders.has(beat.from)) {
        this.unknownSenders.add(beat.from);
        this.log('warn', 'heartbeat: beats from a host that is not a peer (ignored)', { from: beat.from, path, source });
      }
      return beat;
    }
    const now = performance.now();
    const up = entry.state.beat(path, beat, now);
    this.clockRound(entry, beat, receivedAtNs, now, parsed.timingError);
    if (up) {
      this.log('info', 'heartbeat: peer up', { peer: beat.from, path });
      for (const listener of [...this.upListeners]) this.callListener('onPeerUp', () => listener(beat.from));
    }
    for (const listener of [...this.beatListeners]) this.callListener('onBeat', () => listener(beat.from, path, beat));
    return beat;
  }

  /** The beat's clock fields: echo it from now on (the newest beat only), and take the round it completes. */
  private clockRound(entry: PeerEntry, beat: Heartbeat, receivedAtNs: bigint, now: number, timingError: string | undefined): void {
    if (timingError) this.clockTrouble(entry, timingError, now);
    if (beat.sentAtNs === undefined) return;
    // the first arrival of a newer beat (not its copy over the slower path)
    if (entry.state.last === beat) entry.echo = { sentAtNs: beat.sentAtNs, receivedAtNs };
    if (!beat.echo) return;
    const verdict = entry.clock.add({ t1: beat.echo.sentAtNs, t2: beat.echo.receivedAtNs, t3: beat.sentAtNs, t4: receivedAtNs }, now);
    if (!verdict.accepted) this.clockTrouble(entry, `clock sample refused: ${verdict.reason}`, now);
    else if (verdict.reset) this.log('warn', 'heartbeat: peer clock offset changed at once', { peer: entry.config.name, detail: verdict.reset, offsetNs: String(verdict.offsetNs) });
  }

  private clockTrouble(entry: PeerEntry, error: string, now: number): void {
    const trouble = entry.clockTrouble;
    trouble.sinceLog++;
    if (now - trouble.loggedAt < 60_000) return;
    this.log('warn', 'heartbeat: clock measure', { peer: entry.config.name, error, sinceLastReport: trouble.sinceLog });
    trouble.loggedAt = now;
    trouble.sinceLog = 0;
  }

  private invalidMessage(path: HeartbeatPath, source: string, error: string): void {
    const stats = this.invalid[path];
    stats.count++;
    stats.sinceLog++;
    const now = performance.now();
    if (now - stats.loggedAt < 60_000) return;
    this.log('warn', 'heartbeat: dropped a message that is not a heartbeat', { path, source, error, droppedSinceLastReport: stats.sinceLog });
    stats.loggedAt = now;
    stats.sinceLog = 0;
  }

  private checkPeers(): void {
    const now = performance.now();
    for (const entry of this.peers.values()) {
      const lastBeatAt = entry.state.check(now, this.options.timeoutMs);
      if (lastBeatAt === undefined) continue;
      this.log('warn', 'heartbeat: peer down (no beat on either path)', { peer: entry.config.name, silentForMs: Math.round(now - lastBeatAt) });
      for (const listener of [...this.downListeners]) this.callListener('onPeerDown', () => listener(entry.config.name, lastBeatAt));
    }
  }

  private callListener(what: string, call: () => void): void {
    try {
      call();
    } catch (error) {
      this.log('error', `heartbeat: an ${what} listener threw`, { error: String(error) });
    }
  }
}
