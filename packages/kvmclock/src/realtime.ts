/**
 * Host CLOCK_REALTIME in nanoseconds, for clock deltas that must be right to well under a
 * millisecond. Node has no such clock: `Date.now()` is whole milliseconds and `hrtime` is
 * CLOCK_MONOTONIC (`Date.now()` plus the fraction of `performance.now()` mixes two unrelated
 * clocks and is off by up to ±1 ms). `Date.now()` is gettimeofday() truncated, so the instant it
 * ticks from N to N+1 is exactly realtime (N+1) ms: spinning until it ticks (≤ 1 ms) and reading
 * hrtime on both sides pins realtime − monotonic to within one loop iteration.
 */
export type RealtimeClock = () => bigint;

/** realtime − monotonic in ns; throws if `Date.now()` never ticked cleanly (clock stepping). */
export function realtimeAnchorNs(): bigint {
  let best: { anchor: bigint; window: bigint } | undefined;
  for (let attempt = 0; attempt < 5; attempt++) {
    const start = Date.now();
    const giveUp = process.hrtime.bigint() + 3_000_000n;
    let lower = process.hrtime.bigint();
    let before = lower;
    let ms = start;
    while (ms === start && before < giveUp) {
      lower = before;
      before = process.hrtime.bigint();
      ms = Date.now();
    }
    const upper = process.hrtime.bigint();
    if (ms !== start + 1) continue; // preempted across a whole tick, or the clock stepped
    const candidate = { anchor: BigInt(ms) * 1_000_000n - (lower + upper) / 2n, window: upper - lower };
    if (!best || candidate.window < best.window) best = candidate;
    if (best.window < 20_000n) break;
  }
  if (!best) throw new Error('could not anchor host realtime: Date.now() did not tick cleanly');
  return best.anchor;
}

/**
 * A realtime clock anchored once, now. Re-create it for each operation: it follows CLOCK_MONOTONIC
 * from the anchor on, so a later step or slew of the host clock is not seen.
 */
export function realtimeClock(): RealtimeClock {
  const anchor = realtimeAnchorNs();
  return () => process.hrtime.bigint() + anchor;
}
