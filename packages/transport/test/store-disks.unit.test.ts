import { spawnSync } from 'node:child_process';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { CheckpointStore, CheckpointStoreError, scanDiskDelta, type CommitInput, type DiskBase, type DiskExtent } from '../src/store/index.js';
import { ModelDisk, memory, prng } from './fixtures-disks.js';

let dir: string;
beforeEach(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'ftvm-store-disks-'));
});
const opened: CheckpointStore[] = [];
afterEach(async () => {
  await Promise.all(opened.splice(0).map((s) => s.pruned())); // a prune (and apply) may still run
  await fs.rm(dir, { recursive: true, force: true });
});

function openStore(keep = 3, options: ConstructorParameters<typeof CheckpointStore>[2] = {}): Promise<CheckpointStore> {
  const store = new CheckpointStore(dir, keep, options);
  opened.push(store);
  return store.open();
}

/** Two disks, one of a size that is not a multiple of the 4 KiB granularity, and what they held at each committed epoch. */
function world(seed = 1) {
  const random = prng(seed);
  const disks = [new ModelDisk('vda', 64 * 4096), new ModelDisk('vdb', 16 * 4096 + 512)];
  const images = new Map<number, Buffer[]>();
  const scribble = (writes = 6) => {
    for (let i = 0; i < writes; i++) {
      const d = disks[random.int(disks.length)]!;
      const length = 1 + random.int(9000);
      const offset = random.int(d.sizeBytes - length);
      d.write(offset, random.chance(0.2) ? Buffer.alloc(length) : random.bytes(length));
    }
  };
  return { disks, images, scribble, geometry: disks.map(({ disk, sizeBytes }) => ({ disk, sizeBytes })) };
}
type World = ReturnType<typeof world>;

async function seed(store: CheckpointStore, w: World, id = 's1') {
  const result = await store.seed({ seed: id, disks: w.geometry, sections: Readable.from(w.disks.map((d) => d.section(d.seedExtents())), { objectMode: true }) });
  for (const d of w.disks) d.dirty.clear();
  return result;
}

function input(epoch: number, w: World, diskBase: DiskBase | undefined, sections = w.disks.map((d) => d.section(d.deltaExtents({ zeroAsZero: true, maxRun: 3 })))): CommitInput {
  return {
    vm: 'probe',
    epoch,
    data: memory(epoch),
    stopNs: 1n,
    resumeNs: 2n,
    qemuVersion: '7.2.22',
    disks: Readable.from(sections, { objectMode: true }),
    ...(diskBase ? { diskBase } : {}),
  };
}

/** Commits the model's writes since the last commit as checkpoint `epoch`, and remembers the disks as of it. */
async function commit(store: CheckpointStore, w: World, epoch: number, diskBase: DiskBase) {
  const meta = await store.commit(input(epoch, w, diskBase));
  for (const d of w.disks) d.dirty.clear();
  w.images.set(epoch, w.disks.map((d) => Buffer.from(d.image)));
  return meta;
}

async function expectImages(images: Map<string, string>, expected: Buffer[], w: World) {
  expect([...images.keys()]).toEqual(w.disks.map((d) => d.disk));
  for (const [i, d] of w.disks.entries()) {
    const bytes = await fs.readFile(images.get(d.disk)!);
    expect(bytes.length).toBe(d.sizeBytes);
    expect(bytes.equals(expected[i]!), `disk ${d.disk}`).toBe(true);
  }
}

const markerPath = () => path.join(dir, 'disks', 'replica.json');
const readMarker = async () => JSON.parse(await fs.readFile(markerPath(), 'utf8'));

