import type { IDuplexStream, IKeyValue, IWatchRequest, IWatchResponse } from 'etcd3';
import { EtcdCallError, isUnavailableError, type EtcdSession } from './etcd-session.js';

/** What a watch reports besides the changes. */
export interface WatchOptions {
  /**
   * The watch broke (etcd unreachable, connection reset, watch cancelled by etcd); called once per
   * outage, with what happened. The watch keeps re-establishing itself every `retryMs`.
   */
  onError?: (error: Error) => void;
  /** Established again after an onError; changes missed meanwhile have been reported just before. */
  onResumed?: () => void;
  /** Between re-establishing attempts. Default: the session's requestTimeoutMs (at least 100 ms). */
  retryMs?: number;
}

/** A change to one key: its value, or undefined when it was deleted. */
export type RangeListener = (key: string, value: Buffer | undefined, kv: IKeyValue | undefined) => void;

/**
 * Watches a key or a key range and reports every change as (key, value | undefined), beginning
 * with the current contents. It (re)establishes itself as "read the range at revision R, report
 * what differs from what was last reported, watch from R+1", so a reconnect — or a compaction that
 * cancels the watch — never loses the final state of a key (intermediate values during an outage
 * are not replayed). Internal: HostLease.watchOwner and ClusterStore.watchPrefix are built on it.
 */
export class RangeWatch {
  private readonly known = new Map<string, IKeyValue>();
  private stream: IDuplexStream<IWatchRequest, IWatchResponse> | undefined;
  private createTimer: NodeJS.Timeout | undefined;
  private retryTimer: NodeJS.Timeout | undefined;
  private pendingCreate: ((error: Error) => void) | undefined;
  private broken: Error | undefined;
  private started = false;
  private establishing = false;
  private closed = false;
  private readonly unsubscribeReset: () => void;
  private readonly releaseProbe: () => void;
  private readonly retryMs: number;

  private constructor(
    private readonly session: EtcdSession,
    private readonly key: Buffer,
    private readonly rangeEnd: Buffer | undefined,
    private readonly description: string,
    private readonly listener: RangeListener,
    private readonly options: WatchOptions,
  ) {
    this.retryMs = options.retryMs ?? Math.max(100, session.requestTimeoutMs);
    this.unsubscribeReset = session.onReset((reason) => this.fail(new EtcdCallError(this.description, session.endpoints, true, `connection reset (${reason})`)));
    this.releaseProbe = session.retainProbe();
  }

  /**
   * Starts watching; resolves once the current contents were reported and the watch is set up.
   * Rejects (EtcdCallError) when etcd cannot be reached at all — then nothing keeps running.
   */
  static async start(
    session: EtcdSession,
    range: { key: Buffer; rangeEnd?: Buffer; description: string },
    listener: RangeListener,
    options: WatchOptions = {},
  ): Promise<RangeWatch> {
    const watch = new RangeWatch(session, range.key, range.rangeEnd, range.description, listener, options);
    try {
      await watch.establish();
    } catch (error) {
      await watch.close();
      throw error;
    }
    watch.started = true;
    return watch;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.unsubscribeReset();
    this.releaseProbe();
    clearTimeout(this.retryTimer);
    this.dropStream();
  }

  /** Reads the range, reports differences, opens the watch stream from the read's revision + 1. */
  private async establish(): Promise<void> {
    const response = await this.session.call(`read ${this.description}`, (client, options) =>
      client.kv.range({ key: this.key, ...(this.rangeEnd ? { range_end: this.rangeEnd } : {}) }, options),
    );
    if (this.closed) return;
    const now = new Map(response.kvs.map((kv) => [kv.key.toString(), kv]));
    for (const [key, kv] of now) {
      if (this.known.get(key)?.mod_revision !== kv.mod_revision) this.report(key, kv);
    }
    for (const key of [...this.known.keys()]) if (!now.has(key)) this.report(key, undefined);
    await this.openStream(BigInt(response.header.revision) + 1n);
  }

