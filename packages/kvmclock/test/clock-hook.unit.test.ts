import { afterEach, describe, expect, it, vi } from 'vitest';
import type { GuestAgentClient, QmpClient, QmpEvent } from '@ftvm/qmp';
import { ClockCorrectionImpossibleError, ClockHook } from '../src/clock-hook.js';
import { DriftLedger } from '../src/ledger.js';
import { DEFAULT_POLICY, parsePolicy, PolicyError, type ClockPolicy } from '../src/policy.js';
import { COMPENSATE_COMMAND, QUERY_COMPENSATION_COMMAND } from '../src/actuators.js';

const MS = 1_000_000n;
const nowNs = () => BigInt(Date.now()) * MS;

/**
 * QEMU's side of the in-place correction as the QEMU README specifies it (x-ftvm-clock-compensate
 * one-shot, last arguments win, `last-resume` for every resume), driven by the test's stop/resume.
 * Only the hook's state machine is under test here; the real QEMU is in clock-policy.int.test.ts.
 */
class FakeQemu {
  readonly compensateCalls: { 'include-stopped-time': boolean; 'offset-ns': bigint }[] = [];
  private readonly listeners = new Set<(event: QmpEvent) => void>();
  private armed: { include: boolean; offsetNs: bigint } | undefined;
  private stoppedAt: bigint | undefined;
  private lastResume = '';

  constructor(readonly patched: boolean) {}

  get qmp(): QmpClient {
    return {
      onEvent: (listener: (event: QmpEvent) => void) => {
        this.listeners.add(listener);
        return () => this.listeners.delete(listener);
      },
      execute: async (command: string, args?: Record<string, unknown>) => {
        if (command === 'query-commands') return [{ name: 'cont' }, ...(this.patched ? [{ name: COMPENSATE_COMMAND }, { name: QUERY_COMPENSATION_COMMAND }] : [])];
        if (command === COMPENSATE_COMMAND && this.patched) {
          const call = args as { 'include-stopped-time': boolean; 'offset-ns': bigint };
          this.compensateCalls.push(call);
          this.armed = { include: call['include-stopped-time'], offsetNs: call['offset-ns'] };
          return {};
        }
        throw new Error(`fake QEMU: unexpected ${command}`);
      },
      executeFrame: async (command: string) => {
        if (command !== QUERY_COMPENSATION_COMMAND || !this.patched) throw new Error(`fake QEMU: unexpected ${command}`);
        const raw = `{"return": {"armed": ${this.armed !== undefined}${this.lastResume}}}`;
        return { value: JSON.parse(raw) as unknown, raw };
      },
    } as unknown as QmpClient;
  }

  stop(atNs = nowNs()): void {
    this.stoppedAt = atNs;
    this.emit('STOP', atNs);
  }

  resume(atNs: bigint): void {
    const stoppedNs = atNs - this.stoppedAt!;
    const armed = this.armed;
    this.armed = undefined;
    const appliedNs = armed ? (armed.include ? stoppedNs : 0n) + armed.offsetNs : 0n;
    this.lastResume = `, "last-resume": {"compensated": ${armed !== undefined}, "include-stopped-time": ${armed?.include ?? false}, "stopped-ns": ${stoppedNs}, "offset-ns": ${armed?.offsetNs ?? 0n}, "applied-ns": ${appliedNs < 0n ? 0n : appliedNs}, "applied-ticks": 0}`;
    this.stoppedAt = undefined;
    this.emit('RESUME', atNs);
  }

  private emit(event: string, timestampNs: bigint): void {
    for (const listener of [...this.listeners]) listener({ event, data: {}, timestampNs });
  }
}

function fakeAgent(fail?: string): { agent: () => Promise<GuestAgentClient>; setTimes: bigint[] } {
  const setTimes: bigint[] = [];
  const client = {
    setTime: async (timeNs: bigint) => {
      if (fail) throw new Error(fail);
      setTimes.push(timeNs);
    },
    close: async () => undefined,
  } as unknown as GuestAgentClient;
  return { agent: async () => client, setTimes };
}

let hooks: ClockHook[] = [];
afterEach(() => {
  for (const hook of hooks) hook.close();
  hooks = [];
});

async function setup(options: { patched?: boolean; policy?: ClockPolicy; agent?: () => Promise<GuestAgentClient> } = {}) {
  const qemu = new FakeQemu(options.patched ?? true);
  const ledger = new DriftLedger('vm1');
  const logs: string[] = [];
  const hook = await ClockHook.create({
    qmp: qemu.qmp,
    ledger,
    ...(options.policy ? { policy: options.policy } : {}),
    ...(options.agent ? { agent: options.agent } : {}),
    log: (m) => logs.push(m),
  });
  hooks.push(hook);
  return { qemu, ledger, hook, logs };
}

/** A stock-QEMU style checkpoint: announced, stopped `stoppedMs`, armed while stopped, resumed. */
async function checkpointWhileStopped(qemu: FakeQemu, hook: ClockHook, stoppedMs: number): Promise<void> {
  hook.expect('checkpoint');
  const stopNs = nowNs() - BigInt(stoppedMs) * MS; // the STOP stamp lies `stoppedMs` back
  qemu.stop(stopNs);
  let armError: unknown;
  await hook.arm('checkpoint').catch((e: unknown) => (armError = e));
  qemu.resume(nowNs());
  if (armError) throw armError;
}

