// Checkpoint chains. With ftvm's QEMU capability x-ftvm-incremental a migration after a completed
// one carries only the pages written since, so a checkpoint is a full stream followed by zero or
// more incremental ones. QEMU loads only a full stream: flattenCheckpointChain builds one from a
// chain, and RamCoverage tells a full stream (every page of every block) from an incremental one.

import { DEFAULT_TARGET_PAGE_SIZE, RamFlag } from './constants.js';
import { configurationPageSize } from './configuration.js';
import { MigrationStreamParser } from './parser.js';
import type { MigrationRecord, RamBlockInfo, RamPageRecord, RamZeroRecord } from './records.js';
import { encodeRecords } from './writer.js';

/** A RAM block as the stream's MEM_SIZE list announces it. */
export interface RamBlockExtent {
  id: string;
  bytes: number;
}

export class CheckpointChainError extends Error {
  override name = 'CheckpointChainError';
}

/** Which pages of which blocks a stream carried; fed records in stream order. */
export class RamCoverage {
  private pageSize = DEFAULT_TARGET_PAGE_SIZE;
  private blockList: RamBlockExtent[] | undefined;
  private readonly seen = new Map<string, Uint8Array>();

  add(record: MigrationRecord): void {
    if (record.type === 'configuration') this.pageSize = configurationPageSize(record) ?? this.pageSize;
    else if (record.type === 'ram-mem-size') {
      this.blockList = record.blocks.map((b) => ({ id: b.idstr, bytes: b.usedLength }));
      for (const block of record.blocks) this.seen.set(block.idstr, new Uint8Array(Math.ceil(block.usedLength / this.pageSize)));
    } else if (record.type === 'ram-page' || record.type === 'ram-zero' || record.type === 'ram-compressed' || record.type === 'ram-xbzrle') {
      const pages = this.seen.get(record.block);
      const index = record.addr / this.pageSize;
      if (pages && index < pages.length) pages[index] = 1;
    }
  }

  /** The MEM_SIZE block list (undefined if the stream had none). */
  get blocks(): RamBlockExtent[] | undefined {
    return this.blockList;
  }

  /** The first block with pages the stream never carried, with how many; undefined when complete. */
  firstGap(): { block: string; missingPages: number } | undefined {
    for (const [block, pages] of this.seen) {
      const missingPages = pages.length - pages.reduce((n, p) => n + p, 0);
      if (missingPages > 0) return { block, missingPages };
    }
    return undefined;
  }
}

export function sameBlocks(a: readonly RamBlockExtent[] | undefined, b: readonly RamBlockExtent[] | undefined): boolean {
  return a !== undefined && b !== undefined && a.length === b.length && a.every((x, i) => x.id === b[i]!.id && x.bytes === b[i]!.bytes);
}

type PageRecord = RamPageRecord | RamZeroRecord;

export interface FlattenOptions {
  /**
   * Bytes parsed (or records written) between two returns to the event loop. Flattening a
   * 256 MiB guest is a few hundred ms of CPU; in slices, a daemon doing it at failover still
   * answers its lease keepalives and heartbeats on time. Default 4 MiB.
   */
  sliceBytes?: number;
}

const yieldToEventLoop = () => new Promise<void>((resolve) => setImmediate(resolve));

/**
 * One full migration stream from a chain (oldest first: a full checkpoint, then incremental ones
 * in order): the newest stream's records, with its RAM pages replaced by the newest copy of every
 * page, all written in its setup section right after the block list. Device state, the EOF and
 * the VM description are the newest stream's, unchanged. Rejects with CheckpointChainError when
 * the chain does not make one guest: a first stream lacking pages, block lists that differ, or
 * page encodings (compressed, XBZRLE) a merge cannot carry.
 */
