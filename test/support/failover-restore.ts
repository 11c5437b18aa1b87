import { once } from 'node:events';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { checkpointStopInstant, checkpointVirtualClockNs, DriftLedger, loadAndResumeOnTime, machineClocks, realtimeClock } from '@ftvm/kvmclock';
import { clockOffset } from './probe-client.js';
import type { ProbeClocksource } from './probe-domain.js';
import { startProbeVm, type ProbeVm } from './probe-vm.js';

/** `migrate` into a unix socket we listen on; returns the stream and QEMU's STOP stamp. */
export async function checkpointToBuffer(vm: ProbeVm): Promise<{ stream: Buffer; stopNs: bigint }> {
  const sockPath = path.join(path.dirname(vm.qmpPath), `${vm.name}.ckpt`);
  fs.rmSync(sockPath, { force: true });
  const chunks: Buffer[] = [];
  let closed!: () => void;
  const done = new Promise<void>((r) => (closed = r));
  const server = net.createServer((s) => {
    s.on('data', (c: Buffer) => chunks.push(c));
    s.on('close', () => closed());
  });
  await new Promise<void>((r) => server.listen(sockPath, r));
  try {
    await vm.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
    await vm.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 8 * 1024 ** 3 });
    const stop = vm.qmp.waitForEvent('STOP', { timeoutMs: 60_000 });
    const completed = vm.qmp.waitForEvent<{ status: string }>('MIGRATION', { timeoutMs: 60_000, predicate: (e) => e.data.status === 'completed' });
    await vm.qmp.execute('migrate', { uri: `unix:${vm.paths.run}/${vm.name}.ckpt` });
    const stopNs = (await stop).timestampNs;
    await completed;
    await Promise.race([done, new Promise((r) => setTimeout(r, 10_000))]);
    return { stream: Buffer.concat(chunks), stopNs };
  } finally {
    server.close();
  }
}

export interface FailoverRestoreResult {
  clocksource: string;
  vcpus: number;
  gapMs: number;
  deltaMs: number;
  /** What the clock sections carried (Δ capped at the machine's safe step when stepping). */
  firstStepMs: number;
  /** In-place steps after the resume, and what they gave back. */
  inPlaceSteps: number;
  inPlaceMs: number;
  uncorrectedMs: number;
  deviceStateBytes: number;
  offsetBeforeMs: number;
  offsetAfterMs: number;
  /** After − before: the failover's residual as the probe measures it (target: within 5 ms). */
  offsetMs: number;
  ledgerPredictedLagMs: number;
  probeErrorMs: number;
  /** How late the resume came against the moment the rewrite aimed at. */
  resumeLateMs: number;
}

export interface FailoverRestoreOptions {
  name?: string;
  /** Outage to aim at, the checkpoint's stop → the resume (default 1500 ms; at least the load takes). */
  gapMs?: number;
  /** The guest's clocksource (default: the image's, tsc). */
  clocksource?: ProbeClocksource;
  vcpus?: number;
  /** QEMU for both ends (ftvm's patched build steps the clock in place; default libvirt's stock one). */
  emulator?: string;
  /**
   * Cap the rewrite at the machine's safe step (machineClocks) and give the rest back in place
   * (default true). false: the whole outage in the rewrite, as before the step model.
   */
  stepped?: boolean;
}

/**
 * The failover path with the stream rewrite: the probe guest on `primary` is checkpointed twice
 * (resumed in between, as the checkpointer does: that resume dates the next freeze exactly) and
 * dies; the checkpoint is loaded into a libvirt domain waiting on `backup` so that it resumes
 * about `gapMs` after the stop: RAM first, the clock advanced for a scheduled resume, device state
 * last, then `cont` at the scheduled instant (loadAndResumeOnTime), and the rest given back in
 * place where the machine's clocksources cannot take the whole gap at once.
 */
