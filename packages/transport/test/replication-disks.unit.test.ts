import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Duplex, PassThrough, Readable } from 'node:stream';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { CheckpointStore, type DiskExtent, type DiskSection } from '../src/store/index.js';
import { ReplicationError, ReplicationSender, runReceiver, SeedError, type ReceiverReply } from '../src/replication/index.js';
import { encodeDiskExtentFrame, encodeFrameHeader, encodeJsonFrame, FrameType } from '../src/replication/frames.js';
import { connect, memory, ModelDisk, prng, trailer } from './fixtures-disks.js';

let dir: string;
const opened: CheckpointStore[] = [];
beforeEach(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'ftvm-repl-disks-'));
});
afterEach(async () => {
  await Promise.all(opened.splice(0).map((s) => s.pruned()));
  await fs.rm(dir, { recursive: true, force: true });
});

async function openStore(keep = 3): Promise<CheckpointStore> {
  const store = new CheckpointStore(dir, keep);
  opened.push(store);
  return store.open();
}

const header = (epoch: number) => ({ vm: 'probe', epoch, qemuVersion: '7.2.22' });

function disks() {
  const random = prng(21);
  const models = [new ModelDisk('vda', 1024 * 1024), new ModelDisk('vdb', 256 * 1024)];
  const scribble = () => {
    for (const d of models) for (let i = 0; i < 5; i++) d.write(random.int(d.sizeBytes - 70_000), random.bytes(1 + random.int(70_000)));
  };
  const geometry = models.map(({ disk, sizeBytes }) => ({ disk, sizeBytes }));
  return { models, scribble, geometry };
}

