/**
 * A RAM block kept as a file, byte for byte at the block's offsets (a mapped standby's `pc.ram`,
 * see StandbyRam): a checkpoint's pages written into it, and the stamp beside it that says which
 * checkpoint the file holds (`applying` while one is written: then it is neither that checkpoint
 * nor the one before). A full checkpoint rewrites it sparse (zero pages are holes); an increment
 * writes its pages over it, a zero page as zeros. Runs of adjacent pages go out in one write.
 */
import fs from 'node:fs/promises';
import { configurationPageSize } from '../stream/configuration.js';
import { MigrationStreamError } from '../stream/errors.js';
import { MigrationStreamParser } from '../stream/parser.js';
import { RamCoverage } from '../stream/chain.js';
import type { ConfigurationRecord, MigrationRecord, RamMemSizeRecord, RamPageRecord, RamZeroRecord, SectionStartRecord } from '../stream/records.js';

export type RamFileErrorCode =
  /** The stream has no block of that name. */
  | 'NO_BLOCK'
  /** An increment onto a file that is not the block's size (not this VM's, or never filled). */
  | 'FILE_SIZE'
  /** A page this file cannot hold: compressed or XBZRLE, outside the block, or not page aligned. */
  | 'BAD_PAGE'
  /** The stream does not parse, or is an increment where a full one was asked for. */
  | 'BAD_STREAM';

export class RamFileError extends Error {
  override name = 'RamFileError';
  constructor(
    readonly code: RamFileErrorCode,
    message: string,
    options?: ErrorOptions,
  ) {
    super(`${message} [${code}]`, options);
  }
}

export interface RamFileApply {
  /** Pages written (zero pages of an increment included). */
  pages: number;
  /** Zero pages: skipped in a full checkpoint (the file reads zeros there), written in an increment. */
  zeroPages: number;
  /** Bytes written. */
  bytes: number;
  /** The block's size: the file's. */
  blockBytes: number;
}

export interface RamFileApplyOptions {
  /** A full checkpoint (rewrites the file) or an increment onto what the file holds. */
  full: boolean;
  /** The RAM block the file holds (default `pc.ram`, the PC machine's main RAM). */
  block?: string;
  /** Largest single write, bytes (default 4 MiB). */
  maxWriteBytes?: number;
}

const DEFAULT_BLOCK = 'pc.ram';
const DEFAULT_MAX_WRITE = 4 * 1024 * 1024;

/** Writes one checkpoint's pages of `block` into the file at `path` (created when missing). */
export async function applyToRamFile(path: string, stream: Uint8Array, options: RamFileApplyOptions): Promise<RamFileApply> {
  const blockName = options.block ?? DEFAULT_BLOCK;
  const { blockBytes, pageSize, pages } = parseRamCheckpoint(Buffer.from(stream.buffer, stream.byteOffset, stream.byteLength), { block: blockName, full: options.full, what: 'the checkpoint' });
  return writeRamPages(path, pages, { full: options.full, blockBytes, pageSize, block: blockName, ...(options.maxWriteBytes !== undefined ? { maxWriteBytes: options.maxWriteBytes } : {}) });
}

/** One page of a RAM block at its offset: its bytes, or a page filled with one byte. */
export interface RamFilePage {
  addr: number;
  data?: Buffer | undefined;
  fill: number;
}

/**
 * Writes pages (in address order, one per address) into the file of a block of `blockBytes`: a
 * full set rewrites it sparse (zero pages skipped), an increment goes over what it holds.
 */
export async function writeRamPages(
  path: string,
  pages: Iterable<RamFilePage>,
  options: { full: boolean; blockBytes: number; pageSize: number; block?: string; maxWriteBytes?: number },
): Promise<RamFileApply> {
  const { blockBytes, pageSize } = options;
  const blockName = options.block ?? DEFAULT_BLOCK;
  const file = await fs.open(path, options.full ? (await exists(path) ? 'r+' : 'w') : 'r+').catch((error: NodeJS.ErrnoException) => {
    if (error.code === 'ENOENT') throw new RamFileError('FILE_SIZE', `no RAM file at ${path} to apply an increment to: apply a full checkpoint first`);
    throw error;
  });
  try {
    if (options.full) {
      // to nothing and back: every page reads zero without being allocated (a standby mapping
      // the file is paused and reads none of it meanwhile)
      await file.truncate(0);
      await file.truncate(blockBytes);
    } else {
      const { size } = await file.stat();
      if (size !== blockBytes) throw new RamFileError('FILE_SIZE', `the RAM file ${path} is ${size} bytes, block '${blockName}' ${blockBytes}: not this VM's RAM, or never filled`);
    }
    const maxWrite = Math.max(pageSize, options.maxWriteBytes ?? DEFAULT_MAX_WRITE);
    let bytes = 0;
    let zeroPages = 0;
    let written = 0;
    let run: Buffer[] = [];
    let runStart = 0;
    let runBytes = 0;
    const flush = async () => {
      if (runBytes === 0) return;
      const data = run.length === 1 ? run[0]! : Buffer.concat(run, runBytes);
      let done = 0;
      while (done < data.length) done += (await file.write(data, done, data.length - done, runStart + done)).bytesWritten;
      bytes += runBytes;
      run = [];
      runBytes = 0;
    };
    const zero = Buffer.alloc(pageSize);
    for (const page of pages) {
      if (page.data === undefined) {
        zeroPages++;
        if (options.full && page.fill === 0) continue; // the truncated file is zero there
      }
      const data = page.data ?? (page.fill === 0 ? zero : Buffer.alloc(pageSize, page.fill));
      if (runBytes > 0 && (page.addr !== runStart + runBytes || runBytes + data.length > maxWrite)) await flush();
      if (runBytes === 0) runStart = page.addr;
      run.push(data);
      runBytes += data.length;
      written++;
    }
    await flush();
    return { pages: written, zeroPages, bytes, blockBytes };
  } finally {
    await file.close();
  }
}

