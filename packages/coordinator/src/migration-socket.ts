import fs from 'node:fs';
import net from 'node:net';

/**
 * A unix socket QEMU connects to for `migrate unix:…`: each migration arrives as one connection.
 * The listener lives as long as the protection does, so a checkpoint pays no setup cost.
 */
export class MigrationSocket {
  private waiting: ((socket: net.Socket) => void) | undefined;

  private constructor(
    private readonly server: net.Server,
    readonly path: string,
  ) {
    server.on('connection', (socket) => {
      const waiter = this.waiting;
      this.waiting = undefined;
      if (waiter) waiter(socket);
      else socket.destroy(); // nobody asked for a migration: refuse it
    });
  }

  static async listen(path: string): Promise<MigrationSocket> {
    fs.rmSync(path, { force: true });
    const server = net.createServer();
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(path, () => (server.off('error', reject), resolve()));
    });
    return new MigrationSocket(server, path);
  }

  /** The next connection, within the deadline. */
  nextConnection(timeoutMs: number): Promise<net.Socket> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiting = undefined;
        reject(new Error(`QEMU did not connect to ${this.path} within ${timeoutMs} ms`));
      }, timeoutMs);
      this.waiting = (socket) => (clearTimeout(timer), resolve(socket));
    });
  }

  async close(): Promise<void> {
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    fs.rmSync(this.path, { force: true });
  }
}
