/**
 * The backup's disk replica: one raw, sparse image per disk (`<storeDir>/disks/<disk>.img`) and a
 * marker (`disks/replica.json`) saying which seed the images hold and up to which checkpoint's
 * deltas they are applied. The marker is replaced atomically (tmp, fsync, rename, fsync dir) and
 * always written after the image writes it describes are fsync'd, so it never claims more than
 * the images hold; `applying` says an apply is under way, so after a crash no checkpoint older
 * than its target is taken for the images' state (they may hold part of it).
 *
 * Writers (a seed, an apply) hold `disks/lock` — created by an atomic link, holding the owner's
 * pid, taken over once that process is gone — so a receiver applying after a prune and a failover
 * preparing the disks never interleave their writes.
 */
import { execFile } from 'node:child_process';
import { writeSync } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { CheckpointStoreError } from './errors.js';
import { invalidDiskList, scanDiskDelta, DiskDeltaError, type DiskDeltaSummary, type DiskExtent, type DiskGeometry } from './disk-delta.js';
import { validSeedId } from './metadata.js';
import { testPausePoint } from '../test-pause.js';

export interface ReplicaMarker {
  seed: string;
  /** The seed's extents are all written and fsync'd. */
  complete: boolean;
  /** The newest checkpoint whose deltas the images hold (null: the seed alone). */
  appliedEpoch: number | null;
  /** An apply up to this checkpoint began and did not finish: the images may hold part of it. */
  applying?: number;
  disks: DiskGeometry[];
}

/** What `CheckpointStore.replicaState()` tells: the marker, and where the images are. */
export interface ReplicaState extends ReplicaMarker {
  images: Record<string, string>;
}

/** One delta file to apply: a checkpoint's writes to one disk, as committed. */
export interface DeltaToApply {
  epoch: number;
  disk: DiskGeometry;
  path: string;
  expected: DiskDeltaSummary;
}

export const REPLICA_DIR = 'disks';
const MARKER = 'replica.json';
const LOCK = 'lock';
const IMAGE_SUFFIX = '.img';
const TMP_SUFFIX = '.tmp';
/** Start writing images back after this much, so the fsync at the end finds little left. */
const WRITE_BACK_BYTES = 64 * 1024 * 1024;
const ZEROS = Buffer.alloc(1024 * 1024);
/** Image writes are synchronous (see ImageFile); the event loop gets a turn at least this often. */
const YIELD_EVERY_MS = 10;
/** ZERO extents this long are punched out of the image (kept sparse) rather than written. */
const PUNCH_MIN_BYTES = 1024 * 1024;

export class Replica {
  readonly dir: string;

  constructor(
    storeDir: string,
    private readonly lockTimeoutMs = 60_000,
  ) {
    this.dir = path.join(storeDir, REPLICA_DIR);
  }

  imagePath(disk: string): string {
    return Replica.imagePath(path.dirname(this.dir), disk);
  }

  static imagePath(storeDir: string, disk: string): string {
    return path.join(storeDir, REPLICA_DIR, `${disk}${IMAGE_SUFFIX}`);
  }

  get markerPath(): string {
    return path.join(this.dir, MARKER);
  }

  /** The marker, or undefined when there is no replica (never seeded). */
  async readMarker(): Promise<ReplicaMarker | undefined> {
    let text: string;
    try {
      text = await fs.readFile(this.markerPath, 'utf8');
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw CheckpointStoreError.fromFs(error, `read the disk replica's marker ${this.markerPath}`);
    }
    let parsed: unknown;
    try {
      parsed = JSON.parse(text);
    } catch (error) {
      throw new CheckpointStoreError(`the disk replica's marker ${this.markerPath} is not JSON: ${(error as Error).message}`, 'corrupt', undefined, this.markerPath);
    }
    const bad = invalidMarkerField(parsed);
    if (bad) throw new CheckpointStoreError(`the disk replica's marker ${this.markerPath} has an invalid ${bad}`, 'corrupt', undefined, this.markerPath);
    return parsed as ReplicaMarker;
  }

  async writeMarker(marker: ReplicaMarker): Promise<void> {
    const tmp = `${this.markerPath}.${process.pid}${TMP_SUFFIX}`;
    try {
      const file = await fs.open(tmp, 'w');
      try {
        await file.writeFile(`${JSON.stringify(marker, null, 2)}\n`);
        await file.sync();
      } finally {
        await file.close();
      }
      await fs.rename(tmp, this.markerPath);
      await syncDir(this.dir);
    } catch (error) {
      await fs.rm(tmp, { force: true }).catch(() => undefined);
      throw CheckpointStoreError.fromFs(error, `write the disk replica's marker ${this.markerPath}`);
    }
  }

  /** Removes what a crash left in the replica's directory (a marker's temporary). */
  async cleanup(): Promise<void> {
    let names: string[];
    try {
      names = await fs.readdir(this.dir);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') return;
      throw error;
    }
    for (const name of names) if (name.endsWith(TMP_SUFFIX)) await fs.rm(path.join(this.dir, name), { force: true });
  }

