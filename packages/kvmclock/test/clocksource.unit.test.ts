import { describe, expect, it } from 'vitest';
import { CLOCKSOURCE_LIMIT_NS, describeMachineClocks, planSteps, safeStepNs } from '@ftvm/kvmclock';

describe('clocksource step limits', () => {
  it('acpi_pm shows at most half its 24-bit wrap at 3.579545 MHz, hpet half its 32-bit wrap at 100 MHz', () => {
    expect(CLOCKSOURCE_LIMIT_NS.acpi_pm).toBe(2_343_484_437n);
    expect(CLOCKSOURCE_LIMIT_NS.hpet).toBe(21_474_836_480n);
    expect(CLOCKSOURCE_LIMIT_NS.tsc).toBeUndefined();
    expect(safeStepNs('acpi_pm')).toBe(1_171_742_218n);
    expect(safeStepNs('kvm-clock')).toBeUndefined();
  });
});

describe('describeMachineClocks', () => {
  const rows: Array<[string, { kvm: boolean; acpi: boolean; hpet: boolean }, string[], bigint | undefined, string | undefined, number]> = [
    ['pc under TCG', { kvm: false, acpi: true, hpet: true }, ['tsc', 'hpet', 'acpi_pm'], 1_171_742_218n, 'acpi_pm', 0],
    ['pc under KVM', { kvm: true, acpi: true, hpet: true }, ['tsc', 'kvm-clock', 'hpet', 'acpi_pm'], 1_171_742_218n, 'acpi_pm', 0],
    ['ACPI off, HPET on', { kvm: false, acpi: false, hpet: true }, ['tsc', 'hpet'], 10_737_418_240n, 'hpet', 0],
    ['KVM, no ACPI, no HPET', { kvm: true, acpi: false, hpet: false }, ['tsc', 'kvm-clock'], undefined, undefined, 0],
    ['TCG, no ACPI, no HPET: ticks', { kvm: false, acpi: false, hpet: false }, ['tsc'], undefined, undefined, 1],
  ];
  for (const [name, machine, candidates, stepNs, limitedBy, warnings] of rows) {
    it(name, () => {
      const clocks = describeMachineClocks(machine);
      expect(clocks.candidates).toEqual(candidates);
      expect(clocks.stepNs).toBe(stepNs);
      expect(clocks.limitedBy).toBe(limitedBy);
      expect(clocks.warnings).toHaveLength(warnings);
      expect(clocks.accelerator).toBe(machine.kvm ? 'kvm' : 'tcg');
    });
  }
});

describe('planSteps', () => {
  it('cuts a total into steps of at most the limit, the remainder last', () => {
    expect(planSteps(5n, 2n)).toEqual([2n, 2n, 1n]);
    expect(planSteps(4n, 2n)).toEqual([2n, 2n]);
    expect(planSteps(1n, 2n)).toEqual([1n]);
    expect(planSteps(7n, undefined)).toEqual([7n]);
    expect(planSteps(0n, 2n)).toEqual([]);
    expect(planSteps(-3n, 2n)).toEqual([]);
    expect(() => planSteps(5n, 0n)).toThrow(/step must be positive/);
  });
});