export async function flattenCheckpointChain(streams: readonly Uint8Array[], options: FlattenOptions = {}): Promise<Buffer> {
  if (streams.length === 0) throw new CheckpointChainError('an empty checkpoint chain');
  if (streams.length === 1) return Buffer.from(streams[0]!.buffer, streams[0]!.byteOffset, streams[0]!.byteLength);
  const sliceBytes = options.sliceBytes ?? 4 * 1024 * 1024;

  const merger = new ChainMerger();
  for (const [index, stream] of streams.entries()) {
    const parser = new MigrationStreamParser();
    const add = (record: MigrationRecord) => merger.add(index, record, index === streams.length - 1);
    for (let offset = 0; offset < stream.length; offset += sliceBytes) {
      parser.push(stream.subarray(offset, offset + sliceBytes), add);
      await yieldToEventLoop();
    }
    parser.end(add);
    if (index === 0) merger.checkFull();
  }

  const parts: Buffer[] = [];
  let batch: MigrationRecord[] = [];
  for (const record of merger.merged()) {
    batch.push(record);
    if (batch.length >= sliceBytes / 4096) {
      parts.push(encodeRecords(batch));
      batch = [];
      await yieldToEventLoop();
    }
  }
  parts.push(encodeRecords(batch));
  return Buffer.concat(parts);
}

/** The newest copy of every page seen so far, and the newest stream's other records. */
class ChainMerger {
  private blocks: RamBlockInfo[] | undefined;
  private pageSize = DEFAULT_TARGET_PAGE_SIZE;
  private readonly pages = new Map<string, (PageRecord | undefined)[]>();
  private readonly newest: MigrationRecord[] = [];

  add(index: number, record: MigrationRecord, isNewest: boolean): void {
    switch (record.type) {
      case 'configuration':
        this.pageSize = configurationPageSize(record) ?? this.pageSize;
        break;
      case 'ram-mem-size':
        if (this.blocks === undefined) {
          this.blocks = record.blocks;
          for (const b of record.blocks) this.pages.set(b.idstr, new Array<PageRecord | undefined>(Math.ceil(b.usedLength / this.pageSize)));
        } else if (!sameBlocks(extents(this.blocks), extents(record.blocks))) {
          throw new CheckpointChainError(`checkpoint ${index} of the chain has RAM blocks ${describe(record.blocks)}, its base ${describe(this.blocks)}`);
        }
        break;
      case 'ram-page':
      case 'ram-zero': {
        const slots = this.pages.get(record.block);
        const at = record.addr / this.pageSize;
        if (!slots || !Number.isInteger(at) || at >= slots.length) {
          throw new CheckpointChainError(`checkpoint ${index} of the chain has a page at 0x${record.addr.toString(16)} outside block '${record.block}'`);
        }
        slots[at] = record;
        return; // pages are written from the table, never from a stream's own order
      }
      case 'ram-compressed':
      case 'ram-xbzrle':
        throw new CheckpointChainError(`checkpoint ${index} of the chain has ${record.type} pages, which a chain cannot merge`);
      default:
        break;
    }
    if (isNewest) this.newest.push(record);
  }

  /** The first stream of a chain must have carried every page. */
  checkFull(): void {
    for (const [block, slots] of this.pages) {
      let missing = 0;
      for (let i = 0; i < slots.length; i++) if (slots[i] === undefined) missing++;
      if (missing > 0) throw new CheckpointChainError(`the chain's first checkpoint is not full: ${missing} pages of block '${block}' are missing`);
    }
  }

  *merged(): Generator<MigrationRecord> {
    for (const record of this.newest) {
      yield record;
      if (record.type === 'ram-mem-size') yield* allPages(this.blocks!, this.pages);
    }
  }
}

function* allPages(blocks: RamBlockInfo[], pages: Map<string, (PageRecord | undefined)[]>): Generator<PageRecord> {
  for (const block of blocks) {
    let first = true;
    for (const page of pages.get(block.idstr)!) {
      const kind = page!.type === 'ram-page' ? RamFlag.PAGE : RamFlag.ZERO;
      // save_page_header: the block id only on a block's first page, CONTINUE after it.
      yield { ...page!, flags: first ? kind : kind | RamFlag.CONTINUE };
      first = false;
    }
  }
}

function extents(blocks: readonly RamBlockInfo[]): RamBlockExtent[] {
  return blocks.map((b) => ({ id: b.idstr, bytes: b.usedLength }));
}

function describe(blocks: readonly RamBlockInfo[]): string {
  return blocks.map((b) => `${b.idstr}:${b.usedLength}`).join(', ');
}
