import { EtcdLeaseInvalidError, type IDuplexStream, type ILeaseKeepAliveRequest, type ILeaseKeepAliveResponse } from 'etcd3';
import { ClusterStore } from './cluster-store.js';
import { EtcdCallError, EtcdSession, isUnavailableError, silentLog, type ComponentLog } from './etcd-session.js';
import { normalizePrefix, ownerKey } from './keys.js';
import type { WatchOptions } from './range-watch.js';
import { RenewalTracker } from './renewal-tracker.js';

export interface HostLeaseOptions {
  endpoints: string[];
  /** The cluster's key prefix, e.g. `/ftvm`. */
  prefix: string;
  /** This host's name: the value of the owner keys it holds. */
  holder: string;
  /** The lease's TTL on etcd (whole seconds, ≥ 1; etcd raises it to its own floor). */
  ttlSeconds: number;
  /** One keepalive per interval, driven here (not etcd3's TTL/3 cadence). */
  keepaliveIntervalMs: number;
  /**
   * Fence when no keepalive sent within this long has been answered: strictly below the TTL, so
   * the holder has stopped its VMs before etcd can expire the lease and let another host claim.
   */
  fenceAfterMs: number;
  /** The deadline of every etcd call; also how long a keepalive may go unanswered before the
   * connection is thrown away and dialled afresh. */
  requestTimeoutMs: number;
  /**
   * open(): keep asking for the grant this long while etcd does not answer (a loaded host, a
   * leader election); 0 (the default) fails on the first unanswered grant. An answer that says no
   * fails at once either way.
   */
  openRetryMs?: number;
  log?: ComponentLog;
}

/**
 * - `held`: granted and renewed; claims work.
 * - `fenced`: no keepalive was answered for fenceAfterMs; renewing stopped (the lease expires on
 *   etcd by itself unless renew() revokes it first). The holder must have stopped its VMs.
 * - `lost`: etcd said the lease is gone (expired, revoked, not found).
 * - `closed`: close() was called.
 */
export type LeaseState = 'held' | 'fenced' | 'lost' | 'closed';

/** A claim, release or renew on a lease that is not (or no longer) held; `state` says why. */
export class LeaseUnusableError extends Error {
  override name = 'LeaseUnusableError';
  constructor(
    readonly operation: string,
    readonly state: LeaseState,
    reason: string | undefined,
  ) {
    super(`lease: cannot ${operation}: the lease is ${state}${reason ? ` (${reason})` : ''}`);
  }
}

type KeepaliveStream = IDuplexStream<ILeaseKeepAliveRequest, ILeaseKeepAliveResponse>;

/**
 * This host's lease on etcd, which every owner key it holds hangs on. Who may run a VM is whoever
 * holds `<prefix>/vms/<vm>/owner`; the key goes when the lease does — when the holder revokes it
 * (close, renew), or when etcd expires it TTL after the last keepalive it processed (etcd checks
 * for expired leases every 500 ms, so that is 0–0.5 s after the TTL).
 *
 * Keepalives: one per keepaliveIntervalMs over one LeaseKeepAlive stream, each send time recorded;
 * `lastRenewedAt` is the send time of the newest one etcd answered. A timer fires **onFence** once
 * when more than fenceAfterMs have passed since then — whatever the cause (etcd unreachable, a
 * stuck connection, etcd down, this process starved) — and renewing stops: the holder must stop
 * every VM it owns at once. etcd counts the TTL from when it processed a keepalive, which is after
 * we sent it, so with fenceAfterMs < TTL the fence always comes first; the difference is the time
 * the holder has to stop its VMs. A keepalive unanswered for requestTimeoutMs makes the session
 * dial etcd afresh.
 *
 * **onLost** fires when etcd says the lease is gone (a keepalive answered TTL 0, a claim refused
 * for lack of the lease); a lease that was still held is fenced first, so onFence is the one
 * "stop everything" signal. After either, `renew()` grants a new lease (the old one expires by
 * itself, or is revoked on request); onFence then fires once more for the new lease.
 *
 * Listeners are registered with onFence/onLost/onRenewed, which return the unsubscribe function;
 * a listener that throws is logged, never propagated.
 */
