// Checkpoint chains. With ftvm's QEMU capability x-ftvm-incremental a migration after a completed
// one carries only the pages written since, so a checkpoint is a full stream followed by zero or
// more incremental ones. QEMU loads only one stream, so a chain is assembled into one: the full
// stream's RAM, then each increment's RAM sections as further precopy iterations (QEMU's loader
// takes any number of "ram" PART/END sections, and a later page overwrites an earlier one, exactly
// as in a live precopy), then the newest stream's device state. That is byte slicing at offsets
// the store recorded when it verified each stream (CheckpointLayout), not a re-parse.

import { DEFAULT_TARGET_PAGE_SIZE } from './constants.js';
import { configurationPageSize } from './configuration.js';
import { MigrationStreamError } from './errors.js';
import { MigrationStreamParser, parseMigrationStream } from './parser.js';
import type { MigrationRecord } from './records.js';
import { encodedSize } from './writer.js';

/** A RAM block as the stream's MEM_SIZE list announces it. */
export interface RamBlockExtent {
  id: string;
  bytes: number;
}

/** Where a migration stream's parts begin (byte offsets), as its verifier saw them. */
export interface CheckpointLayout {
  /** Section id of "ram": the same in every stream of one QEMU process. */
  ramSectionId: number;
  /** End of header, configuration and commands: the first section starts here. */
  preambleEnd: number;
  /** End of the "ram" setup section (block list), i.e. where the page sections begin. */
  ramSetupEnd: number;
  /** The first device-state (FULL) section; from here on: device state, EOF, VM description. */
  deviceStateStart: number;
}

export class CheckpointChainError extends Error {
  override name = 'CheckpointChainError';
}

/** Which pages of which blocks a stream carried, and where its parts begin; fed records in order. */
export class RamCoverage {
  private pageSize = DEFAULT_TARGET_PAGE_SIZE;
  private blockList: RamBlockExtent[] | undefined;
  private readonly seen = new Map<string, Uint8Array>();
  private offset = 0;
  private readonly marks: Partial<CheckpointLayout> = {};

  add(record: MigrationRecord): void {
    const at = this.offset;
    this.offset += encodedSize(record);
    switch (record.type) {
      case 'configuration':
        this.pageSize = configurationPageSize(record) ?? this.pageSize;
        break;
      case 'section-start':
        this.marks.preambleEnd ??= at;
        if (record.idstr === 'ram') this.marks.ramSectionId ??= record.sectionId;
        break;
      case 'section-footer':
        if (record.sectionId === this.marks.ramSectionId) this.marks.ramSetupEnd ??= this.offset;
        break;
      case 'device-section':
        this.marks.deviceStateStart ??= at;
        break;
      case 'ram-mem-size':
        this.blockList = record.blocks.map((b) => ({ id: b.idstr, bytes: b.usedLength }));
        for (const block of record.blocks) this.seen.set(block.idstr, new Uint8Array(Math.ceil(block.usedLength / this.pageSize)));
        break;
      case 'ram-page':
      case 'ram-zero':
      case 'ram-compressed':
      case 'ram-xbzrle': {
        const pages = this.seen.get(record.block);
        const index = record.addr / this.pageSize;
        if (pages && index < pages.length) pages[index] = 1;
        break;
      }
      default:
        break;
    }
  }

  /** The MEM_SIZE block list (undefined if the stream had none). */
  get blocks(): RamBlockExtent[] | undefined {
    return this.blockList;
  }

  /** Where the stream's parts begin; undefined unless it had RAM setup and device state. */
  get layout(): CheckpointLayout | undefined {
    const { ramSectionId, preambleEnd, ramSetupEnd, deviceStateStart } = this.marks;
    if (ramSectionId === undefined || preambleEnd === undefined || ramSetupEnd === undefined || deviceStateStart === undefined) return undefined;
    return { ramSectionId, preambleEnd, ramSetupEnd, deviceStateStart };
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

/** A stream's layout by parsing it (when no verifier recorded it). Throws if it has none. */
export function checkpointLayout(stream: Uint8Array): CheckpointLayout {
  const coverage = new RamCoverage();
  for (const record of parseMigrationStream(stream)) coverage.add(record);
  const layout = coverage.layout;
  if (!layout) throw new CheckpointChainError('the stream has no "ram" setup section or no device state');
  return layout;
}

/** An assembled checkpoint: the stream is `ram` (in order) followed by `deviceState`. */
export interface AssembledCheckpoint {
  /** Everything QEMU must load before the device state: views into the chain's streams. */
  ram: Buffer[];
  /** The newest stream's device state, EOF and VM description. */
  deviceState: Buffer;
  /** The newest stream's header, configuration and commands (to parse `deviceState` alone). */
  preamble: Buffer;
}

/**
 * One loadable stream from a chain (oldest first: a full checkpoint, then its increments in
 * order), without copying: the full stream up to its device state, each increment's page
 * sections, the newest stream's device state. Layouts default to parsing each stream.
 */
export function assembleCheckpointChain(streams: readonly Uint8Array[], layouts?: readonly CheckpointLayout[]): AssembledCheckpoint {
  if (streams.length === 0) throw new CheckpointChainError('an empty checkpoint chain');
  const laid = layouts ?? streams.map((s) => checkpointLayout(s));
  if (laid.length !== streams.length) throw new CheckpointChainError(`${streams.length} streams but ${laid.length} layouts`);
  const view = (i: number, from: number, to?: number) => {
    const s = streams[i]!;
    if (from > s.length || (to ?? 0) > s.length) throw new CheckpointChainError(`checkpoint ${i} of the chain is shorter (${s.length} bytes) than its layout says`);
    return Buffer.from(s.buffer, s.byteOffset + from, (to ?? s.length) - from);
  };
  // The result loads as one full image with the base's header and configuration: the base must
  // be one (QEMU and requireFull refuse a stream marked x-ftvm-incremental).
  try {
    new MigrationStreamParser({ requireFull: true }).push(view(0, 0, laid[0]!.preambleEnd), () => undefined);
  } catch (error) {
    if (error instanceof MigrationStreamError) throw new CheckpointChainError(`checkpoint 0 of the chain must be a full stream: ${error.message}`);
    throw error;
  }
  const ram = [view(0, 0, laid[0]!.deviceStateStart)];
  for (let i = 1; i < streams.length; i++) {
    if (laid[i]!.ramSectionId !== laid[0]!.ramSectionId) {
      throw new CheckpointChainError(`checkpoint ${i} of the chain has "ram" as section ${laid[i]!.ramSectionId}, its base ${laid[0]!.ramSectionId}: not one QEMU's`);
    }
    ram.push(view(i, laid[i]!.ramSetupEnd, laid[i]!.deviceStateStart));
  }
  const newest = streams.length - 1;
  return { ram, deviceState: view(newest, laid[newest]!.deviceStateStart), preamble: view(newest, 0, laid[newest]!.preambleEnd) };
}

/** assembleCheckpointChain as one Buffer (a copy). */
export function flattenCheckpointChain(streams: readonly Uint8Array[], layouts?: readonly CheckpointLayout[]): Buffer {
  const { ram, deviceState } = assembleCheckpointChain(streams, layouts);
  return Buffer.concat([...ram, deviceState]);
}
