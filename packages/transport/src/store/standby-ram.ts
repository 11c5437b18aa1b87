/**
 * A warm standby's RAM kept at the newest committed checkpoint (issue 18). The standby QEMU maps
 * its main RAM block from a file (MAP_SHARED); every checkpoint the store commits is verified and
 * its pages of that block written into the file, so at failover only device state is left to
 * load: `deviceOnly()` is a stream whose configuration turns QEMU's x-ignore-shared on, whose
 * "ram" section announces every block (with the region address x-ignore-shared expects) and
 * carries pages only for the small blocks kept here in memory (firmware, ROMs, VGA), then the
 * checkpoint's device state.
 *
 * A checkpoint is applied whole or not at all: its data is read and checked against its checksum
 * before its first page is written, so a corrupt checkpoint leaves the file at the previous one.
 * The stamp beside the file says which checkpoint it holds (`applying` while one is written).
 */
import { performance } from 'node:perf_hooks';
import { FTVM_INCREMENTAL_SUBSECTION, RamFlag } from '../stream/constants.js';
import type { AssembledCheckpoint } from '../stream/chain.js';
import type { ConfigurationRecord, ConfigurationSubsection, MigrationRecord, RamMemSizeRecord, RamPageRecord, RamZeroRecord, SectionStartRecord } from '../stream/records.js';
import { encodeRecords } from '../stream/writer.js';
import type { CheckpointStore } from './checkpoint-store.js';
import { isVanished } from './compaction.js';
import { CheckpointStoreError } from './errors.js';
import type { CheckpointMetadata } from './metadata.js';
import { parseRamCheckpoint, RamFileError, writeRamFileStamp, writeRamPages } from './ram-file.js';

/** Listings of the chain per catch-up while its files vanish under the reader (compaction, prune). */
const VANISHED_ATTEMPTS = 3;

/** QEMU's name of the capability that leaves shared RAM blocks out of a migration. */
export const IGNORE_SHARED_CAPABILITY = 'x-ignore-shared';

export interface StandbyRamOptions {
  /** The RAM block the file holds (default `pc.ram`, the PC machine's main RAM). */
  block?: string;
  /** Which committed checkpoints may be applied (e.g. of the current run of protection, not known bad). */
  accept?: (epoch: number) => boolean;
  /** A checkpoint that does not verify (it and what builds on it are never applied). */
  onCorrupt?: (error: CheckpointStoreError) => void;
  /** Awaited before each checkpoint is read (test harnesses hold applies back with it). */
  beforeApply?: (epoch: number) => Promise<void>;
}

/** One checkpoint written into the file. */
export interface StandbyRamApplied {
  epoch: number;
  /** A full checkpoint (the file rewritten) or an increment. */
  full: boolean;
  pages: number;
  bytes: number;
  /** Read, verified, parsed and written, ms. */
  applyMs: number;
  /** From the store's commit (its committedAt) to applied, ms. */
  lagMs: number;
}

/** What the file holds, and what a device-state-only load needs with it. */
interface Held {
  meta: CheckpointMetadata;
  preamble: MigrationRecord[];
  configuration: ConfigurationRecord;
  ramStart: SectionStartRecord;
  memSize: RamMemSizeRecord;
  footers: boolean;
  /** The small blocks' pages, newest of each: every page of them (QEMU's own copies hold firmware). */
  small: Map<string, Map<number, RamPageRecord | RamZeroRecord>>;
  /** The checkpoint's own header, configuration and commands (to parse `deviceState` alone). */
  preambleBytes: Buffer;
  /** Its device state, EOF and VM description. */
  deviceState: Buffer;
}

export class StandbyRam {
  private held: Held | undefined;
  private queue: Promise<unknown> = Promise.resolve();
  private readonly failed = new Set<number>();
  private closed = false;
  private readonly block: string;

  constructor(
    private readonly store: CheckpointStore,
    /** The file the standby maps its RAM block from. */
    readonly file: string,
    private readonly options: StandbyRamOptions = {},
  ) {
    this.block = options.block ?? 'pc.ram';
  }