export class HostLease {
  readonly prefix: string;
  readonly holder: string;
  /** JSON records and watches on this lease's connection. */
  readonly store: ClusterStore;

  private leaseId = '';
  private grantedTtl = 0;
  private stateValue: LeaseState = 'fenced';
  private stateReason: string | undefined;
  private tracker: RenewalTracker;
  private stream: KeepaliveStream | undefined;
  private opening = false;
  private keepaliveTimer: NodeJS.Timeout | undefined;
  private fenceTimer: NodeJS.Timeout | undefined;
  /** What went wrong since the last answered keepalive (for the fence reason and the log). */
  private trouble: { since: number; what: string } | undefined;
  private renewing: Promise<string> | undefined;
  private closing: Promise<void> | undefined;
  private readonly fenceListeners = new Set<(reason: string) => void>();
  private readonly lostListeners = new Set<(reason: string) => void>();
  private readonly renewedListeners = new Set<(sentAt: number, answeredAt: number) => void>();
  private readonly log: ComponentLog;
  private readonly unsubscribeReset: () => void;

  private constructor(
    private readonly options: HostLeaseOptions,
    private readonly session: EtcdSession,
  ) {
    this.prefix = normalizePrefix(options.prefix);
    this.holder = options.holder;
    this.log = options.log ?? silentLog;
    this.store = new ClusterStore(session, false);
    this.tracker = new RenewalTracker(options.fenceAfterMs, options.requestTimeoutMs);
    this.unsubscribeReset = session.onReset(() => this.dropStream());
  }

  /** Grants the lease and starts renewing it. Throws EtcdCallError when etcd does not answer. */
  static async open(options: HostLeaseOptions): Promise<HostLease> {
    validateOptions(options);
    const deadline = performance.now() + (options.openRetryMs ?? 0);
    for (let attempt = 1; ; attempt++) {
      try {
        return await HostLease.openOnce(options);
      } catch (error) {
        const pause = Math.min(500, options.requestTimeoutMs);
        if (!isUnavailableError(error) || performance.now() + pause > deadline) throw error;
        options.log?.('warn', 'etcd did not grant the lease in time: asking again', { attempt, error: (error as Error).message });
        await new Promise((resolve) => setTimeout(resolve, pause));
      }
    }
  }

  private static async openOnce(options: HostLeaseOptions): Promise<HostLease> {
    const session = new EtcdSession(options.endpoints, options.requestTimeoutMs, options.log ?? silentLog);
    const lease = new HostLease(options, session);
    try {
      await lease.grant();
    } catch (error) {
      lease.stateValue = 'closed';
      lease.unsubscribeReset();
      session.close();
      throw error;
    }
    return lease;
  }

  /** The lease id (decimal), as etcdctl shows it in hex; changes with renew(). */
  get id(): string {
    return this.leaseId;
  }

  /** The TTL etcd granted (it may raise the requested one to its floor). */
  get ttlSeconds(): number {
    return this.grantedTtl;
  }

  get state(): LeaseState {
    return this.stateValue;
  }

  /** Why the lease is fenced, lost or closed (undefined while held). */
  get reason(): string | undefined {
    return this.stateReason;
  }

  /** Held, and a keepalive sent within fenceAfterMs has been answered. */
  get healthy(): boolean {
    return this.stateValue === 'held' && !this.tracker.mustFence(performance.now());
  }

  /**
   * How long etcd has not answered this lease: since its trouble began (a failed or ended stream,
   * a keepalive unanswered past the stall bound), else how long the oldest keepalive in flight has
   * waited (0 when none waits); Infinity when the lease is not held.
   */
  silentForMs(now = performance.now()): number {
    if (this.stateValue !== 'held') return Infinity;
    if (this.trouble) return now - this.trouble.since;
    return this.tracker.oldestWaitMs(now);
  }

  /** performance.now() at the send of the newest keepalive (or the grant) etcd answered. */
  get lastRenewedAt(): number | undefined {
    return this.tracker.lastRenewedSentAt;
  }