  /**
   * Runs `fn` holding the replica's lock; waits up to lockTimeoutMs for another holder (this
   * process's own included) and takes the lock over from a holder that is gone.
   */
  async withLock<T>(fn: () => Promise<T>): Promise<T> {
    const lock = path.join(this.dir, LOCK);
    const mine = `${lock}.${process.pid}.${Math.random().toString(36).slice(2)}${TMP_SUFFIX}`;
    try {
      await fs.mkdir(this.dir, { recursive: true });
      await fs.writeFile(mine, String(process.pid));
    } catch (error) {
      throw CheckpointStoreError.fromFs(error, `lock the disk replica in ${this.dir}`);
    }
    const deadline = Date.now() + this.lockTimeoutMs;
    try {
      for (;;) {
        try {
          await fs.link(mine, lock); // atomic, and the lock has its content from the start
          break;
        } catch (error) {
          if ((error as NodeJS.ErrnoException).code !== 'EEXIST') throw CheckpointStoreError.fromFs(error, `lock the disk replica in ${this.dir}`);
        }
        const holder = Number(await fs.readFile(lock, 'utf8').catch(() => 'gone'));
        if (!processAlive(holder)) {
          await fs.rm(lock, { force: true });
          continue;
        }
        if (Date.now() > deadline) {
          throw new CheckpointStoreError(`the disk replica in ${this.dir} is locked by process ${holder} (seeding or applying) for more than ${this.lockTimeoutMs} ms`, 'locked', undefined, lock);
        }
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
    } finally {
      await fs.rm(mine, { force: true }).catch(() => undefined);
    }
    try {
      return await fn();
    } finally {
      await fs.rm(lock, { force: true }).catch(() => undefined);
    }
  }

  /**
   * Empty images of these sizes (sparse: all zeros), replacing what was there; images of disks
   * not listed are removed. Returns them open for writing.
   */
  async createImages(disks: DiskGeometry[]): Promise<Map<string, ImageFile>> {
    const listed = new Set(disks.map((d) => `${d.disk}${IMAGE_SUFFIX}`));
    for (const name of await fs.readdir(this.dir)) {
      if (name.endsWith(IMAGE_SUFFIX) && !listed.has(name)) await fs.rm(path.join(this.dir, name), { force: true });
    }
    const images = new Map<string, ImageFile>();
    try {
      for (const { disk, sizeBytes } of disks) {
        const handle = await fs.open(this.imagePath(disk), 'w+');
        images.set(disk, new ImageFile(handle, this.imagePath(disk)));
        await handle.truncate(sizeBytes);
      }
    } catch (error) {
      await closeAll(images);
      throw error;
    }
    return images;
  }

  /** The marker's images, open for writing, each checked to have its disk's size. */
  async openImages(disks: DiskGeometry[]): Promise<Map<string, ImageFile>> {
    const images = new Map<string, ImageFile>();
    try {
      for (const { disk, sizeBytes } of disks) {
        const file = this.imagePath(disk);
        const handle = await fs.open(file, 'r+').catch((error: NodeJS.ErrnoException) => {
          if (error.code === 'ENOENT') throw new CheckpointStoreError(`the replica image of disk '${disk}' is missing: ${file}`, 'no-replica', undefined, file);
          throw error;
        });
        images.set(disk, new ImageFile(handle, file));
        const { size } = await handle.stat();
        if (size !== sizeBytes) throw new CheckpointStoreError(`the replica image ${file} has ${size} bytes, disk '${disk}' has ${sizeBytes}`, 'corrupt', undefined, file);
      }
    } catch (error) {
      await closeAll(images);
      throw error;
    }
    return images;
  }

  /**
   * Brings the images from `marker` to checkpoint `target`: verifies every delta first (size,
   * sha256, records), records `applying`, writes them in order, fsyncs the images, then records
   * `appliedEpoch = target`. Re-running it after a crash at any point gives the same images: each
   * delta holds the final bytes of the ranges it names. Caller holds the lock.
   */
  async apply(marker: ReplicaMarker, target: number, deltas: DeltaToApply[], onCorrupt: (delta: DeltaToApply, error: DiskDeltaError) => CheckpointStoreError): Promise<ReplicaMarker> {
    if (deltas.length === 0 && marker.appliedEpoch === target && marker.applying === undefined) return marker;
    for (const delta of deltas) await scanOrThrow(delta, {}, onCorrupt);
    await this.writeMarker({ ...marker, applying: Math.max(target, marker.applying ?? target) });
    const images = await this.openImages(marker.disks);
    try {
      for (const delta of deltas) {
        const image = images.get(delta.disk.disk);
        if (!image) throw new CheckpointStoreError(`checkpoint ${delta.epoch} has a delta for disk '${delta.disk.disk}', which the replica does not hold`, 'corrupt', delta.epoch, delta.path);
        await scanOrThrow(delta, { onRecord: (extent) => image.write(extent) }, onCorrupt);
        if (delta === deltas[0]) await testPausePoint('mid-apply', { target, epoch: delta.epoch, disk: delta.disk.disk, deltas: deltas.length });
      }
      for (const image of images.values()) await image.sync();
    } finally {
      await closeAll(images);
    }
    const { applying: _done, ...rest } = marker;
    const applied: ReplicaMarker = { ...rest, appliedEpoch: target };
    await this.writeMarker(applied);
    return applied;
  }
}

/** A replica image open for writing: extents in, written back every WRITE_BACK_BYTES, fsync at the end. */
/**
 * Writes are synchronous pwrites into the page cache, with a turn for the event loop every
 * YIELD_EVERY_MS: a delta of 4 KiB extents (a 4 KiB dirty bitmap under random writes) applied
 * at 39 MB/s with one async write per extent (a thread-pool round trip each), and the failover
 * waits for it.
 */
export class ImageFile {
  private unsynced = 0;
  private lastYield = performance.now();
  private syncing: Promise<void> | undefined;
  private syncError: unknown;

