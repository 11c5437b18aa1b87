import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import type { Readable } from 'node:stream';
import { assembleCheckpointChain, sameBlocks, type AssembledCheckpoint } from '../stream/chain.js';
import type { StreamSummary } from '../stream/verifier.js';
import { CheckpointStoreError } from './errors.js';
import { invalidMetadataField, type CheckpointMetadata } from './metadata.js';

/**
 * Checks a checkpoint's bytes as they arrive (e.g. parses the migration stream to its end), so a
 * stream cut short or garbled is refused before it is committed.
 */
export interface StreamVerifier {
  update(chunk: Buffer): void;
  /**
   * Throws if the stream is incomplete or invalid. A migration-stream verifier also says what RAM
   * the stream carried, so the store can refuse a "full" checkpoint with pages missing or an
   * incremental one whose RAM blocks differ from its base's.
   */
  end(): void | StreamShape;
}

export type StreamShape = Pick<StreamSummary, 'ramBlocks' | 'fullRam' | 'ramGap' | 'layout' | 'guestClockNs'>;

/** The checkpoint an incremental one applies on: its epoch and, to prove the lineage, its checksum. */
export interface CheckpointBase {
  epoch: number;
  sha256: string;
}

/** The newest loadable checkpoint and what makes it, read and verified once. */
export interface LoadableCheckpoint {
  metadata: CheckpointMetadata;
  /** It and every checkpoint it builds on, oldest (a full one) first. */
  chain: CheckpointMetadata[];
  /** Their data, in the same order, each matching its checksum. */
  data: Buffer[];
}

export interface CommitInput {
  vm: string;
  epoch: number;
  data: Readable;
  stopNs: bigint;
  resumeNs: bigint;
  qemuVersion: string;
  domainXml?: string;
  verifier?: StreamVerifier;
  /** Metadata the caller learns only after the data (the RESUME stamp comes after the stream). */
  trailer?: () => Promise<Pick<CommitInput, 'stopNs' | 'resumeNs'>>;
  /** Set for an incremental checkpoint: it must apply on the newest committed one, exactly this. */
  base?: CheckpointBase;
}

const DATA_SUFFIX = '.ckpt';
const META_SUFFIX = '.json';
const TMP_SUFFIX = '.tmp';
const HASH_SLICE_BYTES = 4 * 1024 * 1024;

/**
 * A directory of committed checkpoints, on the backup.
 *
 * Commit protocol: the data is written to a temporary file, fsync'd and verified; it is renamed to
 * `<epoch>.ckpt`; then the metadata (with the data's checksum) is written the same way and renamed
 * to `<epoch>.json`, and the directory is fsync'd. The metadata rename is the commit point: a data
 * file without metadata was never committed and is removed on open, so a crash at any instant
 * leaves either the old set or the old set plus one complete checkpoint.
 *
 * Incremental checkpoints (only the pages written since their base) are committed the same way,
 * only on top of the newest committed checkpoint, named with its checksum; pruning keeps every
 * checkpoint a kept one depends on, and reading assembles the chain into one loadable stream.
 */
export class CheckpointStore {
  /** Pruning after the last commit: it runs once the commit is durable, and the next commit waits for it. */
  private pruning: Promise<void> = Promise.resolve();

  constructor(
    readonly dir: string,
    private readonly keep = 3,
    private readonly options: { onPruneError?: (error: CheckpointStoreError) => void } = {},
  ) {
    if (!Number.isInteger(keep) || keep < 1) throw new RangeError(`keep must be an integer ≥ 1, got ${keep}`);
  }

  /** Creates the directory and removes what a crash left behind (temporaries, uncommitted data). */
  async open(): Promise<this> {
    try {
      await fs.mkdir(this.dir, { recursive: true });
      const names = await fs.readdir(this.dir);
      const committed = new Set(names.filter((n) => n.endsWith(META_SUFFIX)).map((n) => n.slice(0, -META_SUFFIX.length)));
      for (const name of names) {
        const uncommittedData = name.endsWith(DATA_SUFFIX) && !committed.has(name.slice(0, -DATA_SUFFIX.length));
        if (name.endsWith(TMP_SUFFIX) || uncommittedData) await fs.rm(path.join(this.dir, name), { force: true });
      }
    } catch (error) {
      throw CheckpointStoreError.fromFs(error, `open checkpoint store ${this.dir}`);
    }
    return this;
  }