describe('replication of disks, sender ↔ receiver', () => {
  it('seeds, then commits checkpoints with their disk sections, acknowledged once durable', async () => {
    const store = await openStore();
    const link = connect(store);
    const { models, scribble, geometry } = disks();
    scribble();
    const seeded = await link.sender.sendSeed({ seed: 's1', disks: models.map((d) => d.section(d.seedExtents())) });
    expect(seeded.bytes).toBe(models.reduce((n, d) => n + d.seedExtents().reduce((m, e) => m + e.length, 0), 0));
    models.forEach((d) => d.dirty.clear());
    const expected = new Map<number, Buffer[]>();
    for (const epoch of [1, 2, 3]) {
      scribble();
      const sections = models.map((d) => d.section(d.deltaExtents({ zeroAsZero: true, maxRun: 1 + epoch * 7 })));
      const ack = await link.sender.send({
        header: { ...header(epoch), disks: geometry, diskBase: epoch === 1 ? { seed: 's1' } : { epoch: epoch - 1 } },
        data: memory(epoch),
        disks: async function* () {
          yield* sections;
        },
        trailer: trailer(epoch),
      });
      expect(ack).toMatchObject({ type: 'ack', epoch });
      models.forEach((d) => d.dirty.clear());
      expected.set(epoch, models.map((d) => Buffer.from(d.image)));
      expect((await store.metadata(epoch)).disks!.map((d) => d.disk)).toEqual(['vda', 'vdb']);
    }
    const latest = (await store.latestVerified())!;
    expect(latest.metadata.epoch).toBe(3);
    const images = await store.prepareDisks(latest);
    for (const [i, d] of models.entries()) expect((await fs.readFile(images.get(d.disk)!)).equals(expected.get(3)![i]!)).toBe(true);
    expect(link.log.some((l) => /committed epoch 3: .* disks vda \d+ extents \d+ bytes, vdb/.test(l))).toBe(true);
    await link.close();
  });

  it('splits extents longer than a frame holds: data into 4 MiB, zeros into 1 GiB', async () => {
    const store = await openStore();
    const link = connect(store);
    const MiB = 1024 * 1024;
    const sizeBytes = 6 * 1024 * MiB; // sparse
    await link.sender.sendSeed({ seed: 's1', disks: [{ disk: 'vda', sizeBytes, extents: Readable.from([{ offset: 0, length: 4 * MiB, data: Buffer.alloc(4 * MiB, 7) }], { objectMode: true }) }] });
    const data = prng(5).bytes(9 * MiB + 3);
    const extents: DiskExtent[] = [
      { offset: 1, length: data.length, data },
      { offset: 16 * MiB, length: 5 * 1024 * MiB }, // a discard
    ];
    await link.sender.send({
      header: { ...header(1), disks: [{ disk: 'vda', sizeBytes }], diskBase: { seed: 's1' } },
      data: memory(1),
      disks: async function* () {
        yield { disk: 'vda', sizeBytes, extents: Readable.from(extents, { objectMode: true }) };
      },
      trailer: trailer(1),
    });
    expect((await store.metadata(1)).disks).toMatchObject([{ disk: 'vda', extents: 3 + 5, dataBytes: data.length }]);
    const images = await store.prepareDisks((await store.latestVerified())!);
    const image = await fs.open(images.get('vda')!, 'r');
    const read = async (offset: number, length: number) => (await image.read(Buffer.alloc(length), 0, length, offset)).buffer;
    expect((await read(0, 1)).equals(Buffer.from([7]))).toBe(true);
    expect((await read(1, data.length)).equals(data)).toBe(true);
    expect((await read(1 + data.length, 16 * MiB - 1 - data.length)).every((b) => b === 0)).toBe(true);
    expect((await image.stat()).size).toBe(sizeBytes);
    expect((await image.stat()).blocks * 512).toBeLessThan(64 * MiB); // the 5 GiB of zeros were punched, not written
    await image.close();
    await link.close();
  });

  it("turns the store's no-disk-base and a refused seed into errors the primary can act on", async () => {
    const store = await openStore();
    const link = connect(store);
    const { models, geometry } = disks();
    const sending = link.sender.send({
      header: { ...header(1), disks: geometry, diskBase: { seed: 'never' } },
      data: memory(1),
      disks: async function* () {
        yield* models.map((d) => d.section([{ offset: 0, length: 4096, data: Buffer.alloc(4096, 1) }]));
      },
      trailer: trailer(1),
    });
    await expect(sending).rejects.toBeInstanceOf(ReplicationError);
    await expect(sending).rejects.toMatchObject({ code: 'no-disk-base', epoch: 1, message: expect.stringContaining('this backup holds no disk replica') });
    const refused = link.sender.sendSeed({ seed: 'has space', disks: [] });
    await expect(refused).rejects.toBeInstanceOf(SeedError);
    await expect(refused).rejects.toMatchObject({ code: 'verify', seed: 'has space', message: 'seed has space: backup refused it: invalid seed id "has space"' });
    // the link is still good
    await link.sender.sendSeed({ seed: 's1', disks: models.map((d) => d.section([])) });
    expect(await store.replicaState()).toMatchObject({ seed: 's1', complete: true });
    await link.close();
  });

  it('aborts a checkpoint whose disk extents fail to come, and the next one commits', async () => {
    const store = await openStore();
    const link = connect(store);
    const { models, geometry, scribble } = disks();
    await link.sender.sendSeed({ seed: 's1', disks: models.map((d) => d.section([])) });
    const failing: DiskSection = {
      disk: 'vda',
      sizeBytes: models[0]!.sizeBytes,
      extents: (async function* () {
        yield { offset: 0, length: 4096, data: Buffer.alloc(4096, 1) };
        throw new Error('NBD read timed out');
      })(),
    };
    const error = await link.sender
      .send({ header: { ...header(1), disks: geometry, diskBase: { seed: 's1' } }, data: memory(1), disks: async function* () { yield failing; }, trailer: trailer(1) })
      .catch((e: unknown) => e);
    expect(error).toMatchObject({ code: 'source', epoch: 1, message: "checkpoint 1: disk 'vda' failed: NBD read timed out" });
    // a trailer that fails (migration failed after its data) aborts too
    const late = await link.sender
      .send({ header: header(1), data: memory(1), trailer: async () => { throw new Error('migration failed'); } })
      .catch((e: unknown) => e);
    expect(late).toMatchObject({ code: 'source', message: 'checkpoint 1: trailer failed: migration failed' });
    expect(await store.epochs()).toEqual([]);
    scribble();
    await link.sender.send({
      header: { ...header(1), disks: geometry, diskBase: { seed: 's1' } },
      data: memory(1),
      disks: async function* () { yield* models.map((d) => d.section(d.deltaExtents())); },
      trailer: trailer(1),
    });
    expect((await fs.readdir(dir)).filter((n) => n.includes('delta')).sort()).toEqual(['1.vda.delta', '1.vdb.delta']);
    await link.close();
  });

  it('refuses sections that differ from what the sender says it sends, before writing anything', async () => {
    const store = await openStore();
    const link = connect(store);
    const { models, geometry } = disks();
    const swapped = await link.sender
      .send({ header: { ...header(1), disks: geometry, diskBase: { seed: 's1' } }, data: memory(1), disks: async function* () { yield models[1]!.section([]); }, trailer: trailer(1) })
      .catch((e: unknown) => e);
    expect(swapped).toMatchObject({ code: 'source', message: expect.stringContaining("disk 'vdb' of 262144 bytes came where the header lists 'vda' of 1048576 bytes") });
    const outside = await link.sender
      .send({
        header: { ...header(1), disks: [geometry[0]!], diskBase: { seed: 's1' } },
        data: memory(1),
        disks: async function* () { yield models[0]!.section([{ offset: models[0]!.sizeBytes - 1, length: 2 }]); },
        trailer: trailer(1),
      })
      .catch((e: unknown) => e);
    expect(outside).toMatchObject({ code: 'source', message: expect.stringContaining("ends past the disk's 1048576 bytes") });
    await expect(link.sender.send({ header: { ...header(1), disks: geometry }, data: memory(1), trailer: trailer(1) })).rejects.toMatchObject({ code: 'source' });
    await link.close();
  });

  it('stops reading disk extents while the link is full, and gives up at the deadline', async () => {
    const stalled = new PassThrough({ highWaterMark: 1024 }); // never read
    const sender = new ReplicationSender(Duplex.from({ readable: new PassThrough(), writable: stalled }), 64 * 1024);
    let pulled = 0;
    const extents = (async function* (): AsyncGenerator<DiskExtent> {
      for (let i = 0; i < 64; i++) {
        pulled++;
        yield { offset: i * 16384, length: 16384, data: Buffer.alloc(16384, i) };
      }
    })();
    const started = Date.now();
    const sending = sender.send({
      header: { ...header(1), disks: [{ disk: 'vda', sizeBytes: 1 << 20 }], diskBase: { seed: 's1' } },
      data: memory(1),
      disks: async function* () { yield { disk: 'vda', sizeBytes: 1 << 20, extents }; },
      trailer: trailer(1),
      ackTimeoutMs: 300,
    });
    sending.catch(() => undefined);
    await new Promise((r) => setTimeout(r, 100));
    expect(pulled).toBeGreaterThanOrEqual(4); // 64 KiB queued
    expect(pulled).toBeLessThan(8);
    await expect(sending).rejects.toMatchObject({ code: 'timeout', message: 'checkpoint 1: the link did not drain within 300 ms' });
    expect(Date.now() - started).toBeGreaterThanOrEqual(290);
    // the sender is free again for the next one
    await expect(sender.sendSeed({ seed: 's2', disks: [], ackTimeoutMs: 50 })).rejects.toMatchObject({ code: 'timeout' });
    sender.close();
  });

  it('sends one checkpoint or seed at a time', async () => {
    const stalled = new PassThrough({ highWaterMark: 1024 });
    const sender = new ReplicationSender(Duplex.from({ readable: new PassThrough(), writable: stalled }), 64 * 1024);
    const source = new PassThrough();
    const sending = sender.send({ header: header(1), data: source, trailer: trailer(1) });
    sending.catch(() => undefined);
    await expect(sender.sendSeed({ seed: 's1', disks: [] })).rejects.toMatchObject({ code: 'busy', message: 'seed s1: checkpoint 1 is still being sent' });
    await expect(sender.send({ header: header(2), data: memory(2), trailer: trailer(2) })).rejects.toMatchObject({ code: 'busy' });
    source.destroy(new Error('gone'));
    await expect(sending).rejects.toMatchObject({ code: 'source' });
    sender.close();
  });
});

