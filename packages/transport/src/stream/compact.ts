// Compacting a checkpoint chain (chain.ts) into ONE full migration stream: the full stream's
// header, configuration and RAM setup (block list), then one "ram" END section carrying every page
// once — its newest version from anywhere in the chain, a zero page staying a zero page — then the
// newest stream's device state. QEMU loads it to the same RAM and devices as the assembled chain
// (there a later page overwrites an earlier one; here only the last one is left), so the store
// can make an incremental checkpoint full and drop what it built on.
//
// Pages are written block by block (the MEM_SIZE order), ascending, each block's first record
// naming its block and the rest with RAM_SAVE_FLAG_CONTINUE — re-encoded, since a record that
// omitted its block id in its own stream may follow another block's record here.

import { CheckpointChainError, checkpointLayout, type CheckpointLayout } from './chain.js';
import { configurationPageSize } from './configuration.js';
import { DEFAULT_TARGET_PAGE_SIZE, RamFlag, SectionType } from './constants.js';
import { formatOffset, MigrationStreamError } from './errors.js';
import { MigrationStreamParser } from './parser.js';
import type { MigrationRecord, RamBlockInfo, RamCompressedRecord, RamPageRecord, RamZeroRecord } from './records.js';
import { encodedSize, encodeRecords } from './writer.js';

export type ChainCompactionErrorCode =
  /** No streams, or streams and layouts of different counts. */
  | 'EMPTY_CHAIN'
  /** A layout does not fit its stream (offsets past its end, or not at record boundaries). */
  | 'LAYOUT_MISMATCH'
  /** Streams of different QEMU processes: another "ram" section id or page size. */
  | 'NOT_ONE_QEMU'
  /** An increment announces other RAM blocks than the full stream. */
  | 'BLOCKS_DIFFER'
  /** Something the compactor cannot carry over: XBZRLE pages, commands among the page sections… */
  | 'UNSUPPORTED'
  /** A page outside its block or not page aligned (QEMU would refuse to load it). */
  | 'BAD_PAGE'
  /** The stream itself does not parse (MigrationStreamError; its offset is kept). */
  | 'BAD_STREAM';

/** Why a chain cannot be compacted: which stream of the chain (0 = the full one) and where in it. */
export class ChainCompactionError extends CheckpointChainError {
  override name = 'ChainCompactionError';
  constructor(
    readonly code: ChainCompactionErrorCode,
    /** Index of the stream in the chain. */
    readonly link: number,
    /** Byte offset in that stream, when the problem has one. */
    readonly offset: number | undefined,
    detail: string,
  ) {
    super(`checkpoint ${link} of the chain: ${detail}${offset === undefined ? '' : ` at offset ${formatOffset(offset)}`} [${code}]`);
  }
}

type PageRecord = RamPageRecord | RamZeroRecord | RamCompressedRecord;

/** Slices a stream is parsed in (a caller may yield to its event loop between them). */
const DEFAULT_SLICE_BYTES = 4 * 1024 * 1024;
/** About how much each encoded chunk of pages holds. */
const DEFAULT_CHUNK_BYTES = 1024 * 1024;

/**
 * Compacts a chain in steps: `index()` parses the RAM part of every stream (not its device
 * state), yielding between slices; then `layout` and `bytes` describe the result and `chunks()`
 * produces it. The streams' memory must not change until the chunks are written: pages are views.
 */
export class CheckpointChainCompactor {
  private readonly layouts: readonly CheckpointLayout[];
  private pageSize = DEFAULT_TARGET_PAGE_SIZE;
  private blocks: RamBlockInfo[] | undefined;
  /** Per block, per page index: the newest record of that page. */
  private readonly pages = new Map<string, (PageRecord | undefined)[]>();
  private pageBytes = 0;
  private done = false;

  constructor(
    private readonly streams: readonly Uint8Array[],
    layouts?: readonly CheckpointLayout[],
  ) {
    if (streams.length === 0) throw new ChainCompactionError('EMPTY_CHAIN', 0, undefined, 'an empty checkpoint chain');
    if (layouts && layouts.length !== streams.length) {
      throw new ChainCompactionError('EMPTY_CHAIN', 0, undefined, `${streams.length} streams but ${layouts.length} layouts`);
    }
    this.layouts = layouts ?? streams.map((s, i) => wrapped(i, () => checkpointLayout(s)));
  }

  /** Parses every stream's RAM part, oldest first; yields after each slice of about `sliceBytes`. */
  *index(sliceBytes = DEFAULT_SLICE_BYTES): Generator<void, void, void> {
    if (this.done) return;
    for (let i = 0; i < this.streams.length; i++) yield* this.indexOne(i, sliceBytes);
    this.finish();
    this.done = true;
  }