  /** Fired once per lease when it must be considered gone: stop every VM this host owns, now. */
  onFence(listener: (reason: string) => void): () => void {
    this.fenceListeners.add(listener);
    return () => this.fenceListeners.delete(listener);
  }

  /** etcd says the lease is gone (after onFence if it was still held). */
  onLost(listener: (reason: string) => void): () => void {
    this.lostListeners.add(listener);
    return () => this.lostListeners.delete(listener);
  }

  /** Each answered keepalive: when it was sent and answered (performance.now()). For metrics and tests. */
  onRenewed(listener: (sentAt: number, answeredAt: number) => void): () => void {
    this.renewedListeners.add(listener);
    return () => this.renewedListeners.delete(listener);
  }

  /**
   * Takes the VM's owner key for this host, attached to this lease, if nobody holds it. True if
   * this lease holds it now (also when it already did); false if another holder (or this host's
   * previous lease) does. Throws LeaseUnusableError unless the lease is held and healthy, and
   * EtcdCallError when etcd does not answer.
   */
  async claim(vm: string): Promise<boolean> {
    const { id, succeeded, current } = await this.putOwnerIf('claim', vm, { target: 'Create', result: 'Equal', create_revision: 0 });
    if (succeeded) {
      this.log('info', 'lease: claimed', { vm, lease: id });
      return true;
    }
    return current !== undefined && current.value.toString() === this.holder && current.lease === id;
  }

  /**
   * Puts the VM's owner key on this lease when this host holds it on an earlier lease of its own
   * (a failsafe primary whose lease lapsed while etcd was away), or claims it when nobody does.
   * True if this lease holds it now; false if another host does. Throws like claim().
   */
  async reclaim(vm: string): Promise<boolean> {
    const { id, succeeded, current } = await this.putOwnerIf('reclaim', vm, { target: 'Value', result: 'Equal', value: Buffer.from(this.holder) });
    if (succeeded) {
      this.log('info', 'lease: owner key re-taken on the current lease', { vm, lease: id });
      return true;
    }
    return current === undefined ? this.claim(vm) : false;
  }

  /** One transaction: the owner key put on this lease if `compare` holds, else read back. */
  private async putOwnerIf(operation: string, vm: string, compare: { target: 'Create'; result: 'Equal'; create_revision: number } | { target: 'Value'; result: 'Equal'; value: Buffer }) {
    const key = Buffer.from(ownerKey(this.prefix, vm));
    const id = this.requireHeld(`${operation} ${vm}`);
    try {
      const response = await this.session.call(`${operation} ${key}`, (client, options) =>
        client.kv.txn(
          {
            compare: [{ key, ...compare }],
            success: [{ request_put: { key, value: Buffer.from(this.holder), lease: id } }],
            failure: [{ request_range: { key } }],
          },
          options,
        ),
      );
      return { id, succeeded: response.succeeded, current: response.responses[0]?.response_range?.kvs[0] };
    } catch (error) {
      throw this.leaseGoneIfInvalid(error, `${operation} ${vm}`, id);
    }
  }

  /** Deletes the VM's owner key if this lease holds it; true if it did. */
  async release(vm: string): Promise<boolean> {
    const key = Buffer.from(ownerKey(this.prefix, vm));
    const id = this.leaseId;
    const response = await this.session.call(`release ${key}`, (client, options) =>
      client.kv.txn(
        {
          compare: [
            { key, target: 'Value', result: 'Equal', value: Buffer.from(this.holder) },
            { key, target: 'Lease', result: 'Equal', lease: id },
          ],
          success: [{ request_delete_range: { key } }],
        },
        options,
      ),
    );
    const released = response.succeeded && response.responses[0]?.response_delete_range?.deleted !== '0';
    if (released) this.log('info', 'lease: released', { vm, lease: id });
    return released;
  }

  /** The host that holds the VM's owner key, or undefined if nobody does. */
  async owner(vm: string): Promise<string | undefined> {
    const key = ownerKey(this.prefix, vm);
    const response = await this.session.call(`get ${key}`, (client, options) => client.kv.range({ key: Buffer.from(key) }, options));
    return response.kvs[0]?.value.toString();
  }