describe('receiver checks of disk frames', () => {
  /** Raw frames into a receiver, its reply lines out. */
  async function raw(keep = 3) {
    const store = await openStore(keep);
    const input = new PassThrough();
    const output = new PassThrough();
    const receiving = runReceiver(input, output, { store });
    receiving.catch(() => undefined);
    const lines: ReceiverReply[] = [];
    let waiting: (() => void) | undefined;
    let buffered = '';
    output.on('data', (chunk: Buffer) => {
      buffered += chunk.toString();
      for (let n; (n = buffered.indexOf('\n')) >= 0; buffered = buffered.slice(n + 1)) lines.push(JSON.parse(buffered.slice(0, n)) as ReceiverReply);
      waiting?.();
    });
    const reply = async (): Promise<ReceiverReply> => {
      while (lines.length === 0) await new Promise<void>((r) => (waiting = r));
      return lines.shift()!;
    };
    return { store, write: (...frames: Buffer[]) => input.write(Buffer.concat(frames)), reply, end: async () => (input.end(), await receiving), receiving };
  }

  const geometry = [
    { disk: 'vda', sizeBytes: 1 << 20 },
    { disk: 'vdb', sizeBytes: 1 << 18 },
  ];
  const begin = (disk: string, sizeBytes = disk === 'vda' ? 1 << 20 : 1 << 18) => encodeJsonFrame(FrameType.DiskBegin, { disk, sizeBytes });
  const extent = (offset: number, data?: Buffer) => Buffer.concat(encodeDiskExtentFrame(data ? { offset, length: data.length, data } : { offset, length: 4096 }));
  const end = (extents: number, dataBytes: number) => encodeJsonFrame(FrameType.DiskEnd, { extents, dataBytes });
  const section = (disk: string) => [begin(disk), extent(0, Buffer.alloc(512, 1)), extent(8192), end(2, 512)];
  const checkpoint = (epoch: number, sections: Buffer[], withDisks = true) => [
    encodeJsonFrame(FrameType.Header, { ...header(epoch), ...(withDisks ? { disks: geometry, diskBase: epoch === 1 ? { seed: 's1' } : { epoch: epoch - 1 } } : {}) }),
    Buffer.concat([encodeFrameHeader(FrameType.Data, 4), Buffer.from('data')]),
    ...sections,
    encodeJsonFrame(FrameType.Trailer, { stopNs: '1', resumeNs: '2' }),
  ];
  const seed = () => [encodeJsonFrame(FrameType.SeedBegin, { seed: 's1', disks: geometry }), ...section('vda'), ...section('vdb'), encodeJsonFrame(FrameType.SeedEnd, {})];

  it('nacks a checkpoint whose disk frames differ from its header with verify, naming the disk, and keeps going', async () => {
    const r = await raw();
    r.write(...seed());
    expect(await r.reply()).toEqual({ type: 'seed-ack', seed: 's1', bytes: 1024 });
    const cases: [Buffer[], string, boolean?][] = [
      [[...section('vdb'), ...section('vda')], "checkpoint 1: disk 'vdb' of 262144 bytes came where disk 'vda' of 1048576 bytes is listed"],
      [section('vda'), "checkpoint 1: disk 'vdb' is missing (1 of 2 listed came)"],
      [[], "checkpoint 1: disk 'vda', 'vdb' is missing (0 of 2 listed came)"],
      [[...section('vda'), ...section('vdb'), ...section('vdc')], "checkpoint 1: disk 'vdc' came after the 2 listed"],
      [[begin('vda'), extent(0, Buffer.alloc(512, 1)), end(3, 512), ...section('vdb')], "checkpoint 1: disk 'vda' ended saying 3 extents and 512 data bytes, but 1 extents and 512 data bytes came"],
      [[begin('vda'), extent(0, Buffer.alloc(512, 1)), end(1, 511), ...section('vdb')], "checkpoint 1: disk 'vda' ended saying 1 extents and 511 data bytes"],
      [[...section('vda'), begin('vdb'), extent(1 << 18)], "checkpoint 1: disk 'vdb': extent 262144+4096 ends past its 262144 bytes"],
      [[...section('vda'), begin('vdb')], "checkpoint 1: disk 'vdb' did not end"],
      [[extent(0)], 'checkpoint 1: a disk extent outside a disk section'],
      [[begin('vda', 4096), ...section('vdb')], "checkpoint 1: disk 'vda' of 4096 bytes came where disk 'vda' of 1048576 bytes is listed"],
      [section('vda'), "checkpoint 1: disk 'vda' came, but its header lists no disks", false],
    ];
    for (const [sections, message, withDisks] of cases) {
      r.write(...checkpoint(1, sections, withDisks));
      const answer = await r.reply();
      expect(answer).toMatchObject({ type: 'nack', epoch: 1, code: 'verify' });
      expect((answer as { message: string }).message).toContain(message);
    }
    r.write(
      encodeJsonFrame(FrameType.Header, { ...header(1), disks: [{ disk: '../vda', sizeBytes: 1 }], diskBase: { seed: 's1' } }),
      ...checkpoint(1, section('vda')).slice(1),
    );
    expect(await r.reply()).toMatchObject({ type: 'nack', epoch: 1, code: 'verify', message: expect.stringContaining('checkpoint 1: its header lists an invalid disk name "../vda"') });
    expect((await fs.readdir(r.store.dir)).sort()).toEqual(['disks']);
    r.write(...checkpoint(1, [...section('vda'), ...section('vdb')]));
    expect(await r.reply()).toMatchObject({ type: 'ack', epoch: 1 });
    expect((await r.store.metadata(1)).disks!.map((d) => [d.disk, d.extents, d.dataBytes])).toEqual([
      ['vda', 2, 512],
      ['vdb', 2, 512],
    ]);
    await r.end();
  });

  it('nacks a seed whose sections differ from its list, and discards an aborted one', async () => {
    const r = await raw();
    r.write(encodeJsonFrame(FrameType.SeedBegin, { seed: 's1', disks: geometry }), ...section('vda'), encodeJsonFrame(FrameType.SeedEnd, {}));
    expect(await r.reply()).toEqual({ type: 'seed-nack', seed: 's1', code: 'verify', message: "seed s1: disk 'vdb' is missing (1 of 2 listed came)" });
    expect(await r.store.replicaState()).toMatchObject({ seed: 's1', complete: false });
    r.write(encodeJsonFrame(FrameType.SeedBegin, { seed: 's2', disks: geometry }), ...section('vda'), encodeJsonFrame(FrameType.Abort, {}));
    r.write(...seed());
    // no reply for the aborted seed: nobody waits for it
    expect(await r.reply()).toMatchObject({ type: 'seed-ack', seed: 's1' });
    await r.end();
  });

  it('treats frames that break the protocol as a broken link, committing nothing', async () => {
    const r = await raw();
    r.write(...seed());
    await r.reply();
    r.write(...checkpoint(1, section('vda')).slice(0, -1), encodeJsonFrame(FrameType.SeedBegin, { seed: 's2', disks: [] }));
    await expect(r.receiving).rejects.toThrow('seed while checkpoint 1 is open');
    expect(await r.store.epochs()).toEqual([]);
    expect((await fs.readdir(r.store.dir)).sort()).toEqual(['disks']);
  });
});

describe('a Readable of sections', () => {
  it('is accepted by sendSeed as well as an array', async () => {
    const store = await openStore();
    const link = connect(store);
    const d = new ModelDisk('vda', 65536);
    d.write(100, Buffer.from('hello'));
    await link.sender.sendSeed({ seed: 's1', disks: Readable.from([d.section(d.seedExtents())], { objectMode: true }) });
    const state = (await store.replicaState())!;
    expect((await fs.readFile(state.images['vda']!)).equals(d.image)).toBe(true);
    await link.close();
  });
});