  /** The compacted stream's layout (the full stream's, up to where its pages begin). */
  get layout(): CheckpointLayout {
    this.mustBeIndexed();
    const base = this.layouts[0]!;
    return { ramSectionId: base.ramSectionId, preambleEnd: base.preambleEnd, ramSetupEnd: base.ramSetupEnd, deviceStateStart: base.ramSetupEnd + this.pageBytes };
  }

  /** The compacted stream's size. */
  get bytes(): number {
    const newest = this.streams.length - 1;
    return this.layout.deviceStateStart + this.streams[newest]!.length - this.layouts[newest]!.deviceStateStart;
  }

  /** How many pages the compacted stream carries. */
  get pageCount(): number {
    this.mustBeIndexed();
    let n = 0;
    for (const pages of this.pages.values()) for (const p of pages) if (p) n++;
    return n;
  }

  /**
   * The compacted stream: the full stream's preamble and RAM setup (a view), pages in chunks of
   * about `chunkBytes` (copies), the newest stream's device state (a view).
   */
  *chunks(chunkBytes = DEFAULT_CHUNK_BYTES): Generator<Buffer, void, void> {
    this.mustBeIndexed();
    const base = this.streams[0]!;
    const ramSectionId = this.layouts[0]!.ramSectionId;
    yield view(base, 0, this.layouts[0]!.ramSetupEnd);
    let batch: MigrationRecord[] = [{ type: 'section-end', sectionId: ramSectionId }];
    let size = 5;
    for (const block of this.blocks ?? []) {
      for (const page of this.pages.get(block.idstr)!) {
        if (!page) continue;
        batch.push(page);
        size += encodedSize(page);
        if (size >= chunkBytes) {
          yield encodeRecords(batch);
          batch = [];
          size = 0;
        }
      }
    }
    batch.push({ type: 'ram-eos', addr: 0, flags: RamFlag.EOS }, { type: 'section-footer', sectionId: ramSectionId });
    yield encodeRecords(batch);
    const newest = this.streams.length - 1;
    yield view(this.streams[newest]!, this.layouts[newest]!.deviceStateStart);
  }

  private mustBeIndexed(): void {
    if (!this.done) throw new Error('CheckpointChainCompactor: index() first');
  }

  private *indexOne(link: number, sliceBytes: number): Generator<void, void, void> {
    const stream = this.streams[link]!;
    const layout = this.layouts[link]!;
    const fail = (code: ChainCompactionErrorCode, detail: string, offset?: number): never => {
      throw new ChainCompactionError(code, link, offset, detail);
    };
    const { preambleEnd, ramSetupEnd, deviceStateStart } = layout;
    if (!(preambleEnd <= ramSetupEnd && ramSetupEnd <= deviceStateStart && deviceStateStart < stream.length)) {
      fail('LAYOUT_MISMATCH', `its layout (preamble to ${preambleEnd}, RAM setup to ${ramSetupEnd}, device state from ${deviceStateStart}) does not fit its ${stream.length} bytes`);
    }
    if (stream[deviceStateStart] !== SectionType.FULL) fail('LAYOUT_MISMATCH', 'its layout says the device state starts here, but no device section does', deviceStateStart);
    if (layout.ramSectionId !== this.layouts[0]!.ramSectionId) {
      fail('NOT_ONE_QEMU', `"ram" is section ${layout.ramSectionId}, in the full stream ${this.layouts[0]!.ramSectionId}`);
    }
    let pageSize = DEFAULT_TARGET_PAGE_SIZE;
    let blockList = false;
    let setupEnded = false;
    let at = 0;
    const onRecord = (record: MigrationRecord): void => {
      const start = at;
      at += encodedSize(record);
      if (start < ramSetupEnd) {
        switch (record.type) {
          case 'configuration':
            pageSize = configurationPageSize(record) ?? pageSize;
            break;
          case 'ram-mem-size':
            if (blockList) fail('UNSUPPORTED', 'a second RAM block list', start);
            blockList = true;
            this.takeBlocks(link, record.blocks, pageSize, start);
            break;
          case 'ram-page':
          case 'ram-zero':
          case 'ram-compressed':
          case 'ram-xbzrle':
            fail('UNSUPPORTED', 'a RAM page in the RAM setup section', start);
            break;
          case 'section-footer':
            if (at === ramSetupEnd && record.sectionId === layout.ramSectionId) setupEnded = true;
            break;
          default:
            break;
        }
        return;
      }
      if (!setupEnded) fail('LAYOUT_MISMATCH', 'its layout says the RAM setup ends here, but no "ram" section footer does', ramSetupEnd);
      if (!blockList) fail('UNSUPPORTED', 'no RAM block list (MEM_SIZE) before its pages', start);
      switch (record.type) {
        case 'ram-page':
        case 'ram-zero':
        case 'ram-compressed':
          this.takePage(link, record, pageSize, start);
          break;
        case 'ram-xbzrle':
          fail('UNSUPPORTED', 'an XBZRLE page (a delta against an older copy cannot be kept alone)', start);
          break;
        case 'section-part':
        case 'section-end':
        case 'section-footer':
          if (record.sectionId !== layout.ramSectionId) fail('UNSUPPORTED', `section ${record.sectionId} among the "ram" page sections`, start);
          break;
        case 'ram-eos':
          break;
        default:
          fail('UNSUPPORTED', `a ${record.type} record among the "ram" page sections`, start);
      }
    };
    // the full stream's preamble heads the result: it must not be an increment's (0013's marker)
    const parser = new MigrationStreamParser({ requireFull: link === 0 });
    for (let from = 0; from < deviceStateStart; from += sliceBytes) {
      wrapped(link, () => parser.push(view(stream, from, Math.min(from + sliceBytes, deviceStateStart)), onRecord));
      yield;
    }
    // every record up to the device state is complete, and they end exactly there
    if (parser.offset !== deviceStateStart || at !== deviceStateStart) {
      fail('LAYOUT_MISMATCH', `its layout says the device state starts at ${deviceStateStart}, but its records end at ${Math.min(parser.offset, at)}`, Math.min(parser.offset, at));
    }
    if (!setupEnded) fail('LAYOUT_MISMATCH', 'its layout says the RAM setup ends here, but no "ram" section footer does', ramSetupEnd);
  }

