import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parse, stringify } from 'yaml';
import { GuestAgentClient, QmpClient } from '@ftvm/qmp';
import { ftReadyFromSpec } from '../../libvirt/src/xml/spec.js';
import { readProtection } from '../../libvirt/src/xml/protection.js';
import { bootGuest, buildGuest, type BootedGuest, type GuestImage } from '../../../test/guest/boot-qemu.js';
import { probeGuestYaml } from '../../../test/guest/probe-spec.js';
import { patchedQemu } from '../../../test/support/patched-qemu.js';
import { clockOffset, syncGuestClock, type ClockOffset } from '../../../test/support/probe-client.js';
import { ClockHook, DriftLedger, QUERY_COMPENSATION_COMMAND, type ClockPolicy } from '../src/index.js';

// The per-VM clock policy end to end, as PrimaryVm.start wires it: the domain XML's ftvm metadata
// (written by makeFtReady from a spec) → readProtection(xml).clock → ClockHook, on real QEMUs
// running the probe guest under TCG; the guest clock is measured against the host's with the
// clock probe. The pauses are a checkpoint's as the checkpointer makes them on stock QEMU
// (announce, stop, arm while stopped, cont) and as it arms them with ftvm's self-resuming QEMU
// (arm before the stop).
const STOCK_QEMU = '/usr/bin/qemu-system-x86_64';
const MS = 1_000_000n;
const PAUSE_MS = 500;

interface Vm {
  guest: BootedGuest;
  qmp: QmpClient;
}

let image: GuestImage;
const vms: Vm[] = [];

/** Domain XML for the probe guest whose ftvm metadata carries `clock` (the spec's ftvm.clock). */
async function domainXml(name: string, clock: Record<string, unknown> | undefined, agent = false): Promise<string> {
  const spec = parse(await probeGuestYaml({ name, peer: { host: 'backup' }, checkpointIntervalMs: 200, probeListen: { address: '0.0.0.0', port: 5555 } })) as { ftvm: Record<string, unknown> };
  if (clock) spec.ftvm['clock'] = clock;
  if (agent) spec.ftvm['agent'] = true;
  return ftReadyFromSpec(stringify(spec)).xml;
}

async function policyOf(name: string, clock: Record<string, unknown> | undefined, agent = false): Promise<ClockPolicy> {
  const protection = readProtection(await domainXml(name, clock, agent));
  if (!protection) throw new Error('makeFtReady wrote no ftvm metadata');
  return protection.clock;
}

async function boot(qemuBinary: string): Promise<Vm> {
  const guest = await bootGuest({ image, qemuBinary, timeoutMs: 120_000 });
  const qmp = await QmpClient.connect({ path: guest.qmpSocket }, { connectTimeoutMs: 10_000 });
  const vm = { guest, qmp };
  vms.push(vm);
  return vm;
}

const offset = (vm: Vm): Promise<ClockOffset> => clockOffset(vm.guest.probe, { samples: 32, timeoutMs: 10_000 });
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const ms = (ns: bigint) => (Number(ns) / 1e6).toFixed(3);

/** One checkpoint-like pause of `stoppedMs`, armed as the checkpointer arms it. */
async function pause(vm: Vm, hook: ClockHook, stoppedMs: number, armBeforeStop = false): Promise<void> {
  if (armBeforeStop) await hook.arm('checkpoint');
  else hook.expect('checkpoint');
  const stopped = vm.qmp.waitForEvent('STOP', { timeoutMs: 10_000 });
  await vm.qmp.execute('stop', undefined, { timeoutMs: 10_000 });
  await stopped;
  await sleep(stoppedMs);
  if (!armBeforeStop) await hook.arm('checkpoint');
  const resumed = vm.qmp.waitForEvent('RESUME', { timeoutMs: 10_000 });
  await vm.qmp.execute('cont', undefined, { timeoutMs: 10_000 });
  await resumed;
}

/** Waits (bounded) until the hook has written down every pause's outcome. */
async function settled(ledger: DriftLedger, pauses: number): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (ledger.entries.length < pauses || ledger.entries.some((e) => !e.correction && !e.uncorrected)) {
    if (Date.now() > deadline) throw new Error(`ledger not settled: ${JSON.stringify(ledger.entries, (_, v: unknown) => (typeof v === 'bigint' ? String(v) : v))}`);
    await sleep(20);
  }
}

