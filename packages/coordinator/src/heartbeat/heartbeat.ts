import dgram from 'node:dgram';
import net from 'node:net';
import type { SshConnection } from '@ftvm/transport';
import { z } from 'zod';

/** What an agent tells its peers every interval. */
export const heartbeatSchema = z.object({
  from: z.string().min(1),
  seq: z.number().int().nonnegative(),
  /** Date.now() at sending. */
  sentAtMs: z.number(),
  vms: z.record(z.object({ role: z.enum(['primary', 'backup', 'none']), running: z.boolean(), epoch: z.number().optional() })),
});
export type Heartbeat = z.infer<typeof heartbeatSchema>;
export type HeartbeatPath = 'udp' | 'ssh';
type ClientChannel = Awaited<ReturnType<SshConnection['forwardOut']>>;
export type HeartbeatLog = (level: 'info' | 'warn' | 'error', message: string, fields?: object) => void;

export interface HeartbeatOptions {
  host: string;
  /** UDP on this address and TCP on 127.0.0.1, both on `port` (the SSH path arrives over TCP). */
  listen: { udpAddress: string; port: number };
  intervalMs: number;
  /** A peer is down when neither path delivered a beat for this long. */
  timeoutMs: number;
  payload: () => Heartbeat['vms'];
  log?: HeartbeatLog;
}

export interface HeartbeatPeer {
  name: string;
  address: string;
  port: number;
  /** The open SSH connection to the peer, if any: the second path rides on it. */
  ssh?: () => SshConnection | undefined;
}

export interface PeerState {
  alive: boolean;
  /** performance.now() of the last beat on each path. */
  lastBeatAt: { udp?: number; ssh?: number };
  last?: Heartbeat;
}

interface Peer extends HeartbeatPeer {
  state: PeerState;
  channel: ClientChannel | undefined;
  channelOf: SshConnection | undefined;
  opening: boolean;
}

/**
 * Heartbeats between agents over two independent paths: UDP datagrams on the hosts' network and
 * NDJSON lines through the SSH connection between them (a direct-tcpip channel to the peer's
 * loopback listener). Either path keeps a peer alive; losing both for `timeoutMs` makes it down.
 */
export class HeartbeatService {
  private readonly peers = new Map<string, Peer>();
  private readonly downListeners = new Set<(name: string, lastBeatAt: number) => void>();
  private readonly upListeners = new Set<(name: string) => void>();
  private readonly beatListeners = new Set<(name: string, path: HeartbeatPath, beat: Heartbeat) => void>();
  private readonly sendTimer: NodeJS.Timeout;
  private readonly checkTimer: NodeJS.Timeout;
  private seq = 0;
  private garbageReported = false;

  private constructor(
    private readonly options: HeartbeatOptions,
    private readonly udp: dgram.Socket,
    private readonly tcp: net.Server,
  ) {
    this.sendTimer = setInterval(() => this.sendAll(), options.intervalMs);
    this.checkTimer = setInterval(() => this.check(), Math.max(5, Math.floor(options.intervalMs / 2)));
  }

  static async start(options: HeartbeatOptions): Promise<HeartbeatService> {
    const udp = dgram.createSocket('udp4');
    await new Promise<void>((resolve, reject) => {
      udp.once('error', reject);
      udp.bind(options.listen.port, options.listen.udpAddress, () => {
        udp.off('error', reject);
        resolve();
      });
    });
    const tcp = net.createServer();
    await new Promise<void>((resolve, reject) => {
      tcp.once('error', reject);
      tcp.listen(options.listen.port, '127.0.0.1', () => {
        tcp.off('error', reject);
        resolve();
      });
    });
    const service = new HeartbeatService(options, udp, tcp);
    udp.on('message', (message) => service.receive(message.toString(), 'udp'));
    udp.on('error', (error) => options.log?.('warn', 'heartbeat UDP socket error', { err: error.message }));
    tcp.on('connection', (socket) => {
      let buffered = '';
      socket.setNoDelay(true);
      socket.on('data', (chunk: Buffer) => {
        buffered += chunk.toString();
        if (buffered.length > 1 << 20) socket.destroy();
        let newline: number;
        while ((newline = buffered.indexOf('\n')) >= 0) {
          service.receive(buffered.slice(0, newline), 'ssh');
          buffered = buffered.slice(newline + 1);
        }
      });
      socket.on('error', () => socket.destroy());
    });
    return service;
  }

