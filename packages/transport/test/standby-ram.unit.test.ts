import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { CheckpointStore, CheckpointStoreError, readRamFileStamp, StandbyRam, type CheckpointBase, type CheckpointMetadata } from '../src/store/index.js';
import { configurationCapabilities, createStreamVerifier, parseMigrationStream, type MigrationRecord } from '../src/stream/index.js';
import { BLOCKS, full, marked, PAGE, stream, type Page } from './fixtures-chain.js';
import { pseudoRandom } from './fixtures-synthetic.js';

let dir: string;
let file: string;
beforeEach(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'ftvm-standby-ram-'));
  file = path.join(dir, 'pc.ram');
});
afterEach(async () => fs.rm(dir, { recursive: true, force: true }));

function commit(store: CheckpointStore, epoch: number, data: Buffer, base?: CheckpointMetadata): Promise<CheckpointMetadata> {
  const lineage: CheckpointBase | undefined = base && { epoch: base.epoch, sha256: base.sha256 };
  return store.commit({ vm: 'probe', epoch, data: Readable.from([data]), stopNs: 1n, resumeNs: 2n, qemuVersion: '7.2.22', verifier: createStreamVerifier(), ...(lineage ? { base: lineage } : {}) });
}

/** An increment as ftvm's QEMU sends it: its pages only, marked. */
const increment = (pages: Page[], deviceByte: number) => marked(stream(pages, BLOCKS, deviceByte));

/** What pc.ram holds after `sets` of pages, in order (a page without data is zero). */
function expectedRam(...sets: Page[][]): Buffer {
  const ram = Buffer.alloc(BLOCKS[0]!.usedLength);
  for (const pages of sets) for (const p of pages) if (p.block === 'pc.ram') (p.data ?? Buffer.alloc(PAGE)).copy(ram, p.index * PAGE);
  return ram;
}

const ramPages = (records: MigrationRecord[], block: string) => records.filter((r): r is Extract<MigrationRecord, { block: string }> => 'block' in r && r.block === block);

