/**
 * pnpm bench:drift → bench/results/drift.json + drift.png
 *
 * Guest − host offset (clock probe) over N checkpoints at 1/s of the 256 MiB probe guest on the
 * lab's `primary`, checkpointed over SSH into `backup`'s store, for each actuator:
 *   none    stock QEMU: the ledger's prediction vs the measured lag
 *   inplace ftvm's patched QEMU, x-ftvm-clock-compensate armed in every checkpoint's pause
 *   agent   stock QEMU + guest-set-time through the guest agent after every checkpoint (baseline)
 * plus one failover restore with the stream rewrite (test/support/failover-restore.ts).
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { Checkpointer } from '@ftvm/coordinator';
import { ClockHook, DriftLedger, GuestAgentActuator, PauseTracker } from '@ftvm/kvmclock';
import { GuestAgentClient } from '@ftvm/qmp';
import { openRemoteReceiver } from '@ftvm/transport';
import { hostInfo, labUp } from '../test/lab/lab.js';
import { connectLabSsh } from '../test/support/lab-ssh.js';
import { clockOffset, stepGuestClock } from '../test/support/probe-client.js';
import { startProbeVm } from '../test/support/probe-vm.js';
import { describeEnvironment } from './environment.js';
import { failoverRestoreOffset } from '../test/support/failover-restore.js';
import { writeLinePlot, type Series } from './plot.js';
import { round, summarize } from './stats.js';

const CHECKPOINTS = Number(process.env.FTVM_DRIFT_CHECKPOINTS ?? 300);
const INTERVAL_MS = Number(process.env.FTVM_DRIFT_INTERVAL_MS ?? 1000);
const SAMPLE_EVERY = Number(process.env.FTVM_DRIFT_SAMPLE_EVERY ?? 10);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const ms = (ns: bigint) => Number(ns) / 1e6;

type ActuatorName = 'none' | 'inplace' | 'agent';

interface RunResult {
  name: ActuatorName;
  emulator: string;
  checkpoints: number;
  startOffsetMs: number;
  finalOffsetMs: number;
  offsetChangeMs: number;
  ledgerPredictedLagMs: number;
  ledgerErrorRatio: number;
  /**
   * Pauses the ledger counted from the freeze derived from the stream (stopInstantFromClock), and
   * why the others were not (the first has no reference; with in-place correction the clock a
   * checkpoint resumes with is moved, so it is not attempted and QEMU's measure is used).
   */
  stopsDatedFromStream: number;
  streamDatingRejected: string[];
  pauseMs: ReturnType<typeof summarize>;
  correctionMs: ReturnType<typeof summarize>;
  series: { x: number; y: number }[];
}

function patchedQemu(): string | undefined {
  if (process.env.FTVM_QEMU_PATCHED) return process.env.FTVM_QEMU_PATCHED;
  const script = new URL('../packages/kvmclock/qemu/build.sh', import.meta.url);
  if (!fs.existsSync(script)) return undefined;
  return execFileSync('bash', [script.pathname], { encoding: 'utf8', timeout: 3_600_000, stdio: ['ignore', 'pipe', 'inherit'] }).trim().split('\n').pop();
}

