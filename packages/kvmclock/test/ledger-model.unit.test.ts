import { describe, expect, it } from 'vitest';
import type { GuestClocksource } from '../src/clocksource.js';
import { describeMachineClocks } from '../src/clocksource.js';
import { DriftLedger, type Actuator, type PauseCause } from '../src/ledger.js';
import { lagModelFor, pauseKind, type Accelerator } from '../src/lag-model.js';

const STOPPED = 700_000_000n; // one 700 ms pause

// What one uncorrected pause costs the guest, by accelerator, clocksource and pause kind
// (local: checkpoint, user; restore: migration, failover). See lag-model.ts for the QEMU 7.2 code
// behind each row.
const uncorrected: [Accelerator, GuestClocksource | 'unknown', 'local' | 'restore', bigint][] = [
  ['tcg', 'unknown', 'local', STOPPED],
  ['tcg', 'unknown', 'restore', STOPPED],
  ['tcg', 'tsc', 'local', STOPPED],
  ['tcg', 'tsc', 'restore', STOPPED],
  ['tcg', 'hpet', 'local', STOPPED],
  ['tcg', 'hpet', 'restore', STOPPED],
  ['tcg', 'acpi_pm', 'local', STOPPED],
  ['tcg', 'acpi_pm', 'restore', STOPPED],
  ['kvm', 'kvm-clock', 'local', STOPPED],
  ['kvm', 'kvm-clock', 'restore', STOPPED],
  ['kvm', 'tsc', 'local', 0n], // the TSC runs on across a local pause
  ['kvm', 'tsc', 'restore', STOPPED], // the saved TSC is loaded: the outage
  ['kvm', 'hpet', 'local', STOPPED],
  ['kvm', 'hpet', 'restore', STOPPED],
  ['kvm', 'acpi_pm', 'local', STOPPED],
  ['kvm', 'acpi_pm', 'restore', STOPPED],
  ['kvm', 'unknown', 'local', STOPPED], // predicted as kvm-clock
  ['kvm', 'unknown', 'restore', STOPPED],
];

const causeOf = { local: ['checkpoint', 'user'], restore: ['migration', 'failover'] } as const;

