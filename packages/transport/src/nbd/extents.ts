// Walking an export with NBD_CMD_BLOCK_STATUS and reading what the walk selects: the dirty extents
// of a QEMU dirty bitmap (a checkpoint's disk delta), the allocated extents (a seed), and pipelined
// reads of either, yielded in order.

import { AllocationFlag, BASE_ALLOCATION, DIRTY_FLAG } from './constants.js';
import type { NbdExtent } from './codec.js';
import type { NbdClient } from './client.js';
import { NbdError } from './errors.js';

/** A range of the export selected by a walk; `zero`: it reads as zeros (no data needs to travel). */
export interface DiskRange {
  offset: number;
  length: number;
  zero: boolean;
}

/** A range with its bytes; no `data` means the range reads as zeros. */
export interface ReadExtent {
  offset: number;
  length: number;
  data?: Buffer;
}

export const DEFAULT_MAX_EXTENT = 4 * 1024 * 1024;
/** Block status request size: 2 GiB keeps the 32-bit length aligned to any block size. */
const STATUS_REQUEST = 0x8000_0000;

export interface WalkOptions {
  /** Largest range yielded (larger runs are split). Default 4 MiB. */
  maxLength?: number;
  /** Bytes asked for per NBD_CMD_BLOCK_STATUS (the server may answer for less). Default 2 GiB. */
  statusRequestLength?: number;
}

/** A stretch of the export where every context's flags are constant. */
export interface StatusSegment {
  offset: number;
  length: number;
  /** Flags per context, in the order the context ids were given. */
  flags: number[];
}

/**
 * Intersects one block status reply over [offset, end): segments where the flags of every context
 * are constant, up to where the shortest context's extents end (what lies beyond is unknown for
 * that context and asked again). Pure; the last extent may reach past `end` and is clipped.
 */
export function intersectStatus(offset: number, end: number, lists: readonly (readonly NbdExtent[])[]): StatusSegment[] {
  const covered = lists.map((l) => Math.min(end, l.reduce((s, e) => s + e.length, offset)));
  const limit = Math.min(...covered);
  const idx = lists.map(() => 0);
  const extentEnd = lists.map((l) => offset + (l[0]?.length ?? 0));
  const out: StatusSegment[] = [];
  for (let at = offset; at < limit; ) {
    let next = limit;
    const flags: number[] = [];
    lists.forEach((list, i) => {
      let k = idx[i]!;
      let e = extentEnd[i]!;
      while (e <= at) e += list[++k]!.length;
      idx[i] = k;
      extentEnd[i] = e;
      next = Math.min(next, e);
      flags.push(list[k]!.flags);
    });
    out.push({ offset: at, length: next - at, flags });
    at = next;
  }
  return out;
}

/** Walks the whole export, yielding constant-flag segments for the given contexts, in order. */
export async function* walkStatus(client: NbdClient, contextIds: readonly number[], options: WalkOptions = {}): AsyncGenerator<StatusSegment> {
  const step = options.statusRequestLength ?? STATUS_REQUEST;
  for (let offset = 0; offset < client.size; ) {
    const end = offset + Math.min(step, client.size - offset);
    const status = await client.blockStatus(offset, end - offset);
    const segments = intersectStatus(
      offset,
      end,
      contextIds.map((id) => status.get(id)!),
    );
    // Every extent has a length ≥ 1 (the codec checks), so each reply moves the walk forward.
    for (const s of segments) yield s;
    offset = segments.length > 0 ? segments[segments.length - 1]!.offset + segments[segments.length - 1]!.length : end;
  }
}

/**
 * Joins adjacent ranges of the same kind and cuts runs into pieces of at most `maxLength`.
 * Pure state machine: add() and flush() return what is complete.
 */
export class ExtentCoalescer {
  private run: DiskRange | undefined;
  constructor(readonly maxLength: number = DEFAULT_MAX_EXTENT) {
    if (!Number.isSafeInteger(maxLength) || maxLength <= 0) throw new RangeError(`maxLength ${maxLength} must be a positive integer`);
  }

  add(offset: number, length: number, zero: boolean): DiskRange[] {
    const out: DiskRange[] = [];
    const run = this.run;
    if (run && run.offset + run.length === offset && run.zero === zero) run.length += length;
    else {
      if (run) out.push(run);
      this.run = { offset, length, zero };
    }
    const r = this.run!;
    while (r.length > this.maxLength) {
      out.push({ offset: r.offset, length: this.maxLength, zero: r.zero });
      r.offset += this.maxLength;
      r.length -= this.maxLength;
    }
    return out;
  }

