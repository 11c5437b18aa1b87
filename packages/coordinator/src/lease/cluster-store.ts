import { Range, type Etcd3 } from 'etcd3';
import { EtcdCallError, EtcdSession, silentLog, type ComponentLog } from './etcd-session.js';
import { RangeWatch, type WatchOptions } from './range-watch.js';

export interface ClusterStoreOptions {
  endpoints: string[];
  /** Every etcd call has this deadline. */
  requestTimeoutMs: number;
  log?: ComponentLog;
}

/** A JSON value as stored, with its mod revision (for compare-and-swap). */
export interface JsonEntry<T> {
  value: T;
  modRevision: string;
}

/** Per call: a deadline other than the store's requestTimeoutMs. */
export interface CallDeadline {
  timeoutMs?: number;
}

export interface PutJsonOptions extends CallDeadline {
  /**
   * Compare-and-swap: write only if the key's mod revision is this one ('0': only if the key does
   * not exist). Without it the write is unconditional.
   */
  ifModRevision?: string;
  /** Attach the key to this lease (decimal id); it goes when the lease does. */
  lease?: string;
}

/**
 * JSON records in etcd (the agent's VM protection records at `<prefix>/vms/<vm>/spec`): read,
 * write (optionally compare-and-swap), list and watch a prefix. Every call has the session's
 * deadline and fails with EtcdCallError; watches survive reconnects (see RangeWatch).
 *
 * `ClusterStore.open()` makes its own connection; `HostLease.store` shares the lease's.
 */
export class ClusterStore {
  private readonly watches = new Set<RangeWatch>();

  /** @internal use ClusterStore.open or HostLease.store. */
  constructor(
    private readonly session: EtcdSession,
    private readonly ownsSession: boolean,
  ) {}

  static open(options: ClusterStoreOptions): ClusterStore {
    return new ClusterStore(new EtcdSession(options.endpoints, options.requestTimeoutMs, options.log ?? silentLog), true);
  }

  /** The current etcd3 client, for what this class does not cover. Replaced on reconnect: do not keep it. */
  get client(): Etcd3 {
    return this.session.client;
  }

  async getJson<T = unknown>(key: string, options: CallDeadline = {}): Promise<T | undefined> {
    return (await this.getJsonEntry<T>(key, options))?.value;
  }

  async getJsonEntry<T = unknown>(key: string, options: CallDeadline = {}): Promise<JsonEntry<T> | undefined> {
    const response = await this.session.call(`get ${key}`, (client, callOptions) => client.kv.range({ key: Buffer.from(key) }, callOptions), options.timeoutMs);
    const kv = response.kvs[0];
    return kv ? { value: parseJson<T>(key, kv.value), modRevision: kv.mod_revision } : undefined;
  }

  /**
   * The keys under `prefix` (those `filter` accepts, e.g. `(k) => k.endsWith('/spec')` to leave
   * the owner keys out) with their JSON values. Throws if one of them is not JSON.
   */
  async listJson<T = unknown>(prefix: string, filter: (key: string) => boolean = () => true, options: CallDeadline = {}): Promise<Map<string, T>> {
    const range = Range.prefix(prefix);
    const response = await this.session.call(
      `list ${prefix}`,
      (client, callOptions) => client.kv.range({ key: range.start, range_end: range.end }, callOptions),
      options.timeoutMs,
    );
    const kvs = response.kvs.filter((kv) => filter(kv.key.toString()));
    return new Map(kvs.map((kv) => [kv.key.toString(), parseJson<T>(kv.key.toString(), kv.value)]));
  }

  /** Writes `value` as JSON; false when `ifModRevision` did not match (nothing written). */
  async putJson(key: string, value: unknown, options: PutJsonOptions = {}): Promise<boolean> {
    const put = { key: Buffer.from(key), value: Buffer.from(JSON.stringify(value)), ...(options.lease ? { lease: options.lease } : {}) };
    if (options.ifModRevision === undefined) {
      await this.session.call(`put ${key}`, (client, callOptions) => client.kv.put(put, callOptions), options.timeoutMs);
      return true;
    }
    const response = await this.session.call(
      `put ${key} if mod revision ${options.ifModRevision}`,
      (client, callOptions) =>
        client.kv.txn(
          {
            compare: [{ key: put.key, target: 'Mod', result: 'Equal', mod_revision: options.ifModRevision }],
            success: [{ request_put: put }],
          },
          callOptions,
        ),
      options.timeoutMs,
    );
    return response.succeeded;
  }

