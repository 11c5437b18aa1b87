import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import type { Readable } from 'node:stream';
import { assembleCheckpointChain, sameBlocks, type AssembledCheckpoint, type CheckpointLayout } from '../stream/chain.js';
import type { StreamSummary } from '../stream/verifier.js';
import { compactInChildProcess, dataFileIn, isVanished, readVerifiedData, vanished, writeCompactedChain, type CompactedData, type CompactionJob, type CompactionProcess } from './compaction.js';
import {
  DiskDeltaWriter,
  scanDiskDelta,
  invalidDiskList,
  invalidExtent,
  isValidDiskName,
  type DiskGeometry,
  type DiskSectionInput,
} from './disk-delta.js';
import { CheckpointStoreError } from './errors.js';
import {
  COMPACTED_DATA_NAME,
  invalidMetadataField,
  validDiskBase,
  validSeedId,
  type CheckpointMetadata,
  type DiskBase,
  type DiskDeltaMetadata,
} from './metadata.js';
import { closeAll, processAlive, Replica, syncDir, type DeltaToApply, type ReplicaMarker, type ReplicaState } from './replica.js';
import { WriteBehind } from './write-behind.js';
import { testPausePoint } from '../test-pause.js';

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

export type StreamShape = Pick<StreamSummary, 'ramBlocks' | 'fullRam' | 'ramGap' | 'layout' | 'guestClockNs' | 'incremental'>;

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
  /**
   * When it has disks: the checkpoints whose disk deltas bring the replica from its applied state
   * to this one's (verified), oldest first; empty when the replica is there already.
   * `prepareDisks` applies them.
   */
  diskEpochs?: number[];
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
  /**
   * The disks' writes since `diskBase`, one section per disk of the replica, consumed after
   * `data`. The checkpoint commits only if `diskBase` is the store's disk head (else `no-disk-base`).
   */
  disks?: AsyncIterable<DiskSectionInput>;
  diskBase?: DiskBase;
}

/** A seed: every allocated extent of each disk, written into fresh replica images. */
export interface SeedInput {
  seed: string;
  disks: DiskGeometry[];
  /** One section per listed disk, in the listed order; extents ascending, not overlapping. */
  sections: AsyncIterable<DiskSectionInput>;
}

const DATA_SUFFIX = '.ckpt';
const META_SUFFIX = '.json';
const TMP_SUFFIX = '.tmp';
const DELTA_SUFFIX = '.delta';
/** `<epoch>.<disk>.delta` */
const DELTA_NAME = /^(\d+)\.([^.]+)\.delta$/;
const DEFAULT_COMPACT_AT_RATIO = 1;
const DEFAULT_COMPACT_AT_LENGTH = 600;
const DEFAULT_COMPACT_RETRY_MS = 10_000;
const DEFAULT_COMPACT_TIMEOUT_MS = 300_000;
/**
 * A compaction running while its chain grows to this many times its trigger is behind (heavy
 * dirtying: increments of 50–100 MB); its worker then runs at normal priority, unpaused. Without
 * it the niced worker starved and chains reached 2 GB, a 4–5 s read at failover.
 */
const HURRY_FACTOR = 2;

/** Compacted data files (and their temporaries) this process is writing and has not yet named in metadata. */
const compactingHere = new Set<string>();

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
 *
 * Compaction: once a chain's increments outweigh its full checkpoint (or it grows long), the newest
 * checkpoint K is rewritten in the background as one full stream (stream/compact.ts) into
 * `<K>.full-<pid>.ckpt`; a short step serialized with pruning then replaces K's metadata (no
 * `base`, `dataFile`/`dataSha256` naming the new file, `sha256` unchanged: increments go on naming
 * K by it) and removes K's old data, and the prune that follows drops the chain K no longer needs.
 * The metadata rename is again the switch: before it the new file is an orphan (removed on open),
 * after it the old one is. Readers in other processes re-read a chain once when a file vanishes.
 *
 * Disks: a checkpoint may carry each disk's writes since its disk base, one delta file per disk
 * (`<epoch>.<disk>.delta`, see disk-delta.ts), written and renamed before the metadata rename,
 * so they commit with it. The replica (replica.ts) holds the disks as of a seed plus the deltas
 * applied so far; after each commit's prune it is brought to the oldest checkpoint still present
 * (no failover can pick an older one), and a delta file goes only with a checkpoint the replica
 * has passed. At failover `prepareDisks` applies the rest up to the chosen checkpoint.
 */
export class CheckpointStore {
  /** Pruning after the last commit (or a seed): it runs once the commit is durable, and the next commit waits for it. */
  private pruning: Promise<void> = Promise.resolve();
  /** Unlinking the files of pruned checkpoints, after their metadata went (see removeCheckpoint). */
  private dropping: Promise<void> = Promise.resolve();
  private readonly replica: Replica;
  /** The compaction running in the background (it never rejects: see onCompactError). */
  private compaction: Promise<void> = Promise.resolve();
  private compacting = false;
  /** The compaction's worker process, while one runs; and how many commits run now. */
  private worker: CompactionProcess | undefined;
  private committing = 0;
  /** The running compaction is behind the chain's growth (see considerCompaction). */
  private hurry = false;
  /** No compaction before this time (a failed one backs off). */
  private compactRetryAt = 0;
  /**
   * Committed metadata this object has read or written (it changes only when this object compacts
   * the checkpoint, which updates it here). Only trusted for epochs the directory still lists:
   * another process may prune or reseed. Without it
   * every prune re-read the whole chain of each kept checkpoint: at a 100 ms interval the chain
   * grows to hundreds, and the backup's ack went from ~10 ms to ~180 ms (bench/results/HISTORY.md).
   */
  private readonly known = new Map<number, CheckpointMetadata>();

