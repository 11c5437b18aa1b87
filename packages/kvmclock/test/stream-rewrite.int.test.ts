import { once } from 'node:events';
import net from 'node:net';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GuestAgentClient } from '@ftvm/qmp';
import { hostInfo, labUp } from '../../../test/lab/lab.js';
import { clockOffset } from '../../../test/support/probe-client.js';
import { checkpointToBuffer } from '../../../test/support/failover-restore.js';
import { startProbeVm, type ProbeVm } from '../../../test/support/probe-vm.js';
import { checkpointStopInstant, checkpointVirtualClockNs, DriftLedger, loadAndResumeOnTime, realtimeClock } from '../src/index.js';

// A failover restore with the clock rewritten in the stream (stock QEMU): the primary's VM is
// checkpointed (twice, resumed in between, as the checkpointer does) and dies after the second;
// seconds later that checkpoint is loaded into a fresh libvirt domain on the backup with the timer
// section advanced by the time that passed since its clock froze, and resumed at the instant the
// rewrite was computed for. The guest must come back on real time, not seconds behind.
const VM = 'rewrite-probe';
let primary: ProbeVm | undefined;
let backup: ProbeVm | undefined;

beforeAll(async () => {
  await labUp();
});
afterAll(async () => {
  await primary?.destroy();
  await backup?.destroy();
});

/** The guest kernel's current clocksource, read through the guest agent. */
async function guestClocksource(vm: ProbeVm): Promise<string> {
  const agent = await GuestAgentClient.connect({ path: vm.agentPath }, { connectTimeoutMs: 10_000, commandTimeoutMs: 10_000 });
  try {
    const file = '/sys/devices/system/clocksource/clocksource0/current_clocksource';
    const handle = await agent.execute<number>('guest-file-open', { path: file, mode: 'r' });
    const read = await agent.execute<{ 'buf-b64': string }>('guest-file-read', { handle, count: 64 });
    await agent.execute('guest-file-close', { handle });
    return Buffer.from(read['buf-b64'], 'base64').toString('utf8').trim();
  } finally {
    await agent.close();
  }
}

