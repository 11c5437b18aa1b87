import type net from 'node:net';
import {
  QmpClientError,
  QmpCommandError,
  QmpConnectionClosedError,
  QmpProtocolError,
  QmpTimeoutError,
} from './errors.js';
import { encodeMessage, JsonLineDecoder, type Frame } from './framing.js';
import {
  isEventMessage,
  isGreeting,
  isRecord,
  timestampToNs,
  type QmpEvent,
  type QmpGreeting,
} from './messages.js';
import { connectSocket, describeTarget, type SocketTarget } from './socket.js';

export interface QmpConnectOptions {
  /** Deadline for connect + greeting + capabilities negotiation. */
  connectTimeoutMs?: number;
  /** Default deadline for each command. */
  commandTimeoutMs?: number;
  /** Ask for out-of-band execution when QEMU offers it (default true). */
  enableOob?: boolean;
}

export interface ExecuteOptions {
  timeoutMs?: number;
  /** Run out-of-band (`exec-oob`): only for commands QEMU allows, and only if oob was negotiated. */
  oob?: boolean;
}

export interface WaitForEventOptions<Data> {
  timeoutMs?: number;
  predicate?: (event: QmpEvent<Data>) => boolean;
}

type EventListener = (event: QmpEvent) => void;

interface PendingCommand {
  readonly command: string;
  readonly resolve: (frame: Frame) => void;
  readonly reject: (error: Error) => void;
  readonly timer: NodeJS.Timeout;
}

const DEFAULT_CONNECT_TIMEOUT_MS = 5_000;
const DEFAULT_COMMAND_TIMEOUT_MS = 10_000;

/**
 * A QMP connection: one per monitor socket, long-lived (QEMU serves one client per monitor).
 * Replies are matched to commands by `id`; events are fanned out to listeners with QEMU's own
 * timestamp. Every command has a deadline; a dying peer fails every outstanding command at once.
 */
export class QmpClient {
  private readonly pending = new Map<string, PendingCommand>();
  private readonly listeners = new Set<EventListener>();
  private readonly closeWaiters = new Set<(reason: string) => void>();
  private nextId = 1;
  private closedReason: string | undefined;
  private greetingWaiter: { resolve: (g: QmpGreeting) => void; reject: (e: Error) => void } | undefined;
  private readonly closedPromise: Promise<void>;
  greeting: QmpGreeting | undefined;
  oobEnabled = false;

  private constructor(
    private readonly socket: net.Socket,
    readonly target: string,
    private readonly commandTimeoutMs: number,
  ) {
    const decoder = new JsonLineDecoder({
      frame: (frame) => this.onFrame(frame),
      sentinel: () => this.fail(new QmpProtocolError('unexpected 0xff byte on a QMP socket')),
      error: (error) => this.fail(error),
    });
    socket.on('data', (chunk: Buffer) => decoder.push(chunk));
    socket.on('error', (error) => this.fail(new QmpConnectionClosedError(undefined, error.message)));
    this.closedPromise = new Promise((resolve) => socket.once('close', () => resolve()));
    socket.once('close', () => this.fail(new QmpConnectionClosedError(undefined, 'peer closed the socket')));
  }

  /**
   * `connect` for a QEMU that is still starting: while its socket is missing or refuses, tries
   * again every `retryMs` (default 50) until `timeoutMs` is spent, each attempt bounded by what is
   * left (and by `connectTimeoutMs`, default 5 s).
   */
  static async connectWhenReady(target: SocketTarget, options: QmpConnectOptions & { timeoutMs: number; retryMs?: number }): Promise<QmpClient> {
    const deadline = Date.now() + options.timeoutMs;
    for (;;) {
      const left = deadline - Date.now();
      try {
        return await QmpClient.connect(target, { ...options, connectTimeoutMs: Math.max(1, Math.min(options.connectTimeoutMs ?? 5_000, left)) });
      } catch (error) {
        if (Date.now() + (options.retryMs ?? 50) > deadline) {
          throw new QmpClientError(`no QMP on ${describeTarget(target)} within ${options.timeoutMs} ms: ${(error as Error).message}`);
        }
        await new Promise((resolve) => setTimeout(resolve, options.retryMs ?? 50));
      }
    }
  }

  /** Connects, reads the greeting and negotiates capabilities (oob when offered and wanted). */
  static async connect(target: SocketTarget, options: QmpConnectOptions = {}): Promise<QmpClient> {
    const connectTimeoutMs = options.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
    const deadline = Date.now() + connectTimeoutMs;
    const socket = await connectSocket(target, connectTimeoutMs);
    const client = new QmpClient(socket, describeTarget(target), options.commandTimeoutMs ?? DEFAULT_COMMAND_TIMEOUT_MS);
    try {
      const greeting = await client.awaitGreeting(Math.max(1, deadline - Date.now()));
      const offersOob = greeting.QMP.capabilities.includes('oob');
      const enable = offersOob && options.enableOob !== false ? ['oob'] : [];
      await client.execute('qmp_capabilities', enable.length ? { enable } : undefined, {
        timeoutMs: Math.max(1, deadline - Date.now()),
      });
      client.oobEnabled = enable.length > 0;
      return client;
    } catch (error) {
      client.socket.destroy();
      throw error;
    }
  }

  get isOpen(): boolean {
    return this.closedReason === undefined;
  }

  /** Sends a command and resolves with its `return` value; rejects with a typed error. */
  async execute<R = unknown>(command: string, args?: object, options: ExecuteOptions = {}): Promise<R> {
    const frame = await this.executeFrame(command, args, options);
    return (frame.value as { return: R }).return;
  }

