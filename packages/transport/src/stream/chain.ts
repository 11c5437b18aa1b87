// Checkpoint chains. With ftvm's QEMU capability x-ftvm-incremental a migration after a completed
// one carries only the pages written since, so a checkpoint is a full stream followed by zero or
// more incremental ones. QEMU loads only a full stream: flattenCheckpointChain builds one from a
// chain, and RamCoverage tells a full stream (every page of every block) from an incremental one.

import { DEFAULT_TARGET_PAGE_SIZE, RamFlag } from './constants.js';
import { configurationPageSize } from './configuration.js';
import { parseMigrationStream } from './parser.js';
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

/**
 * One full migration stream from a chain (oldest first: a full checkpoint, then incremental ones
 * in order): the newest stream's records, with its RAM pages replaced by the newest copy of every
 * page, all written in its setup section right after the block list. Device state, the EOF and
 * the VM description are the newest stream's, unchanged. Throws CheckpointChainError when the
 * chain does not make one guest: a first stream lacking pages, block lists that differ, or page
 * encodings (compressed, XBZRLE) a merge cannot carry.
 */
export function flattenCheckpointChain(streams: readonly Uint8Array[]): Buffer {
  if (streams.length === 0) throw new CheckpointChainError('an empty checkpoint chain');
  if (streams.length === 1) return Buffer.from(streams[0]!.buffer, streams[0]!.byteOffset, streams[0]!.byteLength);

  let blocks: RamBlockInfo[] | undefined;
  let pageSize = DEFAULT_TARGET_PAGE_SIZE;
  const pages = new Map<string, (PageRecord | undefined)[]>();
  let newest: MigrationRecord[] = [];

  streams.forEach((stream, index) => {
    const records = parseMigrationStream(stream);
    for (const record of records) {
      switch (record.type) {
        case 'configuration':
          pageSize = configurationPageSize(record) ?? pageSize;
          break;
        case 'ram-mem-size':
          if (blocks === undefined) {
            blocks = record.blocks;
            for (const b of blocks) pages.set(b.idstr, new Array<PageRecord | undefined>(Math.ceil(b.usedLength / pageSize)));
          } else if (!sameBlocks(extents(blocks), extents(record.blocks))) {
            throw new CheckpointChainError(
              `checkpoint ${index} of the chain has RAM blocks ${describe(record.blocks)}, its base ${describe(blocks)}`,
            );
          }
          break;
        case 'ram-page':
        case 'ram-zero': {
          const slots = pages.get(record.block);
          const at = record.addr / pageSize;
          if (!slots || !Number.isInteger(at) || at >= slots.length) {
            throw new CheckpointChainError(`checkpoint ${index} of the chain has a page at 0x${record.addr.toString(16)} outside block '${record.block}'`);
          }
          slots[at] = record;
          break;
        }
        case 'ram-compressed':
        case 'ram-xbzrle':
          throw new CheckpointChainError(`checkpoint ${index} of the chain has ${record.type} pages, which a chain cannot merge`);
        default:
          break;
      }
    }
    if (index === 0) {
      for (const [block, slots] of pages) {
        const missing = slots.length - slots.filter(Boolean).length;
        if (missing > 0) throw new CheckpointChainError(`the chain's first checkpoint is not full: ${missing} pages of block '${block}' are missing`);
      }
    }
    if (index === streams.length - 1) newest = records;
  });

  const merged: MigrationRecord[] = [];
  for (const record of newest) {
    if (record.type === 'ram-page' || record.type === 'ram-zero') continue;
    merged.push(record);
    if (record.type === 'ram-mem-size') merged.push(...allPages(blocks!, pages));
  }
  return encodeRecords(merged);
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
