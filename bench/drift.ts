/**
 * pnpm bench:drift → bench/results/drift.json + drift.png
 *
 * Guest − host offset (clock probe) over N checkpoints at 1/s of the 256 MiB probe guest on the
 * lab's `primary`, checkpointed over SSH into `backup`'s store, for each actuator:
 *   none    stock QEMU: the ledger's prediction vs the measured lag
 *   inplace ftvm's patched QEMU, x-ftvm-clock-compensate armed in every checkpoint's pause
 *   agent   stock QEMU + guest-set-time through the guest agent after every checkpoint (baseline)
 * plus one failover restore with the stream rewrite (test/support/failover-restore.ts).
 *
 * inplace also fits the guest's own clock rate: the guest − host offset is sampled for
 * FTVM_DRIFT_RATE_WINDOW_S (default 60) before the checkpointed run and as long after it, same
 * boot, no checkpoints; the slope (one for both windows, fitRate) is that boot's TSC calibration
 * error (~7 ppm in one boot of four: 2.35 ms over 300 checkpoints), and `residual_ms` is the
 * offset change with it removed, beside the raw `raw_offset_ms`.
 *
 * skew: the protected probe VM failed over by kill onto a backup whose agent clock runs
 * SKEW_MS ahead (test/support/skewed-cluster.ts, as host-clock-skew.int.test.ts), once with the
 * measured host offset applied and once with FTVM_TEST_IGNORE_HOST_OFFSET=1.
 *
 * clocksources: the probe guest on clocksource=hpet and acpi_pm (tsc is the runs above): inplace
 * (with the rate fit) and none (the ledger's error), and failovers with outages of ~1.5, 3 and 6 s
 * (failoverRestoreOffset, ftvm's QEMU: the clock sections carry at most the machine's safe step,
 * the rest is stepped in place). vcpus2: the tsc guest with 2 vCPUs, inplace and the same
 * failovers. The tsc entries of `clocksources` are the inplace/none/failover sections' figures.
 *
 * FTVM_DRIFT_SECTIONS=none,inplace,agent,failover,skew,clocksources,vcpus2 (default all) picks what runs; a section
 * left out keeps its figures from the existing bench/results/drift.json. Plots: drift.png (all
 * runs) and drift-zoom.png (the corrected ones, ±ZOOM_MS).
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
import { failoverRestoreOffset, type FailoverRestoreResult } from '../test/support/failover-restore.js';
import type { ProbeClocksource } from '../test/support/probe-domain.js';
import { SKEW_MS, skewFailover, type SkewFailover } from '../test/support/skewed-cluster.js';
import { writeLinePlot, type Series } from './plot.js';
import { fitRate, type OffsetPoint, type RateFit } from './rate-fit.js';
import { round, summarize } from './stats.js';

const CHECKPOINTS = Number(process.env.FTVM_DRIFT_CHECKPOINTS ?? 300);
const INTERVAL_MS = Number(process.env.FTVM_DRIFT_INTERVAL_MS ?? 1000);
const SAMPLE_EVERY = Number(process.env.FTVM_DRIFT_SAMPLE_EVERY ?? 10);
const RATE_WINDOW_S = Number(process.env.FTVM_DRIFT_RATE_WINDOW_S ?? 60);
if (!(RATE_WINDOW_S >= 5)) throw new Error(`FTVM_DRIFT_RATE_WINDOW_S must be a number of seconds ≥ 5, got '${process.env.FTVM_DRIFT_RATE_WINDOW_S}'`);
const ALL_SECTIONS = ['none', 'inplace', 'agent', 'failover', 'skew', 'clocksources', 'vcpus2'] as const;
const FAILOVER_GAPS_MS = [1500, 3000, 6000];
type Section = (typeof ALL_SECTIONS)[number];
const SECTIONS = (process.env.FTVM_DRIFT_SECTIONS ?? ALL_SECTIONS.join(',')).split(',').map((s) => s.trim()).filter(Boolean);
for (const section of SECTIONS) {
  if (!(ALL_SECTIONS as readonly string[]).includes(section)) throw new Error(`FTVM_DRIFT_SECTIONS: unknown section '${section}' (${ALL_SECTIONS.join(', ')})`);
}
const selected = (section: Section) => SECTIONS.includes(section);
/** The zoomed panel's y range (± ms): a few ms, the 5 ms failover target inside, ticks every 2 ms. */
const ZOOM_MS = 6;
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
  /** inplace: the guest's own rate and the change with it removed. */
  rate?: { fit: RateFit; windowS: number; elapsedS: number; residualMs: number };
  series: { x: number; y: number }[];
  /** The series with the fitted rate removed (inplace). */
  seriesRateRemoved?: { x: number; y: number }[];
}

