import { realtimeAnchorNs } from '@ftvm/kvmclock';

/**
 * This host's realtime as the agent reads it, and the two test-only knobs that bend it. Every
 * place where the agent's own realtime meets another host's instants (heartbeat timestamps, the
 * failover rewrite's resume instant) reads it here, so one knob moves all of them together.
 *
 * Test only — never set in production:
 * - `FTVM_TEST_REALTIME_SKEW_MS=<ms>` (may be negative or fractional): this agent's host realtime
 *   runs that far ahead of the kernel's CLOCK_REALTIME. The lab's hosts share one kernel clock, so
 *   this is how a test gets two hosts whose clocks disagree. What it cannot move: QEMU's own event
 *   stamps (STOP, RESUME), which come from the kernel clock. So only the agent's reads skew — its
 *   heartbeats and the instant it resumes a restored VM at, as seen from the other host — which is
 *   exactly what a skewed backup looks like to a failover onto it. A checkpoint taken by a skewed
 *   primary still carries unskewed stamps: skew the host the test fails over *to*.
 * - `FTVM_TEST_IGNORE_HOST_OFFSET=1`: the failover rewrite does not apply the measured offset (it
 *   is still measured and recorded), to show what the error would be without it.
 */

const SKEW_ENV = 'FTVM_TEST_REALTIME_SKEW_MS';
const IGNORE_ENV = 'FTVM_TEST_IGNORE_HOST_OFFSET';
/** Re-anchor the ns clock to CLOCK_REALTIME this often, so an NTP step or slew is followed. */
const REANCHOR_MS = 10_000;

let skew: bigint | undefined;

/** The injected skew (ns; 0 unless FTVM_TEST_REALTIME_SKEW_MS is set). Throws on a value that is not a number. */
export function testRealtimeSkewNs(): bigint {
  if (skew === undefined) {
    const raw = process.env[SKEW_ENV]?.trim();
    if (!raw) skew = 0n;
    else {
      const ms = Number(raw);
      if (!Number.isFinite(ms) || Math.abs(ms) > 86_400_000) throw new Error(`${SKEW_ENV}=${raw}: want milliseconds, a number within ±1 day (test only)`);
      skew = BigInt(Math.round(ms * 1e6));
    }
  }
  return skew;
}

/** FTVM_TEST_IGNORE_HOST_OFFSET is set: the rewrite leaves the measured offset out (why, for the ledger), else undefined. */
export function testIgnoreHostOffset(): string | undefined {
  const raw = process.env[IGNORE_ENV]?.trim();
  return raw && raw !== '0' ? `not applied: ${IGNORE_ENV} is set (test only)` : undefined;
}

let anchor: { ns: bigint; atMs: number } | undefined;

/**
 * This host's realtime in ns (CLOCK_REALTIME to a few µs, see kvmclock's realtime.ts), plus the
 * test skew. Anchored to CLOCK_REALTIME every 10 s; between anchors it follows CLOCK_MONOTONIC.
 */
export function hostRealtimeNs(): bigint {
  const now = performance.now();
  if (!anchor || now - anchor.atMs > REANCHOR_MS) {
    try {
      anchor = { ns: realtimeAnchorNs(), atMs: now };
    } catch {
      // Date.now() did not tick cleanly (a step in progress): keep the old anchor, retry next time
      anchor ??= { ns: BigInt(Date.now()) * 1_000_000n - process.hrtime.bigint(), atMs: now };
    }
  }
  return process.hrtime.bigint() + anchor.ns + testRealtimeSkewNs();
}

/** The kernel's CLOCK_REALTIME instant `kernelNs` (a QEMU stamp, a realtimeClock() read) as this host's realtime. */
export function toHostRealtime(kernelNs: bigint): bigint {
  return kernelNs + testRealtimeSkewNs();
}

/** This host's realtime instant `hostNs` in the kernel's CLOCK_REALTIME (the frame of QEMU's stamps). */
export function toKernelRealtime(hostNs: bigint): bigint {
  return hostNs - testRealtimeSkewNs();
}