async function exists(path: string): Promise<boolean> {
  return fs.access(path).then(
    () => true,
    () => false,
  );
}

/** What a checkpoint stream holds for a RAM file and a device-state-only load. */
export interface ParsedRamCheckpoint {
  preamble: MigrationRecord[];
  configuration: ConfigurationRecord;
  ramStart: SectionStartRecord;
  memSize: RamMemSizeRecord;
  footers: boolean;
  pageSize: number;
  blockBytes: number;
  /** The main block's pages in address order (views into the data). */
  pages: RamFilePage[];
  /** The other blocks' pages (copied: the data is not kept). */
  small: Map<string, Map<number, RamPageRecord | RamZeroRecord>>;
  layout: { preambleEnd: number; deviceStateStart: number };
}

/**
 * Parses one checkpoint stream: the pages of `block` (for its file), every other block's pages, and
 * what a device-state-only stream needs of it. `full`: refuse an increment. `what` names it in errors.
 */
export function parseRamCheckpoint(data: Buffer, options: { block: string; full: boolean; what: string }): ParsedRamCheckpoint {
  const { block, full, what } = options;
  const preamble: MigrationRecord[] = [];
  const main = new Map<number, RamFilePage>();
  const small = new Map<string, Map<number, RamPageRecord | RamZeroRecord>>();
  const coverage = new RamCoverage();
  let configuration: ConfigurationRecord | undefined;
  let ramStart: SectionStartRecord | undefined;
  let memSize: RamMemSizeRecord | undefined;
  let footers = false;
  let pageSize = 4096;
  let inPreamble = true;
  const onRecord = (record: MigrationRecord): void => {
    coverage.add(record);
    if (record.type === 'section-start' || record.type === 'section-part' || record.type === 'section-end' || record.type === 'device-section') inPreamble = false;
    if (inPreamble) preamble.push(record);
    switch (record.type) {
      case 'configuration':
        configuration = record;
        pageSize = configurationPageSize(record) ?? pageSize;
        break;
      case 'section-start':
        if (record.idstr === 'ram') ramStart ??= record;
        break;
      case 'section-footer':
        footers = true;
        break;
      case 'ram-mem-size':
        memSize ??= record;
        break;
      case 'ram-page':
      case 'ram-zero': {
        if (record.block === block) {
          main.set(record.addr, record.type === 'ram-page' ? { addr: record.addr, data: record.data, fill: 0 } : { addr: record.addr, fill: record.fill });
          break;
        }
        const pages = small.get(record.block) ?? new Map<number, RamPageRecord | RamZeroRecord>();
        small.set(record.block, pages);
        pages.set(record.addr, record.type === 'ram-page' ? { ...record, data: Buffer.from(record.data) } : { ...record });
        break;
      }
      case 'ram-compressed':
      case 'ram-xbzrle':
        throw new RamFileError('BAD_PAGE', `${what} has a ${record.type === 'ram-compressed' ? 'compressed' : 'XBZRLE'} page of '${record.block}' at ${record.addr}: the standby RAM takes plain pages only`);
      default:
        break;
    }
  };
  try {
    const parser = new MigrationStreamParser({ requireFull: full });
    parser.push(data, onRecord);
    parser.end(onRecord);
  } catch (error) {
    if (error instanceof MigrationStreamError) throw new RamFileError('BAD_STREAM', `${what} does not parse: ${error.message}`, { cause: error });
    throw error;
  }
  const layout = coverage.layout;
  if (!configuration || !ramStart || !memSize || !layout) throw new RamFileError('BAD_STREAM', `${what} has no configuration, "ram" setup or device state`);
  const blockBytes = memSize.blocks.find((b) => b.idstr === block)?.usedLength;
  if (blockBytes === undefined) throw new RamFileError('NO_BLOCK', `${what} has no RAM block '${block}'`);
  for (const page of main.values()) {
    if (page.addr % pageSize !== 0 || page.addr + pageSize > blockBytes) {
      throw new RamFileError('BAD_PAGE', `${what}: a page of '${block}' at ${page.addr}: not aligned to ${pageSize} or past the block's ${blockBytes} bytes`);
    }
  }
  return {
    preamble,
    configuration,
    ramStart,
    memSize,
    footers,
    pageSize,
    blockBytes,
    pages: [...main.values()].sort((a, b) => a.addr - b.addr),
    small,
    layout,
  };
}

/** What the RAM file holds: checkpoint `epoch`, whole (`applied`) or half-written (`applying`). */
export interface RamFileStamp {
  epoch: number;
  state: 'applying' | 'applied';
}

/** Writes the stamp beside the file atomically (temporary file, rename). */
export async function writeRamFileStamp(path: string, stamp: RamFileStamp): Promise<void> {
  const tmp = `${path}.stamp.tmp`;
  await fs.writeFile(tmp, `${JSON.stringify(stamp)}\n`);
  await fs.rename(tmp, `${path}.stamp`);
}

/** The stamp beside the file; undefined when there is none or it does not read (then the file is unknown). */
export async function readRamFileStamp(path: string): Promise<RamFileStamp | undefined> {
  try {
    const parsed = JSON.parse(await fs.readFile(`${path}.stamp`, 'utf8')) as Partial<RamFileStamp>;
    if (typeof parsed.epoch === 'number' && (parsed.state === 'applying' || parsed.state === 'applied')) return { epoch: parsed.epoch, state: parsed.state };
    return undefined;
  } catch {
    return undefined;
  }
}
