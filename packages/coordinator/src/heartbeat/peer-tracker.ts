import type { Heartbeat } from './wire.js';

export type HeartbeatPath = 'udp' | 'ssh';

/**
 * What one agent knows about one peer's heartbeats, as pure state (times are performance.now()
 * values passed in). A peer is up from its first beat on either path, and down once neither path
 * delivered one for more than timeoutMs. A peer never heard from is not alive, but is not
 * reported down either (there was no "up" to end).
 */
export class PeerTracker {
  private status: 'unknown' | 'up' | 'down' = 'unknown';
  readonly lastBeatAt: { udp?: number; ssh?: number } = {};
  last: Heartbeat | undefined;

  constructor(readonly name: string) {}

  get alive(): boolean {
    return this.status === 'up';
  }

  /** The newest beat on either path, or undefined. */
  lastAny(): number | undefined {
    const { udp, ssh } = this.lastBeatAt;
    if (udp === undefined) return ssh;
    if (ssh === undefined) return udp;
    return Math.max(udp, ssh);
  }

  /** A beat arrived; true when this brings the peer up. */
  beat(path: HeartbeatPath, beat: Heartbeat, now: number): boolean {
    this.lastBeatAt[path] = now;
    if (this.isNewer(beat)) this.last = beat;
    if (this.status === 'up') return false;
    this.status = 'up';
    return true;
  }

  /** The timer's check: when this makes the peer down, the time of its last beat; otherwise undefined. */
  check(now: number, timeoutMs: number): number | undefined {
    if (this.status !== 'up') return undefined;
    const since = this.lastAny()!;
    if (now - since <= timeoutMs) return undefined;
    this.status = 'down';
    return since;
  }

  /** Same beat over the other path: not newer. A restarted sender starts seq again, later in time. */
  private isNewer(beat: Heartbeat): boolean {
    const last = this.last;
    if (last === undefined || beat.seq > last.seq) return true;
    return beat.seq < last.seq && beat.sentAtMs > last.sentAtMs;
  }
}
