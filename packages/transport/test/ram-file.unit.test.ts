import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { applyToRamFile, RamFileError, readRamFileStamp, writeRamFileStamp } from '../src/store/index.js';
import { BLOCKS, full, marked, PAGE, stream } from './fixtures-chain.js';
import { pseudoRandom } from './fixtures-synthetic.js';

let dir: string;
let file: string;
beforeEach(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'ftvm-ramfile-'));
  file = path.join(dir, 'pc.ram');
});
afterEach(async () => fs.rm(dir, { recursive: true, force: true }));

/** What pc.ram holds after `pages` (full(seed)'s layout: every third page zero). */
function expected(pages: ReturnType<typeof full>): Buffer {
  const ram = Buffer.alloc(BLOCKS[0]!.usedLength);
  for (const p of pages) if (p.block === 'pc.ram') (p.data ?? Buffer.alloc(PAGE)).copy(ram, p.index * PAGE);
  return ram;
}

describe('applyToRamFile', () => {
  it('a full checkpoint writes the block byte for byte (zero pages left sparse), other blocks not at all', async () => {
    await fs.writeFile(file, Buffer.alloc(3 * BLOCKS[0]!.usedLength, 0xaa)); // stale, larger
    const applied = await applyToRamFile(file, stream(full(1)), { full: true });
    expect(await fs.readFile(file)).toEqual(expected(full(1)));
    expect(applied).toEqual({ pages: 4, zeroPages: 2, bytes: 4 * PAGE, blockBytes: BLOCKS[0]!.usedLength });
  });

  it('an increment writes its pages over the file, a zero page as zeros, and leaves the rest', async () => {
    await applyToRamFile(file, stream(full(1)), { full: true });
    const page0 = pseudoRandom(PAGE, 99);
    const increment = marked(stream([{ block: 'pc.ram', index: 0, data: page0 }, { block: 'pc.ram', index: 1 }, { block: 'pc.bios', index: 0, data: pseudoRandom(PAGE, 5) }]));
    const applied = await applyToRamFile(file, increment, { full: false });
    const ram = expected(full(1));
    page0.copy(ram, 0);
    ram.fill(0, PAGE, 2 * PAGE);
    expect(await fs.readFile(file)).toEqual(ram);
    expect(applied).toMatchObject({ pages: 2, zeroPages: 1, bytes: 2 * PAGE });
  });

  it('refuses an increment onto no file or a file of another size, and an increment as a full checkpoint', async () => {
    const increment = marked(stream([{ block: 'pc.ram', index: 0, data: pseudoRandom(PAGE, 3) }]));
    await expect(applyToRamFile(file, increment, { full: false })).rejects.toMatchObject({ code: 'FILE_SIZE', message: expect.stringContaining('apply a full checkpoint first') });
    await fs.writeFile(file, Buffer.alloc(PAGE));
    await expect(applyToRamFile(file, increment, { full: false })).rejects.toMatchObject({ code: 'FILE_SIZE', message: expect.stringContaining(`is ${PAGE} bytes, block 'pc.ram' ${6 * PAGE}`) });
    await expect(applyToRamFile(file, increment, { full: true })).rejects.toMatchObject({ code: 'BAD_STREAM', message: expect.stringContaining('INCREMENTAL_STREAM') });
    await expect(applyToRamFile(file, stream(full(1)), { full: true, block: 'pc.nothing' })).rejects.toBeInstanceOf(RamFileError);
  });

  it('cuts runs of adjacent pages at maxWriteBytes without changing what is written', async () => {
    await applyToRamFile(file, stream(full(7)), { full: true, maxWriteBytes: PAGE });
    expect(await fs.readFile(file)).toEqual(expected(full(7)));
  });
});

describe('RAM file stamp', () => {
  it('reads back what was written, and nothing for a missing or torn stamp', async () => {
    expect(await readRamFileStamp(file)).toBeUndefined();
    await writeRamFileStamp(file, { epoch: 12, state: 'applying' });
    expect(await readRamFileStamp(file)).toEqual({ epoch: 12, state: 'applying' });
    await writeRamFileStamp(file, { epoch: 12, state: 'applied' });
    expect(await readRamFileStamp(file)).toEqual({ epoch: 12, state: 'applied' });
    await fs.writeFile(`${file}.stamp`, '{ "epoch": 1');
    expect(await readRamFileStamp(file)).toBeUndefined();
  });
});
