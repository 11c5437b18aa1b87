import { ConsecutiveBreaker, circuitBreaker, handleWhen, isBrokenCircuitError, noop } from 'cockatiel';
import {
  ClientClosedError,
  Etcd3,
  EtcdLeaseInvalidError,
  GRPCCancelledError,
  GRPCDeadlineExceededError,
  GRPCUnavailableError,
  type KVClient,
} from 'etcd3';

/** gRPC call options (a deadline), as etcd3's RPC clients take them. */
export type CallOptions = NonNullable<Parameters<KVClient['range']>[1]>;

/** How the lease and heartbeat modules log: the agent adapts it to pino. */
export type ComponentLog = (level: 'info' | 'warn' | 'error', msg: string, fields?: object) => void;

export const silentLog: ComponentLog = () => undefined;

/**
 * One etcd call (or watch) that failed. `unavailable` is true when etcd did not answer in time or
 * could not be reached (deadline, refused, connection lost): a transient condition to retry.
 */
export class EtcdCallError extends Error {
  override name = 'EtcdCallError';
  constructor(
    readonly operation: string,
    readonly endpoints: readonly string[],
    readonly unavailable: boolean,
    detail: string,
    options?: { cause?: unknown },
  ) {
    super(`etcd ${endpoints.join(',')}: ${operation}: ${detail}`, options);
  }
}

/** Errors that mean "etcd did not answer / cannot be reached", as opposed to etcd saying no. */
export function isUnavailableError(error: unknown): boolean {
  if (error instanceof EtcdCallError) return error.unavailable;
  return (
    error instanceof GRPCDeadlineExceededError ||
    error instanceof GRPCUnavailableError ||
    error instanceof GRPCCancelledError ||
    error instanceof ClientClosedError ||
    // every member of a cluster was just found unreachable (see dial)
    isBrokenCircuitError(error)
  );
}

/**
 * The etcd client behind a HostLease or a ClusterStore: every unary call gets `requestTimeoutMs`
 * as its deadline (the gRPC deadline and a timer of our own), nothing retries behind our back
 * (etcd3's default retry policy and its 5 s circuit breaker are replaced by no-ops), and
 * `reconnect()` throws the connection away and dials afresh.
 *
 * Why reconnect: over a link that drops packets (a cut cable, a frozen peer) a gRPC connection
 * does not fail — its calls just wait, and once the link is back TCP's retransmission backoff can
 * keep it silent for many seconds more. The lease's keepalive loop notices the silence within
 * `requestTimeoutMs` and calls `reconnect()`; every stream user (the keepalive stream, watches)
 * is told through `onReset` and re-opens on the new connection.
 */
export class EtcdSession {
  private current: Etcd3;
  private generationCount = 0;
  private readonly resetListeners = new Set<(reason: string) => void>();
  private closed = false;
  private lastAnswerAt = performance.now();
  private streamUsers = 0;
  private probeTimer: NodeJS.Timeout | undefined;
  private probing = false;
  /** How often an idle session with open streams checks that etcd still answers. */
  readonly probeIntervalMs: number;

  constructor(
    readonly endpoints: readonly string[],
    readonly requestTimeoutMs: number,
    readonly log: ComponentLog = silentLog,
  ) {
    if (endpoints.length === 0) throw new Error('etcd: no endpoints given');
    if (!(requestTimeoutMs > 0)) throw new Error(`etcd: requestTimeoutMs must be positive, got ${requestTimeoutMs}`);
    this.probeIntervalMs = Math.max(200, requestTimeoutMs);
    this.current = this.dial();
  }

  /** etcd answered something just now (a call, a keepalive): no probe needed for a while. */
  noteAnswer(): void {
    this.lastAnswerAt = performance.now();
  }

  /**
   * A stream user (a watch) registers for the liveness probe: while there is at least one, and
   * nothing else (calls, the lease's keepalives) got an answer for probeIntervalMs, the session
   * sends a cheap read; one that gets no answer within requestTimeoutMs makes it reconnect. A
   * watch on a silently dead connection would otherwise wait forever. Returns the release.
   */
  retainProbe(): () => void {
    this.streamUsers++;
    if (this.probeTimer === undefined && !this.closed) {
      this.probeTimer = setInterval(() => void this.probe(), this.probeIntervalMs);
    }
    let released = false;
    return () => {
      if (released) return;
      released = true;
      this.streamUsers--;
      if (this.streamUsers === 0) {
        clearInterval(this.probeTimer);
        this.probeTimer = undefined;
      }
    };
  }

  private async probe(): Promise<void> {
    if (this.closed || this.probing || performance.now() - this.lastAnswerAt < this.probeIntervalMs) return;
    this.probing = true;
    const generation = this.generationCount;
    try {
      await this.call('probe', (client, options) => client.kv.range({ key: Buffer.from('/'), count_only: true }, options));
    } catch (error) {
      if (isUnavailableError(error) && generation === this.generationCount) this.reconnect(`probe: ${(error as Error).message}`);
    } finally {
      this.probing = false;
    }
  }

