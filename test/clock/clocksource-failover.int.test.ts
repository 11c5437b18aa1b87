/**
 * A failover's clock correction on every clocksource the probe guest may keep time with, with
 * outages of 3 and 6 s (ftvm's QEMU on both ends, TCG). The acpi_pm counter (24 bits at
 * 3.58 MHz) shows a guest at most 2.34 s per read; a larger step is taken for a counter gone
 * backwards and lost whole. The restore therefore moves the clock sections by at most the
 * machine's safe step (machineClocks: this `pc` machine offers acpi_pm, so 1.17 s) and gives the
 * rest back in place after the resume, step by step. The unstepped run shows the loss the steps
 * prevent.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { labUp } from '../lab/lab.js';
import { failoverRestoreOffset, type FailoverRestoreResult } from '../support/failover-restore.js';
import { patchedQemu } from '../support/patched-qemu.js';
import type { ProbeClocksource } from '../support/probe-domain.js';

let emulator: string;
const results: FailoverRestoreResult[] = [];

beforeAll(async () => {
  await labUp();
  emulator = patchedQemu();
}, 900_000);

afterAll(() => {
  console.log(JSON.stringify(results.map((r) => ({ cs: r.clocksource, gapMs: r.gapMs, firstStepMs: r.firstStepMs, steps: r.inPlaceSteps, offsetMs: r.offsetMs, probeErrorMs: r.probeErrorMs }))));
});

describe('failover clock correction per clocksource (gaps of 3 and 6 s)', () => {
  const cases: Array<[ProbeClocksource, number]> = [
    ['acpi_pm', 3000],
    ['acpi_pm', 6000],
    ['hpet', 3000],
    ['hpet', 6000],
    ['tsc', 3000],
    ['tsc', 6000],
  ];
  for (const [clocksource, gapMs] of cases) {
    it(`${clocksource}, ${gapMs / 1000} s: the guest clock moves by at most 5 ms`, async () => {
      const r = await failoverRestoreOffset({ name: `cs-${clocksource.replace('_', '')}-${gapMs / 1000}`, clocksource, gapMs, emulator });
      results.push(r);
      console.log(JSON.stringify(r));
      expect(r.gapMs, 'the outage must be as long as asked, or this proves nothing').toBeGreaterThan(gapMs * 0.85);
      expect(r.firstStepMs).toBeLessThanOrEqual(1172); // acpi_pm's half-limit: every pc machine offers it
      expect(r.inPlaceSteps).toBeGreaterThanOrEqual(Math.ceil((gapMs * 0.85 - 1172) / 1172));
      expect(r.uncorrectedMs).toBe(0);
      expect(Math.abs(r.offsetMs)).toBeLessThanOrEqual(5);
    }, 180_000);
  }

  it('acpi_pm, 3 s, the whole gap in the rewrite (no steps): the guest loses it', async () => {
    const r = await failoverRestoreOffset({ name: 'cs-acpipm-whole', clocksource: 'acpi_pm', gapMs: 3000, emulator, stepped: false });
    results.push(r);
    console.log(JSON.stringify(r));
    expect(r.gapMs).toBeGreaterThan(2600); // beyond the 2.34 s the counter can show
    expect(r.inPlaceSteps).toBe(0);
    expect(r.offsetMs).toBeLessThan(-2000);
  }, 180_000);
});
