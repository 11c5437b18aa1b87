// Runs in a worker thread (see stream-fuzz.ts) so that the test can kill it if a parse ever hangs.
// For each run it splits, truncates or corrupts the stream, parses it, checks the properties and
// reports one message per run (the heartbeat the watchdog waits for).

import { parentPort, workerData } from 'node:worker_threads';
import { MigrationStreamError, MigrationStreamParser, encodeRecords, type MigrationRecord } from '../src/stream/index.js';
import { digestRecords } from './stream-digest.js';

export type FuzzMode = 'split' | 'truncate' | 'corrupt';

export interface FuzzJob {
  stream: Uint8Array;
  mode: FuzzMode;
  runs: number;
  seed: number;
}

export interface FuzzRunReport {
  run: number;
  /** What was done to the stream (for reproducing a failure). */
  what: string;
  outcome: string;
  failure?: string;
  ms: number;
}

/** mulberry32: small, seedable. */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function int(r: () => number, lo: number, hi: number): number {
  return lo + Math.floor(r() * (hi - lo + 1));
}

type Outcome =
  | { kind: 'ok'; records: MigrationRecord[] }
  | { kind: 'stream-error'; code: string; offset: number; message: string }
  | { kind: 'other-error'; message: string };

function parse(buf: Buffer, chunkSize: (() => number) | undefined): Outcome {
  const records: MigrationRecord[] = [];
  const add = (r: MigrationRecord): void => {
    records.push(r);
  };
  const parser = new MigrationStreamParser();
  try {
    if (!chunkSize) parser.push(buf, add);
    else for (let p = 0; p < buf.length; ) {
      const n = Math.max(1, chunkSize());
      parser.push(buf.subarray(p, p + n), add);
      p += n;
    }
    parser.end(add);
    return { kind: 'ok', records };
  } catch (e) {
    if (e instanceof MigrationStreamError) {
      if (!Number.isSafeInteger(e.offset) || e.offset < 0 || e.offset > buf.length) {
        return { kind: 'other-error', message: `MigrationStreamError with offset ${e.offset} outside the ${buf.length}-byte input: ${e.message}` };
      }
      return { kind: 'stream-error', code: e.code, offset: e.offset, message: e.message };
    }
    return { kind: 'other-error', message: (e as Error)?.stack ?? String(e) };
  }
}

function summary(o: Outcome): string {
  return o.kind === 'ok' ? `ok ${o.records.length} records` : o.kind === 'stream-error' ? `${o.code}@${o.offset}` : `OTHER ${o.message}`;
}

/** A chunk-size generator: 1-byte chunks, small, page-ish, large, or log-uniform mixes. */
function chunker(r: () => number, run: number): { name: string; next: () => number } {
  const kind = run === 0 ? 0 : int(r, 1, 4);
  switch (kind) {
    case 0:
      return { name: '1-byte', next: () => 1 };
    case 1:
      return { name: '1..16', next: () => int(r, 1, 16) };
    case 2:
      return { name: '1..8192', next: () => int(r, 1, 8192) };
    case 3:
      return { name: '1..262144', next: () => int(r, 1, 262144) };
    default:
      return { name: 'log-uniform', next: () => Math.floor(2 ** (r() * 18)) };
  }
}

function runJob(job: FuzzJob): void {
  const stream = Buffer.from(job.stream.buffer, job.stream.byteOffset, job.stream.length);
  const baseline = parse(stream, undefined);
  if (job.mode === 'split' && baseline.kind !== 'ok') throw new Error(`baseline parse failed: ${summary(baseline)}`);
  const baseDigest = baseline.kind === 'ok' ? digestRecords(baseline.records) : '';
  const r = rng(job.seed);
  for (let run = 0; run < job.runs; run++) {
    const t0 = performance.now();
    let what = '';
    let failure: string | undefined;
    let outcome: Outcome;
    if (job.mode === 'split') {
      const c = chunker(r, run);
      what = `split ${c.name}`;
      outcome = parse(stream, c.next);
      if (outcome.kind !== 'ok') failure = `split parse failed: ${summary(outcome)}`;
      else if (digestRecords(outcome.records) !== baseDigest) failure = 'records differ from the unsplit parse';
      else if (!encodeRecords(outcome.records).equals(stream)) failure = 're-encoded records differ from the stream';
    } else {
      let input: Buffer;
      if (job.mode === 'truncate') {
        // A few fixed cuts (inside the header, right after it), then random ones.
        const fixed = [0, 1, 3, 4, 7, 8, 9, stream.length - 1];
        const cut = run < fixed.length ? fixed[run]! : int(r, 0, stream.length - 1);
        what = `truncate at ${cut}`;
        input = stream.subarray(0, cut);
      } else {
        input = Buffer.from(stream);
        const flips: string[] = [];
        const n = int(r, 1, 4);
        for (let i = 0; i < n; i++) {
          // Half the flips land in the structured parts (start, device state, description).
          const at = r() < 0.5 ? int(r, 0, input.length - 1) : r() < 0.3 ? int(r, 0, Math.min(400, input.length - 1)) : int(r, Math.floor(input.length * 0.8), input.length - 1);
          const x = int(r, 1, 255);
          input[at] = input[at]! ^ x;
          flips.push(`${at}^${x}`);
        }
        what = `corrupt ${flips.join(',')}`;
      }
      outcome = parse(input, undefined);
      const chunked = parse(input, chunker(r, run + 1).next);
      if (outcome.kind === 'other-error') failure = `not a MigrationStreamError: ${outcome.message}`;
      else if (chunked.kind === 'other-error') failure = `chunked: not a MigrationStreamError: ${chunked.message}`;
      else if (summary(outcome) !== summary(chunked)) failure = `whole parse gave ${summary(outcome)}, chunked parse ${summary(chunked)}`;
      else if (outcome.kind === 'ok' && !encodeRecords(outcome.records).equals(input)) failure = 'valid parse does not re-encode to its input';
    }
    const report: FuzzRunReport = { run, what, outcome: summary(outcome), ms: performance.now() - t0, ...(failure ? { failure } : {}) };
    parentPort!.postMessage(report);
  }
}

if (parentPort && workerData) {
  runJob(workerData as FuzzJob);
  parentPort.postMessage('done');
}