/** Guest − host offset about once a second for windowS seconds (the VM left alone meanwhile). */
async function sampleWindow(probe: Parameters<typeof clockOffset>[0], windowS: number, label: string): Promise<OffsetPoint[]> {
  const points: OffsetPoint[] = [];
  const end = performance.now() + windowS * 1000;
  while (performance.now() < end) {
    const began = performance.now();
    try {
      const o = await clockOffset(probe, { samples: 8, timeoutMs: 2_000 });
      points.push({ hostNs: o.hostRealtimeNs, offsetNs: o.offsetNs });
    } catch (error) {
      console.error(`${label}: rate sample lost: ${(error as Error).message}`);
    }
    await sleep(Math.max(0, 1000 - (performance.now() - began)));
  }
  if (points.length < 5) throw new Error(`${label}: only ${points.length} offset samples in ${windowS} s; the rate cannot be fitted`);
  return points;
}

function patchedQemu(): string | undefined {
  if (process.env.FTVM_QEMU_PATCHED) return process.env.FTVM_QEMU_PATCHED;
  const script = new URL('../packages/kvmclock/qemu/build.sh', import.meta.url);
  if (!fs.existsSync(script)) return undefined;
  return execFileSync('bash', [script.pathname], { encoding: 'utf8', timeout: 3_600_000, stdio: ['ignore', 'pipe', 'inherit'] }).trim().split('\n').pop();
}

interface RunOptions {
  rateWindowS?: number;
  clocksource?: ProbeClocksource;
  vcpus?: number;
}

async function run(name: ActuatorName, emulator: string | undefined, options: RunOptions = {}): Promise<RunResult> {
  const variant = [options.clocksource?.replace('_', ''), options.vcpus ? `${options.vcpus}cpu` : undefined].filter(Boolean).join('-');
  const vmName = `drift-${name}${variant ? `-${variant}` : ''}`;
  const storeInside = `/var/lib/libvirt/ftvm/${vmName}`;
  fs.rmSync(path.join(hostInfo('backup').libvirtLibDir, 'ftvm', vmName), { recursive: true, force: true });
  const vm = await startProbeVm({
    host: 'primary',
    name: vmName,
    ...(emulator ? { emulator } : {}),
    ...(options.clocksource ? { clocksource: options.clocksource } : {}),
    ...(options.vcpus ? { vcpus: options.vcpus } : {}),
  });
  const label = `${name}${variant ? ` (${variant})` : ''}`;
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
    const windowBefore = options.rateWindowS ? await sampleWindow(vm.probe, options.rateWindowS, `${label}: rate window before`) : undefined;
    if (windowBefore) console.error(`${label}: ${windowBefore.length} rate samples before the run`);
    const start = await clockOffset(vm.probe, { samples: 32 });
    const series = [{ x: 0, y: 0 }];
    const sampledAtNs = [start.hostRealtimeNs];
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
        console.error(`${label}: checkpoint ${epoch} failed: ${(error as Error).message}`);
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
        sampledAtNs.push(now.hostRealtimeNs);
        console.error(`${label}: ${epoch}/${CHECKPOINTS} offset change ${ms(now.offsetNs - start.offsetNs).toFixed(2)} ms, ledger predicts ${ms(-ledger.predictedLagNs).toFixed(2)} ms`);
      }
      await sleep(Math.max(0, INTERVAL_MS - (performance.now() - began)));
    }
    await sleep(500); // the last RESUME's ledger entry
    const end = await clockOffset(vm.probe, { samples: 32 });
    const changeNs = end.offsetNs - start.offsetNs;
    let rate: RunResult['rate'];
    let seriesRateRemoved: RunResult['seriesRateRemoved'];
    if (windowBefore && options.rateWindowS) {
      const windowAfter = await sampleWindow(vm.probe, options.rateWindowS, `${label}: rate window after`);
      const fit = fitRate([windowBefore, windowAfter]);
      const elapsedS = Number(end.hostRealtimeNs - start.hostRealtimeNs) / 1e9;
      // ppm × s = µs
      const residualMs = ms(changeNs) - (fit.ratePpm * elapsedS) / 1e3;
      rate = { fit, windowS: options.rateWindowS, elapsedS, residualMs };
      seriesRateRemoved = series.map((p, i) => ({ x: p.x, y: p.y - (fit.ratePpm * Number(sampledAtNs[i]! - start.hostRealtimeNs)) / 1e12 }));
      console.error(`${label}: guest rate ${fit.ratePpm.toFixed(2)} ± ${fit.stderrPpm.toFixed(2)} ppm (r² ${fit.r2.toFixed(3)}, n ${fit.n}), raw ${ms(changeNs).toFixed(3)} ms, rate removed ${residualMs.toFixed(3)} ms`);
    }
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
      ...(rate ? { rate } : {}),
      series,
      ...(seriesRateRemoved ? { seriesRateRemoved } : {}),
    };
  } finally {
    tracker.close();
    await checkpointer.close();
    receiver.sender.close();
    ssh.close();
    await vm.destroy();
  }
}