  /**
   * Streams, verifies and commits one checkpoint; resolves only once it is durable. Old checkpoints
   * are pruned after that, not before: unlinking a 150 MB file took ~100 ms on the lab's ext4, and
   * the primary is waiting for the ack. `pruned()` waits for it.
   */
  async commit(input: CommitInput): Promise<CheckpointMetadata> {
    // The source may fail before it is read (the link dies while this waits for the last prune or
    // the disk): its error then surfaces from the read loop below — an errored stream throws when
    // iterated — instead of as an uncaught 'error' event that would take the receiver down.
    input.data.on('error', ignoreHere);
    await this.pruning; // one change to the directory at a time
    const { epoch } = input;
    if (!Number.isSafeInteger(epoch) || epoch < 0) {
      throw new CheckpointStoreError(`epoch must be a non-negative integer, got ${epoch}`, 'conflict', epoch);
    }
    const latest = await this.latestEpoch();
    if (latest !== undefined && epoch <= latest) {
      throw new CheckpointStoreError(`epoch ${epoch} is not newer than the latest committed (${latest})`, 'conflict', epoch);
    }
    const base = input.base ? await this.checkBase(epoch, input.base, latest) : undefined;
    const dataPath = this.dataPath(epoch);
    const tmpData = `${dataPath}.${process.pid}${TMP_SUFFIX}`;
    let bytes = 0;
    const hash = createHash('sha256');
    try {
      const file = await fs.open(tmpData, 'wx');
      const writer = new WriteBehind(file);
      try {
        for await (const chunk of input.data as AsyncIterable<Buffer>) {
          hash.update(chunk);
          input.verifier?.update(chunk);
          bytes += chunk.length;
          await writer.write(chunk);
        }
        await writer.finish();
      } finally {
        await writer.settled();
        await file.close();
      }
      let shape: void | StreamShape;
      try {
        shape = input.verifier?.end();
      } catch (error) {
        throw new CheckpointStoreError(`checkpoint ${epoch} failed verification: ${(error as Error).message}`, 'verify', epoch);
      }
      if (shape) checkShape(epoch, shape, base);
      if (bytes === 0) throw new CheckpointStoreError(`checkpoint ${epoch} is empty`, 'verify', epoch);
      const late = input.trailer ? await input.trailer() : input;
      const metadata: CheckpointMetadata = {
        vm: input.vm,
        epoch,
        stopNs: late.stopNs.toString(),
        resumeNs: late.resumeNs.toString(),
        bytes,
        sha256: hash.digest('hex'),
        qemuVersion: input.qemuVersion,
        ...(input.domainXml === undefined ? {} : { domainXml: input.domainXml }),
        committedAt: new Date().toISOString(),
        ...(base ? { base: base.epoch } : {}),
        ...(shape && shape.ramBlocks ? { ramBlocks: shape.ramBlocks } : {}),
        ...(shape && shape.layout ? { layout: shape.layout } : {}),
        ...(shape && shape.guestClockNs !== undefined ? { guestClockNs: shape.guestClockNs.toString() } : {}),
      };
      await fs.rename(tmpData, dataPath);
      await this.syncDir(); // the data's name must be durable before the metadata that commits it
      await this.writeDurably(this.metaPath(epoch), `${JSON.stringify(metadata, null, 2)}\n`);
      await this.syncDir();
      this.pruning = this.prune().catch((error: unknown) => {
        this.options.onPruneError?.(error instanceof CheckpointStoreError ? error : CheckpointStoreError.fromFs(error, `prune ${this.dir}`));
      });
      return metadata;
    } catch (error) {
      await fs.rm(tmpData, { force: true }).catch(() => undefined);
      // A data file renamed but never given its metadata must not linger either.
      if (!(await exists(this.metaPath(epoch)))) await fs.rm(dataPath, { force: true }).catch(() => undefined);
      if (error instanceof CheckpointStoreError) throw error;
      throw CheckpointStoreError.fromFs(error, `commit checkpoint ${epoch} in ${this.dir}`, epoch);
    }
  }

