import type { GuestAgentClient, QmpClient } from '@ftvm/qmp';
import { QmpCommandError } from '@ftvm/qmp';

/** The QMP command of ftvm's QEMU patch (packages/kvmclock/qemu). */
export const COMPENSATE_COMMAND = 'x-ftvm-clock-compensate';
export const QUERY_COMPENSATION_COMMAND = 'x-ftvm-query-clock-compensation';
/** Patch 0012: drops an arming whose stop never came. */
export const DISARM_COMMAND = 'x-ftvm-clock-compensate-disarm';

export interface AppliedCompensation {
  stoppedNs: bigint;
  offsetNs: bigint;
  appliedNs: bigint;
}

/**
 * In-place correction through the patched QEMU: armed while the VM is stopped, the next resume
 * advances the guest clock by the host time elapsed since the stop (+ an explicit offset).
 */
export class InPlaceActuator {
  private constructor(
    private readonly qmp: QmpClient,
    /** This build has x-ftvm-clock-compensate-disarm (older ones only re-arm with a zero step). */
    private readonly canDisarm: boolean,
  ) {}

  /** Resolves to an actuator when this QEMU has ftvm's command, to undefined when it does not. */
  static async detect(qmp: QmpClient): Promise<InPlaceActuator | undefined> {
    const commands = await qmp.execute<{ name: string }[]>('query-commands');
    const has = (name: string) => commands.some((c) => c.name === name);
    return has(COMPENSATE_COMMAND) ? new InPlaceActuator(qmp, has(DISARM_COMMAND)) : undefined;
  }

  /** Arms the next resume. Only valid while the VM is stopped. */
  async arm(options: { includeStoppedTime?: boolean; offsetNs?: bigint } = {}): Promise<void> {
    await this.qmp.execute(COMPENSATE_COMMAND, {
      'include-stopped-time': options.includeStoppedTime ?? true,
      'offset-ns': options.offsetNs ?? 0n,
    });
  }

  /**
   * The next resume moves the guest clock no more. Without the disarm command (builds before it),
   * a zero-step arming takes the arming's place: the resume then applies 0.
   */
  async disarm(): Promise<void> {
    if (this.canDisarm) await this.qmp.execute(DISARM_COMMAND);
    else await this.arm({ includeStoppedTime: false, offsetNs: 0n });
  }

  /** What the last resume applied (exact 64-bit values from the raw reply). */
  async lastApplied(): Promise<AppliedCompensation | undefined> {
    const frame = await this.qmp.executeFrame(QUERY_COMPENSATION_COMMAND);
    const read = (name: string) => {
      const match = new RegExp(`"${name}"\\s*:\\s*(-?\\d+)`).exec(frame.raw);
      return match?.[1] === undefined ? undefined : BigInt(match[1]);
    };
    const stoppedNs = read('stopped-ns');
    const offsetNs = read('offset-ns');
    const appliedNs = read('applied-ns');
    if (stoppedNs === undefined || offsetNs === undefined || appliedNs === undefined) return undefined;
    return { stoppedNs, offsetNs, appliedNs };
  }
}

/**
 * The traditional method, kept only as the baseline ftvm is compared with: after the resume,
 * `guest-set-time` with the host's clock through the guest agent. Needs an agent in the guest;
 * it steps the clock after the guest already ran behind, and its own latency is error.
 */
export class GuestAgentActuator {
  constructor(private readonly agent: GuestAgentClient) {}

  /** Sets the guest clock to the host's; fails with a QmpTimeoutError if the agent is absent or hung. */
  async correct(timeoutMs = 2_000): Promise<void> {
    await this.agent.setTime(BigInt(Date.now()) * 1_000_000n, timeoutMs);
  }
}

export function isMissingCommand(error: unknown): boolean {
  return error instanceof QmpCommandError && error.errorClass === 'CommandNotFound';
}
