// RAM records of the "ram" iterative section (migration/ram.c). The section bodies carry no
// length, so walking a stream means decoding every record: ram_save_setup writes the block list,
// ram_save_iterate / ram_save_complete write page records, and each body ends with
// RAM_SAVE_FLAG_EOS. Decoding follows ram_load_precopy and ram_block_from_stream.

import { RamFlag, XBZRLE_ENCODING } from './constants.js';
import { formatOffset } from './errors.js';
import type { ByteReader } from './reader.js';
import type { RamBlockInfo, RamRecord } from './records.js';

const TWO_POW_32 = 0x1_0000_0000;

/** What decoding a RAM record needs to know about the stream so far. */
export interface RamContext {
  /** TARGET_PAGE_SIZE; flags live below it. */
  pageSize: number;
  /** Block of the previous page record, for RAM_SAVE_FLAG_CONTINUE. */
  lastBlock: string | undefined;
  /** Blocks from the MEM_SIZE list (undefined until seen): page records must name one of them. */
  blocks: ReadonlyMap<string, RamBlockInfo> | undefined;
  /** MIG_CMD_POSTCOPY_ADVISE was seen: blocks may carry a page size. */
  postcopyAdvised: boolean;
  /** x-ignore-shared is on (configuration/capabilities): blocks carry their region address. */
  ignoreShared: boolean;
}

/** Largest compressed page ram_load_precopy accepts is compressBound(TARGET_PAGE_SIZE); stay a bit above it. */
function maxCompressedLength(pageSize: number): number {
  return pageSize + (pageSize >> 8) + 64;
}

function isPageSizeValue(hi: number, lo: number, pageSize: number): boolean {
  // A page size is a power of two >= TARGET_PAGE_SIZE (below 2^40). A block list entry instead
  // begins with a non-zero id length byte, and a RAM header always has flag bits set.
  if (hi > 0xff) return false;
  const v = hi * TWO_POW_32 + lo;
  return v >= pageSize && (hi === 0 ? (lo & (lo - 1)) === 0 : lo === 0 && (hi & (hi - 1)) === 0);
}

function readBlockList(r: ByteReader, total: number, ctx: RamContext): RamBlockInfo[] {
  const blocks: RamBlockInfo[] = [];
  let remaining = total;
  // ram_load_precopy, case RAM_SAVE_FLAG_MEM_SIZE: entries until their lengths add up to the total.
  while (remaining > 0) {
    const at = r.offset;
    const idlen = r.u8();
    if (idlen === 0) r.fail('BAD_RAM_RECORD', 'RAM block list entry with an empty block id', at);
    const idstr = r.latin1(idlen);
    const usedLength = r.u64(`used length of RAM block '${idstr}'`, 'BAD_RAM_RECORD');
    if (usedLength > remaining) {
      r.fail('BAD_RAM_RECORD', `RAM block '${idstr}' is ${usedLength} bytes, more than the ${remaining} left of the announced total ${total}`, at);
    }
    const block: RamBlockInfo = { idstr, usedLength };
    // ram_save_setup: `if (migrate_postcopy_ram() && block->page_size != qemu_host_page_size)`.
    // The reader cannot know the source's block page sizes, but the value is unambiguous (see
    // isPageSizeValue); with x-ignore-shared the region address that follows must be page aligned.
    if (ctx.postcopyAdvised) {
      const [hi, lo] = r.peekU64Parts();
      let isPageSize = isPageSizeValue(hi, lo, ctx.pageSize);
      if (isPageSize && ctx.ignoreShared) {
        const [hi2, lo2] = r.peekU64Parts(8);
        isPageSize = hi2 <= 0xffffff && (lo2 & (ctx.pageSize - 1)) === 0;
      }
      if (isPageSize) block.pageSize = r.u64(`page size of RAM block '${idstr}'`, 'BAD_RAM_RECORD');
    }
    // ram_save_setup: `if (migrate_ignore_shared()) qemu_put_be64(f, block->mr->addr)`.
    if (ctx.ignoreShared) block.mrAddr = r.u64(`region address of RAM block '${idstr}'`, 'BAD_RAM_RECORD');
    blocks.push(block);
    remaining -= usedLength;
  }
  return blocks;
}

