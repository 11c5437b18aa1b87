import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { DiskDeltaError, DiskDeltaWriter, scanDiskDelta, type DiskExtent } from '../src/store/index.js';
import { prng } from './fixtures-disks.js';

let dir: string;
beforeEach(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'ftvm-delta-'));
});
afterEach(async () => fs.rm(dir, { recursive: true, force: true }));

const SIZE = 8 * 1024 * 1024;

async function write(file: string, extents: DiskExtent[]) {
  const writer = await DiskDeltaWriter.create(file, SIZE);
  for (const e of extents) await writer.add(e);
  return writer.finish();
}

const scanAll = async (file: string, expected?: Awaited<ReturnType<typeof write>>) => {
  const records: DiskExtent[] = [];
  const summary = await scanDiskDelta(file, SIZE, { ...(expected ? { expected } : {}), onRecord: (e) => void records.push({ ...e, ...(e.data ? { data: Buffer.from(e.data) } : {}) }) });
  return { summary, records };
};

describe('disk delta files', () => {
  const random = prng(3);
  const extents: DiskExtent[] = [
    { offset: 4096, length: 4096, data: random.bytes(4096) },
    { offset: 0, length: 512 }, // ZERO
    { offset: SIZE - 4 * 1024 * 1024, length: 4 * 1024 * 1024, data: random.bytes(4 * 1024 * 1024) }, // crosses read buffers
    { offset: 100, length: 3, data: Buffer.from('abc') },
  ];

  it('reads back what was written, in order, with the summary the metadata records', async () => {
    const file = path.join(dir, '1.vda.delta');
    const summary = await write(file, extents);
    expect(summary).toMatchObject({ bytes: 8 + 4 * 13 + 4096 + 4 * 1024 * 1024 + 3, extents: 4, dataBytes: 4096 + 4 * 1024 * 1024 + 3 });
    expect((await fs.stat(file)).size).toBe(summary.bytes);
    const { summary: read, records } = await scanAll(file, summary);
    expect(read).toEqual(summary);
    // (Buffers compared with equals(): a deep toEqual of 4 MiB takes seconds)
    expect(records.map((e) => [e.offset, e.length, e.data?.length])).toEqual(extents.map((e) => [e.offset, e.length, e.data?.length]));
    records.forEach((e, i) => expect(e.data === undefined ? extents[i]!.data === undefined : e.data.equals(extents[i]!.data!)).toBe(true));
  });

  it('refuses an extent that does not fit the disk or a record', async () => {
    const writer = await DiskDeltaWriter.create(path.join(dir, 'x.delta'), 4096);
    await expect(writer.add({ offset: 4000, length: 100, data: Buffer.alloc(100) })).rejects.toThrow("ends past the disk's 4096 bytes");
    await expect(writer.add({ offset: 0, length: 10, data: Buffer.alloc(9) })).rejects.toThrow('says 10 bytes but carries 9');
    await expect(writer.add({ offset: -1, length: 1 })).rejects.toThrow('not a non-negative integer');
    await writer.close();
  });

  it('names what is wrong with a damaged file, and where', async () => {
    const file = path.join(dir, '1.vda.delta');
    const summary = await write(file, extents);
    const good = await fs.readFile(file);
    const damaged = async (edit: (b: Buffer) => Buffer, expected = summary) => {
      await fs.writeFile(file, edit(Buffer.from(good)));
      return scanAll(file, expected).then(
        () => undefined,
        (error: unknown) => error as DiskDeltaError,
      );
    };
    const flip = (at: number) => (b: Buffer) => ((b[at] = b[at]! ^ 0x40), b);

    expect(await damaged(flip(0))).toMatchObject({ code: 'BAD_MAGIC', offset: 0 });
    // record 1's flags byte (8 magic + 13 header + 4096 data + 12)
    const flags = 8 + 13 + 4096 + 12;
    const badFlags = await damaged((b) => ((b[flags] = 0x81), b));
    expect(badFlags).toMatchObject({ code: 'BAD_FLAGS', offset: flags });
    expect(badFlags!.message).toContain(`unknown extent flags 0x81 at offset ${flags} (0x${flags.toString(16)})`);
    // a data byte: only the checksum can tell
    expect(await damaged(flip(8 + 13 + 100))).toMatchObject({ code: 'CHECKSUM_MISMATCH' });
    // cut short, in a header and in data (sizes checked against the file read without `expected`)
    const cutHeader = good.length - 3 - 5;
    await fs.writeFile(file, good.subarray(0, cutHeader));
    await expect(scanDiskDelta(file, SIZE)).rejects.toMatchObject({ code: 'TRUNCATED', offset: good.length - 3 - 13 });
    await fs.writeFile(file, good.subarray(0, good.length - 1));
    await expect(scanDiskDelta(file, SIZE)).rejects.toMatchObject({ code: 'TRUNCATED' });
    expect(await damaged((b) => b.subarray(0, b.length - 1))).toMatchObject({ code: 'SIZE_MISMATCH' });
    // an offset past the disk
    const offsetAt = 8;
    const past = await damaged((b) => (b.writeBigUInt64BE(BigInt(SIZE), offsetAt), b));
    expect(past).toMatchObject({ code: 'OUT_OF_RANGE', offset: offsetAt });
    // intact bytes but other counts than committed
    expect(await damaged((b) => b, { ...summary, extents: 5 })).toMatchObject({ code: 'COUNT_MISMATCH' });
    expect(await damaged((b) => b)).toBeUndefined();
  });
});
