import fsSync from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { CheckpointStore, CheckpointStoreError, type CheckpointBase } from '../src/store/index.js';
import { createStreamVerifier, parseMigrationStream } from '../src/stream/index.js';
import { BLOCKS, full, marked, PAGE, stream } from './fixtures-chain.js';
import { pseudoRandom } from './fixtures-synthetic.js';

let dir: string;
beforeEach(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'ftvm-chain-'));
});
afterEach(async () => fs.rm(dir, { recursive: true, force: true }));

/** Commits one migration stream, verified as the receiver does. */
function commit(store: CheckpointStore, epoch: number, data: Buffer, base?: CheckpointBase) {
  return store.commit({
    vm: 'probe',
    epoch,
    data: Readable.from([data]),
    stopNs: 1n,
    resumeNs: 2n,
    qemuVersion: '7.2.22',
    verifier: createStreamVerifier(),
    ...(base ? { base } : {}),
  });
}

const delta = (index: number, seed: number) => stream([{ block: 'pc.ram', index, data: pseudoRandom(PAGE, seed) }]);

describe('CheckpointStore with incremental checkpoints', () => {
  it('commits a chain and reads its newest checkpoint back as one full stream', async () => {
    const store = await new CheckpointStore(dir, 2).open();
    const m1 = await commit(store, 1, stream(full(1)));
    const m2 = await commit(store, 2, delta(0, 20), { epoch: 1, sha256: m1.sha256 });
    const m3 = await commit(store, 3, delta(5, 30), { epoch: 2, sha256: m2.sha256 });
    expect(m3.base).toBe(2);
    expect(m3.ramBlocks).toEqual(BLOCKS.map((b) => ({ id: b.idstr, bytes: b.usedLength })));
    // keep = 2, but 2 and 3 need 1: nothing a kept checkpoint builds on is pruned
    expect(await store.epochs()).toEqual([1, 2, 3]);

    const latest = (await store.latestVerified())!;
    expect(latest.metadata.epoch).toBe(3);
    expect(latest.chain.map((m) => m.epoch)).toEqual([1, 2, 3]);
    expect(latest.data.map((d, i) => d.equals(fsSync.readFileSync(store.dataPath(i + 1))))).toEqual([true, true, true]);
    // the full stream's 8 pages, then each increment's page as a later iteration would send it
    const pages = parseMigrationStream(store.read(latest)).filter((r) => r.type === 'ram-page' || r.type === 'ram-zero');
    expect(pages).toHaveLength(8 + 1 + 1);
    const page = (addr: number) => pages.findLast((r) => r.type === 'ram-page' && r.block === 'pc.ram' && r.addr === addr);
    expect(page(0)).toMatchObject({ data: pseudoRandom(PAGE, 20) });
    expect(page(5 * PAGE)).toMatchObject({ data: pseudoRandom(PAGE, 30) });

    // a new full checkpoint ends the chain; the old one goes once nothing kept needs it
    const m4 = await commit(store, 4, stream(full(4)));
    await commit(store, 5, delta(1, 50), { epoch: 4, sha256: m4.sha256 });
    await store.pruned();
    expect(await store.epochs()).toEqual([4, 5]);
  });

  it('prunes nothing while a kept checkpoint\'s chain cannot be followed', async () => {
    const store = await new CheckpointStore(dir, 2).open();
    const m1 = await commit(store, 1, stream(full(1)));
    await commit(store, 2, delta(0, 2), { epoch: 1, sha256: m1.sha256 });
    await fs.writeFile(path.join(dir, '1.json'), '{ torn');
    await commit(store, 3, stream(full(3)));
    expect(await store.epochs()).toEqual([1, 2, 3]); // 1 is evidence of what happened to 2
    expect((await store.latestVerified())?.metadata.epoch).toBe(3);
  });

  it('refuses an increment that does not extend the newest committed checkpoint of the same lineage', async () => {
    const store = await new CheckpointStore(dir).open();
    const m1 = await commit(store, 1, stream(full(1)));
    const wrongSum = await commit(store, 2, delta(0, 2), { epoch: 1, sha256: '0'.repeat(64) }).catch((e: unknown) => e);
    expect(wrongSum).toBeInstanceOf(CheckpointStoreError);
    expect(wrongSum).toMatchObject({ code: 'no-base', message: expect.stringContaining('checksum differs') });
    await commit(store, 2, delta(0, 2), { epoch: 1, sha256: m1.sha256 });
    const stale = await commit(store, 3, delta(0, 3), { epoch: 1, sha256: m1.sha256 }).catch((e: unknown) => e);
    expect(stale).toMatchObject({ code: 'no-base', message: expect.stringContaining('the newest committed is 2') });
    expect(await store.epochs()).toEqual([1, 2]);
  });

  it('refuses an increment sent as a full checkpoint', async () => {
    const store = await new CheckpointStore(dir).open();
    const error = await commit(store, 1, delta(0, 1)).catch((e: unknown) => e);
    expect(error).toMatchObject({ code: 'verify', message: expect.stringContaining("lacks 5 pages of RAM block 'pc.ram'") });
    expect(await store.epochs()).toEqual([]);
  });

  it('refuses a stream QEMU marked as an increment when it comes as a full checkpoint, even with every page', async () => {
    const store = await new CheckpointStore(dir).open();
    const error = await commit(store, 1, marked(stream(full(1)))).catch((e: unknown) => e);
    expect(error).toMatchObject({ code: 'verify', message: expect.stringContaining('QEMU marked its stream an increment') });
    expect(await store.epochs()).toEqual([]);
  });

  it('refuses an increment whose RAM blocks differ from its base', async () => {
    const store = await new CheckpointStore(dir).open();
    const m1 = await commit(store, 1, stream(full(1)));
    const bigger = stream([], [{ idstr: 'pc.ram', usedLength: 8 * PAGE }, BLOCKS[1]!]);
    const error = await commit(store, 2, bigger, { epoch: 1, sha256: m1.sha256 }).catch((e: unknown) => e);
    expect(error).toMatchObject({ code: 'verify', message: expect.stringContaining('other RAM blocks than its base') });
  });

  it('skips every checkpoint built on a corrupt one, back to an intact chain', async () => {
    const store = await new CheckpointStore(dir, 5).open();
    const m1 = await commit(store, 1, stream(full(1)));
    const m2 = await commit(store, 2, delta(0, 2), { epoch: 1, sha256: m1.sha256 });
    const m3 = await commit(store, 3, stream(full(3)));
    const m4 = await commit(store, 4, delta(1, 4), { epoch: 3, sha256: m3.sha256 });
    await commit(store, 5, delta(2, 5), { epoch: 4, sha256: m4.sha256 });
    expect(m2.base).toBe(1);
    const file = await fs.open(store.dataPath(3), 'r+');
    await file.write(Buffer.from([0xff]), 0, 1, 100);
    await file.close();

    const corrupt: string[] = [];
    const latest = await store.latestVerified((e) => corrupt.push(e.message));
    expect(latest?.metadata.epoch).toBe(2);
    expect(corrupt).toHaveLength(3);
    expect(corrupt[0]).toMatch(/^checkpoint 5 builds on checkpoint 3: checkpoint 3 is corrupt/);
    expect(corrupt[2]).toMatch(/^checkpoint 3 is corrupt/);
  });

  it('reports a chain whose base is gone', async () => {
    const store = await new CheckpointStore(dir).open();
    const m1 = await commit(store, 1, stream(full(1)));
    await commit(store, 2, delta(0, 2), { epoch: 1, sha256: m1.sha256 });
    await fs.rm(path.join(dir, '1.json'));
    const corrupt: string[] = [];
    expect(await store.latestVerified((e) => corrupt.push(e.message))).toBeUndefined();
    expect(corrupt).toEqual(['checkpoint 2 builds on checkpoint 1, which is gone']);
  });
});