  /** The checkpoint the file holds whole; undefined while it holds none (cold). */
  get epoch(): number | undefined {
    return this.held?.meta.epoch;
  }

  /** The metadata of the checkpoint the file holds. */
  get metadata(): CheckpointMetadata | undefined {
    return this.held?.meta;
  }

  /**
   * Brings the file to the newest committed checkpoint `accept` allows: its chain after the one
   * held, or the whole chain when the held one is not in it (a new full checkpoint, a first fill).
   * Serialized; a checkpoint that does not verify stops it there (reported through onCorrupt).
   */
  catchUp(): Promise<StandbyRamApplied[]> {
    const run = this.queue.then(() => (this.closed ? [] : this.catchUpNow()));
    this.queue = run.catch(() => undefined);
    return run;
  }

  /** No more applies once the running one (if any) ends. */
  async close(): Promise<void> {
    this.closed = true;
    await this.queue;
  }

  /** Applies again after close (a staged failover given up: the standby stays). */
  reopen(): void {
    this.closed = false;
  }

  /**
   * The held checkpoint as a stream for a standby whose block is this file: x-ignore-shared on,
   * every small block's pages, the device state. Throws when the file holds none.
   */
  deviceOnly(): AssembledCheckpoint {
    const held = this.held;
    if (!held) throw new RamFileError('FILE_SIZE', `the standby RAM file ${this.file} holds no checkpoint yet`);
    const { sectionId } = held.ramStart;
    const records: MigrationRecord[] = held.preamble.map((r) => (r.type === 'configuration' ? withIgnoreShared(r) : r));
    // ram_save_setup with x-ignore-shared: each block's region address after its length. Only an
    // ignored (shared) block's is checked (ram_load_precopy), and the main RAM block's region is
    // the machine's RAM container, at 0.
    records.push(held.ramStart, { ...held.memSize, blocks: held.memSize.blocks.map((b) => ({ ...b, mrAddr: b.mrAddr ?? 0 })) }, eos());
    if (held.footers) records.push({ type: 'section-footer', sectionId });
    records.push({ type: 'section-part', sectionId });
    for (const [block, pages] of held.small) {
      let first = true;
      for (const addr of [...pages.keys()].sort((a, b) => a - b)) {
        const page = pages.get(addr)!;
        // the block's name only on its first page (CONTINUE: same block as the previous record)
        const flags = first ? page.flags & ~RamFlag.CONTINUE : page.flags | RamFlag.CONTINUE;
        records.push({ ...page, block, flags });
        first = false;
      }
    }
    records.push(eos());
    if (held.footers) records.push({ type: 'section-footer', sectionId });
    return { ram: [encodeRecords(records)], deviceState: held.deviceState, preamble: held.preambleBytes };
  }

  private async catchUpNow(): Promise<StandbyRamApplied[]> {
    const applied: StandbyRamApplied[] = [];
    // A file that vanished under this reader (the receiver compacted or pruned meanwhile) is no
    // corruption: the chain is listed again; past the attempts the next catch-up tries again.
    for (let attempt = 1; attempt <= VANISHED_ATTEMPTS; attempt++) {
      try {
        await this.catchUpOnce(applied);
        return applied;
      } catch (error) {
        if (!isVanished(error)) throw error;
      }
    }
    return applied;
  }

  private async catchUpOnce(applied: StandbyRamApplied[]): Promise<void> {
    const accept = this.options.accept ?? (() => true);
    const epochs = (await this.store.epochs()).filter((e) => accept(e) && !this.failed.has(e));
    const target = epochs.at(-1);
    if (target === undefined || target === this.held?.meta.epoch) return;
    let chain: CheckpointMetadata[];
    try {
      chain = await this.store.chain(target);
    } catch (error) {
      if (isVanished(error)) throw error;
      this.fail(target, error);
      return;
    }
    const heldAt = this.held ? chain.findIndex((m) => m.epoch === this.held!.meta.epoch && m.sha256 === this.held!.meta.sha256) : -1;
    const links = heldAt >= 0 ? chain.slice(heldAt + 1) : chain;
    for (const link of links) {
      if (this.closed) break;
      if (this.failed.has(link.epoch)) {
        this.fail(target, new CheckpointStoreError(`checkpoint ${target} builds on checkpoint ${link.epoch}, which does not verify`, 'corrupt', target));
        break;
      }
      await this.options.beforeApply?.(link.epoch);
      const t0 = performance.now();
      let data: Buffer;
      try {
        data = await this.store.readVerified(link);
      } catch (error) {
        if (isVanished(error)) throw error;
        this.fail(link.epoch, error);
        if (link.epoch !== target) this.failed.add(target);
        break;
      }
      try {
        applied.push(await this.apply(link, data, t0));
      } catch (error) {
        // it verified but cannot be applied (see RamFileError): never tried again
        this.failed.add(link.epoch).add(target);
        throw error;
      }
    }
  }

