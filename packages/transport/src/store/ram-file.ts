/**
 * A standby's guest RAM kept as a file (issue 18, groundwork: not yet wired into the agent). A
 * warm standby started with its main RAM block on this file, mapped MAP_SHARED, sees what is
 * written here as its memory; applying each committed checkpoint as it commits leaves only device
 * state to load at failover (QEMU's x-ignore-shared).
 *
 * One file holds one RAM block (`pc.ram` by default), byte for byte at the block's offsets. A full
 * checkpoint rewrites it: truncated to nothing and back to the block's size (a sparse file reads
 * zeros), then its non-zero pages written. An increment writes its pages over it, a zero page as
 * zeros. Runs of adjacent pages go out in one write. The stamp beside it says which checkpoint
 * the file holds, and that an apply was under way when it says `applying` (then the file is
 * neither that checkpoint nor the one before: re-apply the whole chain).
 */
import fs from 'node:fs/promises';
import { configurationPageSize } from '../stream/configuration.js';
import { MigrationStreamError } from '../stream/errors.js';
import { MigrationStreamParser } from '../stream/parser.js';
import type { MigrationRecord } from '../stream/records.js';

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
  const { blockBytes, pageSize, pages } = collectPages(stream, blockName, options.full);
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

/** The block's pages, newest last for a page sent twice, in address order. */
function collectPages(stream: Uint8Array, blockName: string, full: boolean): { blockBytes: number; pageSize: number; pages: RamFilePage[] } {
  let blockBytes: number | undefined;
  let pageSize = 4096;
  const byAddr = new Map<number, RamFilePage>();
  const onRecord = (record: MigrationRecord): void => {
    switch (record.type) {
      case 'configuration':
        pageSize = configurationPageSize(record) ?? pageSize;
        break;
      case 'ram-mem-size':
        blockBytes ??= record.blocks.find((b) => b.idstr === blockName)?.usedLength;
        break;
      case 'ram-page':
      case 'ram-zero':
        if (record.block !== blockName) break;
        if (blockBytes === undefined) throw new RamFileError('NO_BLOCK', `a page of '${blockName}' before the block list announced it`);
        if (record.addr % pageSize !== 0 || record.addr + pageSize > blockBytes) {
          throw new RamFileError('BAD_PAGE', `a page of '${blockName}' at ${record.addr}: not aligned to ${pageSize} or past the block's ${blockBytes} bytes`);
        }
        byAddr.set(record.addr, record.type === 'ram-page' ? { addr: record.addr, data: record.data, fill: 0 } : { addr: record.addr, fill: record.fill });
        break;
      case 'ram-compressed':
      case 'ram-xbzrle':
        if (record.block === blockName) throw new RamFileError('BAD_PAGE', `a ${record.type === 'ram-compressed' ? 'compressed' : 'XBZRLE'} page of '${blockName}' at ${record.addr}: the RAM file takes plain pages only`);
        break;
      default:
        break;
    }
  };
  try {
    const parser = new MigrationStreamParser({ requireFull: full });
    parser.push(stream, onRecord);
    parser.end(onRecord);
  } catch (error) {
    if (error instanceof MigrationStreamError) throw new RamFileError('BAD_STREAM', `the checkpoint does not parse: ${error.message}`, { cause: error });
    throw error;
  }
  if (blockBytes === undefined) throw new RamFileError('NO_BLOCK', `the checkpoint has no RAM block '${blockName}'`);
  return { blockBytes, pageSize, pages: [...byAddr.values()].sort((a, b) => a.addr - b.addr) };
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
