/**
 * How far a guest clock can be moved in one step, per clocksource, and what a VM's machine lets
 * its guest choose from.
 *
 * A Linux guest turns its clocksource's counter into time by the delta since its last read,
 * masked to the counter's width; with CONFIG_CLOCKSOURCE_VALIDATE_LAST_CYCLE (x86) a delta above
 * half the mask is taken for a counter that went backwards and counts as 0. A forward step larger
 * than that is lost whole, silently. Half the wrap, per counter as QEMU emulates it:
 *   acpi_pm  24 bits at 3.579545 MHz → 2^23 / 3.579545 MHz = 2.343 s
 *   hpet     32 bits at 100 MHz (QEMU's HPET_CLK_PERIOD, 10 ns) → 2^31 × 10 ns = 21.47 s
 *   tsc, kvm-clock  64 bits: no practical limit.
 * The guest reads its clocksource at least once a tick when busy and on every wake-up; after a
 * forward step its timers are already due, so it reads again at once. A step of half the limit
 * leaves the other half for the time between its last read and the stop.
 */
import type { QmpClient } from '@ftvm/qmp';

export type GuestClocksource = 'tsc' | 'kvm-clock' | 'hpet' | 'acpi_pm';

const NS_PER_S = 1_000_000_000n;

/** The largest forward step the guest still counts, per clocksource (undefined: no limit). */
export const CLOCKSOURCE_LIMIT_NS: Readonly<Record<GuestClocksource, bigint | undefined>> = {
  tsc: undefined,
  'kvm-clock': undefined,
  hpet: (2n ** 31n * 10n), // 10 ns ticks
  acpi_pm: (2n ** 23n * NS_PER_S) / 3_579_545n,
};

/** The step ftvm applies at most at once on a guest that may use `clocksource`. */
export function safeStepNs(clocksource: GuestClocksource): bigint | undefined {
  const limit = CLOCKSOURCE_LIMIT_NS[clocksource];
  return limit === undefined ? undefined : limit / 2n;
}

export interface MachineClocks {
  accelerator: 'kvm' | 'tcg';
  /** The clocksources the machine offers its guest (the guest picks one; QEMU cannot see which). */
  candidates: GuestClocksource[];
  /** The smallest safe step among the candidates: every correction is applied in steps of at most this. */
  stepNs: bigint | undefined;
  /** The clocksource that sets stepNs. */
  limitedBy?: GuestClocksource;
  /** What the machine makes impossible to correct at the VMM level, said once by whoever starts protecting it. */
  warnings: string[];
}

/**
 * What the machine offers, from what QEMU exposes: the `acpi` and `hpet` properties of
 * /machine (x86 PC machines; a PM timer exists unless ACPI is off) and `query-kvm`. A machine
 * without either property (not an x86 PC) is taken as offering neither.
 */
export async function machineClocks(qmp: QmpClient): Promise<MachineClocks> {
  const property = async (name: string): Promise<unknown> => {
    try {
      return await qmp.execute('qom-get', { path: '/machine', property: name });
    } catch {
      return undefined;
    }
  };
  const kvm = await qmp.execute<{ enabled: boolean; present: boolean }>('query-kvm');
  const acpi = await property('acpi');
  const hpet = await property('hpet');
  return describeMachineClocks({ kvm: kvm.enabled, acpi: acpi === undefined ? false : acpi !== 'off', hpet: hpet === true });
}

/** machineClocks' decision, from the three facts (separate for tests). */
export function describeMachineClocks(machine: { kvm: boolean; acpi: boolean; hpet: boolean }): MachineClocks {
  const candidates: GuestClocksource[] = ['tsc'];
  if (machine.kvm) candidates.push('kvm-clock');
  if (machine.hpet) candidates.push('hpet');
  if (machine.acpi) candidates.push('acpi_pm');
  let stepNs: bigint | undefined;
  let limitedBy: GuestClocksource | undefined;
  for (const candidate of candidates) {
    const step = safeStepNs(candidate);
    if (step !== undefined && (stepNs === undefined || step < stepNs)) {
      stepNs = step;
      limitedBy = candidate;
    }
  }
  const warnings: string[] = [];
  if (!machine.kvm && !machine.hpet && !machine.acpi) {
    // Linux calibrates its TSC against the HPET or PM timer; without both it may fall back to
    // counting timer ticks (jiffies), which no clock section or in-place step can move.
    warnings.push('the machine has neither ACPI (PM timer) nor HPET: the guest may keep time by counting ticks, which ftvm cannot correct; enable ACPI');
  }
  return { accelerator: machine.kvm ? 'kvm' : 'tcg', candidates, stepNs, ...(limitedBy ? { limitedBy } : {}), warnings };
}

/** `totalNs` cut into steps of at most `stepNs` (one step when there is no limit). */
export function planSteps(totalNs: bigint, stepNs: bigint | undefined): bigint[] {
  if (totalNs <= 0n) return [];
  if (stepNs === undefined || totalNs <= stepNs) return [totalNs];
  if (stepNs <= 0n) throw new RangeError(`step must be positive (${stepNs} ns)`);
  const steps: bigint[] = [];
  for (let left = totalNs; left > 0n; left -= stepNs) steps.push(left < stepNs ? left : stepNs);
  return steps;
}
