import net from 'node:net';
import { Client, type ClientChannel, type ConnectConfig } from 'ssh2';
import { coalesceWrites } from './coalesced-writes.js';
import { fingerprintOfKeyBlob } from './host-key.js';

export interface SshEndpoint {
  host: string;
  port?: number;
  username: string;
  privateKey: Buffer | string;
  /** The server's pinned host key fingerprint (`SHA256:…`, as `ssh-keygen -lf` prints it). */
  hostKeyFingerprint: string;
}

export interface SshTimeouts {
  /** TCP connect + handshake + authentication. */
  readyTimeoutMs?: number;
  /** Opening a channel (exec, forwardOut). */
  channelTimeoutMs?: number;
  keepaliveIntervalMs?: number;
  /** Unanswered keepalives before the connection is declared dead. */
  keepaliveCountMax?: number;
}

export class SshError extends Error {
  override name = 'SshError';
  constructor(
    message: string,
    readonly stage: 'connect' | 'host-key' | 'auth' | 'channel' | 'closed',
    readonly host: string,
  ) {
    super(`ssh ${host}: ${message}`);
  }
}

/**
 * One authenticated SSH connection (ssh2) to a peer's OpenSSH sshd: key authentication, a pinned
 * host key, keepalives, and a deadline on every stage. Channels carry their own backpressure, so
 * piping a stream into `exec()`'s channel never buffers more than the window allows.
 */
export class SshConnection {
  private closedReason: string | undefined;

  private constructor(
    private readonly client: Client,
    readonly endpoint: SshEndpoint,
    private readonly channelTimeoutMs: number,
  ) {
    client.on('close', () => (this.closedReason ??= 'connection closed'));
    client.on('error', (error) => (this.closedReason ??= error.message));
  }

  static connect(endpoint: SshEndpoint, timeouts: SshTimeouts = {}): Promise<SshConnection> {
    const client = new Client();
    let hostKeyMismatch: string | undefined;
    // ssh2 waits for the socket's connect under its readyTimeout, as for a socket of its own
    const socket = coalesceWrites(net.connect({ host: endpoint.host, port: endpoint.port ?? 22 }));
    const config: ConnectConfig = {
      sock: socket,
      host: endpoint.host,
      port: endpoint.port ?? 22,
      username: endpoint.username,
      privateKey: endpoint.privateKey,
      readyTimeout: timeouts.readyTimeoutMs ?? 10_000,
      keepaliveInterval: timeouts.keepaliveIntervalMs ?? 1_000,
      keepaliveCountMax: timeouts.keepaliveCountMax ?? 3,
      hostVerifier: (key: Buffer) => {
        const seen = fingerprintOfKeyBlob(key);
        if (seen === endpoint.hostKeyFingerprint) return true;
        hostKeyMismatch = `host key ${seen} does not match the pinned ${endpoint.hostKeyFingerprint}`;
        return false;
      },
    };
    return new Promise((resolve, reject) => {
      // Not `once`: tearing a failed attempt down makes ssh2 emit again ("Connection lost before
      // handshake"), and an 'error' with no listener would take the whole process down. The
      // first error decides; the rest of a discarded client's are dropped.
      let failed = false;
      const onError = (error: Error & { level?: string }) => {
        if (failed) return;
        failed = true;
        client.end();
        socket.destroy();
        if (hostKeyMismatch) reject(new SshError(hostKeyMismatch, 'host-key', endpoint.host));
        else if (error.level === 'client-authentication') reject(new SshError(`authentication refused: ${error.message}`, 'auth', endpoint.host));
        else reject(new SshError(error.message, 'connect', endpoint.host));
      };
      client.on('error', onError);
      client.once('ready', () => {
        client.off('error', onError);
        resolve(new SshConnection(client, endpoint, timeouts.channelTimeoutMs ?? 10_000));
      });
      try {
        client.connect(config);
      } catch (error) {
        // ssh2 throws synchronously for a key it cannot parse.
        socket.destroy();
        reject(new SshError(`bad private key: ${(error as Error).message}`, 'auth', endpoint.host));
      }
    });
  }

  get isOpen(): boolean {
    return this.closedReason === undefined;
  }

  /** Resolves when the connection ends, with the reason (keepalive timeout, peer closed, …). */
  onClose(listener: (reason: string) => void): void {
    this.client.once('close', () => listener(this.closedReason ?? 'connection closed'));
  }

  /** Runs a command on the peer; resolves with its channel once open (stdin = the channel). */
  exec(command: string): Promise<ClientChannel> {
    if (this.closedReason !== undefined) {
      return Promise.reject(new SshError(`cannot run ${command}: ${this.closedReason}`, 'closed', this.endpoint.host));
    }
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        reject(new SshError(`no channel for ${JSON.stringify(command)} within ${this.channelTimeoutMs} ms`, 'channel', this.endpoint.host));
      }, this.channelTimeoutMs);
      this.client.exec(command, (error, channel) => {
        clearTimeout(timer);
        if (error) reject(new SshError(`exec ${JSON.stringify(command)}: ${error.message}`, 'channel', this.endpoint.host));
        else resolve(channel);
      });
    });
  }

  /**
   * Opens a direct-tcpip channel (`ssh -W host:port`): the peer's sshd connects to host:port as
   * the peer sees it (`127.0.0.1` is the peer's own loopback). Resolves with the channel (a duplex
   * stream of that TCP connection) once open; SshError 'channel' when the peer refuses (nothing
   * listens there, forwarding disabled) or does not answer within the channel deadline.
   */
  forwardOut(host: string, port: number): Promise<ClientChannel> {
    const target = `${host}:${port}`;
    if (this.closedReason !== undefined) {
      return Promise.reject(new SshError(`cannot forward to ${target}: ${this.closedReason}`, 'closed', this.endpoint.host));
    }
    return new Promise((resolve, reject) => {
      let timedOut = false;
      const timer = setTimeout(() => {
        timedOut = true;
        reject(new SshError(`no channel to ${target} within ${this.channelTimeoutMs} ms`, 'channel', this.endpoint.host));
      }, this.channelTimeoutMs);
      // The originator address is informational for the server; sshd logs it.
      this.client.forwardOut('127.0.0.1', 0, host, port, (error, channel) => {
        clearTimeout(timer);
        if (timedOut) {
          channel?.close(); // too late: nobody is waiting for it
          return;
        }
        if (error) reject(new SshError(`forward to ${target}: ${error.message}`, 'channel', this.endpoint.host));
        else resolve(channel);
      });
    });
  }

  close(): void {
    this.closedReason ??= 'closed by client';
    this.client.end();
  }
}