describe('CheckpointStore with disks', () => {
  it('seeds, then commits deltas on the seed and on each other; the failover gets the disks as of the checkpoint', async () => {
    const w = world();
    const store = await openStore(3);
    w.scribble(10);
    expect(await seed(store, w)).toEqual({ bytes: w.disks.reduce((n, d) => n + d.seedExtents().reduce((m, e) => m + e.length, 0), 0) });
    expect(await store.replicaState()).toMatchObject({ seed: 's1', complete: true, appliedEpoch: null, disks: w.geometry });
    w.scribble();
    const first = await commit(store, w, 1, { seed: 's1' });
    expect(first.diskBase).toEqual({ seed: 's1' });
    expect(first.disks!.map((d) => d.disk)).toEqual(['vda', 'vdb']);
    for (const d of first.disks!) {
      // the delta file is what the metadata says it is
      expect(await scanDiskDelta(store.deltaPath(1, d.disk), d.sizeBytes, { expected: d })).toEqual({ bytes: d.bytes, sha256: d.sha256, extents: d.extents, dataBytes: d.dataBytes });
    }
    w.scribble();
    const second = await commit(store, w, 2, { epoch: 1 });
    expect(second.diskBase).toEqual({ epoch: 1 });
    await store.pruned();
    // the replica follows the oldest checkpoint kept, so a failover to it needs nothing more
    expect(await readMarker()).toMatchObject({ appliedEpoch: 1 });
    const latest = (await store.latestVerified())!;
    expect(latest.metadata.epoch).toBe(2);
    expect(latest.diskEpochs).toEqual([2]);
    await expectImages(await store.prepareDisks(latest), w.images.get(2)!, w);
    expect(await readMarker()).toEqual({ seed: 's1', complete: true, appliedEpoch: 2, disks: w.geometry });
    // prepared again: nothing to do, same bytes
    await expectImages(await store.prepareDisks((await store.latestVerified())!), w.images.get(2)!, w);
  });

  it("refuses deltas that do not apply on the store's disk head with no-disk-base, leaving nothing behind", async () => {
    const w = world();
    const store = await openStore(3);
    const refused = async (epoch: number, diskBase: DiskBase | undefined, message: RegExp, sections?: ReturnType<ModelDisk['section']>[]) => {
      const error = await store.commit(input(epoch, w, diskBase, sections)).catch((e: unknown) => e);
      expect(error).toBeInstanceOf(CheckpointStoreError);
      expect(error).toMatchObject({ code: 'no-disk-base', epoch });
      expect((error as Error).message).toMatch(message);
    };
    await refused(1, { seed: 's1' }, /checkpoint 1's disks apply on seed s1, but this backup holds no disk replica: reseed the disks/);
    await seed(store, w);
    await refused(1, { seed: 'other' }, /but the replica holds seed s1/);
    await refused(1, { epoch: 0 }, /apply on checkpoint 0, but the newest committed checkpoint is none/);
    await refused(1, undefined, /carries disks but names no disk base/);
    await refused(1, { seed: 's1' }, /disk 'vdb' of 999 bytes is not one the replica holds/, [w.disks[0]!.section([]), { disk: 'vdb', sizeBytes: 999, extents: Readable.from([]) }]);
    await refused(1, { seed: 's1' }, /lacks disk 'vdb' of the replica/, [w.disks[0]!.section([])]);
    expect((await fs.readdir(dir)).sort()).toEqual(['disks']);
    await commit(store, w, 1, { seed: 's1' });
    await refused(2, { epoch: 0 }, /apply on checkpoint 0, but checkpoint 0 is not committed here \(the newest committed checkpoint is 1\)/);
    await store.commit({ ...input(2, w, undefined), disks: undefined }); // a checkpoint without disks
    await refused(3, { epoch: 2 }, /checkpoint 2 carries no disks/);
    await refused(3, { epoch: 1 }, /the newest committed checkpoint is 2/);
    expect((await fs.readdir(dir)).filter((n) => n.includes('delta')).sort()).toEqual(['1.vda.delta', '1.vdb.delta']);
  });

  it('takes a delta on an older committed checkpoint (its ack was lost) on the newest, and the failover gets the disks exactly', async () => {
    const w = world(21);
    const store = await openStore(3);
    await seed(store, w);
    w.scribble();
    await commit(store, w, 1, { seed: 's1' });
    // 2 and 3 commit, but the primary never hears of them: it keeps their writes for the next delta
    const lost = async (epoch: number, diskBase: DiskBase) => {
      w.scribble();
      const meta = await store.commit(input(epoch, w, diskBase));
      w.images.set(epoch, w.disks.map((d) => Buffer.from(d.image)));
      return meta;
    };
    expect((await lost(2, { epoch: 1 })).diskBase).toEqual({ epoch: 1 });
    expect((await lost(3, { epoch: 1 })).diskBase).toEqual({ epoch: 2 }); // on the head, not on 1
    await store.pruned();
    w.scribble();
    const fourth = await commit(store, w, 4, { epoch: 1 }); // everything since 1
    expect(fourth.diskBase).toEqual({ epoch: 3 });
    await store.pruned(); // keep 3: 1 went, the replica is at 2
    expect(await readMarker()).toMatchObject({ appliedEpoch: 2 });
    const latest = (await store.latestVerified())!;
    expect(latest.metadata.epoch).toBe(4);
    expect(latest.diskEpochs).toEqual([3, 4]);
    await expectImages(await store.prepareDisks(latest), w.images.get(4)!, w);

    // a delta on a base that is gone (pruned) or was never here: no lineage to show, reseed
    w.scribble();
    await expect(store.commit(input(5, w, { epoch: 1 }))).rejects.toMatchObject({ code: 'no-disk-base', message: expect.stringContaining('checkpoint 1 is not committed here (the newest committed checkpoint is 4)') });
    await expect(store.commit(input(5, w, { seed: 's0' }))).rejects.toMatchObject({ code: 'no-disk-base', message: expect.stringContaining('the replica holds seed s1') });
  });

  it("takes a delta on the seed after checkpoints on it whose acks were lost, even once the replica is past the seed; the previous one stays exact", async () => {
    const w = world(23);
    const store = await openStore(1); // keep 1: the replica follows the newest at once
    await seed(store, w);
    for (const epoch of [1, 2]) {
      w.scribble();
      const meta = await store.commit(input(epoch, w, { seed: 's1' }));
      expect(meta.diskBase).toEqual(epoch === 1 ? { seed: 's1' } : { epoch: 1 });
      w.images.set(epoch, w.disks.map((d) => Buffer.from(d.image)));
      await store.pruned();
    }
    expect(await readMarker()).toMatchObject({ appliedEpoch: 2 });
    w.scribble();
    await commit(store, w, 3, { seed: 's1' });
    const latest = (await store.latestVerified())!;
    expect(latest.diskEpochs).toEqual([3]);
    await expectImages(await store.prepareDisks(latest), w.images.get(3)!, w);
  });

  it('refuses an extent out of the disk as verify, naming the disk', async () => {
    const w = world();
    const store = await openStore();
    await seed(store, w);
    const bad = { disk: 'vdb', sizeBytes: w.disks[1]!.sizeBytes, extents: Readable.from([{ offset: w.disks[1]!.sizeBytes - 10, length: 20 }]) };
    const error = await store.commit(input(1, w, { seed: 's1' }, [w.disks[0]!.section([]), bad])).catch((e: unknown) => e);
    expect(error).toMatchObject({ code: 'verify', message: expect.stringMatching(/checkpoint 1, disk 'vdb': extent 66038\+20 ends past the disk's 66048 bytes/) });
    expect((await fs.readdir(dir)).sort()).toEqual(['disks']);
  });

  it('a seed removes every committed checkpoint and starts a new disk lineage', async () => {
    const w = world();
    const store = await openStore(3);
    await seed(store, w);
    for (const epoch of [1, 2, 3]) {
      w.scribble();
      await commit(store, w, epoch, epoch === 1 ? { seed: 's1' } : { epoch: epoch - 1 });
    }
    w.scribble();
    await seed(store, w, 's2');
    expect(await store.epochs()).toEqual([]);
    expect((await fs.readdir(dir)).sort()).toEqual(['disks']);
    expect(await store.latestVerified()).toBeUndefined();
    expect(await store.replicaState()).toMatchObject({ seed: 's2', complete: true, appliedEpoch: null });
    await expect(store.commit(input(4, w, { epoch: 3 }))).rejects.toMatchObject({ code: 'no-disk-base' });
    w.scribble();
    await commit(store, w, 4, { seed: 's2' });
    await expectImages(await store.prepareDisks((await store.latestVerified())!), w.images.get(4)!, w);
  });

  it('applies in order, and re-applying after a crash between the image writes and the marker gives the same bytes', async () => {
    const w = world(5);
    const store = await openStore(10);
    await seed(store, w);
    for (const epoch of [1, 2, 3, 4]) {
      w.scribble(12); // overlapping writes: only applying in order gives the right bytes
      await commit(store, w, epoch, epoch === 1 ? { seed: 's1' } : { epoch: epoch - 1 });
    }
    await store.pruned();
    expect(await readMarker()).toMatchObject({ appliedEpoch: 1 });
    const atOne = await Promise.all(w.disks.map((d) => fs.readFile(path.join(dir, 'disks', `${d.disk}.img`))));
    atOne.forEach((bytes, i) => expect(bytes.equals(w.images.get(1)![i]!)).toBe(true));

    // A crash mid-apply towards 4: the marker says applying, the images hold all of 2 and part of 3.
    await fs.writeFile(markerPath(), JSON.stringify({ ...(await readMarker()), applying: 4 }));
    for (const d of w.disks) {
      const image = await fs.open(path.join(dir, 'disks', `${d.disk}.img`), 'r+');
      await scanDiskDelta(store.deltaPath(2, d.disk), d.sizeBytes, { onRecord: async (e) => void (await write(image, e)) });
      let n = 0;
      await scanDiskDelta(store.deltaPath(3, d.disk), d.sizeBytes, { onRecord: async (e) => void (n++ % 2 === 0 && (await write(image, e))) });
      await image.close();
    }
    // nothing older than the apply's target is taken for the images' state any more
    const corrupt: CheckpointStoreError[] = [];
    const memoryOf4 = await fs.readFile(store.dataPath(4));
    await fs.writeFile(store.dataPath(4), 'rotten');
    expect(await store.latestVerified((e) => corrupt.push(e))).toBeUndefined();
    expect(corrupt.map((e) => [e.epoch, e.code])).toEqual([
      [4, 'corrupt'],
      [3, 'no-replica'],
      [2, 'no-replica'],
      [1, 'no-replica'],
    ]);
    expect(corrupt[1]!.message).toBe("checkpoint 3's disk state is gone: the replica is being applied up to checkpoint 4");
    await fs.writeFile(store.dataPath(4), memoryOf4);
    const latest = (await store.latestVerified())!;
    expect(latest.metadata.epoch).toBe(4);
    expect(latest.diskEpochs).toEqual([2, 3, 4]);
    await expect(store.prepareDisks({ ...latest, metadata: await store.metadata(3) })).rejects.toMatchObject({ code: 'no-replica', message: expect.stringMatching(/being applied up to checkpoint 4/) });
    await expectImages(await store.prepareDisks(latest), w.images.get(4)!, w);
    expect(await readMarker()).toEqual({ seed: 's1', complete: true, appliedEpoch: 4, disks: w.geometry });

    // A crash right before the final marker: everything written, the marker still says applying.
    await fs.writeFile(markerPath(), JSON.stringify({ seed: 's1', complete: true, appliedEpoch: 1, applying: 4, disks: w.geometry }));
    await expectImages(await store.prepareDisks(latest), w.images.get(4)!, w);
  });

  it('verifies every delta before it writes any: a delta that rots after latestVerified leaves the images untouched', async () => {
    const w = world(13);
    const store = await openStore(5);
    await seed(store, w);
    for (const epoch of [1, 2, 3]) {
      w.scribble(8);
      await commit(store, w, epoch, epoch === 1 ? { seed: 's1' } : { epoch: epoch - 1 });
    }
    await store.pruned();
    const latest = (await store.latestVerified())!;
    expect(latest.diskEpochs).toEqual([2, 3]);
    const file = store.deltaPath(3, 'vda');
    const bytes = await fs.readFile(file);
    bytes[bytes.length - 1] = bytes.at(-1)! ^ 1; // its last byte: every record before it would be applied already
    await fs.writeFile(file, bytes);
    await expect(store.prepareDisks(latest)).rejects.toMatchObject({ code: 'corrupt', epoch: 3, path: file });
    expect(await readMarker()).toEqual({ seed: 's1', complete: true, appliedEpoch: 1, disks: w.geometry });
    for (const [i, d] of w.disks.entries()) expect((await fs.readFile(path.join(dir, 'disks', `${d.disk}.img`))).equals(w.images.get(1)![i]!)).toBe(true);
  });

  it('prunes only checkpoints whose deltas the replica has passed, applying them first', async () => {
    const w = world(9);
    const errors: CheckpointStoreError[] = [];
    const store = await openStore(2, { onPruneError: (e) => errors.push(e) });
    await seed(store, w);
    const deltas = async () => (await fs.readdir(dir)).filter((n) => n.endsWith('.delta')).sort();
    for (const epoch of [1, 2, 3]) {
      w.scribble();
      await commit(store, w, epoch, epoch === 1 ? { seed: 's1' } : { epoch: epoch - 1 });
      await store.pruned();
    }
    // keep 2: checkpoint 1 went, after the replica passed it; 2 is the oldest kept and applied
    expect(await store.epochs()).toEqual([2, 3]);
    expect(await deltas()).toEqual(['2.vda.delta', '2.vdb.delta', '3.vda.delta', '3.vdb.delta']);
    expect(await readMarker()).toMatchObject({ appliedEpoch: 2 });
    const images = await Promise.all(w.disks.map((d) => fs.readFile(path.join(dir, 'disks', `${d.disk}.img`))));
    images.forEach((bytes, i) => expect(bytes.equals(w.images.get(2)![i]!)).toBe(true));

    // a delta that rots before it is applied: the replica stops before it and nothing from it on is pruned
    const file = store.deltaPath(3, 'vda');
    const bytes = await fs.readFile(file);
    bytes[bytes.length - 1] = bytes.at(-1)! ^ 1;
    await fs.writeFile(file, bytes);
    for (const epoch of [4, 5]) {
      w.scribble();
      await commit(store, w, epoch, { epoch: epoch - 1 });
      await store.pruned();
    }
    expect(await store.epochs()).toEqual([3, 4, 5]);
    expect(await readMarker()).toMatchObject({ appliedEpoch: 2 });
    expect(errors.map((e) => e.code)).toEqual(['corrupt', 'corrupt']);
    expect(errors[0]!.message).toContain("checkpoint 3's delta of disk 'vda' is corrupt");
  });

  it('falls back to the previous checkpoint when the newest delta is corrupt, disks and memory together', async () => {
    const w = world(11);
    const store = await openStore(3);
    await seed(store, w);
    for (const epoch of [1, 2, 3]) {
      w.scribble();
      await commit(store, w, epoch, epoch === 1 ? { seed: 's1' } : { epoch: epoch - 1 });
    }
    await store.pruned();
    const file = store.deltaPath(3, 'vdb');
    const handle = await fs.open(file, 'r+');
    await handle.write(Buffer.from([0xff]), 0, 1, 8 + 13 + 1); // a data byte of its first record
    await handle.close();
    const corrupt: CheckpointStoreError[] = [];
    const latest = (await store.latestVerified((e) => corrupt.push(e)))!;
    expect(latest.metadata.epoch).toBe(2);
    expect(latest.diskEpochs).toEqual([2]);
    expect(corrupt.map((e) => [e.code, e.epoch, e.path])).toEqual([['corrupt', 3, file]]);
    expect(corrupt[0]!.message).toMatch(/checkpoint 3's delta of disk 'vdb' is corrupt: .*CHECKSUM_MISMATCH/);
    await expectImages(await store.prepareDisks(latest), w.images.get(2)!, w);
  });

  it('a checkpoint with disks is not loadable without a complete replica, or once the replica is past it', async () => {
    const w = world();
    const store = await openStore(5);
    await seed(store, w);
    for (const epoch of [1, 2]) {
      w.scribble();
      await commit(store, w, epoch, epoch === 1 ? { seed: 's1' } : { epoch: epoch - 1 });
    }
    await store.pruned();
    await store.prepareDisks((await store.latestVerified())!); // replica at 2
    const corrupt: CheckpointStoreError[] = [];
    await fs.rm(store.dataPath(2)); // only 1 is left to choose, and the replica is past it
    expect(await store.latestVerified((e) => corrupt.push(e))).toBeUndefined();
    expect(corrupt.map((e) => [e.epoch, e.code])).toEqual([
      [2, 'corrupt'],
      [1, 'no-replica'],
    ]);
    expect(corrupt[1]!.message).toBe("checkpoint 1's disk state is gone: the replica is applied up to checkpoint 2");
    await fs.writeFile(markerPath(), JSON.stringify({ ...(await readMarker()), complete: false }));
    corrupt.length = 0;
    expect(await store.latestVerified((e) => corrupt.push(e))).toBeUndefined();
    expect(corrupt[0]!.message).toBe("checkpoint 2 has disks, but the replica's seed s1 is incomplete");
    await fs.writeFile(markerPath(), '{"seed": 1}');
    await expect(store.replicaState()).rejects.toMatchObject({ code: 'corrupt', message: expect.stringContaining('has an invalid seed') });
  });

  it('keeps the image sparse where a long ZERO extent (a discard) lands, and reads zeros there', async () => {
    const MiB = 1024 * 1024;
    const disk = new ModelDisk('vda', 16 * MiB);
    disk.write(0, prng(17).bytes(16 * MiB));
    const store = await openStore();
    await store.seed({ seed: 's1', disks: [{ disk: 'vda', sizeBytes: 16 * MiB }], sections: Readable.from([disk.section(disk.seedExtents())], { objectMode: true }) });
    const image = path.join(dir, 'disks', 'vda.img');
    expect((await fs.stat(image)).blocks * 512).toBeGreaterThanOrEqual(16 * MiB);
    disk.write(4 * MiB + 1, Buffer.alloc(8 * MiB)); // what the guest reads after discarding
    const zero: DiskExtent = { offset: 4 * MiB + 1, length: 8 * MiB };
    await store.commit({ ...input(1, world(), { seed: 's1' }), disks: Readable.from([{ disk: 'vda', sizeBytes: 16 * MiB, extents: Readable.from([zero], { objectMode: true }) }], { objectMode: true }) });
    await store.pruned(); // applied: 1 is the oldest kept
    expect((await fs.readFile(image)).equals(disk.image)).toBe(true);
    expect((await fs.stat(image)).blocks * 512).toBeLessThanOrEqual(8 * MiB + 2 * 4096);
  });

  it('open() removes temporaries and deltas without metadata, and keeps committed ones', async () => {
    const w = world();
    const store = await openStore();
    await seed(store, w);
    w.scribble();
    await commit(store, w, 1, { seed: 's1' });
    await store.pruned();
    await fs.writeFile(path.join(dir, '2.vda.delta.4242.tmp'), 'half written');
    await fs.writeFile(path.join(dir, '2.vda.delta'), 'renamed, never committed');
    await fs.writeFile(path.join(dir, 'disks', 'replica.json.4242.tmp'), '{');
    await store.open();
    expect((await fs.readdir(dir)).sort()).toEqual(['1.ckpt', '1.json', '1.vda.delta', '1.vdb.delta', 'disks']);
    expect((await fs.readdir(path.join(dir, 'disks'))).sort()).toEqual(['replica.json', 'vda.img', 'vdb.img']);
    // and a commit that fails midway leaves no delta behind
    const dying = new Readable({ objectMode: true, read() {} });
    dying.push(w.disks[0]!.section([{ offset: 0, length: 4096, data: Buffer.alloc(4096, 1) }]));
    setTimeout(() => dying.destroy(new Error('ssh channel closed')), 20);
    await expect(store.commit({ ...input(2, w, { epoch: 1 }), disks: dying })).rejects.toThrow('ssh channel closed');
    expect((await fs.readdir(dir)).sort()).toEqual(['1.ckpt', '1.json', '1.vda.delta', '1.vdb.delta', 'disks']);
  });

  it('validates the metadata of disks and disk base, naming the bad field', async () => {
    const w = world();
    const store = await openStore();
    await seed(store, w);
    await commit(store, w, 1, { seed: 's1' });
    const metaPath = path.join(dir, '1.json');
    const meta = JSON.parse(await fs.readFile(metaPath, 'utf8')) as Record<string, unknown> & { disks: Record<string, unknown>[] };
    const cases: [Record<string, unknown>, string][] = [
      [{ disks: [{ ...meta.disks[0], sha256: 'nope' }] }, 'disks'],
      [{ disks: [{ ...meta.disks[0], disk: '../etc' }] }, 'disks'],
      [{ disks: [meta.disks[0], meta.disks[0]] }, 'disks'],
      [{ disks: [{ ...meta.disks[0], extents: -1 }] }, 'disks'],
      [{ diskBase: { epoch: 1 } }, 'diskBase'], // not before its own epoch
      [{ diskBase: { epoch: 0, seed: 's1' } }, 'diskBase'],
      [{ diskBase: { seed: '' } }, 'diskBase'],
      [{ diskBase: undefined }, 'diskBase'],
      [{ disks: undefined }, 'disks'],
    ];
    for (const [change, field] of cases) {
      await fs.writeFile(metaPath, JSON.stringify({ ...meta, ...change }));
      await expect(store.metadata(1)).rejects.toThrow(`metadata of checkpoint 1 has an invalid ${field}`);
    }
    await fs.writeFile(metaPath, JSON.stringify(meta));
    expect((await store.metadata(1)).diskBase).toEqual({ seed: 's1' });
  });

  it("takes the replica's lock over from a process that is gone, and waits for a live holder only until its deadline", async () => {
    const w = world();
    const store = await openStore(3, { replicaLockTimeoutMs: 200 });
    await seed(store, w);
    await commit(store, w, 1, { seed: 's1' });
    const lock = path.join(dir, 'disks', 'lock');
    const gone = spawnSync('true').pid!;
    await fs.writeFile(lock, String(gone));
    await expectImages(await store.prepareDisks((await store.latestVerified())!), w.images.get(1)!, w);
    await expect(fs.access(lock)).rejects.toThrow(); // released
    await fs.writeFile(lock, String(process.pid)); // held (by "another" apply in this process)
    const started = Date.now();
    await expect(store.prepareDisks((await store.latestVerified())!)).rejects.toMatchObject({ code: 'locked', message: expect.stringContaining(`locked by process ${process.pid}`) });
    expect(Date.now() - started).toBeGreaterThanOrEqual(200);
  });
});

async function write(image: fs.FileHandle, e: DiskExtent): Promise<void> {
  await image.write(e.data ?? Buffer.alloc(e.length), 0, e.length, e.offset);
}