  /** Like execute, but yields the raw reply line too (for 64-bit integers JSON.parse would round). */
  executeFrame(command: string, args?: object, options: ExecuteOptions = {}): Promise<Frame> {
    if (this.closedReason !== undefined) {
      return Promise.reject(new QmpConnectionClosedError(command, this.closedReason));
    }
    if (options.oob && !this.oobEnabled) {
      return Promise.reject(new QmpClientError(`${command}: out-of-band execution was not negotiated`));
    }
    const id = `ftvm-${this.nextId++}`;
    const timeoutMs = options.timeoutMs ?? this.commandTimeoutMs;
    return new Promise<Frame>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new QmpTimeoutError(command, timeoutMs));
      }, timeoutMs);
      this.pending.set(id, { command, resolve, reject, timer });
      const message = { [options.oob ? 'exec-oob' : 'execute']: command, ...(args ? { arguments: args } : {}), id };
      this.socket.write(encodeMessage(message));
    });
  }

  /** Subscribes to every event; returns the unsubscribe function. */
  onEvent(listener: EventListener): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /**
   * Resolves with the next event of that name (matching the predicate). Subscribe before sending
   * the command that causes it, or the event may already have passed.
   */
  waitForEvent<Data = Record<string, unknown>>(name: string, options: WaitForEventOptions<Data> = {}): Promise<QmpEvent<Data>> {
    const timeoutMs = options.timeoutMs ?? this.commandTimeoutMs;
    return new Promise((resolve, reject) => {
      const finish = (error?: Error, event?: QmpEvent<Data>) => {
        clearTimeout(timer);
        unsubscribe();
        this.closeWaiters.delete(onClose);
        if (error) reject(error);
        else resolve(event!);
      };
      const onClose = (reason: string) => finish(new QmpConnectionClosedError(`wait for ${name}`, reason));
      const timer = setTimeout(() => finish(new QmpTimeoutError(`wait for event ${name}`, timeoutMs)), timeoutMs);
      const unsubscribe = this.onEvent((event) => {
        const typed = event as QmpEvent<Data>;
        if (event.event === name && (!options.predicate || options.predicate(typed))) finish(undefined, typed);
      });
      if (this.closedReason !== undefined) onClose(this.closedReason);
      else this.closeWaiters.add(onClose);
    });
  }

  /** Calls `listener` once when the connection ends, with the reason (at once if it has ended). */
  onClose(listener: (reason: string) => void): () => void {
    if (this.closedReason !== undefined) {
      listener(this.closedReason);
      return () => undefined;
    }
    this.closeWaiters.add(listener);
    return () => this.closeWaiters.delete(listener);
  }

  /** Closes the socket; outstanding commands fail with QmpConnectionClosedError. */
  async close(): Promise<void> {
    if (this.closedReason === undefined) this.fail(new QmpConnectionClosedError(undefined, 'closed by client'));
    await this.closedPromise;
  }

  private awaitGreeting(timeoutMs: number): Promise<QmpGreeting> {
    if (this.greeting) return Promise.resolve(this.greeting);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new QmpTimeoutError(`greeting from ${this.target}`, timeoutMs)), timeoutMs);
      this.greetingWaiter = {
        resolve: (g) => (clearTimeout(timer), resolve(g)),
        reject: (e) => (clearTimeout(timer), reject(e)),
      };
    });
  }

  private onFrame(frame: Frame): void {
    const message = frame.value as Record<string, unknown>;
    if (isGreeting(message)) {
      this.greeting = message;
      this.greetingWaiter?.resolve(message);
      this.greetingWaiter = undefined;
      return;
    }
    if (isEventMessage(message)) {
      const event: QmpEvent = {
        event: message.event,
        data: message.data ?? {},
        timestampNs: timestampToNs(message.timestamp),
      };
      for (const listener of [...this.listeners]) listener(event);
      return;
    }
    if ('return' in message || 'error' in message) {
      this.onReply(message, frame);
      return;
    }
    this.fail(new QmpProtocolError('QMP message is neither a reply, an event nor a greeting', frame.raw));
  }

  private onReply(message: Record<string, unknown>, frame: Frame): void {
    const id = message['id'];
    // A reply without our id answers input QEMU could not parse; it is not ours to match.
    if (typeof id !== 'string') {
      this.fail(new QmpProtocolError('QMP reply without a command id', frame.raw));
      return;
    }
    const pending = this.pending.get(id);
    if (!pending) return; // late reply to a command that already timed out
    this.pending.delete(id);
    clearTimeout(pending.timer);
    const error = message['error'];
    if (isRecord(error)) {
      pending.reject(new QmpCommandError(pending.command, String(error['class']), String(error['desc'])));
    } else {
      pending.resolve(frame);
    }
  }

  /** Tears the connection down once, failing everything outstanding with the cause. */
  private fail(error: QmpClientError): void {
    if (this.closedReason !== undefined) return;
    this.closedReason = error.message;
    this.socket.destroy();
    this.greetingWaiter?.reject(error);
    this.greetingWaiter = undefined;
    for (const pending of this.pending.values()) {
      clearTimeout(pending.timer);
      pending.reject(
        error instanceof QmpConnectionClosedError ? new QmpConnectionClosedError(pending.command, error.reason) : error,
      );
    }
    this.pending.clear();
    for (const waiter of [...this.closeWaiters]) waiter(error.message);
  }
}