  /** Resolves once the pruning after the last commit is done (it never rejects: see onPruneError). */
  async pruned(): Promise<void> {
    await this.pruning;
  }

  /** Committed epochs, oldest first. */
  async epochs(): Promise<number[]> {
    let names: string[];
    try {
      names = await fs.readdir(this.dir);
    } catch (error) {
      throw CheckpointStoreError.fromFs(error, `list checkpoint store ${this.dir}`);
    }
    return names
      .filter((n) => /^\d+\.json$/.test(n))
      .map((n) => Number(n.slice(0, -META_SUFFIX.length)))
      .sort((a, b) => a - b);
  }

  async latestEpoch(): Promise<number | undefined> {
    return (await this.epochs()).at(-1);
  }

  async metadata(epoch: number): Promise<CheckpointMetadata> {
    let parsed: unknown;
    try {
      parsed = JSON.parse(await fs.readFile(this.metaPath(epoch), 'utf8'));
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') {
        throw new CheckpointStoreError(`no committed checkpoint ${epoch} in ${this.dir}`, 'not-found', epoch);
      }
      throw new CheckpointStoreError(`metadata of checkpoint ${epoch} is unreadable: ${(error as Error).message}`, 'corrupt', epoch);
    }
    const bad = invalidMetadataField(parsed);
    if (bad) throw new CheckpointStoreError(`metadata of checkpoint ${epoch} has an invalid ${bad}`, 'corrupt', epoch);
    return parsed as CheckpointMetadata;
  }

  /** Re-reads the data and checks size and checksum against the metadata. */
  async verify(epoch: number): Promise<CheckpointMetadata> {
    const meta = await this.metadata(epoch);
    await this.readVerified(meta);
    return meta;
  }

  /** The metadata of `epoch` and of every checkpoint it builds on, oldest (a full one) first. */
  async chain(epoch: number): Promise<CheckpointMetadata[]> {
    const chain = [await this.metadata(epoch)];
    for (let meta = chain[0]!; meta.base !== undefined; ) {
      const baseEpoch = meta.base;
      meta = await this.metadata(baseEpoch).catch((error: unknown) => {
        throw error instanceof CheckpointStoreError && error.code === 'not-found'
          ? new CheckpointStoreError(`checkpoint ${epoch} builds on checkpoint ${baseEpoch}, which is gone`, 'corrupt', epoch)
          : error;
      });
      chain.unshift(meta);
    }
    return chain;
  }

  /**
   * The newest checkpoint whose data, and that of every checkpoint it builds on, still matches
   * its checksum — each file read once, and kept for loading. Corrupt ones are reported through
   * `onCorrupt` and skipped (never deleted: they are evidence), so an older intact one is used.
   */
  async latestVerified(onCorrupt?: (error: CheckpointStoreError) => void): Promise<LoadableCheckpoint | undefined> {
    const verified = new Map<number, Promise<Buffer>>();
    const readOnce = (meta: CheckpointMetadata) => {
      if (!verified.has(meta.epoch)) verified.set(meta.epoch, this.readVerified(meta));
      return verified.get(meta.epoch)!;
    };
    for (const epoch of (await this.epochs()).reverse()) {
      try {
        const chain = await this.chain(epoch);
        const data: Buffer[] = [];
        for (const link of chain) {
          data.push(
            await readOnce(link).catch((error: unknown) => {
              if (link.epoch === epoch || !(error instanceof CheckpointStoreError)) throw error;
              throw new CheckpointStoreError(`checkpoint ${epoch} builds on checkpoint ${link.epoch}: ${error.message}`, 'corrupt', epoch, error.path);
            }),
          );
        }
        return { metadata: chain.at(-1)!, chain, data };
      } catch (error) {
        if (!(error instanceof CheckpointStoreError)) throw error;
        onCorrupt?.(error);
      }
    }
    return undefined;
  }

  /**
   * A loadable checkpoint as one migration stream, in parts (views, no copy): a full checkpoint
   * as stored; an incremental one assembled from its chain (see assembleCheckpointChain).
   */
  assemble(checkpoint: LoadableCheckpoint): AssembledCheckpoint {
    const { chain } = checkpoint;
    const layouts = chain.every((m) => m.layout) ? chain.map((m) => m.layout!) : undefined;
    try {
      return assembleCheckpointChain(checkpoint.data, layouts);
    } catch (error) {
      throw new CheckpointStoreError(`checkpoint ${checkpoint.metadata.epoch} cannot be assembled: ${(error as Error).message}`, 'corrupt', checkpoint.metadata.epoch);
    }
  }

  /** assemble() as one Buffer. */
  read(checkpoint: LoadableCheckpoint): Buffer {
    const { ram, deviceState } = this.assemble(checkpoint);
    return Buffer.concat([...ram, deviceState]);
  }

  dataPath(epoch: number): string {
    return path.join(this.dir, `${epoch}${DATA_SUFFIX}`);
  }

  private metaPath(epoch: number): string {
    return path.join(this.dir, `${epoch}${META_SUFFIX}`);
  }

  /**
   * A checkpoint's data, checked against its metadata's size and checksum. Hashed in slices: a
   * backup agent does this at failover and must go on answering its lease keepalives meanwhile.
   */
  private async readVerified(meta: CheckpointMetadata): Promise<Buffer> {
    let data: Buffer;
    try {
      data = await fs.readFile(this.dataPath(meta.epoch));
    } catch (error) {
      throw new CheckpointStoreError(`checkpoint ${meta.epoch} data unreadable: ${(error as Error).message}`, 'corrupt', meta.epoch);
    }
    const hash = createHash('sha256');
    for (let offset = 0; offset < data.length; offset += HASH_SLICE_BYTES) {
      hash.update(data.subarray(offset, offset + HASH_SLICE_BYTES));
      await new Promise<void>((resolve) => setImmediate(resolve));
    }
    const sha256 = hash.digest('hex');
    if (data.length !== meta.bytes || sha256 !== meta.sha256) {
      throw new CheckpointStoreError(
        `checkpoint ${meta.epoch} is corrupt: ${data.length} bytes sha256 ${sha256.slice(0, 12)}…, committed ${meta.bytes} bytes ${meta.sha256.slice(0, 12)}…`,
        'corrupt',
        meta.epoch,
        this.dataPath(meta.epoch),
      );
    }
    return data;
  }

  /** An incremental checkpoint may only extend the newest committed one, of the same lineage. */
  private async checkBase(epoch: number, base: CheckpointBase, latest: number | undefined): Promise<CheckpointMetadata> {
    if (base.epoch !== latest) {
      throw new CheckpointStoreError(`checkpoint ${epoch} builds on checkpoint ${base.epoch}, but the newest committed is ${latest ?? 'none'}`, 'no-base', epoch);
    }
    const meta = await this.metadata(base.epoch);
    if (meta.sha256 !== base.sha256) {
      throw new CheckpointStoreError(`checkpoint ${epoch} builds on a checkpoint ${base.epoch} other than the one stored here (checksum differs)`, 'no-base', epoch);
    }
    return meta;
  }

  /**
   * Keeps the newest `keep` checkpoints and every checkpoint they build on; metadata goes first
   * so a half-pruned one is uncommitted.
   */
  private async prune(): Promise<void> {
    const epochs = await this.epochs();
    const needed = new Set<number>();
    for (const epoch of epochs.slice(-this.keep)) {
      // a chain that cannot be followed (unreadable metadata): prune nothing, lose nothing
      const chain = await this.chain(epoch).catch(() => undefined);
      if (!chain) return;
      for (const meta of chain) needed.add(meta.epoch);
    }
    for (const epoch of epochs.filter((e) => !needed.has(e))) {
      await fs.rm(this.metaPath(epoch), { force: true });
      await fs.rm(this.dataPath(epoch), { force: true });
    }
  }

  private async writeDurably(target: string, text: string): Promise<void> {
    const tmp = `${target}.${process.pid}${TMP_SUFFIX}`;
    const file = await fs.open(tmp, 'w');
    try {
      await file.writeFile(text);
      await file.sync();
    } finally {
      await file.close();
    }
    await fs.rename(tmp, target);
  }

  private async syncDir(): Promise<void> {
    const dir = await fs.open(this.dir, 'r');
    try {
      await dir.sync();
    } finally {
      await dir.close();
    }
  }
}