  private fail(epoch: number, error: unknown): void {
    this.failed.add(epoch);
    if (error instanceof CheckpointStoreError) this.options.onCorrupt?.(error);
    else throw error;
  }

  /** Writes one verified checkpoint (full: the whole file; else over the held one). */
  private async apply(meta: CheckpointMetadata, data: Buffer, t0: number): Promise<StandbyRamApplied> {
    const full = meta.base === undefined;
    const parsed = parseRamCheckpoint(data, { block: this.block, full, what: `checkpoint ${meta.epoch}` });
    const small = full || !this.held ? new Map<string, Map<number, RamPageRecord | RamZeroRecord>>() : this.held.small;
    for (const [block, pages] of parsed.small) {
      const mine = small.get(block) ?? new Map<number, RamPageRecord | RamZeroRecord>();
      small.set(block, mine);
      for (const [addr, page] of pages) mine.set(addr, page);
    }
    // from here until `applied` the file is neither the held checkpoint nor this one
    this.held = undefined;
    await writeRamFileStamp(this.file, { epoch: meta.epoch, state: 'applying' });
    const written = await writeRamPages(this.file, parsed.pages, { full, blockBytes: parsed.blockBytes, pageSize: parsed.pageSize, block: this.block });
    await writeRamFileStamp(this.file, { epoch: meta.epoch, state: 'applied' });
    this.held = {
      meta,
      preamble: parsed.preamble,
      configuration: parsed.configuration,
      ramStart: parsed.ramStart,
      memSize: parsed.memSize,
      footers: parsed.footers,
      small,
      preambleBytes: Buffer.from(data.subarray(0, parsed.layout.preambleEnd)),
      deviceState: Buffer.from(data.subarray(parsed.layout.deviceStateStart)),
    };
    const applyMs = performance.now() - t0;
    const committedAt = Date.parse(meta.committedAt);
    return { epoch: meta.epoch, full, pages: written.pages, bytes: written.bytes, applyMs: round(applyMs), lagMs: round(Number.isFinite(committedAt) ? Date.now() - committedAt : applyMs) };
  }
}

/** The configuration with x-ignore-shared as its only validated capability, and no increment marker. */
export function withIgnoreShared(configuration: ConfigurationRecord): ConfigurationRecord {
  const name = Buffer.from(IGNORE_SHARED_CAPABILITY, 'latin1');
  const data = Buffer.alloc(4 + 1 + name.length);
  data.writeUInt32BE(1, 0);
  data[4] = name.length;
  name.copy(data, 5);
  const capabilities: ConfigurationSubsection = { name: 'configuration/capabilities', versionId: 1, data };
  const kept = configuration.subsections.filter((s) => s.name !== 'configuration/capabilities' && s.name !== FTVM_INCREMENTAL_SUBSECTION);
  // vmstate_configuration's order: target-page-bits, capabilities, uuid
  const at = kept.findIndex((s) => s.name === 'configuration/uuid');
  const subsections = at < 0 ? [...kept, capabilities] : [...kept.slice(0, at), capabilities, ...kept.slice(at)];
  return { ...configuration, subsections };
}

function eos(): MigrationRecord {
  return { type: 'ram-eos', addr: 0, flags: RamFlag.EOS };
}

function round(ms: number): number {
  return Math.round(ms * 10) / 10;
}