  flush(): DiskRange[] {
    const run = this.run;
    this.run = undefined;
    return run ? [run] : [];
  }
}

async function* select(
  client: NbdClient,
  contexts: readonly string[],
  options: WalkOptions,
  classify: (flags: number[]) => 'skip' | 'data' | 'zero',
): AsyncGenerator<DiskRange> {
  const ids = contexts.map((c) => client.contextId(c));
  const coalescer = new ExtentCoalescer(options.maxLength ?? DEFAULT_MAX_EXTENT);
  for await (const s of walkStatus(client, ids, options)) {
    const kind = classify(s.flags);
    if (kind === 'skip') continue;
    yield* coalescer.add(s.offset, s.length, kind === 'zero');
  }
  yield* coalescer.flush();
}

export interface DirtyExtentsOptions extends WalkOptions {
  /** The bitmap's context: `qemu:dirty-bitmap:NAME`. */
  bitmap: string;
}

/**
 * The ranges a dirty bitmap marks dirty (flag bit 0), `zero` where base:allocation says they read
 * as zeros. Needs both contexts selected at connect.
 */
export function dirtyExtents(client: NbdClient, options: DirtyExtentsOptions): AsyncGenerator<DiskRange> {
  return select(client, [BASE_ALLOCATION, options.bitmap], options, ([alloc, dirty]) =>
    !(dirty! & DIRTY_FLAG) ? 'skip' : alloc! & AllocationFlag.ZERO ? 'zero' : 'data',
  );
}

/**
 * Everything a copy must carry to reproduce the export on a zeroed target: all but (hole and zero)
 * under base:allocation; allocated ranges that read as zeros are flagged `zero`. A hole that does
 * not read as zero (a backing file shows through) is data.
 */
export function allocatedExtents(client: NbdClient, options: WalkOptions = {}): AsyncGenerator<DiskRange> {
  const holeZero = AllocationFlag.HOLE | AllocationFlag.ZERO;
  return select(client, [BASE_ALLOCATION], options, ([alloc]) =>
    (alloc! & holeZero) === holeZero ? 'skip' : alloc! & AllocationFlag.ZERO ? 'zero' : 'data',
  );
}

export interface ReadExtentsOptions {
  /** Reads in flight at once. Default 4. */
  concurrency?: number;
  /** Deadline of each read (else the client's default). */
  timeoutMs?: number;
}

/**
 * Reads the data of each range (zero ranges pass through without data), a few reads in flight,
 * yielding in input order. Stopping the iteration early leaves the reads in flight to finish
 * (each has its deadline) and stops pulling ranges.
 */
export async function* readExtents(
  client: NbdClient,
  extents: AsyncIterable<DiskRange> | Iterable<DiskRange>,
  options: ReadExtentsOptions = {},
): AsyncGenerator<ReadExtent> {
  const concurrency = options.concurrency ?? 4;
  if (!Number.isSafeInteger(concurrency) || concurrency < 1) throw new RangeError(`concurrency ${concurrency} must be a positive integer`);
  // Zero ranges queue without a read; bound them too, so a long zero stretch is not all buffered.
  const maxQueued = Math.max(64, concurrency * 16);
  const it = Symbol.asyncIterator in extents ? extents[Symbol.asyncIterator]() : (extents as Iterable<DiskRange>)[Symbol.iterator]();
  const queue: { offset: number; length: number; data?: Promise<Buffer> }[] = [];
  let reads = 0;
  let exhausted = false;
  try {
    for (;;) {
      while (!exhausted && reads < concurrency && queue.length < maxQueued) {
        const r = await it.next();
        if (r.done) {
          exhausted = true;
          break;
        }
        const { offset, length, zero } = r.value;
        if (zero) {
          queue.push({ offset, length });
          continue;
        }
        if (length > client.maxRead) {
          throw new NbdError('BAD_REQUEST', `extent of ${length} bytes at ${offset} is longer than one read (${client.maxRead}); walk with a smaller maxLength`);
        }
        const data = client.read(offset, length, options.timeoutMs === undefined ? {} : { timeoutMs: options.timeoutMs });
        data.catch(() => undefined); // awaited below in order; a failure there is the one reported
        queue.push({ offset, length, data });
        reads++;
      }
      const head = queue.shift();
      if (!head) return;
      if (!head.data) {
        yield { offset: head.offset, length: head.length };
        continue;
      }
      const data = await head.data;
      reads--;
      yield { offset: head.offset, length: head.length, data };
    }
  } finally {
    if (!exhausted) await it.return?.();
  }
}