  /**
   * Calls `listener` with the VM's current owner, then on every change (undefined: nobody owns it,
   * e.g. the holder's lease expired). The watch re-establishes itself after etcd was unreachable
   * (options.onError is told once per outage, onResumed when it is back) and then reports the
   * owner if it changed meanwhile. Resolves with the function that stops watching; rejects with
   * EtcdCallError when etcd cannot be reached to start it.
   */
  watchOwner(vm: string, listener: (owner: string | undefined) => void, options: WatchOptions = {}): Promise<() => Promise<void>> {
    const key = ownerKey(this.prefix, vm);
    return this.store.watchRange({ key: Buffer.from(key), description: key }, (_key, value) => listener(value?.toString()), options);
  }

  /**
   * Replaces a fenced or lost lease with a new one (new id; claims start from scratch). The old
   * lease is left to expire on etcd — its owner keys go at most TTL + 0.5 s after its last renewal
   * — so renewing right after a fence never hands a VM over while this host may still be stopping
   * it. Pass `revokeOld: true` once everything the old lease protected is stopped, to hand over at
   * once (best effort, bounded by requestTimeoutMs). Throws EtcdCallError when etcd does not answer
   * (try again later), LeaseUnusableError on a held or closed lease.
   */
  renew(options: { revokeOld?: boolean } = {}): Promise<string> {
    if (this.stateValue === 'held' || this.stateValue === 'closed') {
      return Promise.reject(new LeaseUnusableError('renew', this.stateValue, this.stateValue === 'held' ? 'it is held: close() it, or renew after a fence' : this.stateReason));
    }
    this.renewing ??= (async () => {
      try {
        const old = this.leaseId;
        if (options.revokeOld) await this.revokeQuietly(old);
        await this.grant();
        this.log('info', 'lease: renewed', { old, lease: this.leaseId, oldRevoked: options.revokeOld === true });
        return this.leaseId;
      } finally {
        this.renewing = undefined;
      }
    })();
    return this.renewing;
  }

  /** Stops renewing, revokes the lease (best effort, bounded), stops watches, closes the connection. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      const id = this.leaseId;
      this.stopRenewing();
      this.stateValue = 'closed';
      this.stateReason = 'closed';
      this.unsubscribeReset();
      await this.revokeQuietly(id);
      await this.store.close();
      this.session.close();
    })();
    return this.closing;
  }

  private async grant(): Promise<void> {
    const ttl = this.options.ttlSeconds;
    const sentAt = performance.now();
    const response = await this.session.call(`grant a ${ttl} s lease`, (client, options) => client.leaseClient.leaseGrant({ TTL: ttl }, options));
    if (response.error) throw new EtcdCallError(`grant a ${ttl} s lease`, this.session.endpoints, false, response.error);
    if (this.stateValue === 'closed') {
      await this.revokeQuietly(response.ID);
      throw new LeaseUnusableError('grant', 'closed', 'closed while granting');
    }
    this.leaseId = response.ID;
    this.grantedTtl = Number(response.TTL);
    if (this.grantedTtl !== ttl) this.log('warn', 'lease: etcd granted another TTL than asked', { asked: ttl, granted: this.grantedTtl });
    this.tracker = new RenewalTracker(this.options.fenceAfterMs, this.options.requestTimeoutMs);
    this.tracker.granted(sentAt);
    this.trouble = undefined;
    this.stateValue = 'held';
    this.stateReason = undefined;
    this.log('info', 'lease: granted', { lease: this.leaseId, ttlSeconds: this.grantedTtl, holder: this.holder });
    this.keepaliveTimer = setInterval(() => this.tick(), this.options.keepaliveIntervalMs);
    this.armFence();
    this.tick();
  }

  /** One keepalive per interval; also notices a stalled stream and has the session redial. */
  private tick(): void {
    if (this.stateValue !== 'held') return;
    const now = performance.now();
    if (this.tracker.stalled(now)) {
      const waited = Math.round(this.tracker.oldestWaitMs(now));
      this.noteTrouble(`keepalive unanswered for ${waited} ms`);
      this.dropStream();
      this.session.reconnect(`lease ${this.leaseId}: keepalive unanswered for ${waited} ms`);
    }
    if (this.stream === undefined) {
      void this.openStream();
      return;
    }
    this.send();
  }