describe('StandbyRam', () => {
  it('keeps the file at the newest checkpoint and loads only device state from it', async () => {
    const store = await new CheckpointStore(dir + '/store', 3).open();
    const ram = new StandbyRam(store, file);
    expect(ram.epoch).toBeUndefined();
    expect(() => ram.deviceOnly()).toThrow(/holds no checkpoint yet/);

    const base = full(1);
    const m1 = await commit(store, 1, stream(base, BLOCKS, 1));
    const first = await ram.catchUp();
    expect(first.map((a) => [a.epoch, a.full])).toEqual([[1, true]]);
    expect(await fs.readFile(file)).toEqual(expectedRam(base));
    // a full checkpoint's zero pages are holes, not written
    expect(first[0]!.pages).toBe(base.filter((p) => p.block === 'pc.ram' && p.data).length);

    // two increments committed before the next catch-up: both applied, in order
    const d2: Page[] = [{ block: 'pc.ram', index: 0, data: pseudoRandom(PAGE, 20) }, { block: 'pc.ram', index: 1 }, { block: 'pc.bios', index: 1, data: pseudoRandom(PAGE, 21) }];
    const d3: Page[] = [{ block: 'pc.ram', index: 0, data: pseudoRandom(PAGE, 30) }, { block: 'pc.ram', index: 4, data: pseudoRandom(PAGE, 31) }];
    const m2 = await commit(store, 2, increment(d2, 2), m1);
    await commit(store, 3, increment(d3, 3), m2);
    const next = await ram.catchUp();
    expect(next.map((a) => [a.epoch, a.full])).toEqual([[2, false], [3, false]]);
    expect(ram.epoch).toBe(3);
    expect(await fs.readFile(file)).toEqual(expectedRam(base, d2, d3));
    expect(await readRamFileStamp(file)).toEqual({ epoch: 3, state: 'applied' });
    expect(await ram.catchUp()).toEqual([]);

    const only = ram.deviceOnly();
    const records = parseMigrationStream(Buffer.concat([...only.ram, only.deviceState]));
    const configuration = records.find((r) => r.type === 'configuration')!;
    expect(configurationCapabilities(configuration as Extract<MigrationRecord, { type: 'configuration' }>)).toEqual(['x-ignore-shared']);
    // the marker of increment 3's configuration is gone: QEMU would refuse the stream
    expect((configuration as Extract<MigrationRecord, { type: 'configuration' }>).subsections.map((s) => s.name)).toEqual(['configuration/capabilities']);
    const memSize = records.find((r) => r.type === 'ram-mem-size') as Extract<MigrationRecord, { type: 'ram-mem-size' }>;
    expect(memSize.blocks).toEqual(BLOCKS.map((b) => ({ ...b, mrAddr: 0 })));
    expect(ramPages(records, 'pc.ram')).toEqual([]);
    // every page of the small block, the newest of each
    const bios = ramPages(records, 'pc.bios');
    expect(bios.map((p) => p.addr)).toEqual([0, PAGE]);
    expect(bios[1]).toMatchObject({ type: 'ram-page', data: pseudoRandom(PAGE, 21) });
    expect(bios[0]).toMatchObject({ type: 'ram-page', data: base.find((p) => p.block === 'pc.bios' && p.index === 0)!.data });
    // checkpoint 3's device state, and its preamble to parse it alone
    const device = records.find((r) => r.type === 'device-section') as Extract<MigrationRecord, { type: 'device-section' }>;
    expect(device.body).toEqual(Buffer.alloc(24, 3));
    expect(parseMigrationStream(Buffer.concat([only.preamble, only.deviceState])).some((r) => r.type === 'device-section')).toBe(true);
  });

  it('leaves the file at the previous checkpoint when the newest does not verify, and never applies what builds on it', async () => {
    const store = await new CheckpointStore(dir + '/store', 5).open();
    const corrupt: CheckpointStoreError[] = [];
    const ram = new StandbyRam(store, file, { onCorrupt: (error) => corrupt.push(error) });
    const base = full(1);
    const m1 = await commit(store, 1, stream(base, BLOCKS, 1));
    const d2: Page[] = [{ block: 'pc.ram', index: 2, data: pseudoRandom(PAGE, 20) }];
    const m2 = await commit(store, 2, increment(d2, 2), m1);
    await ram.catchUp();
    const held = await fs.readFile(file);

    const m3 = await commit(store, 3, increment([{ block: 'pc.ram', index: 3, data: pseudoRandom(PAGE, 30) }], 3), m2);
    const data = store.dataPath(3);
    const bytes = await fs.readFile(data);
    bytes[bytes.length - 40]! ^= 0xff;
    await fs.writeFile(data, bytes);
    expect(await ram.catchUp()).toEqual([]);
    expect(corrupt.map((e) => [e.epoch, e.code])).toEqual([[3, 'corrupt']]);
    expect(ram.epoch).toBe(2);
    expect(await fs.readFile(file)).toEqual(held);
    expect(ram.deviceOnly().deviceState.length).toBeGreaterThan(0);

    await commit(store, 4, increment([{ block: 'pc.ram', index: 4, data: pseudoRandom(PAGE, 40) }], 4), m3);
    expect(await ram.catchUp()).toEqual([]);
    expect(ram.epoch).toBe(2);
    expect(await fs.readFile(file)).toEqual(held);
    expect(corrupt.map((e) => e.epoch)).toEqual([3, 4]);
  });

  it('lists the store again when a chain is pruned under it: no corruption reported, the newest applied', async () => {
    const storeDir = dir + '/store';
    const store = await new CheckpointStore(storeDir, 3).open();
    const corrupt: CheckpointStoreError[] = [];
    const ram = new StandbyRam(store, file, { onCorrupt: (error) => corrupt.push(error) });
    const m1 = await commit(store, 1, stream(full(1), BLOCKS, 1));
    await commit(store, 2, increment([{ block: 'pc.ram', index: 2, data: pseudoRandom(PAGE, 20) }], 2), m1);
    // the receiver commits a full checkpoint and prunes the old chain while the chain of 2 is read
    const again = full(7);
    const metadata = store.metadata.bind(store);
    let raced = false;
    store.metadata = async (epoch: number) => {
      if (epoch === 1 && !raced) {
        raced = true;
        await commit(store, 4, stream(again, BLOCKS, 4));
        for (const gone of [1, 2]) await Promise.all([fs.rm(store.dataPath(gone)), fs.rm(path.join(storeDir, `${gone}.json`))]);
      }
      return metadata(epoch);
    };
    expect((await ram.catchUp()).map((a) => [a.epoch, a.full])).toEqual([[4, true]]);
    expect(raced).toBe(true);
    expect(corrupt).toEqual([]);
    expect(await fs.readFile(file)).toEqual(expectedRam(again));
  });

  it('rewrites the file from a new full checkpoint and forgets the old small pages', async () => {
    const store = await new CheckpointStore(dir + '/store', 3).open();
    const ram = new StandbyRam(store, file, { accept: (epoch) => epoch !== 99 });
    const m1 = await commit(store, 1, stream(full(1), BLOCKS, 1));
    await commit(store, 2, increment([{ block: 'pc.bios', index: 0, data: pseudoRandom(PAGE, 20) }], 2), m1);
    await ram.catchUp();
    const again = full(7);
    await commit(store, 5, stream(again, BLOCKS, 5));
    expect((await ram.catchUp()).map((a) => [a.epoch, a.full])).toEqual([[5, true]]);
    expect(await fs.readFile(file)).toEqual(expectedRam(again));
    const bios = ramPages(parseMigrationStream(Buffer.concat([...ram.deviceOnly().ram, ram.deviceOnly().deviceState])), 'pc.bios');
    expect(bios.map((p) => (p.type === 'ram-page' ? p.data : undefined))).toEqual(again.filter((p) => p.block === 'pc.bios').map((p) => p.data));
  });

  it('applies nothing once closed, until reopened', async () => {
    const store = await new CheckpointStore(dir + '/store', 3).open();
    const ram = new StandbyRam(store, file);
    await commit(store, 1, stream(full(1), BLOCKS, 1));
    await ram.close();
    expect(await ram.catchUp()).toEqual([]);
    ram.reopen();
    expect((await ram.catchUp()).map((a) => a.epoch)).toEqual([1]);
  });
});
