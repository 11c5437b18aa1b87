/**
 * The keepalive bookkeeping of a lease, as pure state (times are performance.now() values passed
 * in): which keepalives are in flight and when each was sent, the send time of the newest one
 * etcd answered, whether the holder must fence, and whether the stream has stalled.
 *
 * etcd restarts a lease's TTL when it *processes* a keepalive, which is after we sent it; so
 * "sent at + TTL" is a lower bound of the lease's expiry on etcd, and fencing at
 * "sent at + fenceAfterMs" (fenceAfterMs < TTL) stops the holder before etcd can let anyone else
 * in. etcd answers keepalives on a stream in order, so answers pair with sends first-in first-out.
 */
export class RenewalTracker {
  private inFlight: number[] = [];
  private lastRenewedSent: number | undefined;

  constructor(
    readonly fenceAfterMs: number,
    /** A keepalive unanswered for this long means the stream (connection) is stuck. */
    readonly stallAfterMs: number,
    /** Keepalives allowed in flight at once; beyond that, sending waits for answers. */
    readonly maxInFlight = 4,
  ) {
    if (!(fenceAfterMs > 0)) throw new Error(`fenceAfterMs must be positive, got ${fenceAfterMs}`);
    if (!(stallAfterMs > 0)) throw new Error(`stallAfterMs must be positive, got ${stallAfterMs}`);
  }

  /** A grant counts as a renewal sent when the grant request was sent. */
  granted(sentAt: number): void {
    this.inFlight = [];
    this.lastRenewedSent = sentAt;
  }

  get lastRenewedSentAt(): number | undefined {
    return this.lastRenewedSent;
  }

  get pending(): number {
    return this.inFlight.length;
  }

  canSend(): boolean {
    return this.inFlight.length < this.maxInFlight;
  }

  sent(at: number): void {
    this.inFlight.push(at);
  }

  /** etcd answered the oldest keepalive in flight: returns its send time (undefined if none was in flight). */
  answered(): number | undefined {
    const sentAt = this.inFlight.shift();
    if (sentAt !== undefined && (this.lastRenewedSent === undefined || sentAt > this.lastRenewedSent)) this.lastRenewedSent = sentAt;
    return sentAt;
  }

  /** The stream was replaced: answers to what was in flight will never come. */
  streamLost(): void {
    this.inFlight = [];
  }

  /** When the holder must have fenced (performance.now() scale); undefined before the grant. */
  fenceDeadline(): number | undefined {
    return this.lastRenewedSent === undefined ? undefined : this.lastRenewedSent + this.fenceAfterMs;
  }

  /** Strictly more than fenceAfterMs since the newest answered keepalive was sent. */
  mustFence(now: number): boolean {
    return this.lastRenewedSent !== undefined && now - this.lastRenewedSent > this.fenceAfterMs;
  }

  /** The oldest keepalive in flight has waited more than stallAfterMs. */
  stalled(now: number): boolean {
    const oldest = this.inFlight[0];
    return oldest !== undefined && now - oldest > this.stallAfterMs;
  }

  /** How long the oldest keepalive in flight has waited (0 if none). */
  oldestWaitMs(now: number): number {
    const oldest = this.inFlight[0];
    return oldest === undefined ? 0 : now - oldest;
  }
}