  private send(): void {
    if (this.stream === undefined || !this.tracker.canSend()) return;
    try {
      this.stream.write({ ID: this.leaseId });
      this.tracker.sent(performance.now());
    } catch (error) {
      this.noteTrouble(`keepalive write failed: ${(error as Error).message}`);
      this.dropStream();
    }
  }

  private async openStream(): Promise<void> {
    if (this.opening) return;
    this.opening = true;
    const generation = this.session.generation;
    let stream: KeepaliveStream;
    try {
      stream = await this.session.client.leaseClient.leaseKeepAlive();
    } catch (error) {
      this.noteTrouble(`cannot open the keepalive stream: ${(error as Error).message}`);
      return;
    } finally {
      this.opening = false;
    }
    if (this.stateValue !== 'held' || generation !== this.session.generation || this.stream !== undefined) {
      stream.cancel();
      return;
    }
    this.stream = stream;
    stream.on('data', (response: ILeaseKeepAliveResponse) => this.answered(stream, response));
    stream.on('error', (error: Error) => this.streamFailed(stream, `keepalive stream: ${error.message}`));
    stream.on('end', () => this.streamFailed(stream, 'keepalive stream ended by etcd'));
    this.send();
  }

  private answered(stream: KeepaliveStream, response: ILeaseKeepAliveResponse): void {
    if (stream !== this.stream || this.stateValue !== 'held') return;
    this.session.noteAnswer();
    if (response.TTL === '0') {
      this.markLost(`etcd: lease ${this.leaseId} is gone (expired or revoked): its keepalive was answered with TTL 0`);
      return;
    }
    const sentAt = this.tracker.answered();
    if (sentAt === undefined) return;
    const answeredAt = performance.now();
    if (this.trouble) {
      this.log('info', 'lease: keepalives answered again', { lease: this.leaseId, afterMs: Math.round(answeredAt - this.trouble.since), trouble: this.trouble.what });
      this.trouble = undefined;
    }
    this.armFence();
    for (const listener of [...this.renewedListeners]) this.callListener('onRenewed', () => listener(sentAt, answeredAt));
  }

  private streamFailed(stream: KeepaliveStream, what: string): void {
    if (stream !== this.stream) return;
    this.noteTrouble(what);
    this.dropStream();
  }

  private dropStream(): void {
    const stream = this.stream;
    this.stream = undefined;
    this.tracker.streamLost();
    if (stream) {
      try {
        stream.cancel();
      } catch {
        // already gone
      }
    }
  }

  private noteTrouble(what: string): void {
    if (this.trouble === undefined) {
      this.trouble = { since: performance.now(), what };
      this.log('warn', 'lease: keepalive trouble', { lease: this.leaseId, what });
    } else {
      this.trouble.what = what;
    }
  }

  /** (Re)arms the fence timer for lastRenewedAt + fenceAfterMs. */
  private armFence(): void {
    clearTimeout(this.fenceTimer);
    const deadline = this.tracker.fenceDeadline();
    if (deadline === undefined || this.stateValue !== 'held') return;
    // +1 ms: mustFence is "strictly more than fenceAfterMs", and timers may fire a hair early.
    this.fenceTimer = setTimeout(() => this.checkFence(), Math.max(0, deadline - performance.now()) + 1);
  }

  private checkFence(): void {
    if (this.stateValue !== 'held') return;
    const now = performance.now();
    if (!this.tracker.mustFence(now)) {
      this.armFence();
      return;
    }
    const since = Math.round(now - this.tracker.lastRenewedSentAt!);
    this.fence(`no keepalive answered for ${since} ms (fenceAfterMs ${this.options.fenceAfterMs}): ${this.trouble?.what ?? 'etcd did not answer'}`);
  }

