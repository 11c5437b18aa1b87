/**
 * How far the peer's realtime clock is from this host's, measured NTP-style over the heartbeats,
 * as pure state (times passed in; decisions returned as data, like PeerTracker).
 *
 * A sample is one round: t1 we sent a beat (our clock), t2 the peer received it and t3 the peer
 * sent a beat echoing it (the peer's clock), t4 we received that one (our clock). Then
 *
 *     offset = ((t2 − t1) + (t3 − t4)) / 2        the peer's clock minus ours
 *     delay  = (t4 − t1) − (t3 − t2)              the round trip, without the peer's hold time
 *
 * and, whatever the two one-way delays were, the true offset lies within offset ± delay/2 (as long
 * as neither clock was stepped and their rates agree during the round). So the sample with the
 * smallest delay is the best one; it ages, though: two clocks drift apart by up to `driftPpm`, so
 * each sample's bound grows by driftPpm × its age (and × the round's own length). The estimate is
 * the sample in the window with the smallest bound now.
 */
import type { HostClockOffset } from '@ftvm/kvmclock';

export interface ClockSample {
  /** Our realtime (ns) when we sent the beat the peer echoed. */
  t1: bigint;
  /** The peer's realtime (ns) when it received that beat. */
  t2: bigint;
  /** The peer's realtime (ns) when it sent the echoing beat. */
  t3: bigint;
  /** Our realtime (ns) when the echoing beat arrived. */
  t4: bigint;
}

export interface ClockOffsetOptions {
  /** Samples kept (the oldest goes first). Default 64. */
  maxSamples?: number;
  /** Samples older than this (ms, by the caller's monotonic clock) are dropped. Default 60 s. */
  maxAgeMs?: number;
  /** A round trip longer than this tells too little to keep (ns). Default 1 s. */
  maxDelayNs?: bigint;
  /**
   * How fast two hosts' clocks may drift apart, in parts per million (each sample's error bound
   * grows by this much of its age). Default 100: two free-running crystals; NTP-disciplined hosts
   * stay well within it.
   */
  driftPpm?: number;
}

export interface ClockOffsetEstimate {
  /** The peer's realtime minus ours (ns): add it to one of our instants to get the peer's reading. */
  offsetNs: bigint;
  /** |true offset − offsetNs| ≤ errorNs, unless a clock stepped or drifted faster than driftPpm. */
  errorNs: bigint;
  /** Round trip of the sample the estimate comes from (ns). */
  delayNs: bigint;
  /** Age of that sample (ms). */
  ageMs: number;
  /** Samples in the window. */
  samples: number;
}

/** What `add` did with a sample. */
export type SampleVerdict =
  | { accepted: true; offsetNs: bigint; delayNs: bigint; reset?: string }
  | { accepted: false; reason: string };

interface Kept {
  offsetNs: bigint;
  delayNs: bigint;
  /** t4 − t1: how long the round took on our clock (drift during it counts too). */
  spanNs: bigint;
  atMs: number;
}

const DEFAULTS = { maxSamples: 64, maxAgeMs: 60_000, maxDelayNs: 1_000_000_000n, driftPpm: 100 };

/** ⌈ns × ppm / 10⁶⌉ for a non-negative ns. */
function driftNs(ns: bigint, ppm: number): bigint {
  const scaled = ns * BigInt(Math.round(ppm * 1_000));
  return (scaled + 999_999_999n) / 1_000_000_000n;
}

const msToNs = (ms: number) => BigInt(Math.max(0, Math.ceil(ms * 1e6)));

export class ClockOffsetEstimator {
  private readonly options: typeof DEFAULTS;
  private window: Kept[] = [];
  /** Times the window was dropped because a sample disagreed with it (a clock stepped). */
  jumps = 0;

  constructor(options: ClockOffsetOptions = {}) {
    this.options = { ...DEFAULTS, ...options };
    if (!(this.options.maxSamples >= 1)) throw new RangeError(`maxSamples must be at least 1 (${this.options.maxSamples})`);
    if (!(this.options.driftPpm >= 0)) throw new RangeError(`driftPpm must not be negative (${this.options.driftPpm})`);
  }