describe('ClockHook applies the VM clock policy', () => {
  it('default policy, ftvm QEMU: a checkpoint pause is armed and recorded as given back in place', async () => {
    const { qemu, ledger, hook } = await setup();
    await checkpointWhileStopped(qemu, hook, 20);
    await vi.waitFor(() => expect(ledger.entries[0]?.correction).toBeDefined());
    expect(qemu.compensateCalls).toEqual([{ 'include-stopped-time': true, 'offset-ns': 0n }]);
    expect(ledger.entries[0]).toMatchObject({ cause: 'checkpoint', correction: { actuator: 'inplace' } });
    expect(ledger.entries[0]!.uncorrected).toBeUndefined();
    expect(ledger.predictedLagNs).toBe(0n);
  });

  it('compensate without checkpoint: the pause is not armed, and the ledger says not-in-policy with QEMU-measured length', async () => {
    const { qemu, ledger, hook } = await setup({ policy: parsePolicy('compensate: [migration, failover]') });
    expect(hook.correctsInPlace('checkpoint')).toBe(false);
    expect(hook.correctsInPlace('failover')).toBe(true);
    await checkpointWhileStopped(qemu, hook, 30);
    await vi.waitFor(() => expect(ledger.entries[0]?.uncorrected).toBeDefined());
    expect(qemu.compensateCalls).toEqual([]);
    expect(ledger.entries[0]).toMatchObject({ cause: 'checkpoint', uncorrected: { reason: 'not-in-policy' } });
    expect(ledger.entries[0]!.correction).toBeUndefined();
    expect(ledger.predictedLagNs).toBe(ledger.entries[0]!.pausedNs);
    expect(ledger.predictedLagNs).toBeGreaterThanOrEqual(30n * MS);
    expect(ledger.summary().uncorrected['not-in-policy']).toMatchObject({ pauses: 1 });
  });

  it('compensate without checkpoint, armed before the stop (self-resuming QEMU): nothing is armed', async () => {
    const { qemu, ledger, hook } = await setup({ policy: parsePolicy('compensate: [failover]') });
    await hook.arm('checkpoint');
    qemu.stop();
    qemu.resume(nowNs() + 5n * MS);
    await vi.waitFor(() => expect(ledger.entries[0]?.uncorrected).toEqual({ reason: 'not-in-policy' }));
    expect(ledger.entries[0]!.cause).toBe('checkpoint');
    expect(qemu.compensateCalls).toEqual([]);
  });

  it('maxStepMs exceeded while stopped: not armed, recorded as max-step', async () => {
    const { qemu, ledger, hook, logs } = await setup({ policy: parsePolicy('maxStepMs: 100') });
    await checkpointWhileStopped(qemu, hook, 250);
    await vi.waitFor(() => expect(ledger.entries[0]?.uncorrected?.reason).toBe('max-step'));
    expect(qemu.compensateCalls).toEqual([]);
    expect(ledger.entries[0]!.uncorrected!.detail).toMatch(/stopped 2\d\d\.\d ms, over maxStepMs 100/);
    expect(ledger.predictedLagNs).toBeGreaterThanOrEqual(250n * MS);
    expect(logs.join('\n')).toContain('checkpoint pause not corrected');
  });

  it('maxStepMs exceeded after arming before the stop: the arming is replaced by a zero step in time', async () => {
    const { qemu, ledger, hook } = await setup({ policy: parsePolicy('maxStepMs: 60') });
    await hook.arm('checkpoint'); // before the stop, as with x-ftvm-resume-source
    qemu.stop();
    await new Promise((r) => setTimeout(r, 150));
    qemu.resume(nowNs());
    await vi.waitFor(() => expect(ledger.entries[0]?.uncorrected?.reason).toBe('max-step'));
    expect(qemu.compensateCalls).toEqual([
      { 'include-stopped-time': true, 'offset-ns': 0n },
      { 'include-stopped-time': false, 'offset-ns': 0n },
    ]);
    expect(ledger.entries[0]!.correction).toBeUndefined();
    // the whole ~150 ms pause stays as lag (given back it would be ~0); timers may fire a ms early
    expect(ledger.predictedLagNs).toBeGreaterThanOrEqual(140n * MS);
  });

  it('a pause within maxStepMs after arming before the stop is given back whole', async () => {
    const { qemu, ledger, hook } = await setup({ policy: parsePolicy('maxStepMs: 1000') });
    await hook.arm('checkpoint');
    qemu.stop();
    await new Promise((r) => setTimeout(r, 30));
    qemu.resume(nowNs());
    await vi.waitFor(() => expect(ledger.entries[0]?.correction?.actuator).toBe('inplace'));
    expect(qemu.compensateCalls).toHaveLength(1);
    expect(ledger.predictedLagNs).toBe(0n);
  });

  it('stock QEMU, onImpossible record: said once, every pause recorded as impossible', async () => {
    const { qemu, ledger, hook, logs } = await setup({ patched: false });
    expect(hook.canCorrectInPlace).toBe(false);
    await checkpointWhileStopped(qemu, hook, 10);
    await checkpointWhileStopped(qemu, hook, 10);
    await vi.waitFor(() => expect(ledger.entries.map((e) => e.uncorrected?.reason)).toEqual(['impossible', 'impossible']));
    expect(logs.filter((l) => l.includes('no in-place correction'))).toHaveLength(1);
  });

  it('stock QEMU, onImpossible fail: arm throws a clear error, the pause is recorded as impossible', async () => {
    const { qemu, ledger, hook } = await setup({ patched: false, policy: parsePolicy('onImpossible: fail') });
    await expect(checkpointWhileStopped(qemu, hook, 10)).rejects.toThrow(ClockCorrectionImpossibleError);
    await expect(hook.arm('checkpoint')).rejects.toThrow('onImpossible: fail');
    await vi.waitFor(() => expect(ledger.entries[0]?.uncorrected?.reason).toBe('impossible'));
  });

  it('stock QEMU, onImpossible fail does not fail pauses the policy does not compensate', async () => {
    const { qemu, ledger, hook } = await setup({ patched: false, policy: parsePolicy('compensate: [failover]\nonImpossible: fail') });
    await checkpointWhileStopped(qemu, hook, 10);
    await vi.waitFor(() => expect(ledger.entries[0]?.uncorrected?.reason).toBe('not-in-policy'));
  });

  it('stock QEMU, onImpossible agent: guest-set-time with the host clock after the resume, recorded as an agent correction', async () => {
    const { agent, setTimes } = fakeAgent();
    const { qemu, ledger, hook } = await setup({ patched: false, policy: parsePolicy('onImpossible: agent'), agent });
    await checkpointWhileStopped(qemu, hook, 40);
    await vi.waitFor(() => expect(ledger.entries[0]?.correction?.actuator).toBe('agent'));
    expect(setTimes).toHaveLength(1);
    expect(Number(nowNs() - setTimes[0]!) / 1e6).toBeLessThan(1000);
    expect(ledger.entries[0]!.correction!.appliedNs).toBe(ledger.entries[0]!.pausedNs);
    expect(ledger.predictedLagNs).toBe(0n);
  });

  it('onImpossible agent with an agent that fails: recorded as agent-failed with the reason', async () => {
    const { agent } = fakeAgent('guest-set-time: no answer within 2000 ms');
    const { qemu, ledger, hook } = await setup({ patched: false, policy: parsePolicy('onImpossible: agent'), agent });
    await checkpointWhileStopped(qemu, hook, 10);
    await vi.waitFor(() => expect(ledger.entries[0]?.uncorrected).toEqual({ reason: 'agent-failed', detail: 'guest-set-time: no answer within 2000 ms' }));
  });

  it('onImpossible agent on ftvm QEMU corrects in place (the agent is only the fallback)', async () => {
    const { agent, setTimes } = fakeAgent();
    const { qemu, ledger, hook } = await setup({ policy: parsePolicy('onImpossible: agent'), agent });
    await checkpointWhileStopped(qemu, hook, 10);
    await vi.waitFor(() => expect(ledger.entries[0]?.correction?.actuator).toBe('inplace'));
    expect(setTimes).toEqual([]);
  });

  it('refuses onImpossible agent without a guest-agent channel, and a bad policy, at create', async () => {
    await expect(setup({ policy: parsePolicy('onImpossible: agent') })).rejects.toThrow(PolicyError);
    await expect(setup({ policy: parsePolicy('onImpossible: agent') })).rejects.toThrow("agent needs the VM's guest-agent channel");
    await expect(setup({ policy: { ...DEFAULT_POLICY, maxStepMs: 0 } })).rejects.toThrow('clock policy: maxStepMs: must be a positive number');
    await expect(setup({ policy: { ...DEFAULT_POLICY, compensate: ['checkpoint', 'nap' as 'user'] } })).rejects.toThrow('compensate[1]: "nap" is not one of');
  });

  it('a stop nobody announced is the user\'s: given back when the policy compensates user, recorded not-in-policy otherwise', async () => {
    const withUser = await setup({ policy: parsePolicy('compensate: [checkpoint, user]') });
    withUser.qemu.stop();
    await vi.waitFor(() => expect(withUser.qemu.compensateCalls).toHaveLength(1));
    withUser.qemu.resume(nowNs() + 20n * MS);
    await vi.waitFor(() => expect(withUser.ledger.entries[0]?.correction?.actuator).toBe('inplace'));
    expect(withUser.ledger.entries[0]!.cause).toBe('user');

    const byDefault = await setup();
    byDefault.qemu.stop();
    byDefault.qemu.resume(nowNs() + 20n * MS);
    await vi.waitFor(() => expect(byDefault.ledger.entries[0]?.uncorrected?.reason).toBe('not-in-policy'));
    expect(byDefault.qemu.compensateCalls).toEqual([]);
  });
});
