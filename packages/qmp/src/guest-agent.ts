import type net from 'node:net';
import { randomInt } from 'node:crypto';
import {
  QmpCommandError,
  QmpConnectionClosedError,
  QmpProtocolError,
  QmpTimeoutError,
  type QmpClientError,
} from './errors.js';
import { encodeMessage, JsonLineDecoder, SENTINEL_BYTE, type Frame } from './framing.js';
import { isRecord } from './messages.js';
import { connectSocket, describeTarget, type SocketTarget } from './socket.js';

export interface GuestAgentOptions {
  connectTimeoutMs?: number;
  commandTimeoutMs?: number;
}

type Waiter = { resolve: (frame: Frame) => void; reject: (error: Error) => void };

const DEFAULT_TIMEOUT_MS = 5_000;

/**
 * Client for the QEMU guest agent (qemu-ga) on its virtio-serial chardev.
 *
 * The agent has no reply ids worth trusting across a restart of either side, and a reply to a
 * timed-out command may arrive later, so commands run one at a time and the stream is
 * resynchronised with `guest-sync-delimited` on connect and after any timeout: everything up to
 * the agent's 0xff sentinel and the echoed random id is discarded.
 */
export class GuestAgentClient {
  private queue: Promise<unknown> = Promise.resolve();
  private waiter: Waiter | undefined;
  /** Frames that arrived while nobody waited: one chunk can carry stale output, sentinel and reply. */
  private inbox: Frame[] = [];
  private sawSentinel = false;
  private needsSync = true;
  private closedReason: string | undefined;

  private constructor(
    private readonly socket: net.Socket,
    readonly target: string,
    private readonly commandTimeoutMs: number,
  ) {
    const decoder = new JsonLineDecoder({
      frame: (frame) => this.onFrame(frame),
      sentinel: () => {
        this.sawSentinel = true;
        this.inbox = []; // whatever came before the sentinel is stale
      },
      // A garbled line from the agent is stale or corrupt output: drop it and resync next time.
      error: () => (this.needsSync = true),
    });
    socket.on('data', (chunk: Buffer) => decoder.push(chunk));
    socket.on('error', (error) => this.fail(new QmpConnectionClosedError(undefined, error.message)));
    socket.once('close', () => this.fail(new QmpConnectionClosedError(undefined, 'peer closed the socket')));
  }

  static async connect(target: SocketTarget, options: GuestAgentOptions = {}): Promise<GuestAgentClient> {
    const timeoutMs = options.connectTimeoutMs ?? DEFAULT_TIMEOUT_MS;
    const socket = await connectSocket(target, timeoutMs);
    const client = new GuestAgentClient(socket, describeTarget(target), options.commandTimeoutMs ?? DEFAULT_TIMEOUT_MS);
    try {
      await client.sync(timeoutMs);
      return client;
    } catch (error) {
      socket.destroy();
      throw error;
    }
  }

  /** Resynchronises the stream; fails with QmpTimeoutError when no agent answers in time. */
  sync(timeoutMs = this.commandTimeoutMs): Promise<void> {
    return this.serialize(() => this.syncNow(timeoutMs));
  }

  async ping(timeoutMs?: number): Promise<void> {
    await this.execute('guest-ping', undefined, timeoutMs);
  }

  /** The guest's CLOCK_REALTIME in ns, exactly (parsed from the raw reply: it exceeds 2^53). */
  async getTime(timeoutMs?: number): Promise<bigint> {
    const frame = await this.executeFrame('guest-get-time', undefined, timeoutMs);
    const match = /"return"\s*:\s*(-?\d+)/.exec(frame.raw);
    if (!match?.[1]) throw new QmpProtocolError('guest-get-time reply without an integer', frame.raw);
    return BigInt(match[1]);
  }

  /**
   * Sets the guest clock to `timeNs` (CLOCK_REALTIME ns); the agent also writes the RTC.
   * Without an argument the agent reads the guest's RTC instead.
   */
  async setTime(timeNs?: bigint, timeoutMs?: number): Promise<void> {
    await this.execute('guest-set-time', timeNs === undefined ? undefined : { time: timeNs }, timeoutMs);
  }

  async execute<R = unknown>(command: string, args?: object, timeoutMs?: number): Promise<R> {
    const frame = await this.executeFrame(command, args, timeoutMs);
    return (frame.value as { return: R }).return;
  }

  executeFrame(command: string, args?: object, timeoutMs = this.commandTimeoutMs): Promise<Frame> {
    return this.serialize(async () => {
      if (this.needsSync) await this.syncNow(timeoutMs);
      this.write({ execute: command, ...(args ? { arguments: args } : {}) });
      const frame = await this.nextFrame(command, timeoutMs);
      const error = (frame.value as Record<string, unknown>)['error'];
      if (isRecord(error)) throw new QmpCommandError(command, String(error['class']), String(error['desc']));
      return frame;
    });
  }

  async close(): Promise<void> {
    if (this.closedReason !== undefined) return;
    const closed = new Promise<void>((resolve) => this.socket.once('close', () => resolve()));
    this.fail(new QmpConnectionClosedError(undefined, 'closed by client'));
    await closed;
  }

  private async syncNow(timeoutMs: number): Promise<void> {
    const id = randomInt(1, 2 ** 31);
    this.sawSentinel = false;
    this.inbox = [];
    // A leading 0xff makes the agent's JSON parser drop any half-written request of ours.
    this.socket.write(Buffer.from([SENTINEL_BYTE]));
    this.write({ execute: 'guest-sync-delimited', arguments: { id } });
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const frame = await this.nextFrame('guest-sync-delimited', Math.max(1, deadline - Date.now()));
      const value = frame.value as Record<string, unknown>;
      if (this.sawSentinel && value['return'] === id) break; // older output before it is discarded
    }
    this.needsSync = false;
  }

  private nextFrame(command: string, timeoutMs: number): Promise<Frame> {
    const queued = this.inbox.shift();
    if (queued) return Promise.resolve(queued);
    if (this.closedReason !== undefined) {
      return Promise.reject(new QmpConnectionClosedError(command, this.closedReason));
    }
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiter = undefined;
        this.needsSync = true; // the reply may still come; it must not be taken for the next one
        reject(new QmpTimeoutError(`guest agent ${command}`, timeoutMs));
      }, timeoutMs);
      this.waiter = {
        resolve: (frame) => (clearTimeout(timer), resolve(frame)),
        reject: (error) => (clearTimeout(timer), reject(error)),
      };
    });
  }

  private onFrame(frame: Frame): void {
    const waiter = this.waiter;
    this.waiter = undefined;
    if (waiter) waiter.resolve(frame);
    else this.inbox.push(frame); // unsolicited or early; a sync clears up any confusion
  }

  private write(message: object): void {
    this.socket.write(encodeMessage(message));
  }

  private serialize<T>(task: () => Promise<T>): Promise<T> {
    const run = this.queue.then(task, task);
    this.queue = run.catch(() => undefined);
    return run;
  }

  private fail(error: QmpClientError): void {
    if (this.closedReason !== undefined) return;
    this.closedReason = error.message;
    this.socket.destroy();
    this.waiter?.reject(error);
    this.waiter = undefined;
  }
}