beforeAll(async () => {
  image = await buildGuest();
}, 10 * 60_000);

afterAll(async () => {
  for (const vm of vms) {
    await vm.qmp.close().catch(() => undefined);
    await vm.guest.kill();
  }
});

describe('the per-VM clock policy from the domain XML, applied by ClockHook (ftvm QEMU, TCG)', () => {
  it('corrects the default VM\'s checkpoint pauses in place and leaves those of a VM whose compensate excludes checkpoint', async () => {
    const binary = patchedQemu();
    const defaultPolicy = await policyOf('clock-default', undefined);
    const noCheckpoint = await policyOf('clock-nockpt', { compensate: ['migration', 'failover'] });
    expect(defaultPolicy.compensate).toContain('checkpoint');
    expect(noCheckpoint.compensate).toEqual(['migration', 'failover']);

    const results: Record<string, { lagNs: bigint; errorNs: bigint; ledger: DriftLedger }> = {};
    for (const [name, policy] of [['default', defaultPolicy], ['no-checkpoint', noCheckpoint]] as const) {
      const vm = await boot(binary);
      const ledger = new DriftLedger(name);
      const hook = await ClockHook.create({ qmp: vm.qmp, ledger, policy, log: (m) => console.log(`${name}: ${m}`) });
      expect(hook.canCorrectInPlace).toBe(true);
      try {
        await syncGuestClock(vm.guest.probe, { samples: 16, timeoutMs: 10_000 });
        const o0 = await offset(vm);
        for (let i = 0; i < 3; i++) await pause(vm, hook, PAUSE_MS, i === 2);
        const o1 = await offset(vm);
        await settled(ledger, 3);
        results[name] = { lagNs: o0.offsetNs - o1.offsetNs, errorNs: o0.errorNs + o1.errorNs, ledger };
        console.log(`${name}: guest fell behind ${ms(o0.offsetNs - o1.offsetNs)} ms (±${ms(o0.errorNs + o1.errorNs)}) over 3 × ${PAUSE_MS} ms pauses; ledger predicts ${ms(ledger.predictedLagNs)} ms`);
      } finally {
        hook.close();
      }
    }
    const corrected = results['default']!;
    expect(corrected.ledger.entries.map((e) => e.correction?.actuator)).toEqual(['inplace', 'inplace', 'inplace']);
    expect(corrected.ledger.predictedLagNs).toBe(0n);
    expect(Number(corrected.lagNs < 0n ? -corrected.lagNs : corrected.lagNs)).toBeLessThanOrEqual(Number(5n * MS + corrected.errorNs));

    const left = results['no-checkpoint']!;
    expect(left.ledger.entries.map((e) => e.uncorrected?.reason)).toEqual(['not-in-policy', 'not-in-policy', 'not-in-policy']);
    expect(left.ledger.entries.every((e) => e.correction === undefined)).toBe(true);
    expect(left.lagNs).toBeGreaterThanOrEqual(3n * BigInt(PAUSE_MS) * MS);
    // the ledger (QEMU's own frozen intervals) predicts what the guest lost
    expect(Number(left.lagNs - left.ledger.predictedLagNs)).toBeLessThanOrEqual(Number(5n * MS + left.errorNs));
    expect(Number(left.ledger.predictedLagNs - left.lagNs)).toBeLessThanOrEqual(Number(5n * MS + left.errorNs));
  });

  it('refuses a step over the XML\'s max-step-ms, armed while stopped or before the stop', async () => {
    const policy = await policyOf('clock-maxstep', { maxStepMs: 200 });
    expect(policy.maxStepMs).toBe(200);
    const vm = vms[0] ?? (await boot(patchedQemu()));
    const ledger = new DriftLedger('maxstep');
    const hook = await ClockHook.create({ qmp: vm.qmp, ledger, policy, log: (m) => console.log(`maxstep: ${m}`) });
    try {
      await syncGuestClock(vm.guest.probe, { samples: 16, timeoutMs: 10_000 });
      const o0 = await offset(vm);
      await pause(vm, hook, PAUSE_MS, false); // over the limit when armed: never armed
      await pause(vm, hook, PAUSE_MS, true); // armed before the stop: the guard zeroes the step
      const last = await vm.qmp.execute<{ 'last-resume': { compensated: boolean; 'applied-ns': number; 'include-stopped-time': boolean } }>(QUERY_COMPENSATION_COMMAND);
      await pause(vm, hook, 50, true); // within the limit: given back
      const o1 = await offset(vm);
      await settled(ledger, 3);
      const lagNs = o0.offsetNs - o1.offsetNs;
      console.log(`maxstep: guest fell behind ${ms(lagNs)} ms (±${ms(o0.errorNs + o1.errorNs)}); ledger predicts ${ms(ledger.predictedLagNs)} ms`);
      expect(last['last-resume']).toMatchObject({ compensated: true, 'include-stopped-time': false, 'applied-ns': 0 });
      expect(ledger.entries.map((e) => e.uncorrected?.reason ?? e.correction?.actuator)).toEqual(['max-step', 'max-step', 'inplace']);
      expect(ledger.entries[0]!.uncorrected!.detail).toContain('over maxStepMs 200');
      expect(lagNs).toBeGreaterThanOrEqual(2n * BigInt(PAUSE_MS) * MS);
      expect(Number(lagNs - ledger.predictedLagNs)).toBeLessThanOrEqual(Number(5n * MS + o0.errorNs + o1.errorNs));
      expect(Number(ledger.predictedLagNs - lagNs)).toBeLessThanOrEqual(Number(5n * MS + o0.errorNs + o1.errorNs));
    } finally {
      hook.close();
    }
  });
});