/**
 * Writes a checkpoint in batches (one writev per MiB, not one write per SSH packet) and starts
 * writing it back to disk every WRITE_BEHIND_BYTES while more arrives, so the fsync before the
 * ack finds little left to do: on a full checkpoint that fsync was a tenth of the time.
 */
class WriteBehind {
  private static readonly BATCH_BYTES = 1024 * 1024;
  private static readonly WRITE_BEHIND_BYTES = 16 * 1024 * 1024;
  private batch: Buffer[] = [];
  private batchBytes = 0;
  private unsynced = 0;
  private syncing: Promise<void> | undefined;
  private syncError: unknown;

  constructor(private readonly file: fs.FileHandle) {}

  async write(chunk: Buffer): Promise<void> {
    this.batch.push(chunk);
    this.batchBytes += chunk.length;
    if (this.batchBytes >= WriteBehind.BATCH_BYTES) await this.flush();
  }

  /** Everything written and durable. */
  async finish(): Promise<void> {
    await this.flush();
    await this.settled();
    if (this.syncError !== undefined) throw this.syncError;
    await this.file.sync();
  }

  /** Waits for a write-back in flight (before the file is closed). */
  async settled(): Promise<void> {
    await this.syncing;
  }

  private async flush(): Promise<void> {
    if (this.batchBytes === 0) return;
    const batch = this.batch;
    this.unsynced += this.batchBytes;
    this.batch = [];
    this.batchBytes = 0;
    await this.file.writev(batch);
    if (this.unsynced >= WriteBehind.WRITE_BEHIND_BYTES && !this.syncing) {
      this.unsynced = 0;
      this.syncing = this.file.datasync().then(
        () => (this.syncing = undefined),
        (error: unknown) => {
          this.syncError ??= error;
          this.syncing = undefined;
        },
      );
    }
  }
}