const resultFile = new URL('./results/drift.json', import.meta.url);
const previous: Record<string, unknown> = fs.existsSync(resultFile) ? JSON.parse(fs.readFileSync(resultFile, 'utf8')) : {};
const measuredAt = new Date().toISOString();
const probeSections = (['none', 'inplace', 'agent', 'failover'] as const).filter(selected);

await labUp();
const env = describeEnvironment();
const patched = selected('inplace') ? patchedQemu() : undefined;
// The instrument's own validated error: a known in-guest step measured back.
const validation = probeSections.length === 0
  ? previous['probe_validation']
  : await (async () => {
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
for (const name of (['none', 'inplace', 'agent'] as const).filter(selected)) {
  if (name === 'inplace' && !patched) {
    console.error('inplace: no patched QEMU available; skipped and reported as missing');
    continue;
  }
  runs.push(await run(name, name === 'inplace' ? patched : undefined, name === 'inplace' ? { rateWindowS: RATE_WINDOW_S } : {}));
}
const failover = selected('failover') ? await failoverRestoreOffset({ emulator: patchedQemu() }) : undefined;
const skew = selected('skew') ? await skewSection() : undefined;
const clocksources = selected('clocksources') ? await clocksourceSection() : undefined;
const vcpus2 = selected('vcpus2') ? await vcpusSection() : undefined;

const byName = (n: ActuatorName) => runs.find((r) => r.name === n);
/** A section measured now, or else as the existing drift.json has it. */
const keep = <T>(section: Section, measured: T) => (selected(section) ? measured : (previous[section] as T | undefined));
const inplaceRun = byName('inplace');
const result = {
  ...env,
  sections_measured: SECTIONS,
  probe_validation: validation,
  checkpoints_per_run: runs.length ? CHECKPOINTS : (previous['checkpoints_per_run'] ?? CHECKPOINTS),
  interval_ms: runs.length ? INTERVAL_MS : (previous['interval_ms'] ?? INTERVAL_MS),
  none: keep('none', byName('none') && { measured_at: measuredAt, final_offset_ms: byName('none')!.offsetChangeMs, ledger_error_ratio: byName('none')!.ledgerErrorRatio, ...runFigures(byName('none')!) }),
  inplace: keep(
    'inplace',
    inplaceRun
      ? {
          measured_at: measuredAt,
          final_offset_ms: inplaceRun.offsetChangeMs,
          added_pause_ms_p99: inplaceRun.correctionMs.p99,
          raw_offset_ms: inplaceRun.offsetChangeMs,
          ...(inplaceRun.rate
            ? {
                guest_rate_ppm: round(inplaceRun.rate.fit.ratePpm, 3),
                residual_ms: round(inplaceRun.rate.residualMs),
                rate_fit: {
                  r2: round(inplaceRun.rate.fit.r2, 4),
                  n: inplaceRun.rate.fit.n,
                  stderr_ppm: round(inplaceRun.rate.fit.stderrPpm, 3),
                  window_rates_ppm: inplaceRun.rate.fit.windowRatesPpm.map((r) => round(r, 3)),
                  window_s: inplaceRun.rate.windowS,
                  run_elapsed_s: round(inplaceRun.rate.elapsedS, 1),
                  step_ms: round(inplaceRun.rate.fit.stepMs),
                  note: 'guest − host offset sampled ~1/s for window_s before and after the checkpointed run (same boot, no checkpoints); one slope, one intercept per window. residual_ms = raw_offset_ms − rate × run_elapsed_s; step_ms is the same from the two fitted lines',
                },
              }
            : {}),
          ...runFigures(inplaceRun),
        }
      : { measured_at: measuredAt, missing: 'no patched QEMU' },
  ),
  agent: keep('agent', byName('agent') && { measured_at: measuredAt, final_offset_ms: byName('agent')!.offsetChangeMs, ...runFigures(byName('agent')!) }),
  failover: keep('failover', failover && { measured_at: measuredAt, offset_ms: failover.offsetMs, ...failover }),
  skew: keep('skew', skew),
  clocksources: keep('clocksources', clocksources),
  vcpus2: keep('vcpus2', vcpus2),
  targets: { inplace_offset_change_ms: 1, inplace_residual_ms: 1, inplace_added_pause_ms_p99: 1, failover_offset_ms: 5, none_ledger_error_ratio: 0.05, skew_failover_offset_ms: 5 },
};
// the tsc guest's entries are the main sections' runs (same guest, same build)
const mainTsc = (section: 'inplace' | 'none' | 'failover') => result[section] as Record<string, unknown> | undefined;
if (result.clocksources) {
  const cs = result.clocksources as Record<string, Record<string, unknown>>;
  const inplace = mainTsc('inplace');
  const none = mainTsc('none');
  cs['tsc'] = {
    note: 'the inplace, none and failover sections (clocksource=tsc, 1 vCPU); failover gaps from this section',
    inplace: inplace && { residual_ms: inplace['residual_ms'], raw_offset_ms: inplace['raw_offset_ms'], measured_at: inplace['measured_at'] },
    guest_rate_ppm: inplace?.['guest_rate_ppm'],
    none: none && { ledger_error_ratio: none['ledger_error_ratio'], final_offset_ms: none['final_offset_ms'], measured_at: none['measured_at'] },
    failover: cs['tsc']?.['failover'],
  };
}
fs.mkdirSync(new URL('./results/', import.meta.url), { recursive: true });
fs.writeFileSync(resultFile, `${JSON.stringify(result, null, 2)}\n`);
writePlots(result);
console.log(JSON.stringify(result, (key, value) => (key.startsWith('series') ? undefined : value), 2));

/** A run's figures for the JSON: everything but the rate details (reported above), series rounded. */
function runFigures(r: RunResult) {
  const { series, seriesRateRemoved, rate: _rate, ...rest } = r;
  const points = (s: { x: number; y: number }[]) => s.map((p) => ({ x: p.x, y: round(p.y, 4) }));
  return { ...rest, series: points(series), ...(seriesRateRemoved ? { series_rate_removed: points(seriesRateRemoved) } : {}) };
}

/** drift.png: every run on one scale; drift-zoom.png: the corrected ones at ±ZOOM_MS. */
function writePlots(figures: Record<string, unknown>): void {
  const out = new URL('./results/', import.meta.url);
  type Plotted = { offsetChangeMs?: number; series?: { x: number; y: number }[]; series_rate_removed?: { x: number; y: number }[]; residual_ms?: number };
  const section = (n: string) => figures[n] as Plotted | undefined;
  const line = (n: ActuatorName, color: string, label: string = n): Series[] => {
    const s = section(n);
    return s?.series && s.offsetChangeMs !== undefined ? [{ label: `${label} (${s.offsetChangeMs.toFixed(s.offsetChangeMs > 100 || s.offsetChangeMs < -100 ? 1 : 2)} ms)`, color, points: s.series }] : [];
  };
  const colors: Record<ActuatorName, string> = { none: '#d62728', inplace: '#2ca02c', agent: '#1f77b4' };
  const checkpoints = Number(figures['checkpoints_per_run']);
  writeLinePlot(new URL('drift.png', out).pathname, `Guest − host offset change over ${checkpoints} checkpoints (TCG, 256 MiB)`, 'checkpoint', 'offset change (ms)', (['none', 'inplace', 'agent'] as const).flatMap((n) => line(n, colors[n])));

  const inplace = section('inplace');
  const failoverMs = (figures['failover'] as { offset_ms?: number } | undefined)?.offset_ms;
  const zoomed: Series[] = [
    ...line('inplace', colors.inplace, 'inplace, raw'),
    ...(inplace?.series_rate_removed && inplace.residual_ms !== undefined
      ? [{ label: `inplace −rate (${inplace.residual_ms.toFixed(2)} ms)`, color: '#17becf', dash: '6 4', points: inplace.series_rate_removed }]
      : []),
    ...line('agent', colors.agent),
    // one line per clocksource (tsc is "inplace −rate" above) and the 2-vCPU guest, rate removed
    ...extraLines(figures),
    // one restore, not a series: a point at the run's end
    ...(failoverMs !== undefined ? [{ label: `failover (${failoverMs.toFixed(2)} ms)`, color: '#9467bd', marker: true, points: [{ x: checkpoints, y: failoverMs }] }] : []),
  ];
  writeLinePlot(new URL('drift-zoom.png', out).pathname, `Corrected offsets, ±${ZOOM_MS} ms (beyond it clipped; figures in the legend)`, 'checkpoint', 'offset change (ms)', zoomed, { yRange: [-ZOOM_MS, ZOOM_MS] });
}

/** The clocksource and 2-vCPU in-place runs for the zoomed plot (rate removed where fitted). */
function extraLines(figures: Record<string, unknown>): Series[] {
  type Inplace = { residual_ms?: number | null; raw_offset_ms?: number; series?: { x: number; y: number }[]; series_rate_removed?: { x: number; y: number }[] };
  const cs = figures['clocksources'] as Record<string, { inplace?: Inplace }> | undefined;
  const entries: Array<[string, Inplace | undefined, string]> = [
    ['hpet', cs?.['hpet']?.inplace, '#ff7f0e'],
    ['acpi_pm', cs?.['acpi_pm']?.inplace, '#8c564b'],
    ['2 vCPUs', (figures['vcpus2'] as { inplace?: Inplace } | undefined)?.inplace, '#e377c2'],
  ];
  return entries.flatMap(([name, inplace, color]) => {
    const points = inplace?.series_rate_removed ?? inplace?.series;
    if (!points) return [];
    const figure = inplace?.residual_ms ?? inplace?.raw_offset_ms;
    return [{ label: `${name}${inplace?.series_rate_removed ? ' −rate' : ''} (${figure?.toFixed(2)} ms)`, color, dash: '2 3', points }];
  });
}

/** A run's in-place figures for the clocksource and vCPU sections. */
function inplaceFigures(r: RunResult) {
  return {
    residual_ms: r.rate ? round(r.rate.residualMs) : null,
    raw_offset_ms: r.offsetChangeMs,
    guest_rate_ppm: r.rate ? round(r.rate.fit.ratePpm, 3) : null,
    rate_r2: r.rate ? round(r.rate.fit.r2, 4) : null,
    checkpoints: r.checkpoints,
    pause_ms: r.pauseMs,
    ledger_predicted_lag_ms: r.ledgerPredictedLagMs,
    series: r.series.map((p) => ({ x: p.x, y: round(p.y, 4) })),
    ...(r.seriesRateRemoved ? { series_rate_removed: r.seriesRateRemoved.map((p) => ({ x: p.x, y: round(p.y, 4) })) } : {}),
  };
}

/** Failovers with outages of ~1.5, 3 and 6 s; offset_ms is the largest |offset| of them (signed). */
async function failoverGaps(label: string, options: { clocksource?: ProbeClocksource; vcpus?: number }): Promise<Record<string, unknown>> {
  const runs: FailoverRestoreResult[] = [];
  const errors: string[] = [];
  for (const gapMs of FAILOVER_GAPS_MS) {
    try {
      const r = await failoverRestoreOffset({ name: `drift-fo-${label}`, gapMs, emulator: patchedQemu(), ...options });
      console.error(`${label} failover: outage ${r.gapMs} ms, first step ${r.firstStepMs} ms + ${r.inPlaceSteps} in place, offset ${r.offsetMs} ms`);
      runs.push(r);
    } catch (error) {
      errors.push(`${gapMs} ms: ${(error as Error).message}`);
      console.error(`${label} failover (${gapMs} ms) FAILED: ${(error as Error).message}`);
    }
  }
  const worst = runs.reduce<FailoverRestoreResult | undefined>((w, r) => (!w || Math.abs(r.offsetMs) > Math.abs(w.offsetMs) ? r : w), undefined);
  return {
    offset_ms: worst?.offsetMs ?? null,
    runs: runs.map((r) => ({ outage_ms: r.gapMs, offset_ms: r.offsetMs, first_step_ms: r.firstStepMs, in_place_steps: r.inPlaceSteps, in_place_ms: r.inPlaceMs, uncorrected_ms: r.uncorrectedMs, probe_error_ms: r.probeErrorMs, resume_late_ms: r.resumeLateMs })),
    errors,
  };
}

/** hpet and acpi_pm: inplace (rate fitted), none (ledger error), failovers; tsc's failovers. */
async function clocksourceSection(): Promise<Record<string, unknown>> {
  const out: Record<string, unknown> = { measured_at: measuredAt, failover_gaps_ms: FAILOVER_GAPS_MS };
  for (const clocksource of ['hpet', 'acpi_pm'] as const) {
    const inplace = await run('inplace', patchedQemu(), { rateWindowS: RATE_WINDOW_S, clocksource });
    const none = await run('none', undefined, { clocksource });
    out[clocksource] = {
      inplace: inplaceFigures(inplace),
      guest_rate_ppm: inplace.rate ? round(inplace.rate.fit.ratePpm, 3) : null,
      none: { ledger_error_ratio: none.ledgerErrorRatio, final_offset_ms: none.offsetChangeMs, ledger_predicted_lag_ms: none.ledgerPredictedLagMs },
      failover: await failoverGaps(clocksource.replace('_', ''), { clocksource }),
    };
  }
  out['tsc'] = { failover: await failoverGaps('tsc', { clocksource: 'tsc' }) };
  return out;
}

/** The tsc guest with 2 vCPUs: inplace (rate fitted) and failovers. */
async function vcpusSection(): Promise<Record<string, unknown>> {
  const inplace = await run('inplace', patchedQemu(), { rateWindowS: RATE_WINDOW_S, vcpus: 2 });
  return { measured_at: measuredAt, vcpus: 2, clocksource: 'tsc', inplace: inplaceFigures(inplace), failover: await failoverGaps('2cpu', { vcpus: 2 }) };
}

/** Failover by kill onto a backup whose agent clock runs SKEW_MS ahead, with and without the measure. */
async function skewSection(): Promise<Record<string, unknown>> {
  const errors: string[] = [];
  const attempt = async (measure: boolean): Promise<SkewFailover | undefined> => {
    try {
      const r = await skewFailover(measure, (line) => console.error(`skew: ${line}`));
      console.error(`skew (${measure ? 'measure applied' : 'measure ignored'}): offset ${r.run.offsetMs} ms, host offset ${JSON.stringify(r.hostOffset)}`);
      return r;
    } catch (error) {
      errors.push(`${measure ? 'measured' : 'without measure'}: ${(error as Error).message}`);
      console.error(`skew (${measure ? 'measure applied' : 'measure ignored'}) FAILED: ${(error as Error).message}`);
      return undefined;
    }
  };
  const measured = await attempt(true);
  const ignored = await attempt(false);
  const figures = (r: SkewFailover | undefined) =>
    r && {
      host_offset_measured_ms: r.fromBackup.offsetMs,
      host_offset_error_ms: r.fromBackup.errorMs,
      take_over_clock: r.hostOffset ?? null,
      failover_s: r.run.failoverS ?? null,
      offset_ms: r.run.offsetMs,
      probe_error_ms: r.run.probeErrorMs,
      same_boot: r.run.sameBoot,
      continuity_ok: r.run.continuityOk,
    };
  return {
    measured_at: measuredAt,
    injected_ms: SKEW_MS,
    failover_offset_ms: measured?.run.offsetMs ?? null,
    failover_offset_ms_without_measure: ignored?.run.offsetMs ?? null,
    measured: figures(measured) ?? null,
    without_measure: figures(ignored) ?? null,
    note: "backup agent's realtime SKEW_MS ahead (FTVM_TEST_REALTIME_SKEW_MS), failover by kill onto it; offset = guest − host after the take-over minus before the kill, host = the lab's one kernel clock; without_measure: FTVM_TEST_IGNORE_HOST_OFFSET=1 on the backup",
    errors,
  };
}