  constructor(
    readonly dir: string,
    private readonly keep = 3,
    private readonly options: {
      onPruneError?: (error: CheckpointStoreError) => void;
      /** How long a seed, an apply or `prepareDisks` waits for another process's hold on the replica. */
      replicaLockTimeoutMs?: number;
      /**
       * Compact the newest checkpoint once its chain's increments add up to this many times the
       * bytes of the full checkpoint it starts with (default 1; Infinity: never by size).
       */
      compactAtRatio?: number;
      /** ... or once its chain is this many checkpoints long (default 600; Infinity: never by length). */
      compactAtLength?: number;
      /** A compaction failed (the store is as it was); default: onPruneError. */
      onCompactError?: (error: CheckpointStoreError) => void;
      /** After a failed compaction, none is tried for this long (default 10 s). */
      compactRetryMs?: number;
      /**
       * Where the compaction's reading, rewriting and checking runs: 'process' (default) in a
       * child process at the lowest CPU priority, so commits keep their pace meanwhile; 'here'
       * on this event loop, in slices.
       */
      compactIn?: 'process' | 'here';
      /** A compaction in a child process is killed after this long (default 300 s), and retried later. */
      compactTimeoutMs?: number;
    } = {},
  ) {
    if (!Number.isInteger(keep) || keep < 1) throw new RangeError(`keep must be an integer ≥ 1, got ${keep}`);
    for (const option of ['compactAtRatio', 'compactAtLength'] as const) {
      const value = options[option];
      if (value !== undefined && !(value > 0)) throw new RangeError(`${option} must be > 0 (Infinity: never), got ${value}`);
    }
    this.replica = new Replica(dir, options.replicaLockTimeoutMs);
  }