/** A full checkpoint must carry every page; an incremental one the same RAM blocks as its base. */
function checkShape(epoch: number, shape: StreamShape, base: CheckpointMetadata | undefined): void {
  if (!base && shape.ramBlocks && !shape.fullRam) {
    const gap = shape.ramGap;
    throw new CheckpointStoreError(
      `checkpoint ${epoch} came as a full checkpoint but lacks ${gap ? `${gap.missingPages} pages of RAM block '${gap.block}'` : 'RAM pages'} (an incremental stream without its base?)`,
      'verify',
      epoch,
    );
  }
  if (base?.ramBlocks && !sameBlocks(base.ramBlocks, shape.ramBlocks)) {
    throw new CheckpointStoreError(`checkpoint ${epoch} has other RAM blocks than its base, checkpoint ${base.epoch}`, 'verify', epoch);
  }
  if (base?.layout && shape.layout && base.layout.ramSectionId !== shape.layout.ramSectionId) {
    throw new CheckpointStoreError(`checkpoint ${epoch} numbers its sections unlike its base, checkpoint ${base.epoch}: not the same QEMU`, 'verify', epoch);
  }
}

function ignoreHere(): void {}

async function exists(file: string): Promise<boolean> {
  return fs.access(file).then(
    () => true,
    () => false,
  );
}