  /**
   * Writes `value` as JSON only if the key does not exist, in one transaction that otherwise
   * reads it: `created` says which happened, `entry` is what the key holds afterwards (the new
   * value, or the one that was already there).
   */
  async createJson<T = unknown>(key: string, value: T, options: CallDeadline & { lease?: string } = {}): Promise<{ created: boolean; entry: JsonEntry<T> }> {
    const keyBytes = Buffer.from(key);
    const put = { key: keyBytes, value: Buffer.from(JSON.stringify(value)), ...(options.lease ? { lease: options.lease } : {}) };
    const response = await this.session.call(
      `create ${key}`,
      (client, callOptions) =>
        client.kv.txn(
          {
            compare: [{ key: keyBytes, target: 'Create', result: 'Equal', create_revision: 0 }],
            success: [{ request_put: put }],
            failure: [{ request_range: { key: keyBytes } }],
          },
          callOptions,
        ),
      options.timeoutMs,
    );
    // A put in a transaction gets the transaction's revision as its mod revision.
    if (response.succeeded) return { created: true, entry: { value, modRevision: response.header.revision } };
    const kv = response.responses[0]?.response_range?.kvs[0];
    // The compare failed because the key exists, and the read ran in the same transaction.
    if (!kv) throw new EtcdCallError(`create ${key}`, this.session.endpoints, false, 'etcd said the key exists but returned none');
    return { created: false, entry: { value: parseJson<T>(key, kv.value), modRevision: kv.mod_revision } };
  }

  /** Deletes the key (only if its mod revision is `ifModRevision`, when given); true if it was deleted. */
  async delete(key: string, options: CallDeadline & { ifModRevision?: string } = {}): Promise<boolean> {
    const request = { key: Buffer.from(key) };
    if (options.ifModRevision === undefined) {
      const response = await this.session.call(`delete ${key}`, (client, callOptions) => client.kv.deleteRange(request, callOptions), options.timeoutMs);
      return response.deleted !== '0';
    }
    const response = await this.session.call(
      `delete ${key} if mod revision ${options.ifModRevision}`,
      (client, callOptions) =>
        client.kv.txn(
          {
            compare: [{ key: request.key, target: 'Mod', result: 'Equal', mod_revision: options.ifModRevision }],
            success: [{ request_delete_range: request }],
          },
          callOptions,
        ),
      options.timeoutMs,
    );
    return response.succeeded && response.responses[0]?.response_delete_range?.deleted !== '0';
  }

  /**
   * Watches the keys under `prefix` (those `options.filter` accepts): the listener gets each
   * current key first, then every change (`undefined` for a deletion). After an outage it gets
   * what changed meanwhile (the final values). A value that is not JSON is skipped: handed to
   * `options.onInvalid` if given, else logged. Resolves with the function that stops it; rejects
   * (EtcdCallError) if etcd cannot be reached to start it.
   */
  async watchPrefix<T = unknown>(
    prefix: string,
    listener: (key: string, value: T | undefined) => void,
    options: WatchOptions & { filter?: (key: string) => boolean; onInvalid?: (key: string, error: Error) => void } = {},
  ): Promise<() => Promise<void>> {
    const range = Range.prefix(prefix);
    const filter = options.filter ?? (() => true);
    return this.watchRange({ key: range.start, rangeEnd: range.end, description: `prefix ${prefix}` }, (key, raw) => {
      if (!filter(key)) return;
      if (raw === undefined) return listener(key, undefined);
      let value: T;
      try {
        value = parseJson<T>(key, raw);
      } catch (error) {
        if (options.onInvalid) options.onInvalid(key, error as Error);
        else this.session.log('error', 'etcd: skipping a value that is not JSON', { key, error: (error as Error).message });
        return;
      }
      listener(key, value);
    }, options);
  }

  /** @internal a watch on this store's session, stopped by close(). */
  async watchRange(
    range: { key: Buffer; rangeEnd?: Buffer; description: string },
    listener: (key: string, value: Buffer | undefined) => void,
    options: WatchOptions,
  ): Promise<() => Promise<void>> {
    const watch = await RangeWatch.start(this.session, range, (key, value) => listener(key, value), options);
    this.watches.add(watch);
    return async () => {
      this.watches.delete(watch);
      await watch.close();
    };
  }

  /** Stops every watch (and closes the connection if this store opened it). */
  async close(): Promise<void> {
    const watches = [...this.watches];
    this.watches.clear();
    await Promise.all(watches.map((watch) => watch.close()));
    if (this.ownsSession) this.session.close();
  }
}

function parseJson<T>(key: string, value: Buffer): T {
  try {
    return JSON.parse(value.toString('utf8')) as T;
  } catch (error) {
    throw new Error(`etcd key ${key}: the value is not JSON (${(error as Error).message}): ${JSON.stringify(value.toString('utf8').slice(0, 80))}`);
  }
}