describe('onImpossible from the domain XML on a QEMU without ftvm\'s patch', () => {
  it('agent: the guest agent (qemu-ga in the probe guest) puts the guest back on real time after each pause', async () => {
    const policy = await policyOf('clock-agent', { onImpossible: 'agent' }, true);
    expect(policy.onImpossible).toBe('agent');
    const vm = await boot(STOCK_QEMU);
    const ledger = new DriftLedger('agent');
    const hook = await ClockHook.create({
      qmp: vm.qmp,
      ledger,
      policy,
      agent: () => GuestAgentClient.connect({ path: vm.guest.gaSocket }, { connectTimeoutMs: 5_000, commandTimeoutMs: 5_000 }),
      agentTimeoutMs: 5_000,
      log: (m) => console.log(`agent: ${m}`),
    });
    expect(hook.canCorrectInPlace).toBe(false);
    try {
      await syncGuestClock(vm.guest.probe, { samples: 16, timeoutMs: 10_000 });
      const o0 = await offset(vm);
      for (let i = 0; i < 2; i++) await pause(vm, hook, PAUSE_MS);
      await settled(ledger, 2);
      const o1 = await offset(vm);
      const lagNs = o0.offsetNs - o1.offsetNs;
      console.log(`agent: guest off by ${ms(lagNs)} ms (±${ms(o0.errorNs + o1.errorNs)}) after 2 × ${PAUSE_MS} ms pauses corrected by guest-set-time`);
      expect(ledger.entries.map((e) => e.correction?.actuator)).toEqual(['agent', 'agent']);
      expect(ledger.predictedLagNs).toBe(0n);
      // guest-set-time is stamped with the host clock before it travels: its latency stays as error
      expect(Number(lagNs < 0n ? -lagNs : lagNs)).toBeLessThan(Number(100n * MS));
    } finally {
      hook.close();
    }
  });

  it('record: the pauses stay uncorrected and the ledger says impossible', async () => {
    const policy = await policyOf('clock-record', { onImpossible: 'record' });
    const vm = vms.at(-1)!; // the stock QEMU above
    const ledger = new DriftLedger('record');
    const hook = await ClockHook.create({ qmp: vm.qmp, ledger, policy });
    try {
      await syncGuestClock(vm.guest.probe, { samples: 16, timeoutMs: 10_000 });
      const o0 = await offset(vm);
      await pause(vm, hook, PAUSE_MS);
      await settled(ledger, 1);
      const o1 = await offset(vm);
      expect(ledger.entries[0]!.uncorrected?.reason).toBe('impossible');
      expect(o0.offsetNs - o1.offsetNs).toBeGreaterThanOrEqual(BigInt(PAUSE_MS) * MS);
    } finally {
      hook.close();
    }
  });
});
