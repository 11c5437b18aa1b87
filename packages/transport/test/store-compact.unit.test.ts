import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { CheckpointStore, type CheckpointMetadata, type CheckpointStoreError, type CommitInput, type DiskBase } from '../src/store/index.js';
import { createStreamVerifier, encodeRecords, parseMigrationStream, RamFlag } from '../src/stream/index.js';
import { compactInChildProcess, PauseGate } from '../src/store/compaction.js';
import { BLOCKS, full, PAGE, stream, type Page } from './fixtures-chain.js';
import { ModelDisk } from './fixtures-disks.js';
import { pseudoRandom } from './fixtures-synthetic.js';

/** A pid no process has (above any pid_max): what a crashed compaction's file names. */
const DEAD = 99_999_999;

let dir: string;
const opened: CheckpointStore[] = [];
beforeEach(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'ftvm-compact-'));
});
afterEach(async () => {
  vi.restoreAllMocks();
  await Promise.all(opened.splice(0).map((s) => s.compacted()));
  await fs.rm(dir, { recursive: true, force: true });
});

type Options = ConstructorParameters<typeof CheckpointStore>[2];

function openStore(keep: number, options: Options = {}, at = dir): Promise<CheckpointStore> {
  const store = new CheckpointStore(at, keep, options);
  opened.push(store);
  return store.open();
}

/** An increment: a data page, a zero page over what was there, and now and then a bios page. */
function increment(epoch: number): Page[] {
  const pages: Page[] = [
    { block: 'pc.ram', index: epoch % 6, data: pseudoRandom(PAGE, 1000 + epoch) },
    { block: 'pc.ram', index: (epoch * 5 + 1) % 6 },
  ];
  if (epoch % 2 === 0) pages.unshift({ block: 'pc.bios', index: epoch % 2 === 0 ? 1 : 0, data: pseudoRandom(PAGE, 2000 + epoch) });
  return pages;
}

/** Commits a full checkpoint (no `tip`) or an increment on `tip`, verified as the receiver does; device state differs per epoch. */
function commit(store: CheckpointStore, epoch: number, tip?: CheckpointMetadata, extra: Partial<CommitInput> = {}) {
  return store.commit({
    vm: 'probe',
    epoch,
    data: Readable.from([stream(tip ? increment(epoch) : full(epoch), BLOCKS, epoch)]),
    stopNs: BigInt(epoch) * 1000n,
    resumeNs: BigInt(epoch) * 1000n + 5n,
    qemuVersion: '7.2.22',
    verifier: createStreamVerifier(),
    ...(tip ? { base: { epoch: tip.epoch, sha256: tip.sha256 } } : {}),
    ...extra,
  });
}

/** What loading the stream leaves: every page (newest wins) and the device sections. */
function contentOf(bytes: Buffer) {
  const ram = new Map<string, string>();
  const devices: string[] = [];
  for (const r of parseMigrationStream(bytes)) {
    if (r.type === 'ram-page') ram.set(`${r.block}@${r.addr}`, createHash('sha256').update(r.data).digest('hex'));
    else if (r.type === 'ram-zero') ram.set(`${r.block}@${r.addr}`, 'zero');
    else if (r.type === 'device-section') devices.push(`${r.idstr}:${r.body.toString('hex')}`);
  }
  return { ram: Object.fromEntries([...ram].sort()), devices };
}

async function latestContent(store: CheckpointStore, onCorrupt?: (e: CheckpointStoreError) => void) {
  const latest = (await store.latestVerified(onCorrupt))!;
  return { epoch: latest.metadata.epoch, chain: latest.chain.map((m) => m.epoch), ...contentOf(store.read(latest)) };
}