/** ram_block_from_stream: the block id string, unless CONTINUE says "same as before". */
function readBlock(r: ByteReader, flags: number, ctx: RamContext): string {
  const at = r.offset;
  if (flags & RamFlag.CONTINUE) {
    if (ctx.lastBlock === undefined) r.fail('BAD_RAM_RECORD', 'RAM page with RAM_SAVE_FLAG_CONTINUE but no previous block', at);
    return ctx.lastBlock;
  }
  const idlen = r.u8();
  const block = r.latin1(idlen);
  if (ctx.blocks && !ctx.blocks.has(block)) r.fail('BAD_RAM_RECORD', `RAM page for unknown block '${block}'`, at);
  return block;
}

/**
 * Decodes one RAM record at the reader's cursor. Throws NeedMoreData if the buffered bytes end
 * inside it (the caller retries from the same position) and MigrationStreamError for anything
 * ram_load_precopy would reject.
 */
export function readRamRecord(r: ByteReader, ctx: RamContext): RamRecord {
  const at = r.offset;
  const [hi, lo] = r.u64Parts();
  const flagMask = ctx.pageSize - 1;
  const flags = lo & flagMask;
  if (hi > 0x1f_ffff) r.fail('BAD_RAM_RECORD', `RAM record header 0x${hi.toString(16)}${lo.toString(16).padStart(8, '0')} has an address beyond 2^53`, at);
  const addr = hi * TWO_POW_32 + (lo - flags);
  // ram_load_precopy switches on `flags & ~RAM_SAVE_FLAG_CONTINUE`: exactly one kind per record.
  switch (flags & ~RamFlag.CONTINUE) {
    case RamFlag.MEM_SIZE:
      return { type: 'ram-mem-size', addr, flags, blocks: readBlockList(r, addr, ctx) };
    case RamFlag.ZERO: {
      const block = readBlock(r, flags, ctx);
      return { type: 'ram-zero', addr, flags, block, fill: r.u8() };
    }
    case RamFlag.PAGE: {
      const block = readBlock(r, flags, ctx);
      return { type: 'ram-page', addr, flags, block, data: r.bytes(ctx.pageSize) };
    }
    case RamFlag.COMPRESS_PAGE: {
      const block = readBlock(r, flags, ctx);
      const lenAt = r.offset;
      const len = r.u32();
      if (len > maxCompressedLength(ctx.pageSize)) r.fail('BAD_RAM_RECORD', `compressed RAM page of ${len} bytes is larger than a page can compress to`, lenAt);
      return { type: 'ram-compressed', addr, flags, block, data: r.bytes(len) };
    }
    case RamFlag.XBZRLE: {
      const block = readBlock(r, flags, ctx);
      const encAt = r.offset;
      // load_xbzrle: u8 ENCODING_FLAG_XBZRLE, be16 length (<= TARGET_PAGE_SIZE), data.
      const encoding = r.u8();
      if (encoding !== XBZRLE_ENCODING) r.fail('BAD_RAM_RECORD', `XBZRLE page with encoding byte 0x${encoding.toString(16)}`, encAt);
      const len = r.u16();
      if (len > ctx.pageSize) r.fail('BAD_RAM_RECORD', `XBZRLE page of ${len} bytes is larger than a page`, encAt + 1);
      return { type: 'ram-xbzrle', addr, flags, block, encoding, data: r.bytes(len) };
    }
    case RamFlag.EOS:
      return { type: 'ram-eos', addr, flags };
    case RamFlag.HOOK:
      return r.fail('UNSUPPORTED', 'RAM_SAVE_FLAG_HOOK (RDMA transport) records are not supported', at);
    default:
      return r.fail('BAD_RAM_RECORD', `RAM record header at ${formatOffset(at)} has flags 0x${flags.toString(16)}, not one record kind`, at);
  }
}