describe('DriftLedger: lag by accelerator, clocksource and pause kind', () => {
  it('sorts causes into kinds', () => {
    expect((['checkpoint', 'user', 'migration', 'failover'] as const).map(pauseKind)).toEqual(['local', 'local', 'restore', 'restore']);
  });

  it.each(uncorrected)('%s, %s, %s pause, uncorrected: predicted lag %s ns', (accelerator, clocksource, kind, lag) => {
    for (const cause of causeOf[kind]) {
      const ledger = new DriftLedger('vm1', { accelerator, clocksource });
      ledger.recordPause(cause as PauseCause, 1_000_000_000n, 1_000_000_000n + STOPPED);
      expect(ledger.pausedNs).toBe(STOPPED); // the stopped time is the stopped time, whatever the guest lost
      expect(ledger.predictedLagNs).toBe(lag);
      expect(ledger.summary().predictedLagNs).toBe(lag);
    }
  });

  // A correction of the whole pause, by actuator: what remains of the lag.
  const corrected: [Accelerator, GuestClocksource, 'local' | 'restore', Actuator, bigint][] = [
    ['tcg', 'tsc', 'local', 'inplace', 0n],
    ['tcg', 'tsc', 'restore', 'stream-rewrite', 0n],
    ['tcg', 'hpet', 'restore', 'inplace', 0n],
    ['kvm', 'kvm-clock', 'local', 'inplace', 0n],
    ['kvm', 'kvm-clock', 'restore', 'stream-rewrite', 0n],
    ['kvm', 'hpet', 'local', 'inplace', 0n], // cpu_enable_ticks moves QEMU_CLOCK_VIRTUAL under KVM too
    ['kvm', 'acpi_pm', 'restore', 'stream-rewrite', 0n], // the timer section
    ['kvm', 'tsc', 'local', 'inplace', 0n], // nothing lost, and moving kvmclock does not touch the TSC
    ['kvm', 'tsc', 'restore', 'inplace', 0n], // 0002 advances the loaded TSC
    ['kvm', 'tsc', 'restore', 'stream-rewrite', STOPPED], // the CPUs' saved TSC is not rewritten
    ['kvm', 'tsc', 'restore', 'agent', 0n],
  ];
  it.each(corrected)('%s, %s, %s pause, corrected by %s: predicted lag %s ns', (accelerator, clocksource, kind, actuator, lag) => {
    const ledger = new DriftLedger('vm1', { accelerator, clocksource });
    ledger.recordPause(causeOf[kind][0], 0n, STOPPED);
    ledger.recordCorrection({ actuator, appliedNs: STOPPED });
    expect(ledger.correctedNs).toBe(STOPPED); // what was applied, whatever it reached
    expect(ledger.predictedLagNs).toBe(lag);
  });

  it('keeps the stopped-time prediction by default (TCG, clocksource unknown), without per-clocksource figures', () => {
    const ledger = new DriftLedger('vm1');
    ledger.recordPause('checkpoint', 0n, 10n);
    ledger.recordCorrection({ actuator: 'inplace', appliedNs: 4n });
    ledger.recordPause('failover', 20n, 120n);
    expect(ledger.predictedLagNs).toBe(ledger.pausedNs - ledger.correctedNs);
    expect(ledger.predictedLagNs).toBe(106n);
    const summary = ledger.summary();
    expect(summary.model).toEqual({ accelerator: 'tcg', clocksource: 'unknown' });
    expect(summary.byClocksource).toBeUndefined();
  });

  it('under KVM with the clocksource unknown, predicts for each candidate the machine offers', () => {
    const machine = describeMachineClocks({ kvm: true, acpi: true, hpet: false });
    const ledger = new DriftLedger('vm1', lagModelFor(machine));
    ledger.recordPause('checkpoint', 0n, 1_000n); // local, uncorrected
    ledger.recordPause('failover', 2_000n, 7_000n); // restore, stream rewrite of 4 µs
    ledger.recordCorrection({ actuator: 'stream-rewrite', appliedNs: 4_000n });
    const summary = ledger.summary();
    expect(summary.model).toEqual({ accelerator: 'kvm', clocksource: 'unknown' });
    expect(summary.byClocksource).toEqual({ tsc: 5_000n, 'kvm-clock': 2_000n, acpi_pm: 2_000n });
    expect(summary.predictedLagNs).toBe(2_000n); // kvm-clock's
    const sent = JSON.parse(JSON.stringify(ledger.summaryJson()));
    expect(sent).toMatchObject({ predictedLagNs: '2000', model: { accelerator: 'kvm', clocksource: 'unknown' }, byClocksource: { tsc: '5000', 'kvm-clock': '2000', acpi_pm: '2000' } });
  });

  it('takes a model set later, for the pauses already recorded too', () => {
    const ledger = new DriftLedger('vm1');
    ledger.recordPause('user', 0n, 500n);
    expect(ledger.predictedLagNs).toBe(500n);
    ledger.setModel({ accelerator: 'kvm', clocksource: 'tsc' });
    expect(ledger.predictedLagNs).toBe(0n);
    expect(ledger.predictedLagFor('kvm-clock')).toBe(500n);
    expect(ledger.recordResidual(3n, 1_000n).predictedLagNs).toBe(0n);
  });

  it('refuses a model the accelerator cannot have, naming what is wrong', () => {
    expect(() => new DriftLedger('vm1', { accelerator: 'tcg', clocksource: 'kvm-clock' })).toThrow('kvm-clock exists only under KVM');
    expect(() => new DriftLedger('vm1', { accelerator: 'hvf' as Accelerator, clocksource: 'tsc' })).toThrow('unknown accelerator "hvf"');
    expect(() => new DriftLedger('vm1', { accelerator: 'kvm', clocksource: 'jiffies' as GuestClocksource })).toThrow('unknown clocksource "jiffies"');
    const ledger = new DriftLedger('vm1');
    expect(() => ledger.setModel({ accelerator: 'tcg', clocksource: 'unknown', candidates: ['kvm-clock'] })).toThrow('kvm-clock exists only under KVM');
    expect(ledger.model).toEqual({ accelerator: 'tcg', clocksource: 'unknown' });
  });
});