async function run(name: ActuatorName, emulator: string | undefined): Promise<RunResult> {
  const vmName = `drift-${name}`;
  const storeInside = `/var/lib/libvirt/ftvm/${vmName}`;
  fs.rmSync(path.join(hostInfo('backup').libvirtLibDir, 'ftvm', vmName), { recursive: true, force: true });
  const vm = await startProbeVm({ host: 'primary', name: vmName, ...(emulator ? { emulator } : {}) });
  const ssh = await connectLabSsh('backup');
  let receiver = await openRemoteReceiver(ssh, { storeDir: storeInside, keep: 2 });
  const ledger = new DriftLedger(vmName);
  const hook = name === 'inplace' ? await ClockHook.create({ qmp: vm.qmp, ledger, log: console.error }) : undefined;
  if (name === 'inplace' && !hook?.canCorrectInPlace) throw new Error(`${emulator} has no in-place correction command`);
  const tracker = hook?.tracker ?? new PauseTracker(vm.qmp, ledger);
  const agent = name === 'agent' ? new GuestAgentActuator(await GuestAgentClient.connect({ path: vm.agentPath }, { connectTimeoutMs: 30_000 })) : undefined;
  const correctionMs: number[] = [];
  const streamDatingRejected: string[] = [];
  let stopsDatedFromStream = 0;
  const checkpointer = await Checkpointer.create({
    vm: vmName,
    qmp: vm.qmp,
    socketPath: vm.paths.migrationOutside,
    qemuSocketPath: vm.paths.migration,
    qemuVersion: '7.2',
    clockMovesAtResume: hook !== undefined,
    ...(hook
      ? {
          // With ftvm's QEMU the checkpoint resumes by itself: arm before the stop, adding nothing
          // to the pause. Otherwise arm inside the pause, and that time is what it adds.
          beforeMigrate: async () => {
            if (checkpointer.selfResuming) await hook.arm('checkpoint');
          },
          beforeResume: async () => {
            const started = performance.now();
            await hook.arm('checkpoint');
            correctionMs.push(performance.now() - started);
          },
        }
      : {}),
  });
  if (hook && checkpointer.selfResuming) correctionMs.push(0);
  try {
    const start = await clockOffset(vm.probe, { samples: 32 });
    const series = [{ x: 0, y: 0 }];
    const pauses: number[] = [];
    for (let epoch = 1; epoch <= CHECKPOINTS; epoch++) {
      const began = performance.now();
      tracker.expect('checkpoint');
      try {
        const result = await checkpointer.checkpoint(epoch, receiver.sender);
        pauses.push(ms(result.resumeNs - result.stopNs));
        if (result.frozeAt.source === 'stream') {
          if (ledger.redateStop(result.stopNs, result.frozeAt.stopNs)) stopsDatedFromStream++;
          else streamDatingRejected.push('no ledger entry with that STOP stamp');
        } else if (epoch > 1) streamDatingRejected.push(result.frozeAt.rejected ?? 'no reference');
      } catch (error) {
        console.error(`${name}: checkpoint ${epoch} failed: ${(error as Error).message}`);
        if (!receiver.sender.isOpen) receiver = await openRemoteReceiver(ssh, { storeDir: storeInside, keep: 2 });
      }
      if (agent) {
        const t = performance.now();
        await agent.correct();
        correctionMs.push(performance.now() - t);
      }
      if (epoch % SAMPLE_EVERY === 0 || epoch === CHECKPOINTS) {
        const now = await clockOffset(vm.probe, { samples: 16 });
        series.push({ x: epoch, y: ms(now.offsetNs - start.offsetNs) });
        console.error(`${name}: ${epoch}/${CHECKPOINTS} offset change ${ms(now.offsetNs - start.offsetNs).toFixed(2)} ms, ledger predicts ${ms(-ledger.predictedLagNs).toFixed(2)} ms`);
      }
      await sleep(Math.max(0, INTERVAL_MS - (performance.now() - began)));
    }
    await sleep(500); // the last RESUME's ledger entry
    const end = await clockOffset(vm.probe, { samples: 32 });
    const changeNs = end.offsetNs - start.offsetNs;
    const measuredLagNs = -changeNs;
    const predicted = ledger.predictedLagNs;
    ledger.recordResidual(measuredLagNs, BigInt(Date.now()) * 1_000_000n);
    return {
      name,
      emulator: emulator ?? 'libvirt default (stock)',
      checkpoints: pauses.length,
      startOffsetMs: round(ms(start.offsetNs)),
      finalOffsetMs: round(ms(end.offsetNs)),
      offsetChangeMs: round(ms(changeNs)),
      ledgerPredictedLagMs: round(ms(predicted)),
      ledgerErrorRatio: predicted === 0n ? Number.NaN : round(Number(measuredLagNs - predicted) / Number(predicted), 4),
      stopsDatedFromStream,
      streamDatingRejected: [...new Set(streamDatingRejected.map((r) => r.replace(/\d+/g, 'N')))],
      pauseMs: summarize(pauses),
      correctionMs: summarize(correctionMs.length ? correctionMs : [0]),
      series,
    };
  } finally {
    tracker.close();
    await checkpointer.close();
    receiver.sender.close();
    ssh.close();
    await vm.destroy();
  }
}

await labUp();
const env = describeEnvironment();
const patched = patchedQemu();
// The instrument's own validated error: a known in-guest step measured back.
const validation = await (async () => {
  const vm = await startProbeVm({ host: 'primary', name: 'drift-validate' });
  try {
    const a = await clockOffset(vm.probe, { samples: 32 });
    await stepGuestClock(vm.probe, 250_000_000n);
    const b = await clockOffset(vm.probe, { samples: 32 });
    return { step_ms: 250, measured_ms: round(ms(b.offsetNs - a.offsetNs), 4), error_bound_ms: round(ms(a.errorNs + b.errorNs), 4) };
  } finally {
    await vm.destroy();
  }
})();

const runs: RunResult[] = [];
for (const name of ['none', 'inplace', 'agent'] as const) {
  if (name === 'inplace' && !patched) {
    console.error('inplace: no patched QEMU available; skipped and reported as missing');
    continue;
  }
  runs.push(await run(name, name === 'inplace' ? patched : undefined));
}
const failover = await failoverRestoreOffset();

const byName = (n: ActuatorName) => runs.find((r) => r.name === n);
const result = {
  ...env,
  probe_validation: validation,
  checkpoints_per_run: CHECKPOINTS,
  interval_ms: INTERVAL_MS,
  none: byName('none') && { final_offset_ms: byName('none')!.offsetChangeMs, ledger_error_ratio: byName('none')!.ledgerErrorRatio, ...omitSeries(byName('none')!) },
  inplace: byName('inplace')
    ? { final_offset_ms: byName('inplace')!.offsetChangeMs, added_pause_ms_p99: byName('inplace')!.correctionMs.p99, ...omitSeries(byName('inplace')!) }
    : { missing: 'no patched QEMU' },
  agent: byName('agent') && { final_offset_ms: byName('agent')!.offsetChangeMs, ...omitSeries(byName('agent')!) },
  failover: { offset_ms: failover.offsetMs, ...failover },
  targets: { inplace_offset_change_ms: 1, inplace_added_pause_ms_p99: 1, failover_offset_ms: 5, none_ledger_error_ratio: 0.05 },
};
const out = new URL('./results/', import.meta.url);
fs.mkdirSync(out, { recursive: true });
fs.writeFileSync(new URL('drift.json', out), `${JSON.stringify(result, null, 2)}\n`);
const colors: Record<ActuatorName, string> = { none: '#d62728', inplace: '#2ca02c', agent: '#1f77b4' };
const series: Series[] = runs.map((r) => ({ label: `${r.name} (${r.offsetChangeMs.toFixed(1)} ms)`, color: colors[r.name], points: r.series }));
writeLinePlot(new URL('drift.png', out).pathname, `Guest − host offset change over ${CHECKPOINTS} checkpoints (TCG, 256 MiB)`, 'checkpoint', 'offset change (ms)', series);
console.log(JSON.stringify(result, null, 2));

function omitSeries(r: RunResult) {
  const { series: _series, ...rest } = r;
  return rest;
}
