// The heavy half of a store compaction: read a chain (verified), rewrite it as one full stream
// into a temporary file, fsync it and check it. It runs in a child process (bin/ftvm-compact.ts)
// at the lowest CPU priority, and it pauses (briefly) while the store commits a checkpoint: on the
// receiver's event loop its ~2 s of CPU and ~270 MB of reads slowed 100 ms intervals to 150–280 ms
// whenever a compaction ran, and even niced it still did (2 gaps over 200 ms a minute; none
// without compaction; bench/results/HISTORY.md). The store keeps the switch and the prune.
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { sameBlocks, type CheckpointLayout } from '../stream/chain.js';
import { CheckpointChainCompactor } from '../stream/compact.js';
import { createStreamVerifier } from '../stream/verifier.js';
import { CheckpointStoreError, type CheckpointStoreErrorCode } from './errors.js';
import type { CheckpointMetadata } from './metadata.js';
import { WriteBehind } from './write-behind.js';

const HASH_SLICE_BYTES = 4 * 1024 * 1024;

/** What a compaction wrote: the new file's checksum, size and layout (K's metadata takes them). */
export interface CompactedData {
  dataSha256: string;
  bytes: number;
  layout: CheckpointLayout;
}

/** One compaction: the chain (a full checkpoint first, K last) in `dir`, rewritten into `tmp`. */
export interface CompactionJob {
  dir: string;
  chain: CheckpointMetadata[];
  tmp: string;
}

/** Errors that say a file of a chain vanished while it was read (another process compacted or pruned): worth one re-read. */
const vanishedErrors = new WeakSet<Error>();

/** Marks an error as "a file vanished under the reader". */
export function vanished(error: CheckpointStoreError): CheckpointStoreError {
  vanishedErrors.add(error);
  return error;
}

export function isVanished(error: unknown): boolean {
  return error instanceof Error && vanishedErrors.has(error);
}

/** Where the data of the checkpoint `meta` describes is: its compacted file, if it has one. */
export function dataFileIn(dir: string, meta: CheckpointMetadata): string {
  return path.join(dir, meta.dataFile ?? `${meta.epoch}.ckpt`);
}

/**
 * A checkpoint's data, checked against its metadata's size and checksum. Hashed in slices: a
 * backup agent does this at failover and must go on answering its lease keepalives meanwhile.
 */
export async function readVerifiedData(dir: string, meta: CheckpointMetadata, turn: () => Promise<void> = nextTurn): Promise<Buffer> {
  const file = dataFileIn(dir, meta);
  const expected = meta.dataSha256 ?? meta.sha256;
  const hash = createHash('sha256');
  let data: Buffer;
  try {
    const handle = await fs.open(file, 'r');
    try {
      // read and hashed in slices, the size fstat gives (a longer file fails the size check)
      data = Buffer.allocUnsafe((await handle.stat()).size);
      let length = 0;
      while (length < data.length) {
        const { bytesRead } = await handle.read(data, length, Math.min(HASH_SLICE_BYTES, data.length - length), length);
        if (bytesRead === 0) break;
        hash.update(data.subarray(length, length + bytesRead));
        length += bytesRead;
        await turn();
      }
      data = data.subarray(0, length);
    } finally {
      await handle.close();
    }
  } catch (error) {
    const unreadable = new CheckpointStoreError(`checkpoint ${meta.epoch} data unreadable: ${(error as Error).message}`, 'corrupt', meta.epoch);
    throw (error as NodeJS.ErrnoException).code === 'ENOENT' ? vanished(unreadable) : unreadable;
  }
  const sha256 = hash.digest('hex');
  if (data.length !== meta.bytes || sha256 !== expected) {
    throw new CheckpointStoreError(
      `checkpoint ${meta.epoch} is corrupt: ${data.length} bytes sha256 ${sha256.slice(0, 12)}…, ${meta.dataFile === undefined ? 'committed' : 'compacted to'} ${meta.bytes} bytes ${expected.slice(0, 12)}…`,
      'corrupt',
      meta.epoch,
      file,
    );
  }
  return data;
}

/**
 * Writes the chain compacted into `tmp` (fsync'd) and checks it is a full stream of the chain's
 * RAM blocks. Every failure is a CheckpointStoreError on K (the codec's: `verify`). `turn` is
 * awaited between slices of work (a few MiB each): the worker's pauses wait there.
 */