export async function failoverRestoreOffset(options: FailoverRestoreOptions = {}): Promise<FailoverRestoreResult> {
  const name = options.name ?? 'failover-probe';
  const vcpus = options.vcpus ?? 1;
  const common = { name, vcpus, ...(options.emulator ? { emulator: options.emulator } : {}) };
  let primary: ProbeVm | undefined = await startProbeVm({ host: 'primary', ...common, ...(options.clocksource ? { clocksource: options.clocksource } : {}) });
  let backup: ProbeVm | undefined;
  try {
    backup = await startProbeVm({ host: 'backup', ...common, incoming: true });
    await backup.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
    await backup.qmp.execute('migrate-incoming', { uri: `unix:${backup.paths.run}/${name}.incoming` });
    const clocks = await machineClocks(backup.qmp);

    const warmup = await checkpointToBuffer(primary);
    const resumedPrimary = primary.qmp.waitForEvent('RESUME', { timeoutMs: 10_000 });
    await primary.qmp.execute('cont');
    const reference = { resumeNs: (await resumedPrimary).timestampNs, virtualClockNs: checkpointVirtualClockNs(warmup.stream) };
    await new Promise((r) => setTimeout(r, 500)); // the guest runs a while on the warm-up's resume
    const before = await clockOffset(primary.probe, { samples: 32 });
    const { stream, stopNs: stopEventNs } = await checkpointToBuffer(primary);
    const stopNs = checkpointStopInstant(stream, { stopEventNs, reference }).stopNs;
    await primary.destroy();
    primary = undefined;
    // the load (RAM, then device state, then the scheduled resume) takes ~LOAD_MS of the gap
    const sinceStopMs = Number(realtimeClock()() - stopNs) / 1e6;
    await new Promise((r) => setTimeout(r, Math.max(0, (options.gapMs ?? 1500) - sinceStopMs - LOAD_MS)));

    const socket = net.connect(path.join(path.dirname(backup.qmpPath), `${name}.incoming`));
    await once(socket, 'connect', { signal: AbortSignal.timeout(10_000) });
    const stepNs = options.stepped === false ? undefined : clocks.stepNs;
    const load = await loadAndResumeOnTime({ qmp: backup.qmp, sink: socket, checkpoint: stream, stopNs, clock: realtimeClock(), ...(stepNs !== undefined ? { stepNs } : {}) });

    const ledger = new DriftLedger(name);
    ledger.recordPause('failover', stopNs, load.resumeNs);
    ledger.recordCorrection({ actuator: 'stream-rewrite', appliedNs: load.firstStepNs });
    for (const step of load.inPlace?.steps ?? []) {
      ledger.recordPause('failover', step.resumeNs - step.pauseNs, step.resumeNs);
      ledger.recordCorrection({ actuator: 'inplace', appliedNs: step.appliedNs, frozenNs: step.pauseNs });
    }
    await new Promise((r) => setTimeout(r, 300));
    const after = await clockOffset(backup.probe, { samples: 32 });
    const r = (ns: bigint) => Math.round(Number(ns) / 1e3) / 1e3;
    return {
      clocksource: options.clocksource ?? 'tsc',
      vcpus,
      gapMs: r(load.resumeNs - stopNs),
      deltaMs: r(load.deltaNs),
      firstStepMs: r(load.firstStepNs),
      inPlaceSteps: load.inPlace?.steps.length ?? 0,
      inPlaceMs: r((load.inPlace?.steps ?? []).reduce((sum, s) => sum + s.offsetNs, 0n)),
      uncorrectedMs: r(load.uncorrectedNs),
      deviceStateBytes: load.tailBytes,
      offsetBeforeMs: r(before.offsetNs),
      offsetAfterMs: r(after.offsetNs),
      offsetMs: r(after.offsetNs - before.offsetNs),
      ledgerPredictedLagMs: r(ledger.predictedLagNs),
      probeErrorMs: r(before.errorNs + after.errorNs),
      resumeLateMs: r(load.lateNs),
    };
  } finally {
    await primary?.destroy();
    await backup?.destroy();
  }
}

/** What the restore takes of the gap before the resume (the probe guest's RAM into the waiting QEMU, TCG: ~0.3 s measured). */
const LOAD_MS = 300;