describe('restore-time clock rewrite (failover path, stock QEMU)', () => {
  it('brings a restored guest back within 5 ms of the offset it had before the primary stopped', async () => {
    primary = await startProbeVm({ host: 'primary', name: VM });
    // A guest that keeps time by counting ticks (jiffies) loses the whole gap whatever the stream
    // says: Linux falls back to it when it cannot calibrate its TSC at boot (see stream-rewrite.ts).
    const clocksource = await guestClocksource(primary);
    expect(clocksource, 'the probe guest must keep time with a counter the VMM advances (tsc or hpet), not by counting ticks').toMatch(/^(tsc|hpet)$/);
    // An earlier checkpoint and the resume after it: the reference that dates the freeze of the
    // next one exactly (QEMU's STOP stamp is 0.3–6 ms late; see stop-instant.ts).
    const clock = realtimeClock();
    const warmup = await checkpointToBuffer(primary);
    const resumedPrimary = primary.qmp.waitForEvent('RESUME', { timeoutMs: 10_000 });
    await primary.qmp.execute('cont');
    const primaryContAnsweredNs = clock();
    const reference = { resumeNs: (await resumedPrimary).timestampNs, virtualClockNs: checkpointVirtualClockNs(warmup.stream) };
    const before = await clockOffset(primary.probe, { samples: 32 });
    const { stream, stopNs: stopEventNs } = await checkpointToBuffer(primary);
    const stop = checkpointStopInstant(stream, { stopEventNs, reference });
    expect(stop.source, stop.rejected).toBe('stream');
    const stopNs = stop.stopNs;
    await primary.destroy(); // the primary dies with its VM stopped at the checkpoint
    primary = undefined;
    await new Promise((r) => setTimeout(r, 1500)); // failure detection and promotion take time

    // Started with -S (libvirt), and no `cont` before the load: the resume is scheduled.
    backup = await startProbeVm({ host: 'backup', name: VM, incoming: true });
    const ledger = new DriftLedger(VM);
    await backup.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
    await backup.qmp.execute('migrate-incoming', { uri: `unix:${backup.paths.run}/${VM}.incoming` });
    const socket = net.connect(path.join(path.dirname(backup.qmpPath), `${VM}.incoming`));
    await once(socket, 'connect', { signal: AbortSignal.timeout(10_000) });
    const load = await loadAndResumeOnTime({ qmp: backup.qmp, sink: socket, checkpoint: stream, stopNs, clock });

    const entry = ledger.recordPause('failover', stopNs, load.resumeNs);
    ledger.recordCorrection({ actuator: 'stream-rewrite', appliedNs: load.deltaNs });
    const after = await clockOffset(backup.probe, { samples: 32 });
    await new Promise((r) => setTimeout(r, 1000));
    const later = await clockOffset(backup.probe, { samples: 32 });
    const measuredLagNs = before.offsetNs - after.offsetNs;
    ledger.recordResidual(measuredLagNs, clock());
    // Each RESUME stamp is taken before its clock starts and `cont` answered after: the windows.
    const referenceWindowNs = primaryContAnsweredNs - reference.resumeNs;
    const restoreWindowNs = load.contAnsweredNs - load.resumeNs;
    const ms = (ns: bigint) => (Number(ns) / 1e6).toFixed(2);
    console.log(
      `clocksource ${clocksource}; STOP stamp ${ms(stop.stopEventLatenessNs ?? 0n)} ms late; failover gap ${ms(entry.pausedNs)} ms, rewrite Δ ${ms(load.deltaNs)} ms ` +
        `(${load.advances.map((a) => a.section).join('+')}, ${load.tailBytes} B of device state; loaded ${ms(load.loadedNs - load.rewriteNs)} ms after the rewrite, ` +
        `QMP rtt ${ms(load.qmpRoundTripNs)} ms, cont sent ${ms(load.contSentNs - load.targetNs)} ms and resumed ${ms(load.lateNs)} ms after the target${load.overrun ? ', OVERRUN' : ''}); ` +
        `ledger predicts lag ${ms(ledger.predictedLagNs)} ms, probe measures ${ms(measuredLagNs)} ms ± ${ms(before.errorNs + after.errorNs)}, ` +
        `resume stamps' windows ${ms(referenceWindowNs)} ms (primary) and ${ms(restoreWindowNs)} ms (backup), ` +
        `1 s later ${ms(before.offsetNs - later.offsetNs)} ms ± ${ms(before.errorNs + later.errorNs)}`,
    );
    // Same guest (memory and probe restored), not another VM answering on that address.
    expect(after.bootId).toBe(before.bootId);
    expect(entry.pausedNs).toBeGreaterThan(1_500_000_000n);
    expect(load.overrun).toBe(false);
    expect(Math.abs(Number(measuredLagNs))).toBeLessThanOrEqual(5_000_000);
    // The ledger's prediction (stopped time not given back) agrees with the measurement, to within
    // what the stamps and the probe allow. Both ends are dated by QEMU's RESUME stamp (the freeze
    // through the primary's reference resume), which QEMU takes before it writes the event to its
    // monitors and only then starts the clock: 0.10–1.34 ms earlier on an idle host (uprobes, 7.2
    // build), more when QEMU is preempted in between (CI once saw 2.6 ms off here). So the guest's
    // true lag is the prediction plus the restore's delay minus the reference's, each somewhere
    // in its window from stamp to `cont`'s reply, measured on this very run (2.5–3.2 ms on the
    // primary and 6.8–10.7 ms on the backup on an idle host).
    const probeErrorNs = before.errorNs + after.errorNs;
    const deviationNs = measuredLagNs - ledger.predictedLagNs;
    expect(deviationNs, `measured lag − predicted, against the reference's window ${ms(referenceWindowNs)} ms`).toBeGreaterThanOrEqual(-(referenceWindowNs + probeErrorNs));
    expect(deviationNs, `measured lag − predicted, against the restore's window ${ms(restoreWindowNs)} ms`).toBeLessThanOrEqual(restoreWindowNs + probeErrorNs);
    // And it stays there: the guest runs at the host's rate after the restore (to within what the
    // two probe readings allow: on a loaded host every sample of one reading may wait; CI once saw
    // 5.5 ms here, its probe errors not recorded).
    expect(Math.abs(Number(later.offsetNs - after.offsetNs))).toBeLessThanOrEqual(1_000_000 + Number(after.errorNs + later.errorNs));
    expect(hostInfo('backup').ip).toBe(backup.probe.host);
  });
});