export async function writeCompactedChain({ dir, chain, tmp }: CompactionJob, turn: () => Promise<void> = nextTurn): Promise<CompactedData> {
  const head = chain.at(-1)!;
  try {
    const data: Buffer[] = [];
    for (const link of chain) data.push(await readVerifiedData(dir, link, turn)); // never launder a rotten chain into a new checksum
    const compactor = new CheckpointChainCompactor(data, chain.map((m) => m.layout!));
    for (const _ of compactor.index()) await turn();
    const verifier = createStreamVerifier();
    const hash = createHash('sha256');
    const file = await fs.open(tmp, 'wx');
    try {
      // small write-backs: a commit's fsync never queues behind much of this file
      const writer = new WriteBehind(file, { syncEveryBytes: 4 * 1024 * 1024 });
      try {
        for (const chunk of compactor.chunks()) {
          hash.update(chunk);
          verifier.update(chunk);
          await writer.write(chunk);
          await turn();
        }
        await writer.finish();
      } finally {
        await writer.settled();
      }
    } finally {
      await file.close();
    }
    const summary = verifier.end();
    const layout = compactor.layout;
    if (!summary.fullRam || !sameBlocks(summary.ramBlocks, head.ramBlocks) || summary.bytes !== compactor.bytes || !sameLayout(summary.layout, layout)) {
      throw new CheckpointStoreError(`checkpoint ${head.epoch}'s compacted stream is not a full stream of its RAM blocks`, 'verify', head.epoch, tmp);
    }
    return { dataSha256: hash.digest('hex'), bytes: summary.bytes, layout };
  } catch (error) {
    if (error instanceof CheckpointStoreError) throw error;
    if (isFsError(error)) throw CheckpointStoreError.fromFs(error, `compact checkpoint ${head.epoch} in ${dir}`, head.epoch);
    throw new CheckpointStoreError(`checkpoint ${head.epoch} cannot be compacted: ${(error as Error).message}`, 'verify', head.epoch);
  }
}

// The compiled worker, whether this module runs from src/ (tests) or dist/ (both are two deep).
const WORKER = fileURLToPath(new URL('../../dist/bin/ftvm-compact.js', import.meta.url));

/** What the worker writes on stdout: one JSON line. */
export type CompactionReply = { ok: true; result: CompactedData } | { ok: false; error: { message: string; code: CheckpointStoreErrorCode; epoch?: number; path?: string } };

export function replyOf(outcome: { result: CompactedData } | { error: unknown }): CompactionReply {
  if ('result' in outcome) return { ok: true, result: outcome.result };
  const error = outcome.error instanceof CheckpointStoreError ? outcome.error : new CheckpointStoreError(String((outcome.error as Error)?.message ?? outcome.error), 'io');
  return { ok: false, error: { message: error.message, code: error.code, ...(error.epoch === undefined ? {} : { epoch: error.epoch }), ...(error.path === undefined ? {} : { path: error.path }) } };
}

/**
 * The worker's pause: `passed()` waits while paused, until resume() or MAX_PAUSE_MS after the
 * pause, whichever comes first. Bounded, because a long commit (a full checkpoint, heavy
 * dirtying) must not starve the compaction: the chain, and a failover's read of it, would grow
 * without bound (2 GB and a 4.8 s read under 100 MiB/s dirtying with unbounded pauses).
 */
export class PauseGate {
  static readonly MAX_PAUSE_MS = 100;
  private pausedAt: number | undefined;
  private waiting: (() => void)[] = [];

  constructor(private readonly now: () => number = () => performance.now()) {}

  private hurried = false;

  pause(): void {
    if (!this.hurried) this.pausedAt ??= this.now();
  }

  /** From now on pauses are ignored. */
  hurry(): void {
    this.hurried = true;
    this.resume();
  }

  resume(): void {
    this.pausedAt = undefined;
    for (const go of this.waiting.splice(0)) go();
  }

