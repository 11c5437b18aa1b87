// Runs stream-fuzz-worker.ts in a worker thread with a watchdog: if one run takes longer than
// `perRunTimeoutMs` the worker is terminated and the run reported as hung — a synchronous parser
// loop cannot be bounded any other way.

import { createRequire } from 'node:module';
import { pathToFileURL } from 'node:url';
import { Worker } from 'node:worker_threads';
import type { FuzzJob, FuzzRunReport } from './stream-fuzz-worker.js';

export interface FuzzResult {
  reports: FuzzRunReport[];
  failures: FuzzRunReport[];
  /** Outcome counts, e.g. { 'ok': 12, 'TRUNCATED': 80 }. */
  outcomes: Record<string, number>;
}

const workerUrl = new URL('./stream-fuzz-worker.ts', import.meta.url).href;
// tsx's ESM API entry (its exports map: import -> index.mjs, require -> index.cjs).
const tsxApi = pathToFileURL(createRequire(import.meta.url).resolve('tsx/esm/api').replace(/\.cjs$/, '.mjs')).href;

export function runFuzz(job: FuzzJob, perRunTimeoutMs = 10_000): Promise<FuzzResult> {
  // The worker loads the TypeScript sources through tsx (vitest's transform does not reach workers).
  const code = `import(${JSON.stringify(tsxApi)}).then((m) => m.tsImport(${JSON.stringify(workerUrl)}, ${JSON.stringify(workerUrl)}))`;
  const worker = new Worker(code, { eval: true, workerData: job });
  const reports: FuzzRunReport[] = [];
  return new Promise<FuzzResult>((resolve, reject) => {
    let timer: NodeJS.Timeout;
    const arm = (): void => {
      clearTimeout(timer);
      timer = setTimeout(() => {
        void worker.terminate();
        reject(new Error(`fuzz run ${reports.length} (${job.mode}, seed ${job.seed}) did not finish within ${perRunTimeoutMs} ms: the parser hangs`));
      }, perRunTimeoutMs + (reports.length === 0 ? 20_000 : 0)); // the first run includes loading tsx
    };
    arm();
    worker.on('message', (m: FuzzRunReport | 'done') => {
      if (m === 'done') {
        clearTimeout(timer);
        void worker.terminate();
        const outcomes: Record<string, number> = {};
        for (const r of reports) {
          const key = r.outcome.startsWith('ok') ? 'ok' : r.outcome.split('@')[0]!;
          outcomes[key] = (outcomes[key] ?? 0) + 1;
        }
        resolve({ reports, failures: reports.filter((r) => r.failure), outcomes });
        return;
      }
      reports.push(m);
      arm();
    });
    worker.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    worker.on('exit', (code) => {
      clearTimeout(timer);
      if (code !== 0) reject(new Error(`fuzz worker exited with code ${code}`));
    });
  });
}