  constructor(
    private readonly handle: fs.FileHandle,
    readonly path: string,
  ) {}

  /**
   * Writes the extent's data, or zeros: a long ZERO extent (a discard in the guest) is punched
   * out with util-linux's fallocate, as Node has no fallocate(2); where that fails, zeros are written.
   */
  async write(extent: DiskExtent): Promise<void> {
    if (extent.data) {
      writeFully(this.handle.fd, extent.data, extent.offset);
    } else if (extent.length >= PUNCH_MIN_BYTES && (await punchHole(this.path, extent.offset, extent.length))) {
      // the range reads as zeros; the fsync at the end makes it durable like a write
    } else {
      for (let done = 0; done < extent.length; done += ZEROS.length) {
        writeFully(this.handle.fd, ZEROS.subarray(0, Math.min(ZEROS.length, extent.length - done)), extent.offset + done);
        await this.yieldSometimes();
      }
    }
    await this.yieldSometimes();
    this.unsynced += extent.length;
    if (this.unsynced >= WRITE_BACK_BYTES && !this.syncing) {
      this.unsynced = 0;
      this.syncing = this.handle.datasync().then(
        () => void (this.syncing = undefined),
        (error: unknown) => void ((this.syncError ??= error), (this.syncing = undefined)),
      );
    }
  }

  private async yieldSometimes(): Promise<void> {
    if (performance.now() - this.lastYield < YIELD_EVERY_MS) return;
    await new Promise<void>((resolve) => setImmediate(resolve));
    this.lastYield = performance.now();
  }

  async sync(): Promise<void> {
    await this.syncing;
    if (this.syncError !== undefined) throw this.syncError;
    await this.handle.sync();
  }

  async close(): Promise<void> {
    await this.syncing;
    await this.handle.close();
  }
}

export async function closeAll(images: Map<string, ImageFile>): Promise<void> {
  for (const image of images.values()) await image.close().catch(() => undefined);
}

function punchHole(file: string, offset: number, length: number): Promise<boolean> {
  return new Promise((resolve) => {
    execFile('fallocate', ['--punch-hole', '--offset', String(offset), '--length', String(length), file], { timeout: 30_000 }, (error) => resolve(!error));
  });
}

function writeFully(fd: number, data: Buffer, position: number): void {
  for (let done = 0; done < data.length; ) {
    done += writeSync(fd, data, done, data.length - done, position + done);
  }
}

async function scanOrThrow(
  delta: DeltaToApply,
  options: { onRecord?: (extent: DiskExtent) => Promise<void> },
  onCorrupt: (delta: DeltaToApply, error: DiskDeltaError) => CheckpointStoreError,
): Promise<void> {
  try {
    await scanDiskDelta(delta.path, delta.disk.sizeBytes, { expected: delta.expected, ...options });
  } catch (error) {
    if (error instanceof DiskDeltaError) throw onCorrupt(delta, error);
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') {
      throw onCorrupt(delta, new DiskDeltaError('MISSING', 0, 'file is missing', delta.path));
    }
    throw error;
  }
}

export async function syncDir(dir: string): Promise<void> {
  const handle = await fs.open(dir, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

/** A process with this pid exists (EPERM: it does, it is someone else's). */
export function processAlive(pid: number): boolean {
  if (!Number.isSafeInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Validates parsed JSON as a replica marker; returns the first bad field, or undefined. */
export function invalidMarkerField(value: unknown): string | undefined {
  if (typeof value !== 'object' || value === null) return '(root)';
  const m = value as Record<string, unknown>;
  if (!validSeedId(m['seed'])) return 'seed';
  if (typeof m['complete'] !== 'boolean') return 'complete';
  const applied = m['appliedEpoch'];
  if (applied !== null && (!Number.isSafeInteger(applied) || (applied as number) < 0)) return 'appliedEpoch';
  const applying = m['applying'];
  if (applying !== undefined && (!Number.isSafeInteger(applying) || (applying as number) < ((applied as number | null) ?? 0))) return 'applying';
  if (invalidDiskList(m['disks']) !== undefined) return 'disks';
  return undefined;
}