  private fence(reason: string): void {
    if (this.stateValue !== 'held') return;
    // Keepalives went unanswered: the connection is suspect, and with renewing stopped nothing
    // else would notice. Redial now, so watches on it report the outage and re-establish.
    const suspect = this.trouble !== undefined || this.tracker.pending > 0;
    this.stopRenewing();
    if (suspect) this.session.reconnect(`lease ${this.leaseId} fenced: ${reason}`);
    this.stateValue = 'fenced';
    this.stateReason = reason;
    this.log('error', 'lease: FENCED — every VM this host owns must stop', { lease: this.leaseId, reason });
    for (const listener of [...this.fenceListeners]) this.callListener('onFence', () => listener(reason));
  }

  private markLost(reason: string): void {
    if (this.stateValue === 'lost' || this.stateValue === 'closed') return;
    if (this.stateValue === 'held') this.fence(`lease lost: ${reason}`);
    this.stateValue = 'lost';
    this.stateReason = reason;
    this.log('error', 'lease: lost', { lease: this.leaseId, reason });
    for (const listener of [...this.lostListeners]) this.callListener('onLost', () => listener(reason));
  }

  private stopRenewing(): void {
    clearInterval(this.keepaliveTimer);
    clearTimeout(this.fenceTimer);
    this.keepaliveTimer = undefined;
    this.fenceTimer = undefined;
    this.dropStream();
  }

  /** The lease id if it is held and its fence deadline has not passed; fences at once if it has. */
  private requireHeld(operation: string): string {
    if (this.stateValue === 'held' && this.tracker.mustFence(performance.now())) this.checkFence();
    if (this.stateValue !== 'held') throw new LeaseUnusableError(operation, this.stateValue, this.stateReason);
    return this.leaseId;
  }

  private leaseGoneIfInvalid(error: unknown, operation: string, id: string): unknown {
    if (!(error instanceof EtcdLeaseInvalidError)) return error;
    if (id === this.leaseId) this.markLost(`etcd: lease ${id} not found (${operation})`);
    return new LeaseUnusableError(operation, 'lost', `etcd: lease ${id} not found`);
  }

  private async revokeQuietly(id: string): Promise<void> {
    if (!id) return;
    try {
      await this.session.call(`revoke lease ${id}`, (client, options) => client.leaseClient.leaseRevoke({ ID: id }, options));
      this.log('info', 'lease: revoked', { lease: id });
    } catch (error) {
      // Not found: already expired. Otherwise it expires by itself within its TTL.
      if (!(error instanceof EtcdLeaseInvalidError)) this.log('warn', 'lease: revoke failed; it expires by itself', { lease: id, error: (error as Error).message });
    }
  }

  private callListener(what: string, call: () => void): void {
    try {
      call();
    } catch (error) {
      this.log('error', `lease: an ${what} listener threw`, { error: String(error) });
    }
  }
}

function validateOptions(options: HostLeaseOptions): void {
  const problems: string[] = [];
  if (!Number.isInteger(options.ttlSeconds) || options.ttlSeconds < 1) problems.push(`ttlSeconds must be a whole number ≥ 1 (etcd's unit), got ${options.ttlSeconds}`);
  if (!(options.fenceAfterMs > 0) || options.fenceAfterMs >= options.ttlSeconds * 1000) {
    problems.push(`fenceAfterMs must be positive and below the TTL (${options.ttlSeconds * 1000} ms), got ${options.fenceAfterMs}`);
  }
  if (!(options.keepaliveIntervalMs > 0) || options.keepaliveIntervalMs >= options.fenceAfterMs) {
    problems.push(`keepaliveIntervalMs must be positive and below fenceAfterMs (${options.fenceAfterMs}), got ${options.keepaliveIntervalMs}`);
  }
  if (options.openRetryMs !== undefined && !(options.openRetryMs >= 0)) problems.push(`openRetryMs must be ≥ 0, got ${options.openRetryMs}`);
  if (!(options.requestTimeoutMs > 0)) problems.push(`requestTimeoutMs must be positive, got ${options.requestTimeoutMs}`);
  if (!options.holder) problems.push('holder (this host\'s name) is empty');
  if (options.endpoints.length === 0) problems.push('no etcd endpoints');
  if (problems.length > 0) throw new Error(`HostLease: ${problems.join('; ')}`);
}