  /** The current client. It is replaced by `reconnect()`: do not keep it across awaits. */
  get client(): Etcd3 {
    if (this.closed) throw new EtcdCallError('use the client', this.endpoints, false, 'the session is closed');
    return this.current;
  }

  /** Bumped by every reconnect; stream users compare it to drop answers from an old connection. */
  get generation(): number {
    return this.generationCount;
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /**
   * Runs one unary etcd call with the session's deadline (or `timeoutMs`, for a caller whose calls
   * may legitimately take longer, e.g. writes waiting on etcd's disk). Failures become
   * EtcdCallError (with the operation's name), except etcd's "lease not found"
   * (EtcdLeaseInvalidError), passed through as it is: its meaning belongs to the caller.
   */
  async call<T>(operation: string, fn: (client: Etcd3, options: CallOptions) => Promise<T>, timeoutMs = this.requestTimeoutMs): Promise<T> {
    if (this.closed) throw new EtcdCallError(operation, this.endpoints, false, 'the session is closed');
    if (!(timeoutMs > 0)) throw new Error(`etcd: ${operation}: the deadline must be positive, got ${timeoutMs} ms`);
    let timer: NodeJS.Timeout | undefined;
    const deadline = new Promise<never>((_, reject) => {
      // A little after the gRPC deadline, which should normally win (it also cancels the call).
      timer = setTimeout(
        () => reject(new EtcdCallError(operation, this.endpoints, true, `no answer within ${timeoutMs} ms`)),
        timeoutMs + 25,
      );
    });
    const deadlineAt = Date.now() + timeoutMs;
    try {
      for (let attempt = 1; ; attempt++) {
        try {
          const result = await Promise.race([fn(this.current, { deadline: deadlineAt }), deadline]);
          this.noteAnswer();
          return result;
        } catch (error) {
          // A member that refused the connection never saw the call: another member may take it,
          // within the same deadline (its breaker keeps the refusing one out for a while).
          if (this.endpoints.length > 1 && attempt < this.endpoints.length && error instanceof GRPCUnavailableError && Date.now() < deadlineAt) continue;
          throw error;
        }
      }
    } catch (error) {
      throw this.wrap(operation, error, timeoutMs);
    } finally {
      clearTimeout(timer);
    }
  }

  wrap(operation: string, error: unknown, timeoutMs = this.requestTimeoutMs): Error {
    if (error instanceof EtcdCallError || error instanceof EtcdLeaseInvalidError) return error;
    if (error instanceof GRPCDeadlineExceededError) {
      return new EtcdCallError(operation, this.endpoints, true, `no answer within ${timeoutMs} ms`, { cause: error });
    }
    const message = error instanceof Error ? error.message : String(error);
    return new EtcdCallError(operation, this.endpoints, isUnavailableError(error), message, { cause: error });
  }

  /** Drops the connection and dials afresh; stream users hear of it through onReset. */
  reconnect(reason: string): void {
    if (this.closed) return;
    const old = this.current;
    this.current = this.dial();
    this.generationCount++;
    this.log('warn', 'etcd: reconnecting', { reason, endpoints: this.endpoints, generation: this.generationCount });
    for (const listener of [...this.resetListeners]) {
      try {
        listener(reason);
      } catch (error) {
        this.log('error', 'etcd: a reconnect listener threw', { error: String(error) });
      }
    }
    old.close();
  }

  /** Called after a reconnect, when streams of the old connection are dead (cancel and re-open them). */
  onReset(listener: (reason: string) => void): () => void {
    this.resetListeners.add(listener);
    return () => this.resetListeners.delete(listener);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.probeTimer);
    this.probeTimer = undefined;
    this.resetListeners.clear();
    this.current.close();
  }

  private dial(): Etcd3 {
    return new Etcd3({
      hosts: [...this.endpoints],
      // No hidden retries (each would get a fresh deadline) and no global circuit breaker (it
      // refuses every call for 5 s after three failures, long after etcd is back). With several
      // members, a member that failed is left out for one request timeout, so the next calls
      // (and streams) go to the others instead of to a dead member at random.
      faultHandling: {
        host: () => (this.endpoints.length > 1 ? circuitBreaker(handleWhen((e) => e instanceof GRPCUnavailableError || e instanceof GRPCDeadlineExceededError), { halfOpenAfter: this.requestTimeoutMs, breaker: new ConsecutiveBreaker(1) }) : noop),
        global: noop,
      },
      defaultCallOptions: (context) => (context.isStream ? {} : { deadline: Date.now() + this.requestTimeoutMs }),
      grpcOptions: {
        // Our own connection, so that reconnect() really dials instead of sharing a stuck one.
        'grpc.use_local_subchannel_pool': 1,
        // After a refused connect (etcd restarting), try again soon rather than backing off to 2 min.
        'grpc.initial_reconnect_backoff_ms': 100,
        'grpc.max_reconnect_backoff_ms': 1_000,
      },
    });
  }
}