  private async openStream(fromRevision: bigint): Promise<void> {
    const generation = this.session.generation;
    let stream: IDuplexStream<IWatchRequest, IWatchResponse>;
    try {
      stream = await this.session.client.watchClient.watch();
    } catch (error) {
      throw this.session.wrap(`watch ${this.description}`, error);
    }
    if (this.closed || generation !== this.session.generation) {
      stream.cancel();
      if (!this.closed) throw new EtcdCallError(`watch ${this.description}`, this.session.endpoints, true, 'connection reset while opening the watch');
      return;
    }
    this.stream = stream;
    await new Promise<void>((resolve, reject) => {
      let created = false;
      // dropStream() (a reset, close) rejects a creation still pending.
      this.pendingCreate = reject;
      const failed = (error: Error) => {
        if (this.stream !== stream) return;
        if (!created) {
          this.pendingCreate = undefined;
          this.dropStream();
          reject(error);
        } else {
          this.fail(error);
        }
      };
      this.createTimer = setTimeout(
        () => failed(new EtcdCallError(`watch ${this.description}`, this.session.endpoints, true, `not created within ${this.session.requestTimeoutMs} ms`)),
        this.session.requestTimeoutMs,
      );
      stream.on('data', (response: IWatchResponse) => {
        if (this.stream !== stream) return;
        this.session.noteAnswer();
        if (response.created && !created) {
          created = true;
          this.pendingCreate = undefined;
          clearTimeout(this.createTimer);
          if (response.canceled) {
            failed(new EtcdCallError(`watch ${this.description}`, this.session.endpoints, false, `refused by etcd: ${response.cancel_reason || 'canceled'}`));
            return;
          }
          resolve();
        } else if (response.canceled) {
          // Compaction past our revision, or etcd dropping the watch: read afresh.
          const why = response.compact_revision !== '0' ? `compacted to revision ${response.compact_revision}` : response.cancel_reason || 'canceled by etcd';
          failed(new EtcdCallError(`watch ${this.description}`, this.session.endpoints, false, why));
          return;
        }
        for (const event of response.events) {
          const key = event.kv.key.toString();
          this.report(key, event.type === 'Delete' ? undefined : event.kv);
        }
      });
      stream.on('error', (error: Error) => failed(this.session.wrap(`watch ${this.description}`, error)));
      stream.on('end', () => failed(new EtcdCallError(`watch ${this.description}`, this.session.endpoints, true, 'stream ended by etcd')));
      stream.write({ create_request: { key: this.key, ...(this.rangeEnd ? { range_end: this.rangeEnd } : {}), start_revision: fromRevision.toString() } });
    });
  }

  private report(key: string, kv: IKeyValue | undefined): void {
    if (kv) this.known.set(key, kv);
    else this.known.delete(key);
    try {
      this.listener(key, kv?.value, kv);
    } catch (error) {
      this.session.log('error', 'etcd watch: the listener threw', { watch: this.description, key, error: String(error) });
    }
  }

  /** The established watch broke: tell once, then keep re-establishing until closed. */
  private fail(error: Error): void {
    if (this.closed) return;
    this.dropStream(error);
    // Before start() resolved, or while re-establishing, the attempt in flight fails by itself.
    if (!this.started || this.establishing) return;
    if (this.broken === undefined) {
      this.broken = error;
      this.session.log('warn', 'etcd watch broken; re-establishing', { watch: this.description, error: error.message, retryMs: this.retryMs });
      try {
        this.options.onError?.(error);
      } catch (listenerError) {
        this.session.log('error', 'etcd watch: onError threw', { watch: this.description, error: String(listenerError) });
      }
    }
    if (this.retryTimer === undefined) {
      // Right away after a reset (a new connection is there); otherwise after retryMs.
      const delay = /connection reset/.test(error.message) ? 0 : this.retryMs;
      this.retryTimer = setTimeout(() => void this.retry(), delay);
    }
  }

  private async retry(): Promise<void> {
    this.retryTimer = undefined;
    if (this.closed) return;
    this.establishing = true;
    try {
      await this.establish();
    } catch (error) {
      if (this.closed) return;
      this.dropStream();
      if (!isUnavailableError(error)) this.session.log('warn', 'etcd watch: re-establishing failed', { watch: this.description, error: String(error) });
      const reset = error instanceof Error && /connection reset/.test(error.message);
      this.retryTimer = setTimeout(() => void this.retry(), reset ? 0 : this.retryMs);
      return;
    } finally {
      this.establishing = false;
    }
    if (this.closed) return;
    const outage = this.broken;
    this.broken = undefined;
    if (outage) {
      this.session.log('info', 'etcd watch re-established', { watch: this.description });
      try {
        this.options.onResumed?.();
      } catch (listenerError) {
        this.session.log('error', 'etcd watch: onResumed threw', { watch: this.description, error: String(listenerError) });
      }
    }
  }

  private dropStream(reason?: Error): void {
    clearTimeout(this.createTimer);
    const pending = this.pendingCreate;
    this.pendingCreate = undefined;
    pending?.(reason ?? new EtcdCallError(`watch ${this.description}`, this.session.endpoints, false, 'closed'));
    const stream = this.stream;
    this.stream = undefined;
    if (stream) {
      try {
        stream.cancel();
      } catch {
        // already gone
      }
    }
  }
}
