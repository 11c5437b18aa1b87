import { ControlError, type AgentControl, type AgentStatus, type CheckpointNowResult, type DriftReport, type Progress, type ProtectRequest, type SwitchoverResult, type VmStatus } from '../src/agent/control.js';

/** What the fake agent was asked, in order. */
export type Call =
  | { op: 'status' }
  | { op: 'protect'; request: ProtectRequest }
  | { op: 'unprotect' | 'switchover' | 'checkpointNow' | 'drift'; vm: string }
  | { op: 'reprotect'; vm: string; backup: string | undefined };

export const vmStatus = (name: string, extra: Partial<VmStatus> = {}): VmStatus => ({
  name,
  role: 'primary',
  domainState: 'running',
  primaryHost: 'alpha',
  backupHost: 'beta',
  leaseHolder: 'alpha',
  phase: 'protected',
  reason: 'checkpointed into beta',
  lastCheckpoint: { epoch: 41, ageMs: 730, bytes: 268_435_456, pauseMs: 12.5 },
  outputCommit: false,
  checkpointIntervalMs: 1000,
  clockResidualMs: -0.42,
  ...extra,
});

export const agentStatus = (): AgentStatus => ({
  host: 'alpha',
  lease: { id: '694d8a1b2c3d4e5f', healthy: true, lastRenewAgeMs: 120 },
  peers: [{ name: 'beta', alive: true, lastBeatAgeMs: { udp: 80, ssh: undefined } }],
  vms: [vmStatus('vm1'), vmStatus('vm2', { outputCommit: true, checkpointIntervalMs: 100, role: 'backup', phase: 'degraded', domainState: 'absent', lastCheckpoint: undefined, clockResidualMs: undefined, leaseHolder: undefined, standby: { domain: true, ready: true, ram: 'warm', ramEpoch: 42 } })],
});

/**
 * A scriptable AgentControl: every operation reports the steps in `steps` (a step whose name is in
 * `failStep` fails), and `gate` (when set) holds the operation after its first step until released.
 * `errors` makes a named operation throw instead.
 */
export class FakeControl implements AgentControl {
  readonly calls: Call[] = [];
  steps = ['connect to backup', 'first checkpoint', 'arm clock hook'];
  failStep: string | undefined;
  errors: Partial<Record<Call['op'], Error>> = {};
  gate: Promise<void> | undefined;

  private fail(op: Call['op']): void {
    const error = this.errors[op];
    if (error) throw error;
  }

  private async run(op: Call['op'], progress: Progress): Promise<void> {
    for (const [i, step] of this.steps.entries()) {
      progress({ step, state: 'start' });
      if (i === 0 && this.gate) await this.gate;
      await new Promise((resolve) => setImmediate(resolve));
      if (step === this.failStep) {
        progress({ step, state: 'fail', detail: `${step} refused` });
        throw new ControlError(`${op}: ${step} refused`, 409);
      }
      progress({ step, state: 'done', ...(i === 1 ? { detail: 'epoch 42' } : {}) });
    }
    this.fail(op);
  }

  async status(): Promise<AgentStatus> {
    this.calls.push({ op: 'status' });
    this.fail('status');
    if (this.gate) await this.gate;
    return agentStatus();
  }

  async protect(request: ProtectRequest, progress: Progress): Promise<VmStatus> {
    this.calls.push({ op: 'protect', request });
    await this.run('protect', progress);
    return vmStatus(request.vm, { backupHost: request.backup });
  }

  async unprotect(vm: string, progress: Progress): Promise<VmStatus> {
    this.calls.push({ op: 'unprotect', vm });
    await this.run('unprotect', progress);
    return vmStatus(vm, { phase: 'unprotected', backupHost: undefined, lastCheckpoint: undefined });
  }

  async switchover(vm: string, progress: Progress): Promise<SwitchoverResult> {
    this.calls.push({ op: 'switchover', vm });
    await this.run('switchover', progress);
    return { vm, from: 'alpha', to: 'beta', downtimeMs: 183, epoch: 43 };
  }

  async reprotect(vm: string, backup: string | undefined, progress: Progress): Promise<VmStatus> {
    this.calls.push({ op: 'reprotect', vm, backup });
    await this.run('reprotect', progress);
    return vmStatus(vm, { backupHost: backup ?? 'alpha', primaryHost: 'beta' });
  }

  async checkpointNow(vm: string): Promise<CheckpointNowResult> {
    this.calls.push({ op: 'checkpointNow', vm });
    this.fail('checkpointNow');
    if (this.gate) await this.gate;
    return { vm, epoch: 44, bytes: 1_048_576, pauseMs: 9.25 };
  }

  async drift(vm: string): Promise<DriftReport> {
    this.calls.push({ op: 'drift', vm });
    this.fail('drift');
    return { vm, ledger: { pauses: [{ epoch: 44, ms: 9.25 }], corrections: [] }, predictedLagMs: 0.4 };
  }
}