  /**
   * Creates the directory and removes what a crash left behind (temporaries, uncommitted data, a
   * compacted file no metadata names, the data a compacted one replaced). Files another live
   * process is compacting into are left alone (a failover's restore opens the store while the
   * receiver may still be at work).
   */
  async open(): Promise<this> {
    try {
      await fs.mkdir(this.dir, { recursive: true });
      const names = await fs.readdir(this.dir);
      const committed = new Set(names.filter((n) => n.endsWith(META_SUFFIX)).map((n) => n.slice(0, -META_SUFFIX.length)));
      const replaced = new Set<string>(); // `<epoch>.ckpt` of a checkpoint whose metadata names its compacted file
      const orphans: string[] = [];
      for (const name of names) {
        const compacted = COMPACTED_DATA_NAME.exec(name);
        if (!compacted) continue;
        const [, epoch, pid] = compacted;
        let named: string | undefined;
        if (committed.has(epoch!)) {
          const meta = await this.metadata(Number(epoch)).catch(() => undefined);
          if (!meta) continue; // unreadable metadata: touch nothing of its checkpoint (evidence)
          named = meta.dataFile;
        }
        if (named === name) replaced.add(`${epoch}${DATA_SUFFIX}`);
        else if (!this.inProgressElsewhere(name, Number(pid))) orphans.push(name);
      }
      for (const name of names) {
        const compaction = name.endsWith(TMP_SUFFIX) ? COMPACTED_DATA_NAME.exec(name.slice(0, -TMP_SUFFIX.length)) : null;
        if (compaction && this.inProgressElsewhere(name, Number(compaction[2]))) continue;
        const uncommittedData = name.endsWith(DATA_SUFFIX) && !COMPACTED_DATA_NAME.test(name) && !committed.has(name.slice(0, -DATA_SUFFIX.length));
        const delta = DELTA_NAME.exec(name);
        const uncommittedDelta = delta !== null && !committed.has(delta[1]!);
        if (name.endsWith(TMP_SUFFIX) || uncommittedData || uncommittedDelta || replaced.has(name) || orphans.includes(name)) {
          await fs.rm(path.join(this.dir, name), { force: true });
        }
      }
      await this.replica.cleanup();
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
    // a compaction's worker waits meanwhile: commits keep their pace (see compaction.ts)
    this.committing++;
    this.worker?.pause();
    try {
      return await this.commitNow(input);
    } finally {
      this.committing--;
      this.worker?.resume();
    }
  }

  private async commitNow(input: CommitInput): Promise<CheckpointMetadata> {
    // The source may fail before it is read (the link dies while this waits for the last prune or
    // the disk): its error then surfaces from the read loop below — an errored stream throws when
    // iterated — instead of as an uncaught 'error' event that would take the receiver down.
    input.data.on('error', ignoreHere);
    ignoreErrorsUntilRead(input.disks);
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
    const onDisks = input.disks || input.diskBase ? await this.checkDiskBase(epoch, input, latest) : undefined;
    const replica = onDisks?.marker;
    const dataPath = this.dataPath(epoch);
    const tmpData = `${dataPath}.${process.pid}${TMP_SUFFIX}`;
    let bytes = 0;
    const hash = createHash('sha256');
    const deltas: { path: string; tmp: string; writer?: DiskDeltaWriter; metadata?: DiskDeltaMetadata }[] = [];
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
      if (input.disks && replica) await this.writeDeltas(epoch, input.disks, replica, deltas);
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
        ...(onDisks ? { disks: deltas.map((d) => d.metadata!), diskBase: onDisks.base } : {}),
      };
      await fs.rename(tmpData, dataPath);
      for (const delta of deltas) await fs.rename(delta.tmp, delta.path);
      await this.syncDir(); // the data's and deltas' names must be durable before the metadata that commits them
      await testPausePoint('before-meta-rename', { epoch });
      await this.writeDurably(this.metaPath(epoch), `${JSON.stringify(metadata, null, 2)}\n`);
      await this.syncDir();
      this.known.set(epoch, metadata);
      await testPausePoint('after-meta-rename', { epoch });
      const previous = this.pruning; // (a seed queued meanwhile)
      this.pruning = previous
        .then(() => this.prune())
        .catch((error: unknown) => this.reportPruneError(error))
        .then(() => this.considerCompaction(epoch))
        .catch(() => undefined); // (it never throws; the next commit must not fail on it)
      return metadata;
    } catch (error) {
      await fs.rm(tmpData, { force: true }).catch(() => undefined);
      for (const delta of deltas) {
        await delta.writer?.close().catch(() => undefined);
        await fs.rm(delta.tmp, { force: true }).catch(() => undefined);
      }
      // A data file renamed but never given its metadata must not linger either, nor its deltas.
      if (!(await exists(this.metaPath(epoch)))) {
        await fs.rm(dataPath, { force: true }).catch(() => undefined);
        for (const delta of deltas) await fs.rm(delta.path, { force: true }).catch(() => undefined);
      }
      if (error instanceof CheckpointStoreError) throw error;
      throw CheckpointStoreError.fromFs(error, `commit checkpoint ${epoch} in ${this.dir}`, epoch);
    }
  }

  /** Resolves once the pruning after the last commit is done, its files unlinked too (it never rejects: see onPruneError). */
  async pruned(): Promise<void> {
    await this.pruning;
    await this.dropping;
  }

  /**
   * Resolves once a compaction the last commit started (if any) is done: switched to and pruned
   * after, or abandoned. It never rejects: see onCompactError.
   */
  async compacted(): Promise<void> {
    await this.pruning;
    await this.compaction;
    await this.dropping;
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
    await readVerifiedData(this.dir, meta);
    return meta;
  }

  /** One checkpoint's data, read once and checked against its checksum (CheckpointStoreError `corrupt` if it does not match). */
  async readVerified(meta: CheckpointMetadata): Promise<Buffer> {
    return readVerifiedData(this.dir, meta);
  }

  /**
   * The disk state of `head` is loadable: the replica complete and not past it, every delta from
   * its applied state up to `head` intact. Returns the epochs `prepareDisks` will apply (see
   * LoadableCheckpoint.diskEpochs); throws CheckpointStoreError otherwise. A checkpoint without
   * disks: undefined.
   */
  async verifiedDiskEpochs(head: CheckpointMetadata): Promise<number[] | undefined> {
    if (!head.disks) return undefined;
    return this.verifyDiskState(head, await this.replica.readMarker(), new Map());
  }

  /** The metadata of `epoch` and of every checkpoint it builds on, oldest (a full one) first. */
  async chain(epoch: number, read: (epoch: number) => Promise<CheckpointMetadata> = (e) => this.metadata(e)): Promise<CheckpointMetadata[]> {
    const chain = [await read(epoch)];
    for (let meta = chain[0]!; meta.base !== undefined; ) {
      const baseEpoch = meta.base;
      meta = await read(baseEpoch).catch((error: unknown) => {
        if (!(error instanceof CheckpointStoreError && error.code === 'not-found')) throw error;
        throw vanished(new CheckpointStoreError(`checkpoint ${epoch} builds on checkpoint ${baseEpoch}, which is gone`, 'corrupt', epoch));
      });
      chain.unshift(meta);
    }
    return chain;
  }

  /**
   * The newest checkpoint whose data, and that of every checkpoint it builds on, still matches
   * its checksum — each file read once, and kept for loading. Corrupt ones are reported through
   * `onCorrupt` and skipped (never deleted: they are evidence), so an older intact one is used.
   * A checkpoint with disks also needs a complete replica not past it, and every disk delta
   * from the replica's applied state up to it intact (`diskEpochs`).
   */
  async latestVerified(onCorrupt?: (error: CheckpointStoreError) => void): Promise<LoadableCheckpoint | undefined> {
    // keyed by file and checksum: a compaction gives an epoch other data
    const verified = new Map<string, Promise<Buffer>>();
    const failed = new Set<string>();
    const readOnce = (meta: CheckpointMetadata) => {
      const key = `${this.dataPathOf(meta)} ${meta.dataSha256 ?? meta.sha256}`;
      if (!verified.has(key)) verified.set(key, readVerifiedData(this.dir, meta).catch((error: unknown) => (failed.add(key), Promise.reject(error))));
      return verified.get(key)!;
    };
    const deltasVerified = new Map<string, Promise<unknown>>();
    let marker: Promise<ReplicaMarker | undefined> | undefined;
    for (const epoch of (await this.epochs()).reverse()) {
      // A file that vanished under this reader (the receiver compacted or pruned meanwhile): the
      // chain is read again once, from its metadata, before the checkpoint is called corrupt.
      for (let attempt = 1; ; attempt++) {
        try {
          const chain = await this.chain(epoch);
          const head = chain.at(-1)!;
          const diskEpochs = head.disks ? await this.verifyDiskState(head, await (marker ??= this.replica.readMarker()), deltasVerified) : undefined;
          const data: Buffer[] = [];
          for (const link of chain) {
            data.push(
              await readOnce(link).catch((error: unknown) => {
                if (link.epoch === epoch || !(error instanceof CheckpointStoreError)) throw error;
                const wrapped = new CheckpointStoreError(`checkpoint ${epoch} builds on checkpoint ${link.epoch}: ${error.message}`, 'corrupt', epoch, error.path);
                throw isVanished(error) ? vanished(wrapped) : wrapped;
              }),
            );
          }
          return { metadata: head, chain, data, ...(diskEpochs ? { diskEpochs } : {}) };
        } catch (error) {
          if (!(error instanceof CheckpointStoreError)) throw error;
          if (attempt === 1 && isVanished(error)) {
            for (const key of failed) verified.delete(key);
            failed.clear();
            deltasVerified.clear();
            marker = undefined; // a prune may have moved the replica on
            continue;
          }
          onCorrupt?.(error);
          break;
        }
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

  /**
   * Brings the replica to a loadable checkpoint's disk state (applies its `diskEpochs`, each
   * verified again first, and fsyncs) and returns each disk's image. Call it with the receiver
   * stopped: a later commit's prune would move the replica on. No disks: an empty map.
   */
  async prepareDisks(checkpoint: Pick<LoadableCheckpoint, 'metadata'>): Promise<Map<string, string>> {
    const { metadata } = checkpoint;
    if (!metadata.disks) return new Map();
    await this.replica.withLock(() => this.applyLocked(metadata.epoch, true));
    return new Map(metadata.disks.map((d) => [d.disk, this.replica.imagePath(d.disk)]));
  }

  /** Where the store in `storeDir` keeps its replica of `disk` (a raw image; it exists once seeded). */
  static replicaImage(storeDir: string, disk: string): string {
    return Replica.imagePath(storeDir, disk);
  }

  /** The replica's marker and images, or undefined when this store was never seeded. */
  async replicaState(): Promise<ReplicaState | undefined> {
    const marker = await this.replica.readMarker();
    return marker && { ...marker, images: Object.fromEntries(marker.disks.map((d) => [d.disk, this.replica.imagePath(d.disk)])) };
  }

  /**
   * Seeds the replica: marks it incomplete, removes every committed checkpoint (their disk state
   * is about to go), writes fresh images from the sections, fsyncs them and marks it complete.
   * Resolves with the data bytes written. The next checkpoint with disks names `{ seed }` as its
   * disk base (and, the store being empty, carries full RAM).
   */
  async seed(input: SeedInput): Promise<{ bytes: number }> {
    ignoreErrorsUntilRead(input.sections);
    const run = this.pruning.then(() => this.seedNow(input));
    this.pruning = run.then(
      () => undefined,
      () => undefined,
    );
    return run;
  }

  /** Where a checkpoint's data is as committed (`<epoch>.ckpt`); see dataPathOf for a compacted one. */
  dataPath(epoch: number): string {
    return path.join(this.dir, `${epoch}${DATA_SUFFIX}`);
  }

  /** Where the data of the checkpoint `meta` describes is: its compacted file, if it has one. */
  dataPathOf(meta: CheckpointMetadata): string {
    return dataFileIn(this.dir, meta);
  }

  deltaPath(epoch: number, disk: string): string {
    return path.join(this.dir, `${epoch}.${disk}${DELTA_SUFFIX}`);
  }

  private metaPath(epoch: number): string {
    return path.join(this.dir, `${epoch}${META_SUFFIX}`);
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
   * so a half-pruned one is uncommitted. The replica is first brought to the oldest checkpoint
   * kept (no failover can pick an older one); a checkpoint whose delta it has not passed stays.
   */
  private async prune(): Promise<void> {
    const epochs = await this.epochs();
    const read = this.cachedReader(epochs);
    const needed = new Set<number>();
    const metas = new Map<number, CheckpointMetadata>();
    for (const epoch of epochs.slice(-this.keep)) {
      // a chain that cannot be followed (unreadable metadata): prune nothing, lose nothing
      const chain = await this.chain(epoch, read).catch(() => undefined);
      if (!chain) return;
      for (const meta of chain) needed.add(meta.epoch), metas.set(meta.epoch, meta);
    }
    for (const epoch of epochs) if (!metas.has(epoch)) await read(epoch).then((m) => metas.set(epoch, m), () => undefined);
    let applied: number | null = null;
    let applyError: unknown;
    if ([...metas.values()].some((m) => m.disks)) {
      try {
        applied = (await this.replica.withLock(() => this.applyLocked(Math.min(...needed), false))).appliedEpoch;
      } catch (error) {
        applyError = error;
        applied = (await this.replica.readMarker().catch(() => undefined))?.appliedEpoch ?? null;
      }
    }
    for (const epoch of epochs.filter((e) => !needed.has(e))) {
      if (metas.get(epoch)?.disks && (applied === null || epoch > applied)) continue; // its delta is not applied yet
      await this.removeCheckpoint(epoch);
    }
    if (applyError !== undefined) throw applyError;
  }

  /** Reads metadata through the `known` cache, trusting it only for the `listed` epochs (and forgetting the rest). */
  private cachedReader(listed: readonly number[]): (epoch: number) => Promise<CheckpointMetadata> {
    const present = new Set(listed);
    for (const epoch of this.known.keys()) if (!present.has(epoch)) this.known.delete(epoch);
    return async (epoch: number) => {
      const cached = present.has(epoch) ? this.known.get(epoch) : undefined;
      if (cached) return cached;
      const meta = await this.metadata(epoch);
      this.known.set(epoch, meta);
      return meta;
    };
  }

  /**
   * Metadata first (the checkpoint is no longer committed); its data (compacted too) and disk
   * deltas are unlinked after, outside the pruning chain: unlinking a 137 MB file took ~40 ms here,
   * and the next commit must not wait for it. Their names are never used again (epochs only grow).
   */
  private async removeCheckpoint(epoch: number): Promise<void> {
    this.known.delete(epoch);
    await fs.rm(this.metaPath(epoch), { force: true });
    this.dropLater(async () => {
      await fs.rm(this.dataPath(epoch), { force: true });
      for (const name of await fs.readdir(this.dir)) {
        const owner = DELTA_NAME.exec(name)?.[1] ?? COMPACTED_DATA_NAME.exec(name)?.[1];
        if (owner === String(epoch)) await fs.rm(path.join(this.dir, name), { force: true });
      }
    });
  }

  /** Queues the removal of files no metadata names any more (open() removes them after a crash). */
  private dropLater(remove: () => Promise<void>): void {
    this.dropping = this.dropping.then(remove).catch((error: unknown) => this.reportPruneError(error));
  }

  private reportPruneError(error: unknown): void {
    this.options.onPruneError?.(error instanceof CheckpointStoreError ? error : CheckpointStoreError.fromFs(error, `prune ${this.dir}`));
  }

  /** A compacted file (or its temporary) that a live store may still name: this process's compaction, or another live process's. */
  private inProgressElsewhere(name: string, pid: number): boolean {
    const file = path.join(this.dir, name);
    if (compactingHere.has(file)) return true;
    return pid !== process.pid && processAlive(pid);
  }

  /**
   * After a commit (in the pruning chain): starts compacting `epoch`, the newest checkpoint, in
   * the background when its chain has grown past compactAtRatio or compactAtLength. Never throws.
   */
  private async considerCompaction(epoch: number): Promise<void> {
    const ratio = this.options.compactAtRatio ?? DEFAULT_COMPACT_AT_RATIO;
    const length = this.options.compactAtLength ?? DEFAULT_COMPACT_AT_LENGTH;
    if ((!this.compacting && Date.now() < this.compactRetryAt) || (ratio === Infinity && length === Infinity)) return;
    let chain: CheckpointMetadata[];
    try {
      chain = await this.chain(epoch, this.cachedReader(await this.epochs()));
    } catch {
      return; // the prune reports what is wrong with it, or the next commit's
    }
    if (chain.length < 2 || !chain.every((m) => m.layout && m.ramBlocks)) return; // full already, or not verified migration streams
    const incrementBytes = chain.slice(1).reduce((n, m) => n + m.bytes, 0);
    // a chain grown to HURRY_FACTOR times what starts a compaction: the running one is behind
    const behind = incrementBytes >= HURRY_FACTOR * ratio * chain[0]!.bytes || chain.length >= HURRY_FACTOR * length;
    if (this.compacting) {
      if (behind) this.hurry = true, this.worker?.hurry();
      return;
    }
    if (incrementBytes < ratio * chain[0]!.bytes && chain.length < length) return;
    this.compacting = true;
    this.hurry = behind;
    this.compaction = this.compact(chain).finally(() => {
      this.compacting = false;
    });
  }

  /**
   * Rewrites the chain's newest checkpoint K as one full stream, outside the pruning chain (commits
   * go on meanwhile, on K too), then switches K's metadata to it in a short step serialized with
   * prunes, and prunes. Any failure leaves the store as it was and is reported; never throws.
   */
  private async compact(chain: CheckpointMetadata[]): Promise<void> {
    const head = chain.at(-1)!;
    const { epoch } = head;
    const name = `${epoch}.full-${process.pid}${DATA_SUFFIX}`;
    const target = path.join(this.dir, name);
    const tmp = `${target}${TMP_SUFFIX}`;
    const state = { named: false };
    compactingHere.add(target).add(tmp);
    try {
      const job = { dir: this.dir, chain, tmp };
      const compacted = (this.options.compactIn ?? 'process') === 'here' ? await writeCompactedChain(job) : await this.compactInWorker(job);
      await fs.rename(tmp, target);
      await this.syncDir();
      const run = this.pruning.then(async () => {
        if (!(await this.switchToCompacted(head, { dataFile: name, ...compacted }, state))) return;
        await this.prune().catch((error: unknown) => this.reportPruneError(error));
      });
      this.pruning = run.then(
        () => undefined,
        () => undefined,
      );
      await run;
    } catch (error) {
      // K went meanwhile (a newer full checkpoint or a seed pruned it): nothing to report
      const gone = await this.metadata(epoch).then(
        (meta) => meta.sha256 !== head.sha256,
        () => true,
      );
      if (!gone) {
        this.compactRetryAt = Date.now() + (this.options.compactRetryMs ?? DEFAULT_COMPACT_RETRY_MS);
        const reported = error instanceof CheckpointStoreError ? error : CheckpointStoreError.fromFs(error, `compact checkpoint ${epoch} in ${this.dir}`, epoch);
        (this.options.onCompactError ?? this.options.onPruneError)?.(reported);
      }
    } finally {
      await fs.rm(tmp, { force: true }).catch(() => undefined);
      if (!state.named) await fs.rm(target, { force: true }).catch(() => undefined);
      compactingHere.delete(target);
      compactingHere.delete(tmp);
    }
  }

  /** compactInChildProcess, paused while a commit runs. */
  private async compactInWorker(job: CompactionJob): Promise<CompactedData> {
    const worker = compactInChildProcess(job, this.options.compactTimeoutMs ?? DEFAULT_COMPACT_TIMEOUT_MS);
    if (this.hurry) worker.hurry();
    for (let i = 0; i < this.committing; i++) worker.pause();
    this.worker = worker;
    try {
      return await worker.done;
    } finally {
      this.worker = undefined;
    }
  }

  /**
   * The switch (in the pruning chain): K's metadata names the compacted data, then K's old data
   * goes. False when K is no longer the checkpoint that was compacted (pruned, or recommitted
   * after a seed). `state.named` is set the moment the metadata names the new file.
   */
  private async switchToCompacted(
    head: CheckpointMetadata,
    compacted: { dataFile: string; dataSha256: string; bytes: number; layout: CheckpointLayout },
    state: { named: boolean },
  ): Promise<boolean> {
    const { epoch } = head;
    const current = await this.metadata(epoch).catch((error: unknown) => {
      if (error instanceof CheckpointStoreError && error.code === 'not-found') return undefined;
      throw error;
    });
    if (!current || current.sha256 !== head.sha256 || current.committedAt !== head.committedAt || current.dataFile !== undefined) return false;
    const { base: _base, ...kept } = current;
    const metadata: CheckpointMetadata = { ...kept, ...compacted, compactedAt: new Date().toISOString() };
    const metaPath = this.metaPath(epoch);
    try {
      await this.writeDurably(metaPath, `${JSON.stringify(metadata, null, 2)}\n`);
    } catch (error) {
      await fs.rm(`${metaPath}.${process.pid}${TMP_SUFFIX}`, { force: true }).catch(() => undefined);
      throw error;
    }
    state.named = true;
    this.known.set(epoch, metadata);
    await this.syncDir(); // the new name durable before the old data goes
    this.dropLater(() => fs.rm(this.dataPath(epoch), { force: true }));
    return true;
  }

  /**
   * A checkpoint's disk deltas are committed on the store's disk head — the newest committed
   * checkpoint (which must have disks), or the replica's completed seed with nothing committed on
   * it — and its metadata names that head as its disk base.
   *
   * The primary names the last disk state it knows committed: its bitmaps hold every write since
   * that one's stop instant (an epoch it was not told of merged into the next). When an ack was
   * lost (the link or the backup died after the metadata rename), the store holds newer
   * checkpoints than the one named. Those came from the same lineage, each covering writes since
   * the named one, so this delta — a superset of theirs — turns the head's state into this
   * checkpoint's exactly: it is taken, on the head, rather than forcing a reseed. What must hold
   * is only that the named base is of this store's lineage: a committed checkpoint with disks, or
   * the replica's seed (a seed removes every checkpoint before it).
   */
  private async checkDiskBase(epoch: number, input: CommitInput, latest: number | undefined): Promise<{ marker: ReplicaMarker; base: DiskBase }> {
    const { diskBase } = input;
    if (!input.disks) throw new CheckpointStoreError(`checkpoint ${epoch} names a disk base but carries no disks`, 'verify', epoch);
    if (diskBase === undefined) throw new CheckpointStoreError(`checkpoint ${epoch} carries disks but names no disk base: reseed the disks`, 'no-disk-base', epoch);
    if (!validDiskBase(diskBase, epoch)) throw new CheckpointStoreError(`checkpoint ${epoch} names an invalid disk base ${JSON.stringify(diskBase)}`, 'verify', epoch);
    const refuse = (why: string) => new CheckpointStoreError(`checkpoint ${epoch}'s disks apply on ${describeBase(diskBase)}, but ${why}: reseed the disks`, 'no-disk-base', epoch);
    const marker = await this.replica.readMarker();
    if (!marker) throw refuse('this backup holds no disk replica');
    if (!marker.complete) throw refuse(`the replica's seed ${marker.seed} is incomplete`);
    if ('epoch' in diskBase) {
      if (latest === undefined) throw refuse('the newest committed checkpoint is none');
      const named = await this.metadata(diskBase.epoch).catch((error: unknown) => {
        if (error instanceof CheckpointStoreError && error.code === 'not-found') throw refuse(`checkpoint ${diskBase.epoch} is not committed here (the newest committed checkpoint is ${latest})`);
        throw refuse((error as Error).message); // unreadable: its lineage cannot be shown
      });
      if (!named.disks) throw refuse(`checkpoint ${diskBase.epoch} carries no disks`);
    } else {
      if (diskBase.seed !== marker.seed) throw refuse(`the replica holds seed ${marker.seed}`);
      if (latest === undefined && marker.appliedEpoch !== null) throw refuse(`the replica is applied up to checkpoint ${marker.appliedEpoch} since`);
    }
    if (latest === undefined) return { marker, base: { seed: marker.seed } };
    if (!(await this.metadata(latest)).disks) throw refuse(`the newest committed checkpoint is ${latest}, which carries no disks`);
    return { marker, base: { epoch: latest } };
  }

  /** Writes each disk section to its delta's temporary (fsync'd); `deltas` collects them for the commit or its cleanup. */
  private async writeDeltas(
    epoch: number,
    sections: AsyncIterable<DiskSectionInput>,
    marker: ReplicaMarker,
    deltas: { path: string; tmp: string; writer?: DiskDeltaWriter; metadata?: DiskDeltaMetadata }[],
  ): Promise<void> {
    const sizes = new Map(marker.disks.map((d) => [d.disk, d.sizeBytes]));
    const seen = new Set<string>();
    for await (const { disk, sizeBytes, extents } of sections) {
      ignoreErrorsUntilRead(extents);
      if (!isValidDiskName(disk)) throw new CheckpointStoreError(`checkpoint ${epoch} carries a disk with an invalid name ${JSON.stringify(disk)}`, 'verify', epoch);
      if (seen.has(disk)) throw new CheckpointStoreError(`checkpoint ${epoch} carries disk '${disk}' twice`, 'verify', epoch);
      seen.add(disk);
      if (sizes.get(disk) !== sizeBytes) {
        throw new CheckpointStoreError(`checkpoint ${epoch}'s disk '${disk}' of ${sizeBytes} bytes is not one the replica holds (${describeDisks(marker.disks)}): reseed the disks`, 'no-disk-base', epoch);
      }
      const delta: (typeof deltas)[number] = { path: this.deltaPath(epoch, disk), tmp: `${this.deltaPath(epoch, disk)}.${process.pid}${TMP_SUFFIX}` };
      deltas.push(delta);
      const writer = (delta.writer = await DiskDeltaWriter.create(delta.tmp, sizeBytes));
      for await (const extent of extents) {
        const bad = invalidExtent(extent, sizeBytes);
        if (bad) throw new CheckpointStoreError(`checkpoint ${epoch}, disk '${disk}': ${bad}`, 'verify', epoch);
        await writer.add(extent);
      }
      delta.metadata = { disk, sizeBytes, ...(await writer.finish()) };
      delta.writer = undefined;
    }
    const missing = marker.disks.filter((d) => !seen.has(d.disk));
    if (missing.length > 0) {
      throw new CheckpointStoreError(`checkpoint ${epoch} lacks disk ${missing.map((d) => `'${d.disk}'`).join(', ')} of the replica: reseed the disks`, 'no-disk-base', epoch);
    }
  }

  private async seedNow({ seed, disks, sections }: SeedInput): Promise<{ bytes: number }> {
    if (!validSeedId(seed)) throw new CheckpointStoreError(`invalid seed id ${JSON.stringify(seed)}`, 'verify');
    const bad = invalidDiskList(disks);
    if (bad) throw new CheckpointStoreError(`seed ${seed}: invalid ${bad}`, 'verify');
    try {
      return await this.replica.withLock(async () => {
        await this.replica.writeMarker({ seed, complete: false, appliedEpoch: null, disks });
        // the images are about to change: no committed checkpoint's disk state survives
        for (const epoch of await this.epochs()) await this.removeCheckpoint(epoch);
        await this.syncDir();
        const images = await this.replica.createImages(disks);
        let bytes = 0;
        try {
          let next = 0;
          for await (const section of sections) {
            ignoreErrorsUntilRead(section.extents);
            const listed = disks[next++];
            if (!listed || section.disk !== listed.disk || section.sizeBytes !== listed.sizeBytes) {
              throw new CheckpointStoreError(
                `seed ${seed}: disk '${section.disk}' of ${section.sizeBytes} bytes came where ${listed ? `'${listed.disk}' of ${listed.sizeBytes} bytes` : 'no more disks'} was listed`,
                'verify',
              );
            }
            const image = images.get(listed.disk)!;
            let end = 0;
            for await (const extent of section.extents) {
              const why = invalidExtent(extent, listed.sizeBytes) ?? (extent.offset < end ? `extent at ${extent.offset} overlaps or precedes the one ending at ${end}` : undefined);
              if (why) throw new CheckpointStoreError(`seed ${seed}, disk '${listed.disk}': ${why}`, 'verify');
              end = extent.offset + extent.length;
              // a fresh image reads as zeros: a ZERO extent needs no write
              if (extent.data) {
                await image.write(extent);
                bytes += extent.length;
              }
            }
          }
          if (next < disks.length) throw new CheckpointStoreError(`seed ${seed} ended without disk ${disks.slice(next).map((d) => `'${d.disk}'`).join(', ')}`, 'verify');
          for (const image of images.values()) await image.sync();
        } finally {
          await closeAll(images);
        }
        await syncDir(this.replica.dir);
        await this.replica.writeMarker({ seed, complete: true, appliedEpoch: null, disks });
        return { bytes };
      });
    } catch (error) {
      if (error instanceof CheckpointStoreError) throw error;
      throw CheckpointStoreError.fromFs(error, `seed ${seed} into ${this.replica.dir}`);
    }
  }

  /**
   * Holding the replica's lock: applies the committed deltas after the replica's applied state up
   * to the newest checkpoint with disks at or before `target` — `exact`: up to `target` itself,
   * which must not be older than the replica's state (else `no-replica`).
   */
  private async applyLocked(target: number, exact: boolean): Promise<ReplicaMarker> {
    const marker = await this.replica.readMarker();
    if (!marker || !marker.complete) {
      const why = marker ? `the replica's seed ${marker.seed} is incomplete` : 'this backup holds no disk replica';
      throw new CheckpointStoreError(`checkpoint ${target}'s disks cannot be prepared: ${why}`, 'no-replica', target);
    }
    const applied = marker.appliedEpoch ?? -1;
    const floor = Math.max(applied, marker.applying ?? -1);
    if (target < floor) {
      if (!exact) return marker;
      throw new CheckpointStoreError(`checkpoint ${target}'s disk state is gone: the replica is ${marker.applying === undefined ? 'applied' : 'being applied'} up to checkpoint ${floor}`, 'no-replica', target);
    }
    let head: CheckpointMetadata | undefined;
    if (exact) {
      head = await this.metadata(target);
    } else {
      for (const epoch of (await this.epochs()).filter((e) => e > applied && e <= target).reverse()) {
        const meta = await this.metadata(epoch);
        if (meta.disks) {
          head = meta;
          break;
        }
      }
    }
    if (!head || head.epoch < floor) {
      if (marker.applying === undefined) return marker;
      throw new CheckpointStoreError(`the replica was being applied up to checkpoint ${marker.applying}, which is gone`, 'corrupt', marker.applying);
    }
    const chain = await this.diskChain(head, marker);
    const deltas: DeltaToApply[] = chain.flatMap((meta) =>
      meta.disks!.map((d) => ({ epoch: meta.epoch, disk: { disk: d.disk, sizeBytes: d.sizeBytes }, path: this.deltaPath(meta.epoch, d.disk), expected: d })),
    );
    return this.replica.apply(marker, head.epoch, deltas, (delta, error) => this.deltaError(delta.epoch, delta.epoch, delta.disk.disk, error));
  }

  /**
   * The checkpoints whose deltas take the replica from its applied state to `head`'s disk state,
   * oldest first (empty: it is there), following each one's disk base.
   */
  private async diskChain(head: CheckpointMetadata, marker: ReplicaMarker): Promise<CheckpointMetadata[]> {
    const applied = marker.appliedEpoch;
    const chain: CheckpointMetadata[] = [];
    for (let meta = head; meta.epoch !== applied; ) {
      if (!meta.disks || !meta.diskBase) {
        throw new CheckpointStoreError(`checkpoint ${head.epoch}'s disks build on checkpoint ${meta.epoch}, which carries none`, 'corrupt', head.epoch);
      }
      if (!sameDisks(meta.disks, marker.disks)) {
        throw new CheckpointStoreError(`checkpoint ${meta.epoch}'s disks (${describeDisks(meta.disks)}) are not the replica's (${describeDisks(marker.disks)})`, 'no-replica', head.epoch);
      }
      chain.unshift(meta);
      const base: DiskBase = meta.diskBase;
      if ('seed' in base) {
        if (applied === null && base.seed === marker.seed) break;
        throw new CheckpointStoreError(
          `checkpoint ${head.epoch}'s disks build on seed ${base.seed}, but the replica holds seed ${marker.seed}${applied === null ? '' : ` applied up to checkpoint ${applied}`}`,
          'no-replica',
          head.epoch,
        );
      }
      if (applied !== null && base.epoch < applied) {
        throw new CheckpointStoreError(`checkpoint ${head.epoch}'s disk state is gone: the replica is applied up to checkpoint ${applied}`, 'no-replica', head.epoch);
      }
      if (base.epoch === applied) break;
      meta = await this.metadata(base.epoch).catch((error: unknown) => {
        throw error instanceof CheckpointStoreError && error.code === 'not-found'
          ? new CheckpointStoreError(`checkpoint ${head.epoch}'s disks build on checkpoint ${base.epoch}, which is gone`, 'corrupt', head.epoch)
          : error;
      });
    }
    return chain;
  }

  /** What latestVerified checks of a checkpoint with disks: returns the epochs of the deltas it needs. */
  private async verifyDiskState(head: CheckpointMetadata, marker: ReplicaMarker | undefined, verified: Map<string, Promise<unknown>>): Promise<number[]> {
    if (!marker || !marker.complete) {
      const why = marker ? `the replica's seed ${marker.seed} is incomplete` : 'this backup holds no disk replica';
      throw new CheckpointStoreError(`checkpoint ${head.epoch} has disks, but ${why}`, 'no-replica', head.epoch);
    }
    const floor = Math.max(marker.appliedEpoch ?? -1, marker.applying ?? -1);
    if (head.epoch < floor) {
      throw new CheckpointStoreError(`checkpoint ${head.epoch}'s disk state is gone: the replica is ${marker.applying === undefined ? 'applied' : 'being applied'} up to checkpoint ${floor}`, 'no-replica', head.epoch);
    }
    const chain = await this.diskChain(head, marker);
    for (const meta of chain) {
      for (const delta of meta.disks!) {
        const key = `${meta.epoch}.${delta.disk}`;
        if (!verified.has(key)) verified.set(key, scanDiskDelta(this.deltaPath(meta.epoch, delta.disk), delta.sizeBytes, { expected: delta }));
        await verified.get(key)!.catch((error: unknown) => {
          throw this.deltaError(head.epoch, meta.epoch, delta.disk, error);
        });
      }
    }
    return chain.map((m) => m.epoch);
  }

  private deltaError(candidate: number, epoch: number, disk: string, error: unknown): CheckpointStoreError {
    if (error instanceof CheckpointStoreError) return error;
    const file = this.deltaPath(epoch, disk);
    const missing = (error as NodeJS.ErrnoException).code === 'ENOENT';
    const what = missing ? 'is missing' : `is corrupt: ${(error as Error).message}`;
    const message = candidate === epoch ? `checkpoint ${epoch}'s delta of disk '${disk}' ${what}` : `checkpoint ${candidate} builds on checkpoint ${epoch}'s delta of disk '${disk}', which ${what}`;
    const reported = new CheckpointStoreError(message, 'corrupt', candidate, file);
    return missing ? vanished(reported) : reported;
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

/** A full checkpoint must carry every page; an incremental one the same RAM blocks as its base. */
function checkShape(epoch: number, shape: StreamShape, base: CheckpointMetadata | undefined): void {
  if (!base && shape.incremental) {
    throw new CheckpointStoreError(`checkpoint ${epoch} came as a full checkpoint but QEMU marked its stream an increment (x-ftvm-incremental): its base is missing`, 'verify', epoch);
  }
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


/** A stream input's error surfaces when it is iterated (see commit), not as an uncaught 'error' event. */
function ignoreErrorsUntilRead(input: unknown): void {
  if (input && typeof (input as { on?: unknown }).on === 'function') (input as Readable).on('error', ignoreHere);
}

function describeBase(base: DiskBase): string {
  return 'seed' in base ? `seed ${base.seed}` : `checkpoint ${base.epoch}`;
}

function describeDisks(disks: DiskGeometry[]): string {
  return disks.length === 0 ? 'no disks' : disks.map((d) => `'${d.disk}' of ${d.sizeBytes} bytes`).join(', ');
}

function sameDisks(a: DiskGeometry[], b: DiskGeometry[]): boolean {
  const sizes = new Map(b.map((d) => [d.disk, d.sizeBytes]));
  return a.length === b.length && a.every((d) => sizes.get(d.disk) === d.sizeBytes);
}

async function exists(file: string): Promise<boolean> {
  return fs.access(file).then(
    () => true,
    () => false,
  );
}
