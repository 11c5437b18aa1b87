/**
 * Stands in for the local coordinator (which does not exist yet): records what the libvirt hook
 * sends, over a unix socket (one JSON line, answered with "ok") or HTTP POST.
 */
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import type { HookMessage } from '@ftvm/libvirt';

export interface Recorded {
  message: HookMessage;
  receivedAtMs: number;
}

export class Recorder {
  readonly received: Recorded[] = [];
  private waiters: Array<{ predicate: (m: HookMessage) => boolean; resolve: (r: Recorded) => void }> = [];
  /** Delay before answering (to test the hook's deadline). */
  answerDelayMs = 0;

  private constructor(
    private readonly server: net.Server | http.Server,
    readonly endpoint: string,
  ) {}

  static async unix(path: string): Promise<Recorder> {
    fs.rmSync(path, { force: true });
    let recorder!: Recorder;
    const server = net.createServer((socket) => {
      let buf = '';
      socket.setEncoding('utf8');
      socket.on('data', (chunk: string) => {
        buf += chunk;
        let nl: number;
        while ((nl = buf.indexOf('\n')) >= 0) {
          const line = buf.slice(0, nl);
          buf = buf.slice(nl + 1);
          recorder.record(JSON.parse(line) as HookMessage);
          setTimeout(() => socket.end('ok\n'), recorder.answerDelayMs);
        }
      });
      socket.on('error', () => undefined);
    });
    await new Promise<void>((resolve) => server.listen(path, resolve));
    fs.chmodSync(path, 0o777);
    recorder = new Recorder(server, `unix:${path}`);
    return recorder;
  }

  static async http(host = '127.0.0.1'): Promise<Recorder> {
    let recorder!: Recorder;
    const server = http.createServer((req, res) => {
      let body = '';
      req.setEncoding('utf8');
      req.on('data', (c: string) => (body += c));
      req.on('end', () => {
        recorder.record(JSON.parse(body) as HookMessage);
        setTimeout(() => res.writeHead(204).end(), recorder.answerDelayMs);
      });
    });
    await new Promise<void>((resolve) => server.listen(0, host, resolve));
    const { port } = server.address() as net.AddressInfo;
    recorder = new Recorder(server, `http://${host}:${port}/v1/hook`);
    return recorder;
  }

  private record(message: HookMessage): void {
    const entry = { message, receivedAtMs: performance.now() };
    this.received.push(entry);
    for (const w of [...this.waiters]) {
      if (w.predicate(message)) {
        this.waiters.splice(this.waiters.indexOf(w), 1);
        w.resolve(entry);
      }
    }
  }

  /** The next (or an already received, with includePast) message matching `predicate`. */
  waitFor(predicate: (m: HookMessage) => boolean, timeoutMs: number, includePast = false): Promise<Recorded> {
    if (includePast) {
      const past = this.received.find((r) => predicate(r.message));
      if (past) return Promise.resolve(past);
    }
    return new Promise((resolve, reject) => {
      const waiter = {
        predicate,
        resolve: (r: Recorded) => {
          clearTimeout(timer);
          resolve(r);
        },
      };
      const timer = setTimeout(() => {
        this.waiters.splice(this.waiters.indexOf(waiter), 1);
        reject(new Error(`recorder: nothing matching within ${timeoutMs} ms; got ${JSON.stringify(this.received.map((r) => `${r.message.op} ${r.message.domain} (${r.message.phase})`))}`));
      }, timeoutMs);
      this.waiters.push(waiter);
    });
  }

  close(): Promise<void> {
    return new Promise((resolve) => this.server.close(() => resolve()));
  }
}