  private takeBlocks(link: number, blocks: RamBlockInfo[], pageSize: number, at: number): void {
    if (link === 0) {
      this.blocks = blocks;
      this.pageSize = pageSize;
      for (const block of blocks) this.pages.set(block.idstr, new Array<PageRecord | undefined>(Math.ceil(block.usedLength / pageSize)));
      return;
    }
    if (pageSize !== this.pageSize) throw new ChainCompactionError('NOT_ONE_QEMU', link, at, `its pages are ${pageSize} bytes, in the full stream ${this.pageSize}`);
    const base = this.blocks ?? [];
    if (blocks.length !== base.length || blocks.some((b, i) => b.idstr !== base[i]!.idstr || b.usedLength !== base[i]!.usedLength)) {
      throw new ChainCompactionError('BLOCKS_DIFFER', link, at, `its RAM blocks (${describeBlocks(blocks)}) are not the full stream's (${describeBlocks(base)})`);
    }
  }

  private takePage(link: number, page: PageRecord, pageSize: number, at: number): void {
    const pages = this.pages.get(page.block);
    const index = page.addr / pageSize;
    if (!pages || !Number.isInteger(index) || index >= pages.length) {
      throw new ChainCompactionError('BAD_PAGE', link, at, `a page at ${page.addr} of RAM block '${page.block}', which is not a page of it`);
    }
    pages[index] = page;
  }

  /** Re-encodes each page's CONTINUE flag for its place in the output, and sizes the page section. */
  private finish(): void {
    let bytes = 5 + 8 + 5; // END header, EOS, footer
    for (const block of this.blocks ?? []) {
      let first = true;
      for (const page of this.pages.get(block.idstr)!) {
        if (!page) continue;
        // records are this compactor's own (fresh from the parser): adjusted in place
        page.flags = (page.flags & ~RamFlag.CONTINUE) | (first ? 0 : RamFlag.CONTINUE);
        first = false;
        bytes += encodedSize(page);
      }
    }
    this.pageBytes = bytes;
  }
}

/**
 * A chain (oldest first: a full stream, then its increments) as one full stream with each RAM page
 * once, its newest version, and the newest stream's device state. Layouts default to parsing.
 */
export function compactCheckpointChain(streams: readonly Uint8Array[], layouts?: readonly CheckpointLayout[]): Buffer {
  const compactor = new CheckpointChainCompactor(streams, layouts);
  for (const _ of compactor.index(Number.MAX_SAFE_INTEGER));
  return Buffer.concat([...compactor.chunks()], compactor.bytes);
}

function view(s: Uint8Array, from: number, to = s.length): Buffer {
  return Buffer.from(s.buffer, s.byteOffset + from, to - from);
}

/** Runs `fn`, turning a parse error into a ChainCompactionError that names the link. */
function wrapped<T>(link: number, fn: () => T): T {
  try {
    return fn();
  } catch (error) {
    if (error instanceof MigrationStreamError) throw new ChainCompactionError('BAD_STREAM', link, error.offset, error.message);
    if (error instanceof CheckpointChainError && !(error instanceof ChainCompactionError)) throw new ChainCompactionError('LAYOUT_MISMATCH', link, undefined, error.message);
    throw error;
  }
}

function describeBlocks(blocks: readonly RamBlockInfo[]): string {
  return blocks.map((b) => `'${b.idstr}' ${b.usedLength} bytes`).join(', ') || 'none';
}