/** Holds the compaction just before its data gets its committed name (its temporary is complete, fsync'd). */
function holdCompactionRename() {
  const rename = fs.rename;
  let release!: () => void;
  const released = new Promise<void>((resolve) => (release = resolve));
  let reach!: () => void;
  const reached = new Promise<void>((resolve) => (reach = resolve));
  vi.spyOn(fs, 'rename').mockImplementation(async (from, to) => {
    if (/\.full-\d+\.ckpt\.tmp$/.test(String(from))) {
      reach();
      await released;
    }
    return rename(from, to);
  });
  return { reached, release };
}

const sorted = async (at = dir) => (await fs.readdir(at)).sort();

describe('CheckpointStore compaction', () => {
  it('compacts the newest checkpoint in the background while increments go on committing on it', async () => {
    const errors: CheckpointStoreError[] = [];
    const hold = holdCompactionRename();
    const store = await openStore(2, { compactAtLength: 4, compactAtRatio: Infinity, onCompactError: (e) => errors.push(e) });
    let tip = await commit(store, 1);
    const committed = [tip];
    for (const epoch of [2, 3, 4]) committed.push((tip = await commit(store, epoch, tip)));
    const m4 = tip;
    const asOf4 = await latestContent(store);
    expect(asOf4.chain).toEqual([1, 2, 3, 4]);

    await hold.reached; // compacting 4: its stream written, not yet switched to
    for (const epoch of [5, 6]) tip = await commit(store, epoch, tip); // on 4, then 5: not held up
    const asOf6 = await latestContent(store);
    expect(asOf6.chain).toEqual([1, 2, 3, 4, 5, 6]);
    expect(await store.epochs()).toEqual([1, 2, 3, 4, 5, 6]);

    hold.release();
    await store.compacted();
    expect(errors).toEqual([]);
    const meta = await store.metadata(4);
    const file = `4.full-${process.pid}.ckpt`;
    const data = await fs.readFile(path.join(dir, file));
    // K's identity stays (the next increment names it by sha256); its data and shape are the new file's
    const { base: _base, bytes: _bytes, layout: _layout, ...unchanged } = m4;
    expect(meta).toEqual({
      ...unchanged,
      bytes: data.length,
      layout: expect.objectContaining({ ramSectionId: m4.layout!.ramSectionId, preambleEnd: m4.layout!.preambleEnd, ramSetupEnd: m4.layout!.ramSetupEnd }),
      dataFile: file,
      dataSha256: createHash('sha256').update(data).digest('hex'),
      compactedAt: expect.any(String),
    });
    expect(meta.base).toBeUndefined();
    expect(store.dataPathOf(meta)).toBe(path.join(dir, file));
    await store.verify(4);
    // keep = 2: 5 and 6, which build on 4, now full — 1, 2, 3 and 4's increment are gone
    expect(await store.epochs()).toEqual([4, 5, 6]);
    expect(await sorted()).toEqual([file, '4.json', '5.ckpt', '5.json', '6.ckpt', '6.json']);

    // the same RAM and devices as before, now from a shorter chain
    expect(await latestContent(store)).toEqual({ ...asOf6, chain: [4, 5, 6] });
    expect(contentOf(data)).toEqual({ ram: asOf4.ram, devices: asOf4.devices });
    const m7 = await commit(store, 7, tip);
    expect(m7.base).toBe(6);
    expect((await latestContent(store)).chain).toEqual([4, 5, 6, 7]);
  });

  it('goes on compacting as the chain grows again, by size with the default ratio', async () => {
    const store = await openStore(3);
    let tip = await commit(store, 1);
    for (let epoch = 2; epoch <= 40; epoch++) {
      tip = await commit(store, epoch, tip);
      await store.compacted();
      // never more increments than a full checkpoint's bytes before it is compacted
      const chain = await store.chain(epoch);
      expect(chain.slice(1).reduce((n, m) => n + m.bytes, 0)).toBeLessThan(chain[0]!.bytes + tip.bytes);
    }
    const compactedEpochs = [];
    for (const epoch of await store.epochs()) if ((await store.metadata(epoch)).dataFile) compactedEpochs.push(epoch);
    expect(compactedEpochs.length).toBeGreaterThan(0);
    expect((await store.epochs()).length).toBeLessThan(12);
    // equal to a store that never compacted
    const plainDir = await fs.mkdtemp(path.join(os.tmpdir(), 'ftvm-compact-plain-'));
    try {
      const plain = await openStore(3, { compactAtRatio: Infinity, compactAtLength: Infinity }, plainDir);
      let plainTip = await commit(plain, 1);
      for (let epoch = 2; epoch <= 40; epoch++) plainTip = await commit(plain, epoch, plainTip);
      expect((await latestContent(plain)).chain).toHaveLength(40);
      const { chain: _c1, ...compactedContent } = await latestContent(store);
      const { chain: _c2, ...plainContent } = await latestContent(plain);
      expect(compactedContent).toEqual(plainContent);
    } finally {
      await fs.rm(plainDir, { recursive: true, force: true });
    }
  });

  describe('open() after a crash at each step of a compaction', () => {
    /** A store compacted at 4 (keep 10: 1–3 stay), as it was just before the switch and after it. */
    async function snapshots() {
      const hold = holdCompactionRename();
      const work = path.join(dir, 'work');
      const store = await openStore(10, { compactAtLength: 4, compactAtRatio: Infinity }, work);
      let tip = await commit(store, 1);
      for (const epoch of [2, 3, 4]) tip = await commit(store, epoch, tip);
      const expected = await latestContent(store);
      await hold.reached;
      const before = path.join(dir, 'before');
      await fs.cp(work, before, { recursive: true });
      hold.release();
      await store.compacted();
      const after = path.join(dir, 'after');
      await fs.cp(work, after, { recursive: true });
      vi.restoreAllMocks();
      return { before, after, expected };
    }

    /** A copy of `from` as a crash left it, made by `edit`; then opened. */
    async function crashed(from: string, name: string, edit: (at: string) => Promise<void>) {
      const at = path.join(dir, name);
      await fs.cp(from, at, { recursive: true });
      await edit(at);
      const store = await openStore(10, { compactAtRatio: Infinity, compactAtLength: Infinity }, at);
      return { at, store };
    }

    const mine = `4.full-${process.pid}.ckpt`;
    const dead = `4.full-${DEAD}.ckpt`;
    const plainFiles = ['1.ckpt', '1.json', '2.ckpt', '2.json', '3.ckpt', '3.json', '4.ckpt', '4.json'];

    it('keeps the chain and drops the compacted file until the metadata names it, then keeps that and drops the old data', async () => {
      const { before, after, expected } = await snapshots();
      expect(await sorted(before)).toEqual([...plainFiles, `${mine}.tmp`].sort());
      expect(await sorted(after)).toEqual([...plainFiles.filter((n) => n !== '4.ckpt'), mine].sort());

      // 1. the temporary written, not renamed
      let s = await crashed(before, 'tmp', (at) => fs.rename(path.join(at, `${mine}.tmp`), path.join(at, `${dead}.tmp`)));
      expect(await sorted(s.at)).toEqual(plainFiles);
      expect(await latestContent(s.store)).toEqual(expected);

      // 2. renamed to its committed name, metadata not switched (and the switch's temporary half written)
      s = await crashed(before, 'renamed', async (at) => {
        await fs.rename(path.join(at, `${mine}.tmp`), path.join(at, dead));
        await fs.writeFile(path.join(at, `4.json.${DEAD}.tmp`), '{ "half');
      });
      expect(await sorted(s.at)).toEqual(plainFiles);
      expect(await latestContent(s.store)).toEqual(expected);

      // 3. switched, the increment's data not yet removed
      const switched = async (at: string) => {
        await fs.rename(path.join(at, mine), path.join(at, dead));
        const meta = JSON.parse(await fs.readFile(path.join(at, '4.json'), 'utf8'));
        await fs.writeFile(path.join(at, '4.json'), JSON.stringify({ ...meta, dataFile: dead }));
      };
      s = await crashed(after, 'switched', async (at) => {
        await switched(at);
        await fs.copyFile(path.join(before, '4.ckpt'), path.join(at, '4.ckpt'));
      });
      expect(await sorted(s.at)).toEqual([...plainFiles.filter((n) => n !== '4.ckpt'), dead].sort());
      expect(await latestContent(s.store)).toEqual({ ...expected, chain: [4] });

      // 4. done (the older chain not pruned yet): nothing to clean
      s = await crashed(after, 'done', switched);
      expect(await sorted(s.at)).toEqual([...plainFiles.filter((n) => n !== '4.ckpt'), dead].sort());
      expect(await latestContent(s.store)).toEqual({ ...expected, chain: [4] });
      // the older checkpoints still load as they were
      expect(contentOf(s.store.read((await s.store.latestVerified())!))).toEqual({ ram: expected.ram, devices: expected.devices });
    });

    it('leaves alone a compaction another live process is still writing or switching to', async () => {
      const { before, expected } = await snapshots();
      const live = `4.full-${process.ppid}.ckpt`;
      const s = await crashed(before, 'live', async (at) => {
        await fs.copyFile(path.join(at, `${mine}.tmp`), path.join(at, live));
        await fs.rename(path.join(at, `${mine}.tmp`), path.join(at, `${live}.tmp`));
      });
      expect(await sorted(s.at)).toEqual([...plainFiles, live, `${live}.tmp`].sort());
      expect(await latestContent(s.store)).toEqual(expected);
    });
  });

  describe('a reader in another process, racing a compaction and the prune after it', () => {
    for (const [what, vanishing] of [
      ['a data file', '1.ckpt'],
      ["a link's metadata", '3.json'],
    ] as const) {
      it(`reads the chain again once when ${what} vanishes under it`, async () => {
        const hold = holdCompactionRename();
        const writer = await openStore(2, { compactAtLength: 4, compactAtRatio: Infinity });
        let tip = await commit(writer, 1);
        for (const epoch of [2, 3, 4]) tip = await commit(writer, epoch, tip);
        await hold.reached;
        for (const epoch of [5, 6]) tip = await commit(writer, epoch, tip);
        const expected = await latestContent(writer);
        // the reader's open() must not take the compaction in progress for a crash's leftovers
        const reader = await new CheckpointStore(dir, 2).open();
        expect(await sorted()).toContain(`4.full-${process.pid}.ckpt.tmp`);

        const { readFile, open } = fs;
        let raced = false;
        const race = async (file: unknown) => {
          if (!raced && String(file) === path.join(dir, vanishing)) {
            raced = true; // the receiver switches to the compacted 4 and prunes 1–3 just now
            hold.release();
            await writer.compacted();
          }
        };
        // metadata is read whole, data opened and read in slices
        vi.spyOn(fs, 'readFile').mockImplementation(async (file, options) => (await race(file), readFile(file, options as never)));
        vi.spyOn(fs, 'open').mockImplementation(async (file, ...rest) => (await race(file), open(file, ...(rest as [never]))));
        const corrupt: string[] = [];
        const content = await latestContent(reader, (e) => corrupt.push(e.message));
        expect(raced).toBe(true);
        expect(corrupt).toEqual([]);
        expect(content).toEqual({ ...expected, chain: [4, 5, 6] });
      });
    }
  });

  it('reports a full disk during a compaction (run here, where fs can be made to fail) and leaves the store as it was', async () => {
    const errors: CheckpointStoreError[] = [];
    const open = fs.open;
    vi.spyOn(fs, 'open').mockImplementation(async (file, ...rest) => {
      if (/\.full-\d+\.ckpt\.tmp$/.test(String(file))) throw Object.assign(new Error(`ENOSPC: no space left on device, open '${String(file)}'`), { code: 'ENOSPC' });
      return open(file, ...(rest as [never]));
    });
    const store = await openStore(2, { compactIn: 'here', compactAtLength: 3, compactAtRatio: Infinity, compactRetryMs: 0, onCompactError: (e) => errors.push(e) });
    let tip = await commit(store, 1);
    for (const epoch of [2, 3]) tip = await commit(store, epoch, tip);
    await store.compacted();
    expect(errors).toEqual([expect.objectContaining({ code: 'no-space', epoch: 3 })]);
    expect(await sorted()).toEqual(['1.ckpt', '1.json', '2.ckpt', '2.json', '3.ckpt', '3.json']);
    expect((await store.metadata(3)).base).toBe(2);
  });

  it('reports what its worker process found (a rotten link, what the codec cannot carry, a deadline) and leaves the store as it was', async () => {
    const errors: CheckpointStoreError[] = [];
    const store = await openStore(2, { compactAtLength: 3, compactAtRatio: Infinity, compactRetryMs: 0, onCompactError: (e) => errors.push(e) });
    let tip = await commit(store, 1);
    for (const epoch of [2, 3]) tip = await commit(store, epoch, tip);
    await store.compacted();
    expect(errors).toEqual([]);
    expect((await store.metadata(3)).dataFile).toMatch(/^3\.full-\d+\.ckpt$/);

    tip = await commit(store, 4, tip);
    const intact = await fs.readFile(store.dataPath(4));
    const file = await fs.open(store.dataPath(4), 'r+');
    await file.write(Buffer.from([0xee]), 0, 1, 200);
    await file.close();
    tip = await commit(store, 5, tip);
    tip = await commit(store, 6, tip);
    await store.compacted();
    expect(errors[0]).toMatchObject({ code: 'corrupt', epoch: 4, message: expect.stringContaining('checkpoint 4 is corrupt') });
    expect(await sorted()).toEqual([expect.stringMatching(/^3\.full-\d+\.ckpt$/), '3.json', '4.ckpt', '4.json', '5.ckpt', '5.json', '6.ckpt', '6.json']);
    expect((await store.metadata(6)).dataFile).toBeUndefined();

    // what the codec cannot carry over (an XBZRLE page is a delta against an older copy): verify
    await fs.writeFile(store.dataPath(4), intact);
    const records = parseMigrationStream(stream(increment(7), BLOCKS, 7));
    const xbzrle = records.map((r) => (r.type === 'ram-page' ? { type: 'ram-xbzrle' as const, addr: r.addr, flags: RamFlag.XBZRLE | (r.flags & RamFlag.CONTINUE), block: r.block, encoding: 1, data: Buffer.alloc(12) } : r));
    await commit(store, 7, tip, { data: Readable.from([encodeRecords(xbzrle)]) });
    await store.compacted();
    expect(errors[1]).toMatchObject({ code: 'verify', epoch: 7, message: expect.stringContaining('XBZRLE') });
    expect((await store.metadata(7)).dataFile).toBeUndefined();
    expect(await store.epochs()).toEqual([3, 4, 5, 6, 7]);

    const slow = await openStore(2, { compactAtLength: 2, compactAtRatio: Infinity, compactTimeoutMs: 1, onCompactError: (e) => errors.push(e) }, await fs.mkdtemp(path.join(dir, 'slow-')));
    const first = await commit(slow, 1);
    await commit(slow, 2, first);
    await slow.compacted();
    expect(errors[2]).toMatchObject({ code: 'io', epoch: 2, message: expect.stringContaining('took longer than 1 ms') });
    expect(await sorted(slow.dir)).toEqual(['1.ckpt', '1.json', '2.ckpt', '2.json']);
  });

  it('pauses its worker between slices until resumed or for 100 ms at most, and not once hurried', async () => {
    vi.useFakeTimers();
    try {
      let now = 0;
      const gate = new PauseGate(() => now);
      const passed = async () => {
        let done = false;
        void gate.passed().then(() => (done = true));
        await vi.advanceTimersByTimeAsync(0);
        return { done: () => done };
      };
      expect((await passed()).done()).toBe(true); // not paused
      gate.pause();
      const held = await passed();
      now = 60;
      await vi.advanceTimersByTimeAsync(60);
      expect(held.done()).toBe(false);
      gate.resume();
      await vi.advanceTimersByTimeAsync(0);
      expect(held.done()).toBe(true); // resumed

      gate.pause(); // at 60
      now = 100;
      const bounded = await passed(); // 60 ms left of this pause
      await vi.advanceTimersByTimeAsync(59);
      expect(bounded.done()).toBe(false);
      await vi.advanceTimersByTimeAsync(1);
      expect(bounded.done()).toBe(true); // a pause never lasts longer than 100 ms
      now = 500;
      expect((await passed()).done()).toBe(true); // still "paused", but long past its bound
      gate.resume();

      gate.pause();
      const hurried = await passed();
      gate.hurry(); // the compaction is behind the chain's growth: no more pauses
      await vi.advanceTimersByTimeAsync(0);
      expect(hurried.done()).toBe(true);
      gate.pause();
      expect((await passed()).done()).toBe(true);
    } finally {
      vi.useRealTimers();
    }
  });

  it('compacts in its worker process even when paused and never resumed (a long commit does not starve it)', async () => {
    const store = await openStore(2, { compactAtLength: Infinity, compactAtRatio: Infinity });
    let tip = await commit(store, 1);
    for (const epoch of [2, 3]) tip = await commit(store, epoch, tip);
    const chain = await Promise.all([1, 2, 3].map((e) => store.metadata(e)));
    const tmp = path.join(dir, `3.full-${process.pid}.ckpt.tmp`);
    const worker = compactInChildProcess({ dir, chain, tmp }, 30_000);
    worker.pause();
    const compacted = await worker.done;
    expect(compacted.bytes).toBe((await fs.stat(tmp)).size);
    expect(contentOf(await fs.readFile(tmp))).toEqual(contentOf(store.read((await store.latestVerified())!)));
  });

  it('leaves disk deltas and disk bases as they were: the replica follows, and a failover gets the disks exactly', async () => {
    const disk = new ModelDisk('vda', 32 * 4096);
    const store = await openStore(2, { compactAtLength: 4, compactAtRatio: Infinity });
    await store.seed({ seed: 's1', disks: [{ disk: 'vda', sizeBytes: disk.sizeBytes }], sections: Readable.from([disk.section([])], { objectMode: true }) });
    const images = new Map<number, Buffer>();
    let tip: CheckpointMetadata | undefined;
    const metas = new Map<number, CheckpointMetadata>();
    for (let epoch = 1; epoch <= 6; epoch++) {
      disk.write((epoch * 3 % 32) * 4096 + 100, pseudoRandom(5000, epoch));
      const diskBase: DiskBase = epoch === 1 ? { seed: 's1' } : { epoch: epoch - 1 };
      const sections = Readable.from([disk.section(disk.deltaExtents())], { objectMode: true });
      tip = await commit(store, epoch, tip, { disks: sections, diskBase });
      disk.dirty.clear();
      images.set(epoch, Buffer.from(disk.image));
      metas.set(epoch, tip);
      await store.compacted();
    }
    const compacted = await store.metadata(4);
    expect(compacted.dataFile).toBeDefined();
    expect({ disks: compacted.disks, diskBase: compacted.diskBase }).toEqual({ disks: metas.get(4)!.disks, diskBase: { epoch: 3 } });
    // 1–3 went once the replica had passed their deltas; 4's delta stays with it
    expect(await store.epochs()).toEqual([4, 5, 6]);
    expect(await sorted()).toContain('4.vda.delta');
    const latest = (await store.latestVerified())!;
    expect(latest.chain.map((m) => m.epoch)).toEqual([4, 5, 6]);
    const prepared = await store.prepareDisks(latest);
    expect((await fs.readFile(prepared.get('vda')!)).equals(images.get(6)!)).toBe(true);
  });
});
