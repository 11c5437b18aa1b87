/**
 * Test-only pause points, so a fault-injection harness can strike at a precise moment of a
 * checkpoint (bench/disk-faults.ts, test/failover/disk-faults.int.test.ts). Unset, a pause point
 * costs one environment lookup. The agent uses it too (exported from @ftvm/transport).
 *
 * - `FTVM_TEST_PAUSE_AT=<point>[,<point>…]` pauses every time a named point is reached — each is
 *   reached once per checkpoint — for `FTVM_TEST_PAUSE_MS` (default 5000).
 * - `FTVM_TEST_PAUSE_AT=@<file>` reads the points from <file> each time one is reached (lines of
 *   `<point> [ms]`; a missing or empty file: none), so a harness arms and disarms them in running
 *   processes on every lab host (the file system outside /run and /var/lib/libvirt is shared).
 *   Each pause is also appended to `<file>.hits` as a JSON line.
 *
 * Every pause writes a JSON line with `"msg":"test pause point <point>"` to stderr (the agent's
 * output file; for ftvm-receive, the primary agent's channel). The sleep is a timer: the process
 * goes on serving everything else (lease, heartbeats, health checks) meanwhile.
 */
import { appendFileSync, readFileSync } from 'node:fs';

export type TestPausePoint = 'delta-read' | 'before-disk-frames' | 'before-meta-rename' | 'after-meta-rename' | 'mid-apply';

const ENV = 'FTVM_TEST_PAUSE_AT';
const DEFAULT_MS = 5000;

/** Pauses here if a harness armed `point` (see above); `detail` (epoch, …) goes into the log line. */
export async function testPausePoint(point: TestPausePoint, detail: Record<string, unknown> = {}): Promise<void> {
  const spec = process.env[ENV];
  if (!spec) return;
  const armed = armedMs(spec, point);
  if (armed === undefined) return;
  const line = JSON.stringify({ msg: `test pause point ${point}`, point, ms: armed, pid: process.pid, at: Date.now(), ...detail });
  process.stderr.write(`${line}\n`);
  if (spec.startsWith('@')) {
    try {
      appendFileSync(`${spec.slice(1)}.hits`, `${line}\n`);
    } catch {
      // the harness's directory is gone: pause anyway
    }
  }
  await new Promise((resolve) => setTimeout(resolve, armed));
}

/** `items` with a pause point after the first one (none when no pause can be armed). */
export function pauseAfterFirst<T>(items: AsyncIterable<T>, point: TestPausePoint, detail?: Record<string, unknown>): AsyncIterable<T> {
  if (!process.env[ENV]) return items;
  return (async function* () {
    let first = true;
    for await (const item of items) {
      yield item;
      if (first) await testPausePoint(point, detail);
      first = false;
    }
  })();
}

function armedMs(spec: string, point: string): number | undefined {
  const fallback = Number(process.env['FTVM_TEST_PAUSE_MS'] ?? DEFAULT_MS);
  let lines: string[];
  if (spec.startsWith('@')) {
    try {
      lines = readFileSync(spec.slice(1), 'utf8').split('\n');
    } catch {
      return undefined;
    }
  } else {
    lines = spec.split(',');
  }
  for (const line of lines) {
    const [name, ms] = line.trim().split(/\s+/);
    if (name !== point) continue;
    const value = ms === undefined ? fallback : Number(ms);
    return Number.isFinite(value) && value >= 0 ? value : DEFAULT_MS;
  }
  return undefined;
}