  addPeer(peer: HeartbeatPeer): void {
    if (this.peers.has(peer.name)) return;
    this.peers.set(peer.name, { ...peer, state: { alive: false, lastBeatAt: {} }, channel: undefined, channelOf: undefined, opening: false });
  }

  removePeer(name: string): void {
    const peer = this.peers.get(name);
    peer?.channel?.destroy();
    this.peers.delete(name);
  }

  peer(name: string): PeerState | undefined {
    return this.peers.get(name)?.state;
  }

  onPeerDown(listener: (name: string, lastBeatAt: number) => void): void {
    this.downListeners.add(listener);
  }

  onPeerUp(listener: (name: string) => void): void {
    this.upListeners.add(listener);
  }

  onBeat(listener: (name: string, path: HeartbeatPath, beat: Heartbeat) => void): void {
    this.beatListeners.add(listener);
  }

  async close(): Promise<void> {
    clearInterval(this.sendTimer);
    clearInterval(this.checkTimer);
    for (const peer of this.peers.values()) peer.channel?.destroy();
    this.udp.close();
    await new Promise<void>((resolve) => this.tcp.close(() => resolve()));
  }

  private sendAll(): void {
    const beat: Heartbeat = { from: this.options.host, seq: this.seq++, sentAtMs: Date.now(), vms: this.options.payload() };
    const line = JSON.stringify(beat);
    for (const peer of this.peers.values()) {
      this.udp.send(line, peer.port, peer.address, () => undefined);
      this.sendSsh(peer, line);
    }
  }

  private sendSsh(peer: Peer, line: string): void {
    const ssh = peer.ssh?.();
    if (peer.channel && (peer.channelOf !== ssh || peer.channel.destroyed)) {
      peer.channel.destroy();
      peer.channel = undefined;
    }
    if (peer.channel) {
      // a stalled path must not buffer without bound: drop beats the channel cannot take
      if (peer.channel.writableLength < 64 * 1024) peer.channel.write(`${line}\n`);
      return;
    }
    if (!ssh || peer.opening) return;
    peer.opening = true;
    ssh
      .forwardOut('127.0.0.1', peer.port)
      .then((channel) => {
        peer.channel = channel;
        peer.channelOf = ssh;
        channel.on('close', () => {
          if (peer.channel === channel) peer.channel = undefined;
        });
        channel.on('error', () => channel.destroy());
        channel.on('data', () => undefined);
      })
      .catch((error: Error) => this.options.log?.('warn', `heartbeat channel to ${peer.name} over SSH`, { err: error.message }))
      .finally(() => (peer.opening = false));
  }

  private receive(text: string, path: HeartbeatPath): void {
    let beat: Heartbeat;
    try {
      beat = heartbeatSchema.parse(JSON.parse(text));
    } catch {
      if (!this.garbageReported) this.options.log?.('warn', `ignoring a malformed heartbeat on ${path}`);
      this.garbageReported = true;
      return;
    }
    const peer = this.peers.get(beat.from);
    if (!peer) return;
    // beats arrive out of order across the two paths, and seq restarts with the agent: keep the newest
    if (!peer.state.last || beat.sentAtMs >= peer.state.last.sentAtMs) peer.state.last = beat;
    peer.state.lastBeatAt[path] = performance.now();
    for (const listener of this.beatListeners) listener(peer.name, path, beat);
    if (!peer.state.alive) {
      peer.state.alive = true;
      for (const listener of this.upListeners) listener(peer.name);
    }
  }

  private check(): void {
    const now = performance.now();
    for (const peer of this.peers.values()) {
      if (!peer.state.alive) continue;
      const last = Math.max(peer.state.lastBeatAt.udp ?? 0, peer.state.lastBeatAt.ssh ?? 0);
      if (now - last > this.options.timeoutMs) {
        peer.state.alive = false;
        for (const listener of this.downListeners) listener(peer.name, last);
      }
    }
  }
}
