import { once } from 'node:events';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { checkpointStopInstant, checkpointVirtualClockNs, DriftLedger, loadAndResumeOnTime, realtimeClock } from '@ftvm/kvmclock';
import { clockOffset } from './probe-client.js';
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
  gapMs: number;
  deltaMs: number;
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

/**
 * The failover path with the stream rewrite, on stock QEMU: the probe guest on `primary` is
 * checkpointed twice (resumed in between, as the checkpointer does: that resume dates the next
 * freeze exactly) and dies; `gapMs` later the checkpoint is loaded into a fresh libvirt domain on
 * `backup`: RAM first, the clock advanced for a scheduled resume, device state last, then `cont`
 * at the scheduled instant (loadAndResumeOnTime).
 */
export async function failoverRestoreOffset(options: { name?: string; gapMs?: number } = {}): Promise<FailoverRestoreResult> {
  const name = options.name ?? 'failover-probe';
  let primary: ProbeVm | undefined = await startProbeVm({ host: 'primary', name });
  let backup: ProbeVm | undefined;
  try {
    const warmup = await checkpointToBuffer(primary);
    const resumedPrimary = primary.qmp.waitForEvent('RESUME', { timeoutMs: 10_000 });
    await primary.qmp.execute('cont');
    const reference = { resumeNs: (await resumedPrimary).timestampNs, virtualClockNs: checkpointVirtualClockNs(warmup.stream) };
    const before = await clockOffset(primary.probe, { samples: 32 });
    const { stream, stopNs: stopEventNs } = await checkpointToBuffer(primary);
    const stopNs = checkpointStopInstant(stream, { stopEventNs, reference }).stopNs;
    await primary.destroy();
    primary = undefined;
    await new Promise((r) => setTimeout(r, options.gapMs ?? 1500));

    backup = await startProbeVm({ host: 'backup', name, incoming: true });
    await backup.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
    await backup.qmp.execute('migrate-incoming', { uri: `unix:${backup.paths.run}/${name}.incoming` });
    const socket = net.connect(path.join(path.dirname(backup.qmpPath), `${name}.incoming`));
    await once(socket, 'connect', { signal: AbortSignal.timeout(10_000) });
    const load = await loadAndResumeOnTime({ qmp: backup.qmp, sink: socket, checkpoint: stream, stopNs, clock: realtimeClock() });

    const ledger = new DriftLedger(name);
    ledger.recordPause('failover', stopNs, load.resumeNs);
    ledger.recordCorrection({ actuator: 'stream-rewrite', appliedNs: load.deltaNs });
    const after = await clockOffset(backup.probe, { samples: 32 });
    const r = (ns: bigint) => Math.round(Number(ns) / 1e3) / 1e3;
    return {
      gapMs: r(load.resumeNs - stopNs),
      deltaMs: r(load.deltaNs),
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
