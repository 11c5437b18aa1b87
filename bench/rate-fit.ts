/**
 * The guest clock's free-running rate against the host's, from guest − host offsets sampled in
 * windows without checkpoints: least squares with one slope shared by all windows and one
 * intercept per window, so a correction's step between windows is not read as rate.
 */
export interface OffsetPoint {
  /** Host CLOCK_REALTIME of the sample (ns). */
  hostNs: bigint;
  /** Guest − host offset (ns). */
  offsetNs: bigint;
}

export interface RateFit {
  /** Guest rate − host rate, parts per million (positive: the guest clock runs fast). */
  ratePpm: number;
  /** Standard error of ratePpm. */
  stderrPpm: number;
  /** Share of the within-window offset variance the slope explains (near 0 when the rate is ~0). */
  r2: number;
  n: number;
  /** Each window's own slope (ppm), to see that the rate held. */
  windowRatesPpm: number[];
  /**
   * Offset step from the first window's line to the last's (ms): the change between the windows
   * with the rate removed, from all samples.
   */
  stepMs: number;
}

export function fitRate(windows: OffsetPoint[][]): RateFit {
  const used = windows.filter((w) => w.length >= 2);
  if (used.length === 0) throw new Error('fitRate: no window with 2 or more samples');
  const t0 = used[0]![0]!.hostNs;
  // seconds and ms keep the sums well inside double precision
  const prepared = used.map((w) => {
    const t = w.map((p) => Number(p.hostNs - t0) / 1e9);
    const y = w.map((p) => Number(p.offsetNs) / 1e6);
    const tMean = t.reduce((a, b) => a + b, 0) / t.length;
    const yMean = y.reduce((a, b) => a + b, 0) / y.length;
    const sxx = t.reduce((a, ti) => a + (ti - tMean) ** 2, 0);
    const sxy = t.reduce((a, ti, i) => a + (ti - tMean) * (y[i]! - yMean), 0);
    return { t, y, tMean, yMean, sxx, sxy };
  });
  const sxx = prepared.reduce((a, w) => a + w.sxx, 0);
  if (sxx === 0) throw new Error('fitRate: the samples of each window share one host time');
  const slope = prepared.reduce((a, w) => a + w.sxy, 0) / sxx; // ms per s
  let ssRes = 0;
  let ssTot = 0;
  for (const w of prepared) {
    w.t.forEach((ti, i) => {
      const dy = w.y[i]! - w.yMean;
      ssTot += dy ** 2;
      ssRes += (dy - slope * (ti - w.tMean)) ** 2;
    });
  }
  const n = prepared.reduce((a, w) => a + w.t.length, 0);
  const dof = n - prepared.length - 1;
  const intercept = (w: (typeof prepared)[number]) => w.yMean - slope * w.tMean;
  return {
    ratePpm: slope * 1e3, // 1 ms/s = 1000 ppm
    stderrPpm: dof > 0 ? Math.sqrt(ssRes / dof / sxx) * 1e3 : Number.NaN,
    r2: ssTot > 0 ? 1 - ssRes / ssTot : Number.NaN,
    n,
    windowRatesPpm: prepared.map((w) => (w.sxx > 0 ? (w.sxy / w.sxx) * 1e3 : Number.NaN)),
    stepMs: intercept(prepared.at(-1)!) - intercept(prepared[0]!),
  };
}
