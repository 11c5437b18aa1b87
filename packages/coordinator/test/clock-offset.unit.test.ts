import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { ClockOffsetEstimator, HeartbeatService, peerInstantOnOurClock, type ClockSample } from '../src/heartbeat/index.js';
import { hostRealtimeNs } from '../src/host-clock.js';

const MS = 1_000_000n;
const S = 1_000_000_000n;

/**
 * One round as the wire makes it: we send at `at` (our clock); the beat takes `out` to the peer,
 * whose clock reads ours + `offset`; it holds it `hold` (its clock) and the echo takes `back`.
 */
function round(offset: bigint, out: bigint, back: bigint, hold = 50n * MS, at = 1_700_000_000n * S): ClockSample {
  const t1 = at;
  const t2 = at + out + offset;
  const t3 = t2 + hold;
  const t4 = at + out + hold + back;
  return { t1, t2, t3, t4 };
}

describe('ClockOffsetEstimator: one round', () => {
  // [situation, sample, verdict]
  const rows: [string, ClockSample, { accepted: true; offsetNs: bigint; delayNs: bigint } | { accepted: false; reason: RegExp }][] = [
    ['symmetric round: the offset exactly', round(2n * S, 100_000n, 100_000n), { accepted: true, offsetNs: 2n * S, delayNs: 200_000n }],
    ['peer behind us', round(-3n * MS, 40_000n, 40_000n), { accepted: true, offsetNs: -3n * MS, delayNs: 80_000n }],
    ['asymmetric paths: off by half the difference, within delay/2', round(0n, 900_000n, 100_000n), { accepted: true, offsetNs: 400_000n, delayNs: 1_000_000n }],
    ['the hold does not count as round trip', round(0n, 50_000n, 50_000n, 900n * MS), { accepted: true, offsetNs: 0n, delayNs: 100_000n }],
    ['our clock went back during the round', { ...round(0n, 0n, 0n), t4: 1n }, { accepted: false, reason: /our clock went back/ }],
    ["the peer's clock went back during the round", { ...round(0n, 1n, 1n), t3: 0n }, { accepted: false, reason: /peer's clock went back/ }],
    ['negative round trip beyond the drift allowance', { ...round(0n, 0n, 0n), t3: round(0n, 0n, 0n).t3 + 10n * MS }, { accepted: false, reason: /negative round trip/ }],
    // a 100 ms hold at 100 ppm may look 10 µs longer than it was
    ['a few µs negative within the drift allowance: counted as 0', { ...round(0n, 0n, 0n, 100n * MS), t3: round(0n, 0n, 0n, 100n * MS).t3 + 8_000n }, { accepted: true, offsetNs: 4_000n, delayNs: 0n }],
    ['round trip longer than maxDelayNs', round(0n, 600n * MS, 600n * MS), { accepted: false, reason: /round trip of 1200000000 ns/ }],
  ];
  for (const [situation, sample, verdict] of rows) {
    it(situation, () => {
      const got = new ClockOffsetEstimator().add(sample, 0);
      if (verdict.accepted) expect(got).toEqual(verdict);
      else expect(got).toEqual({ accepted: false, reason: expect.stringMatching(verdict.reason) });
    });
  }
});

describe('ClockOffsetEstimator: the window', () => {
  it('takes the round with the smallest bound; its error is delay/2 plus drift over its span and age', () => {
    const e = new ClockOffsetEstimator({ driftPpm: 100 });
    e.add(round(5n * MS, 2n * MS, 1n * MS), 0); // offset off by 0.5 ms, delay 3 ms
    e.add(round(5n * MS, 100_000n, 100_000n, 50n * MS), 10); // the good one
    e.add(round(5n * MS, 300_000n, 1_000_000n), 20);
    const est = e.estimate(1_010)!;
    expect(est.offsetNs).toBe(5n * MS);
    expect(est.delayNs).toBe(200_000n);
    expect(est.ageMs).toBe(1_000);
    expect(est.samples).toBe(3);
    // 100 µs + 100 ppm × (50.2 ms span + 1 s age) = 100 µs + 105.02 µs
    expect(est.errorNs).toBe(100_000n + 105_020n);
  });

  it('an old low-delay round gives way to a fresh one once its drift allowance outgrows the difference', () => {
    const e = new ClockOffsetEstimator({ driftPpm: 100, maxAgeMs: 120_000 });
    e.add(round(0n, 50_000n, 50_000n, 0n), 0); // delay 100 µs
    e.add(round(1_000n, 150_000n, 150_000n, 0n), 50_000); // delay 300 µs, 50 s later
    expect(e.estimate(50_000)!.offsetNs).toBe(1_000n); // the old one's bound: 50 µs + 5 ms
    expect(e.estimate(50_000)!.errorNs).toBe(150_030n); // 150 µs + 100 ppm × 300 µs
  });

  it('drops rounds older than maxAgeMs: nothing fresh is no estimate', () => {
    const e = new ClockOffsetEstimator({ maxAgeMs: 1_000 });
    e.add(round(7n * MS, 100_000n, 100_000n), 0);
    expect(e.estimate(1_000)?.offsetNs).toBe(7n * MS);
    expect(e.estimate(1_001)).toBeUndefined();
  });

  it('keeps at most maxSamples, the newest', () => {
    const e = new ClockOffsetEstimator({ maxSamples: 3 });
    // the oldest rounds are the best ones: only the last three may count
    for (let i = 0; i < 10; i++) e.add(round(0n, BigInt(100_000 + i * 10_000), 100_000n), i);
    expect(e.estimate(10)!.samples).toBe(3);
    expect(e.estimate(10)!.delayNs).toBe(270_000n);
  });

  it('a slow round that agrees within its wide bound is kept; the window is not reset', () => {
    const e = new ClockOffsetEstimator();
    e.add(round(2n * S, 100_000n, 100_000n), 0);
    const slow = e.add(round(2n * S, 40n * MS, 1n * MS), 10); // off by 19.5 ms, bound 20.5 ms
    expect(slow).toMatchObject({ accepted: true, offsetNs: 2n * S + 19_500_000n });
    expect(slow).not.toHaveProperty('reset');
    expect(e.jumps).toBe(0);
    expect(e.estimate(10)!.offsetNs).toBe(2n * S);
  });

  it('a round outside every bound means a clock stepped: older rounds are dropped, the new one counts', () => {
    const e = new ClockOffsetEstimator();
    for (let i = 0; i < 5; i++) e.add(round(0n, 100_000n, 100_000n), i);
    const stepped = e.add(round(250n * MS, 300_000n, 300_000n), 10);
    expect(stepped).toMatchObject({ accepted: true, reset: expect.stringMatching(/a clock was stepped/) });
    expect(e.jumps).toBe(1);
    expect(e.estimate(10)).toMatchObject({ offsetNs: 250n * MS, samples: 1 });
  });

  it('reset() forgets everything', () => {
    const e = new ClockOffsetEstimator();
    e.add(round(1n * MS, 1n, 1n), 0);
    e.reset();
    expect(e.estimate(0)).toBeUndefined();
  });
});

describe('peerInstantOnOurClock', () => {
  const estimate = { offsetNs: -2n * S, errorNs: 150_000n, delayNs: 200_000n, ageMs: 812.4, samples: 40 };
  // [situation, estimate, disabled, instant on our clock, ledger record]
  const rows: [string, typeof estimate | undefined, string | undefined, bigint, object][] = [
    ['measured: the peer stamp minus the offset', estimate, undefined, 10n * S + 2n * S, { peer: 'a', offsetNs: -2n * S, errorNs: 150_000n, ageMs: 812, applied: true }],
    ['nothing measured: as stamped, and says so', undefined, undefined, 10n * S, { peer: 'a', applied: false, detail: expect.stringMatching(/no clock offset to a measured/) }],
    ['measured but disabled: as stamped, the measure recorded', estimate, 'off for a test', 10n * S, { peer: 'a', offsetNs: -2n * S, errorNs: 150_000n, ageMs: 812, applied: false, detail: 'off for a test' }],
  ];
  for (const [situation, est, disabled, ns, record] of rows) {
    it(situation, () => {
      expect(peerInstantOnOurClock(10n * S, 'a', est, disabled)).toEqual({ ns, record });
    });
  }
});

describe('test-only host clock knobs', () => {
  afterEach(() => {
    vi.unstubAllEnvs();
    vi.resetModules();
  });

  it('FTVM_TEST_REALTIME_SKEW_MS moves the agent clock, and a bad value is refused by name', async () => {
    vi.stubEnv('FTVM_TEST_REALTIME_SKEW_MS', '-1500.5');
    vi.resetModules();
    const skewed = await import('../src/host-clock.js');
    expect(skewed.testRealtimeSkewNs()).toBe(-1_500_500_000n);
    expect(skewed.toHostRealtime(10n * S)).toBe(10n * S - 1_500_500_000n);
    expect(skewed.toKernelRealtime(skewed.toHostRealtime(7n))).toBe(7n);
    const drift = Number(skewed.hostRealtimeNs() - BigInt(Date.now()) * MS) / 1e6;
    expect(drift).toBeGreaterThan(-1_503);
    expect(drift).toBeLessThan(-1_498);
    vi.stubEnv('FTVM_TEST_REALTIME_SKEW_MS', 'two seconds');
    vi.resetModules();
    const bad = await import('../src/host-clock.js');
    expect(() => bad.testRealtimeSkewNs()).toThrow(/FTVM_TEST_REALTIME_SKEW_MS=two seconds: want milliseconds/);
  });

  it('FTVM_TEST_IGNORE_HOST_OFFSET says why the offset was left out', async () => {
    const plain = await import('../src/host-clock.js');
    expect(plain.testIgnoreHostOffset()).toBeUndefined();
    vi.stubEnv('FTVM_TEST_IGNORE_HOST_OFFSET', '1');
    expect(plain.testIgnoreHostOffset()).toMatch(/FTVM_TEST_IGNORE_HOST_OFFSET is set/);
  });
});

describe('HeartbeatService measures the peer clock', () => {
  it('two services on the loopback, one 2 s ahead: each sees the other within its error bound', async () => {
    const skewNs = 2n * S;
    const ports = { a: 47_000 + Math.floor(Math.random() * 1_000), b: 0 };
    ports.b = ports.a + 1;
    const start = (host: string, port: number, clock: () => bigint) =>
      HeartbeatService.start({ host, listen: { udpAddress: '127.0.0.1', port }, intervalMs: 10, timeoutMs: 100, payload: () => ({}), clock });
    const a = await start('a', ports.a, hostRealtimeNs);
    const b = await start('b', ports.b, () => hostRealtimeNs() + skewNs);
    try {
      a.addPeer({ name: 'b', address: '127.0.0.1', port: ports.b });
      b.addPeer({ name: 'a', address: '127.0.0.1', port: ports.a });
      const deadline = performance.now() + 5_000;
      while (!(a.peer('b')?.clockOffset && (a.peer('b')!.clockOffset!.samples >= 10) && b.peer('a')?.clockOffset)) {
        if (performance.now() > deadline) throw new Error(`no clock offset measured in 5 s: ${JSON.stringify(a.peer('b'), (_, v) => (typeof v === 'bigint' ? String(v) : v))}`);
        await sleep(20);
      }
      const ab = a.peer('b')!.clockOffset!;
      const ba = b.peer('a')!.clockOffset!;
      // the bound holds the truth (the loopback's rounds are tens of µs; the error well under 5 ms)
      expect(ab.errorNs).toBeLessThan(5n * MS);
      expect(ab.offsetNs - skewNs <= ab.errorNs && skewNs - ab.offsetNs <= ab.errorNs).toBe(true);
      expect(ba.offsetNs + skewNs <= ba.errorNs && -skewNs - ba.offsetNs <= ba.errorNs).toBe(true);
    } finally {
      await a.close();
      await b.close();
    }
  });
});
