// Model-based test of disk replication: random guest writes to in-memory disks, deltas made from
// the model's dirty blocks as the primary makes them from its bitmaps, sent through the real
// sender and receiver into the real store; at random points a failover's view (latestVerified,
// then prepareDisks) must be byte for byte the model's disks at the chosen checkpoint. Reseeds,
// refused disk bases (the primary keeps the writes for the next delta), lost acks (the store
// committed, the primary keeps the writes and its base), receiver restarts and a corrupted newest
// delta are mixed in.
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { CheckpointStore, type DiskBase } from '../src/store/index.js';
import { connect, memory, ModelDisk, prng, trailer } from './fixtures-disks.js';

let dir: string;
beforeEach(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'ftvm-disk-model-'));
});
afterEach(async () => fs.rm(dir, { recursive: true, force: true }));

async function run(seed: number, steps: number) {
  const random = prng(seed);
  const keep = 1 + random.int(3);
  const disks = [new ModelDisk('vda', (32 + random.int(64)) * 4096), new ModelDisk('vdb', (8 + random.int(16)) * 4096 + random.int(4096))];
  const geometry = disks.map(({ disk, sizeBytes }) => ({ disk, sizeBytes }));
  let store = await new CheckpointStore(dir, keep).open();
  let link = connect(store);
  let base: DiskBase | undefined;
  let epoch = 0;
  let newest: number | undefined; // the newest committed checkpoint
  const committed = new Set<number>(); // every checkpoint committed since the last seed
  const snapshots = new Map<number, Buffer[]>();
  const counts = { writes: 0, checkpoints: 0, refused: 0, lostAcks: 0, seeds: 0, restarts: 0, checks: 0, fallbacks: 0 };

  const write = () => {
    const d = disks[random.int(disks.length)]!;
    const length = 1 + random.int(Math.min(d.sizeBytes, random.chance(0.2) ? 40_000 : 3000));
    const offset = random.int(d.sizeBytes - length + 1);
    d.write(offset, random.chance(0.25) ? Buffer.alloc(length) : random.bytes(length));
    counts.writes++;
  };

  const reseed = async () => {
    const id = `s${seed}-${++counts.seeds}`;
    const { bytes } = await link.sender.sendSeed({ seed: id, disks: disks.map((d) => d.section(d.seedExtents())) });
    expect(bytes).toBe(disks.reduce((n, d) => n + d.seedExtents().reduce((m, e) => m + e.length, 0), 0));
    disks.forEach((d) => d.dirty.clear());
    base = { seed: id };
    newest = undefined;
    committed.clear();
    snapshots.clear();
  };

  const checkpoint = async () => {
    if (!base) await reseed();
    epoch += 1 + random.int(3);
    // a base this store never committed (an epoch in a gap, or another seed); an older committed
    // one (an ack lost) is no error: see lostAck
    const gap = newest === undefined ? undefined : [newest - 1, newest - 2].find((e) => e >= 0 && !committed.has(e));
    const wrong: DiskBase | undefined = random.chance(0.1) ? (gap !== undefined && random.chance(0.5) ? { epoch: gap } : { seed: 'stale' }) : undefined;
    const lostAck = !wrong && random.chance(0.15);
    const maxRun = 1 + random.int(64);
    const zeroAsZero = random.chance(0.5);
    const sending = link.sender.send({
      header: { vm: 'probe', epoch, qemuVersion: '7.2.22', disks: geometry, diskBase: wrong ?? base! },
      data: memory(epoch),
      disks: async function* () {
        yield* disks.map((d) => d.section(d.deltaExtents({ maxRun, zeroAsZero })));
      },
      trailer: trailer(epoch),
    });
    if (wrong) {
      // refused: the primary merges the epoch's bitmap into the next, so nothing is lost
      await expect(sending).rejects.toMatchObject({ code: 'no-disk-base', epoch });
      counts.refused++;
      return;
    }
    await sending;
    snapshots.set(epoch, disks.map((d) => Buffer.from(d.image)));
    committed.add(epoch);
    newest = epoch;
    counts.checkpoints++;
    if (lostAck) {
      // committed, but the ack never reached the primary: it keeps the epoch's writes and its base
      counts.lostAcks++;
      return;
    }
    disks.forEach((d) => d.dirty.clear());
    base = { epoch };
  };

  /** What a failover finds, checked against the model. */
  const failover = async (expected: number | undefined) => {
    await store.pruned(); // the receiver's store is quiet at failover
    const latest = await store.latestVerified();
    expect(latest?.metadata.epoch, `seed ${seed}: the checkpoint a failover picks`).toBe(expected);
    if (!latest) return;
    const images = await store.prepareDisks(latest);
    for (const [i, d] of disks.entries()) {
      const bytes = await fs.readFile(images.get(d.disk)!);
      expect(bytes.equals(snapshots.get(expected!)![i]!), `seed ${seed}: disk ${d.disk} at checkpoint ${expected}`).toBe(true);
    }
    counts.checks++;
  };

  /** The newest delta rots: the failover must take the previous checkpoint its replica can still reach. */
  const corruptNewest = async () => {
    await store.pruned();
    const replica = (await store.replicaState())!;
    const floor = Math.max(replica.appliedEpoch ?? -1, replica.applying ?? -1);
    const file = store.deltaPath(newest!, disks[random.int(disks.length)]!.disk);
    const bytes = await fs.readFile(file);
    const at = random.int(bytes.length);
    bytes[at] = bytes[at]! ^ 0x10; // (a delta without extents is its magic alone)
    await fs.writeFile(file, bytes);
    const present = await store.epochs();
    // already applied (keep 1 applies the newest at once): its delta is no longer needed
    const expected = newest! <= floor ? newest : present.filter((e) => e < newest! && e >= floor).at(-1);
    await failover(expected);
    counts.fallbacks++;
    await reseed(); // the lineage through the rotten delta is over
  };

  for (let step = 0; step < steps; step++) {
    const op = random.next();
    if (op < 0.45) for (let i = 1 + random.int(4); i > 0; i--) write();
    else if (op < 0.75) await checkpoint();
    else if (op < 0.8) await reseed();
    else if (op < 0.86) {
      await link.close();
      await store.pruned();
      store = await new CheckpointStore(dir, keep).open();
      link = connect(store);
      counts.restarts++;
    } else if (op < 0.97 || newest === undefined) await failover(newest);
    else await corruptNewest();
  }
  await failover(newest);
  await link.close();
  await store.pruned();
  return counts;
}

describe('disk replication against a model', () => {
  for (const seed of [1, 2, 3, 4, 5, 6]) {
    it(`run ${seed}: a failover always finds the disks exactly as they were at its checkpoint`, async () => {
      const counts = await run(seed, 70);
      expect(counts.checks).toBeGreaterThan(2);
      expect(counts.refused + counts.lostAcks).toBeGreaterThan(0);
      expect(counts.checkpoints).toBeGreaterThan(10);
    }, 60_000);
  }
});