  /** Adds one round, received at `nowMs` (caller's monotonic clock); says whether it was kept and why not. */
  add(sample: ClockSample, nowMs: number): SampleVerdict {
    const { t1, t2, t3, t4 } = sample;
    if (t4 < t1) return { accepted: false, reason: `our clock went back during the round (sent ${t1}, received ${t4})` };
    if (t3 < t2) return { accepted: false, reason: `the peer's clock went back during the round (received ${t2}, sent ${t3})` };
    const spanNs = t4 - t1;
    let delayNs = spanNs - (t3 - t2);
    if (delayNs < 0n) {
      // the peer held the beat longer than the whole round took here: only a rate difference
      // within the drift allowance may explain a little of that
      if (-delayNs > driftNs(t3 - t2, this.options.driftPpm) + 1_000n) {
        return { accepted: false, reason: `negative round trip (${delayNs} ns): the peer held our beat longer than the round took` };
      }
      delayNs = 0n;
    }
    if (delayNs > this.options.maxDelayNs) return { accepted: false, reason: `round trip of ${delayNs} ns, more than ${this.options.maxDelayNs}` };
    const offsetNs = (t2 - t1 + (t3 - t4)) / 2n;
    const kept: Kept = { offsetNs, delayNs, spanNs, atMs: nowMs };

    this.expire(nowMs);
    let reset: string | undefined;
    const best = this.best(nowMs);
    if (best) {
      // both intervals hold the true offset unless a clock stepped (or drifted past the allowance)
      const gap = absolute(offsetNs - best.offsetNs);
      const allowed = this.errorOf(kept, nowMs) + best.errorNs;
      if (gap > allowed) {
        reset = `offset moved by ${gap} ns, more than the two samples' error bounds (${allowed} ns) allow: a clock was stepped; older samples dropped`;
        this.window = [];
        this.jumps++;
      }
    }
    this.window.push(kept);
    while (this.window.length > this.options.maxSamples) this.window.shift();
    return { accepted: true, offsetNs, delayNs, ...(reset ? { reset } : {}) };
  }

  /** The best estimate now, or undefined when the window holds no sample young enough. */
  estimate(nowMs: number): ClockOffsetEstimate | undefined {
    this.expire(nowMs);
    const best = this.best(nowMs);
    if (!best) return undefined;
    return { offsetNs: best.offsetNs, errorNs: best.errorNs, delayNs: best.sample.delayNs, ageMs: Math.max(0, nowMs - best.sample.atMs), samples: this.window.length };
  }

  /** Forgets every sample (the peer restarted elsewhere, or was removed). */
  reset(): void {
    this.window = [];
  }

  private expire(nowMs: number): void {
    const oldest = nowMs - this.options.maxAgeMs;
    this.window = this.window.filter((k) => k.atMs >= oldest && k.atMs <= nowMs + 1_000);
  }

  private errorOf(kept: Kept, nowMs: number): bigint {
    const age = msToNs(nowMs - kept.atMs);
    return (kept.delayNs + 1n) / 2n + driftNs(kept.spanNs + age, this.options.driftPpm);
  }

  private best(nowMs: number): { sample: Kept; offsetNs: bigint; errorNs: bigint } | undefined {
    let best: { sample: Kept; offsetNs: bigint; errorNs: bigint } | undefined;
    for (const sample of this.window) {
      const errorNs = this.errorOf(sample, nowMs);
      // ties go to the newer sample
      if (!best || errorNs <= best.errorNs) best = { sample, offsetNs: sample.offsetNs, errorNs };
    }
    return best;
  }
}

function absolute(ns: bigint): bigint {
  return ns < 0n ? -ns : ns;
}

/**
 * An instant the peer stamped on its own clock (the old primary's stop instant), on ours: minus
 * the measured offset when there is one and `disabled` does not say otherwise; as it is otherwise
 * (then it is off by however far the two clocks disagree). Returns the instant and what the drift
 * ledger records about it.
 */
export function peerInstantOnOurClock(
  peerNs: bigint,
  peer: string,
  estimate: ClockOffsetEstimate | undefined,
  disabled?: string,
): { ns: bigint; record: HostClockOffset } {
  if (!estimate) return { ns: peerNs, record: { peer, applied: false, detail: `no clock offset to ${peer} measured (no heartbeat round in the window, or a peer that does not echo)` } };
  const measured = { peer, offsetNs: estimate.offsetNs, errorNs: estimate.errorNs, ageMs: Math.round(estimate.ageMs) };
  if (disabled) return { ns: peerNs, record: { ...measured, applied: false, detail: disabled } };
  return { ns: peerNs - estimate.offsetNs, record: { ...measured, applied: true } };
}
