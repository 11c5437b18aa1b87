import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import fs from 'node:fs';

/**
 * A scripted peer on a unix socket, for unit tests of framing and matching only: each test
 * decides byte by byte what the "QEMU" side writes. Real QEMU is exercised in *.int.test.ts.
 */
export class FakePeer {
  readonly path: string;
  private server: net.Server;
  private connection: net.Socket | undefined;
  private connectionWaiters: ((socket: net.Socket) => void)[] = [];
  readonly received: Record<string, unknown>[] = [];
  private receivedWaiters: (() => void)[] = [];
  onMessage: ((message: Record<string, unknown>, peer: FakePeer) => void) | undefined;

  private constructor(socketPath: string) {
    this.path = socketPath;
    this.server = net.createServer((socket) => {
      this.connection = socket;
      let buffered = '';
      socket.on('data', (chunk) => {
        buffered += chunk.toString('latin1');
        let newline: number;
        while ((newline = buffered.indexOf('\n')) >= 0) {
          const line = buffered.slice(0, newline).replace(/^\xff+/, '');
          buffered = buffered.slice(newline + 1);
          if (!line.trim()) continue;
          const message = JSON.parse(line) as Record<string, unknown>;
          this.received.push(message);
          this.onMessage?.(message, this);
          for (const waiter of this.receivedWaiters.splice(0)) waiter();
        }
      });
      for (const waiter of this.connectionWaiters.splice(0)) waiter(socket);
    });
  }

  static async listen(socketPath = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'ftvm-qmp-')), 'qmp.sock')): Promise<FakePeer> {
    const peer = new FakePeer(socketPath);
    await new Promise<void>((resolve) => peer.server.listen(peer.path, resolve));
    return peer;
  }

  async socket(): Promise<net.Socket> {
    if (this.connection) return this.connection;
    return new Promise((resolve) => this.connectionWaiters.push(resolve));
  }

  async send(data: string | Buffer): Promise<void> {
    (await this.socket()).write(data);
  }

  /** The index-th message the client sent (0 is qmp_capabilities), waiting for it if needed. */
  async messageAt(index: number): Promise<Record<string, unknown>> {
    while (this.received.length <= index) await new Promise<void>((resolve) => this.receivedWaiters.push(resolve));
    return this.received[index]!;
  }

  async close(): Promise<void> {
    this.connection?.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    fs.rmSync(path.dirname(this.path), { recursive: true, force: true });
  }
}

export const GREETING = JSON.stringify({
  QMP: { version: { qemu: { micro: 0, minor: 2, major: 7 }, package: 'test' }, capabilities: ['oob'] },
});

/** Answers the greeting and qmp_capabilities like QEMU does. */
export function actLikeQemu(peer: FakePeer): void {
  void peer.send(`${GREETING}\r\n`);
  peer.onMessage = (message, p) => {
    if (message['execute'] === 'qmp_capabilities') void p.send(`${JSON.stringify({ return: {}, id: message['id'] })}\r\n`);
  };
}