  async passed(): Promise<void> {
    if (this.pausedAt === undefined) return;
    const leftMs = this.pausedAt + PauseGate.MAX_PAUSE_MS - this.now();
    if (leftMs <= 0) return;
    let timer: NodeJS.Timeout | undefined;
    await new Promise<void>((resolve) => {
      this.waiting.push(resolve);
      timer = setTimeout(resolve, leftMs);
    });
    clearTimeout(timer);
  }
}

/** A compaction running in a child process. */
export interface CompactionProcess {
  /** Its outcome; rejects with a CheckpointStoreError (also at the deadline, which kills it). */
  readonly done: Promise<CompactedData>;
  /** It stops at its next slice until resume() or for 100 ms, whichever comes first (each pause() needs its resume()). */
  pause(): void;
  resume(): void;
  /** It is behind: from now on it runs at normal priority and ignores pauses. */
  hurry(): void;
}

/**
 * Runs writeCompactedChain in a child process at the lowest CPU priority (`nice -n 19` for its
 * threads, and its own autogroup niced too), killed at the deadline. The child ends itself when
 * this process goes (its stdin closes).
 */
export function compactInChildProcess(job: CompactionJob, timeoutMs: number): CompactionProcess {
  const epoch = job.chain.at(-1)?.epoch;
  // its own session (detached: setsid), so its own autogroup, which it then nices: with
  // autogroups on, a nice value only counts among threads of the same autogroup
  const child = spawn('nice', ['-n', '19', process.execPath, WORKER], { stdio: ['pipe', 'pipe', 'pipe'], detached: true });
  let pauses = 0;
  let hurried = false;
  const send = (line: string) => {
    if (child.stdin.writable) child.stdin.write(`${line}\n`);
  };
  const done = new Promise<CompactedData>((resolve, reject) => {
    let stdout = '';
    let stderr = '';
    let settled = false;
    const finish = (outcome: { result: CompactedData } | { error: CheckpointStoreError }) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      if ('result' in outcome) resolve(outcome.result);
      else reject(outcome.error);
    };
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      finish({ error: new CheckpointStoreError(`checkpoint ${epoch}'s compaction took longer than ${timeoutMs} ms (killed)`, 'io', epoch) });
    }, timeoutMs);
    child.stdout.setEncoding('utf8').on('data', (text: string) => (stdout += text));
    child.stderr.setEncoding('utf8').on('data', (text: string) => (stderr = (stderr + text).slice(-2048)));
    child.stdin.on('error', () => undefined); // (a child that died early: its exit says why)
    child.on('error', (error) => finish({ error: CheckpointStoreError.fromFs(error, `start the compaction of checkpoint ${epoch} (${WORKER})`, epoch) }));
    child.on('close', (code, signal) => {
      let reply: CompactionReply | undefined;
      try {
        reply = JSON.parse(stdout) as CompactionReply;
      } catch {
        reply = undefined;
      }
      if (reply?.ok) return finish({ result: reply.result });
      if (reply) return finish({ error: new CheckpointStoreError(reply.error.message, reply.error.code, reply.error.epoch, reply.error.path) });
      const how = signal ? `was killed by ${signal}` : `exited with ${code}`;
      finish({ error: new CheckpointStoreError(`checkpoint ${epoch}'s compaction ${how}${stderr.trim() ? `: ${stderr.trim()}` : ''}`, 'io', epoch) });
    });
  });
  send(JSON.stringify(job));
  return {
    done,
    pause: () => {
      if (pauses++ === 0) send('pause');
    },
    resume: () => {
      if (pauses > 0 && --pauses === 0) send('resume');
    },
    hurry: () => {
      if (!hurried) send('hurry');
      hurried = true;
    },
  };
}

/** Lets the event loop run between slices of a long computation. */
function nextTurn(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

function sameLayout(a: CheckpointLayout | undefined, b: CheckpointLayout): boolean {
  return a !== undefined && a.ramSectionId === b.ramSectionId && a.preambleEnd === b.preambleEnd && a.ramSetupEnd === b.ramSetupEnd && a.deviceStateStart === b.deviceStateStart;
}

/** A system call's error (ENOSPC, EIO…), not the codec's (whose codes are words like BAD_PAGE). */
function isFsError(error: unknown): boolean {
  const { code, syscall } = error as NodeJS.ErrnoException;
  return typeof syscall === 'string' || /^E[A-Z0-9]+$/.test(String(code));
}
