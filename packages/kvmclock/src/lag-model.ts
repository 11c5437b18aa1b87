/**
 * Which guest clocks a pause leaves behind, by accelerator, guest clocksource and kind of pause,
 * and which corrections reach them. Read from QEMU 7.2 (Debian's 7.2+dfsg source):
 *
 * - TCG: do_vm_stop() (softmmu/cpus.c) calls cpu_disable_ticks(), which freezes the tick counter
 *   the guest TSC is derived from (cpu_get_ticks()) and QEMU_CLOCK_VIRTUAL, which the HPET
 *   (hw/timer/hpet.c) and the ACPI PM timer (hw/acpi/core.c) count from; cpu_enable_ticks() at the
 *   resume restarts them where they were. Every clocksource lags by the stopped time. A restore
 *   loads the `timer` section (cpu_ticks_offset, cpu_clock_offset): the same, the outage.
 * - KVM, kvm-clock: kvmclock_vm_state_change() (hw/i386/kvm/clock.c) reads the clock with
 *   KVM_GET_CLOCK at the stop (again in pre_save when a running VM migrates) and writes that value
 *   back with KVM_SET_CLOCK at the resume: it lags by the stopped time, locally and at a restore.
 * - KVM, tsc: the guest TSC is the host's plus a per-vCPU offset KVM keeps. A local pause does not
 *   touch it: kvm_put_msrs() (target/i386/kvm/kvm.c) writes MSR_IA32_TSC only at reset or full
 *   state (after a load), not at a resume. So no lag across a local pause. A restore on another
 *   host writes the TSC the source read at its stop (kvm_synchronize_all_tsc(), saved as
 *   env.tsc): it lags by the outage.
 * - KVM, hpet / acpi_pm: QEMU_CLOCK_VIRTUAL devices; cpu_disable_ticks() runs under KVM too, so
 *   they stop with the VM like under TCG.
 *
 * Corrections: ftvm's in-place correction (patches 0001–0002) moves QEMU_CLOCK_VIRTUAL and the
 * TCG ticks in cpu_enable_ticks() under either accelerator, and kvmclock under KVM; the guest
 * TSC under KVM only at a resume after a restore (0002 as revised for issue 17; the TSC it did
 * not stop locally needs nothing). The stream rewrite moves the `timer` and `kvmclock` sections,
 * not the CPUs' saved TSC: a tsc guest under KVM keeps its outage. The guest agent sets the
 * guest's realtime itself, whatever it counts from.
 */
import type { GuestClocksource, MachineClocks } from './clocksource.js';
import type { Actuator, PauseCause } from './ledger.js';

export type Accelerator = 'kvm' | 'tcg';

/** A pause that resumes where it stopped (`local`), or ends in a restore from a stream (`restore`). */
export type PauseKind = 'local' | 'restore';

export interface LagModel {
  accelerator: Accelerator;
  /** The guest's clocksource, when known (QEMU cannot see which one the guest picked). */
  clocksource: GuestClocksource | 'unknown';
  /** The clocksources the machine offers (machineClocks); used when `clocksource` is unknown. */
  candidates?: readonly GuestClocksource[];
}

/** What the ledger assumed before it had a model: every pause lags the guest by its stopped time. */
export const DEFAULT_LAG_MODEL: Readonly<LagModel> = { accelerator: 'tcg', clocksource: 'unknown' };

/** The clocksources a KVM guest can pick from when nothing narrower is known. */
const KVM_CANDIDATES: readonly GuestClocksource[] = ['kvm-clock', 'tsc', 'hpet', 'acpi_pm'];

/**
 * The clocksource ledgers predict for when it is unknown under KVM: kvm-clock, what a Linux
 * guest picks unless the CPU model exposes an invariant TSC (QEMU's named models do not, it
 * blocks migration). It also lags like the stopped-time prediction the ledger always made.
 */
export const KVM_DEFAULT_CLOCKSOURCE: GuestClocksource = 'kvm-clock';

/** Checkpoints and user pauses resume in place; migrations and failovers end in a restore. */
export function pauseKind(cause: PauseCause): PauseKind {
  return cause === 'migration' || cause === 'failover' ? 'restore' : 'local';
}

/** The model for a machine as machineClocks() describes it. */
export function lagModelFor(machine: Pick<MachineClocks, 'accelerator' | 'candidates'>, clocksource: GuestClocksource | 'unknown' = 'unknown'): LagModel {
  return { accelerator: machine.accelerator, clocksource, candidates: [...machine.candidates] };
}

/** Refuses a model that names what the accelerator cannot have (kvm-clock under TCG). */
export function validateLagModel(model: LagModel): LagModel {
  if (model.accelerator !== 'kvm' && model.accelerator !== 'tcg') throw new RangeError(`lag model: unknown accelerator ${JSON.stringify(model.accelerator)} (kvm or tcg)`);
  const all = [...KVM_CANDIDATES];
  if (model.clocksource !== 'unknown' && !all.includes(model.clocksource)) {
    throw new RangeError(`lag model: unknown clocksource ${JSON.stringify(model.clocksource)} (${all.join(', ')} or unknown)`);
  }
  for (const source of [...(model.candidates ?? []), ...(model.clocksource === 'unknown' ? [] : [model.clocksource])]) {
    if (!all.includes(source)) throw new RangeError(`lag model: unknown candidate clocksource ${JSON.stringify(source)}`);
    if (source === 'kvm-clock' && model.accelerator === 'tcg') throw new RangeError('lag model: kvm-clock exists only under KVM');
  }
  return model;
}

/** Whether a guest on `clocksource` loses a pause of this kind, uncorrected. */
export function stopsWithVm(accelerator: Accelerator, clocksource: GuestClocksource | 'unknown', kind: PauseKind): boolean {
  if (accelerator === 'tcg') return true;
  if (clocksource === 'tsc') return kind === 'restore';
  // kvm-clock, hpet, acpi_pm; unknown as kvm-clock (see KVM_DEFAULT_CLOCKSOURCE)
  return true;
}

/** Whether a correction by `actuator` moves the clock a guest on `clocksource` reads. */
export function correctionReaches(accelerator: Accelerator, clocksource: GuestClocksource | 'unknown', kind: PauseKind, actuator: Actuator): boolean {
  if (actuator === 'agent' || accelerator === 'tcg' || clocksource !== 'tsc') return true;
  // KVM, tsc: in place only at a restore (0002 advances the loaded TSC); the stream rewrite never.
  return actuator === 'inplace' && kind === 'restore';
}

/** The lag one pause leaves in a guest on `clocksource`: what stopped minus what reached it. */
export function pauseLagNs(
  accelerator: Accelerator,
  clocksource: GuestClocksource | 'unknown',
  pause: { cause: PauseCause; pausedNs: bigint; correction?: { actuator: Actuator; appliedNs: bigint } },
): bigint {
  const kind = pauseKind(pause.cause);
  const lost = stopsWithVm(accelerator, clocksource, kind) ? pause.pausedNs : 0n;
  const given = pause.correction && correctionReaches(accelerator, clocksource, kind, pause.correction.actuator) ? pause.correction.appliedNs : 0n;
  return lost - given;
}

/**
 * The clocksources worth a prediction each: under KVM with the clocksource unknown, the machine's
 * candidates (all four when not given); otherwise none (one prediction holds for all).
 */
export function predictionCandidates(model: LagModel): GuestClocksource[] {
  if (model.accelerator !== 'kvm' || model.clocksource !== 'unknown') return [];
  return [...(model.candidates?.length ? model.candidates : KVM_CANDIDATES)];
}
