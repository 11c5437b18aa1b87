// Disk-replication fixtures: an in-memory disk (image + dirty blocks, like a 4 KiB dirty bitmap),
// the extents a primary would send for it, and a sender ↔ receiver link over in-memory pipes.
import { Duplex, PassThrough, Readable } from 'node:stream';
import { runReceiver, ReplicationSender } from '../src/replication/index.js';
import type { CheckpointStore, DiskExtent, DiskSection } from '../src/store/index.js';

export const GRANULARITY = 4096;

/** A small deterministic PRNG (mulberry32): tests that fail can be replayed from their seed. */
export function prng(seed: number): { next(): number; int(n: number): number; chance(p: number): boolean; bytes(n: number): Buffer } {
  let a = seed >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const int = (n: number) => Math.floor(next() * n);
  return {
    next,
    int,
    chance: (p) => next() < p,
    bytes: (n) => {
      const b = Buffer.allocUnsafe(n);
      for (let i = 0; i < n; i++) b[i] = int(256);
      return b;
    },
  };
}

/** A disk as the guest sees it, with the blocks written since the last checkpoint (the bitmap). */
export class ModelDisk {
  readonly image: Buffer;
  dirty = new Set<number>();

  constructor(
    readonly disk: string,
    readonly sizeBytes: number,
  ) {
    this.image = Buffer.alloc(sizeBytes);
  }

  write(offset: number, data: Buffer): void {
    data.copy(this.image, offset);
    for (let b = Math.floor(offset / GRANULARITY); b * GRANULARITY < offset + data.length; b++) this.dirty.add(b);
  }

  /** The dirty blocks as extents (runs cut into pieces of at most `maxRun` blocks); all-zero ones as ZERO when `zeroAsZero`. */
  deltaExtents(options: { maxRun?: number; zeroAsZero?: boolean } = {}): DiskExtent[] {
    return this.extentsOf([...this.dirty].sort((a, b) => a - b), options);
  }

  /** Every block holding a non-zero byte (what a seed copies of an allocated disk). */
  seedExtents(): DiskExtent[] {
    const blocks: number[] = [];
    for (let b = 0; b * GRANULARITY < this.sizeBytes; b++) if (this.block(b).some((x) => x !== 0)) blocks.push(b);
    return this.extentsOf(blocks, {});
  }

  section(extents: DiskExtent[]): DiskSection {
    return { disk: this.disk, sizeBytes: this.sizeBytes, extents: Readable.from(extents, { objectMode: true }) };
  }

  private block(b: number): Buffer {
    return this.image.subarray(b * GRANULARITY, Math.min(this.sizeBytes, (b + 1) * GRANULARITY));
  }

  /** maxRun: 1024 blocks, the 4 MiB a record holds, unless said otherwise (the sender splits longer ones). */
  private extentsOf(blocks: number[], { maxRun = 1024, zeroAsZero = false }: { maxRun?: number; zeroAsZero?: boolean }): DiskExtent[] {
    const extents: DiskExtent[] = [];
    for (let i = 0; i < blocks.length; ) {
      let j = i + 1;
      while (j < blocks.length && blocks[j] === blocks[j - 1]! + 1 && j - i < maxRun) j++;
      const offset = blocks[i]! * GRANULARITY;
      const end = Math.min(this.sizeBytes, (blocks[j - 1]! + 1) * GRANULARITY);
      const data = Buffer.from(this.image.subarray(offset, end));
      extents.push(zeroAsZero && data.every((x) => x === 0) ? { offset, length: end - offset } : { offset, length: end - offset, data });
      i = j;
    }
    return extents;
  }
}

/** A receiver on `store` and a sender joined by two in-memory pipes. */
export function connect(store: CheckpointStore, options: { maxBufferedBytes?: number } = {}) {
  const toReceiver = new PassThrough();
  const toSender = new PassThrough();
  const channel = Duplex.from({ readable: toSender, writable: toReceiver });
  const log: string[] = [];
  const receiving = runReceiver(toReceiver, toSender, { store, log: (m) => log.push(m) });
  receiving.catch(() => undefined);
  const sender = new ReplicationSender(channel, options.maxBufferedBytes);
  return {
    sender,
    toReceiver,
    toSender,
    receiving,
    log,
    async close() {
      sender.close();
      await receiving;
    },
  };
}

export const memory = (epoch: number) => Readable.from([Buffer.from(`memory of checkpoint ${epoch}`)]);
export const trailer = (epoch: number) => async () => ({ stopNs: `${epoch}000`, resumeNs: `${epoch}005` });
