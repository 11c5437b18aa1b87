import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Duplex, PassThrough, Readable } from 'node:stream';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { CheckpointStore } from '../src/store/index.js';
import { ReplicationError, ReplicationSender, runReceiver } from '../src/replication/index.js';
import { encodeFrameHeader, encodeJsonFrame, FrameDecoder, FrameType } from '../src/replication/frames.js';
import type { StreamVerifier } from '../src/store/index.js';
import { createStreamVerifier } from '../src/stream/index.js';
import { full, stream } from './fixtures-chain.js';

/** Two pipes joined into the duplex a sender sees, the receiver reading the other ends. */
function link() {
  const toReceiver = new PassThrough();
  const toSender = new PassThrough();
  const channel = Duplex.from({ readable: toSender, writable: toReceiver });
  return { channel, toReceiver, toSender };
}

let dir: string;
beforeEach(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'ftvm-repl-'));
});
afterEach(async () => fs.rm(dir, { recursive: true, force: true }));

const header = (epoch: number) => ({ vm: 'probe', epoch, qemuVersion: '7.2.22' });
const trailer = (epoch: number) => async () => ({ stopNs: `${epoch}000`, resumeNs: `${epoch}005` });

describe('FrameDecoder', () => {
  const frames = [
    encodeJsonFrame(FrameType.Header, { vm: 'probe', epoch: 7, qemuVersion: '7.2' }),
    Buffer.concat([encodeFrameHeader(FrameType.Data, 70_000), Buffer.alloc(70_000, 1)]),
    Buffer.concat([encodeFrameHeader(FrameType.Data, 3), Buffer.from([2, 3, 4])]),
    encodeJsonFrame(FrameType.Trailer, { stopNs: '1', resumeNs: '2' }),
    encodeJsonFrame(FrameType.Abort, {}),
  ];
  const wire = Buffer.concat(frames);

  it('gives the same frames and data for any chunking, data as views of the input', () => {
    for (let seed = 1; seed <= 200; seed++) {
      const decoder = new FrameDecoder();
      const out: { type: number; payload: Buffer }[] = [];
      let random = seed;
      for (let at = 0; at < wire.length; ) {
        random = (random * 1103515245 + 12345) % 2 ** 31;
        const size = 1 + (random % (seed % 3 === 0 ? 7 : 20_000));
        out.push(...decoder.push(Buffer.from(wire.subarray(at, at + size))));
        at += size;
      }
      expect(decoder.pendingBytes).toBe(0);
      const json = out.filter((f) => f.type !== FrameType.Data).map((f) => [f.type, JSON.parse(f.payload.toString())]);
      expect(json).toEqual([[FrameType.Header, { vm: 'probe', epoch: 7, qemuVersion: '7.2' }], [FrameType.Trailer, { stopNs: '1', resumeNs: '2' }], [FrameType.Abort, {}]]);
      const data = Buffer.concat(out.filter((f) => f.type === FrameType.Data).map((f) => f.payload));
      expect(data.equals(Buffer.concat([Buffer.alloc(70_000, 1), Buffer.from([2, 3, 4])]))).toBe(true);
      // data comes out before the trailer that follows it
      expect(out.findIndex((f) => f.type === FrameType.Trailer)).toBe(out.length - 2);
    }
  });

  it('names what is wrong, with the offset', () => {
    const bad = Buffer.concat([frames[0]!, Buffer.from([10, 0, 0, 0, 1, 0])]);
    expect(() => new FrameDecoder().push(bad)).toThrow(`unknown frame type 10 at stream offset ${frames[0]!.length}`);
    const huge = Buffer.from([FrameType.Data, 0xff, 0xff, 0xff, 0xff]);
    expect(() => new FrameDecoder().push(huge)).toThrow(/frame of 4294967295 bytes at stream offset 0 exceeds/);
    const cut = new FrameDecoder();
    cut.push(wire.subarray(0, frames[0]!.length + 100));
    expect(cut.pendingBytes).toBe(70_000 - 95);
  });
});

describe('replication sender ↔ receiver', () => {
  it('commits a sequence of checkpoints, each acknowledged only once durable', async () => {
    const store = await new CheckpointStore(dir, 2).open();
    const { channel, toReceiver, toSender } = link();
    const receiving = runReceiver(toReceiver, toSender, { store });
    const sender = new ReplicationSender(channel);
    for (const epoch of [1, 2, 3]) {
      const payload = Buffer.alloc(3 * 1024 * 1024 + epoch, epoch);
      const ack = await sender.send({ header: header(epoch), data: Readable.from([payload.subarray(0, 1000), payload.subarray(1000)]), trailer: trailer(epoch) });
      expect(ack).toMatchObject({ type: 'ack', epoch, bytes: payload.length });
      expect((await store.verify(epoch)).stopNs).toBe(`${epoch}000`);
    }
    await store.pruned();
    expect(await store.epochs()).toEqual([2, 3]);
    sender.close();
    await receiving;
  });

  it('stops reading the source once maxBufferedBytes are queued, until the link drains or the send is unthrottled', async () => {
    // a channel nobody reads: everything written stays queued
    const stalled = new PassThrough({ highWaterMark: 1024 });
    const channel = Duplex.from({ readable: new PassThrough(), writable: stalled });
    const sender = new ReplicationSender(channel, 64 * 1024);
    let pulled = 0;
    const source = Readable.from(
      (function* () {
        for (let i = 0; i < 64; i++) {
          pulled++;
          yield Buffer.alloc(16 * 1024, i);
        }
      })(),
      { highWaterMark: 1 },
    );
    let unthrottle!: () => void;
    const sending = sender.send({ header: header(1), data: source, trailer: trailer(1), unthrottle: new Promise<void>((r) => (unthrottle = r)) });
    sending.catch(() => undefined);
    await new Promise((r) => setTimeout(r, 50));
    // 64 KiB queued = 4 chunks, plus what the source's own buffer read ahead
    expect(pulled).toBeGreaterThanOrEqual(4);
    expect(pulled).toBeLessThan(10);
    unthrottle(); // QEMU stopped: the rest must go through without waiting for the link
    await new Promise((r) => setTimeout(r, 50));
    expect(pulled).toBe(64);
    sender.close();
  });

  it('gives up a send parked behind a channel that no longer drains once its source is destroyed', async () => {
    const stalled = new PassThrough({ highWaterMark: 1024 }); // open, never read
    const channel = Duplex.from({ readable: new PassThrough(), writable: stalled });
    const sender = new ReplicationSender(channel, 64 * 1024);
    const source = new Readable({ read() {} });
    for (let i = 0; i < 8; i++) source.push(Buffer.alloc(16 * 1024, i));
    const sending = sender.send({ header: header(1), data: source, trailer: async () => { throw new Error('migration failed'); } });
    sending.catch(() => undefined);
    await new Promise((r) => setTimeout(r, 50));
    source.destroy(new Error('checkpoint deadline')); // what the checkpointer does on failure
    await expect(sending).rejects.toThrow(/checkpoint deadline|migration failed/);
    sender.close();
  });

  it('carries an incremental checkpoint\'s base to the store, which refuses one of another lineage', async () => {
    const store = await new CheckpointStore(dir).open();
    const { channel, toReceiver, toSender } = link();
    const receiving = runReceiver(toReceiver, toSender, { store, createVerifier: createStreamVerifier });
    const sender = new ReplicationSender(channel);
    const first = await sender.send({ header: header(1), data: Readable.from([stream(full(1), undefined, 1)]), trailer: trailer(1) });
    // The receiver read the VM's clock at the freeze from the timer section (bytes 16..23) and says it.
    expect(first.guestClockNs).toBe(0x0101010101010101n.toString());
    expect((await store.metadata(1)).guestClockNs).toBe(first.guestClockNs);
    const increment = stream([{ block: 'pc.ram', index: 3 }]);
    const foreign = await sender
      .send({ header: { ...header(2), base: { epoch: 1, sha256: 'f'.repeat(64) } }, data: Readable.from([increment]), trailer: trailer(2) })
      .catch((e: unknown) => e);
    expect(foreign).toMatchObject({ code: 'no-base', epoch: 2 });
    await sender.send({ header: { ...header(2), base: { epoch: 1, sha256: first.sha256 } }, data: Readable.from([increment]), trailer: trailer(2) });
    expect((await store.metadata(2)).base).toBe(1);
    sender.close();
    await receiving;
  });

  it('turns a refused checkpoint into a nack and keeps going', async () => {
    const store = await new CheckpointStore(dir).open();
    const { channel, toReceiver, toSender } = link();
    let calls = 0;
    const verifier = (): StreamVerifier => ({
      update: () => {},
      end: () => {
        if (++calls === 2) throw new Error('footer mismatch at offset 42');
      },
    });
    const receiving = runReceiver(toReceiver, toSender, { store, createVerifier: verifier });
    const sender = new ReplicationSender(channel);
    await sender.send({ header: header(1), data: Readable.from([Buffer.from('one')]), trailer: trailer(1) });
    const error = await sender.send({ header: header(2), data: Readable.from([Buffer.from('two')]), trailer: trailer(2) }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(ReplicationError);
    expect(error).toMatchObject({ code: 'verify', epoch: 2 });
    expect((error as Error).message).toContain('footer mismatch at offset 42');
    await sender.send({ header: header(3), data: Readable.from([Buffer.from('three')]), trailer: trailer(3) });
    expect(await store.epochs()).toEqual([1, 3]);
    sender.close();
    await receiving;
  });

  it('drains and nacks a checkpoint whose commit fails before reading (epoch conflict), without hanging', async () => {
    const store = await new CheckpointStore(dir).open();
    const { channel, toReceiver, toSender } = link();
    const receiving = runReceiver(toReceiver, toSender, { store });
    const sender = new ReplicationSender(channel);
    await sender.send({ header: header(5), data: Readable.from([Buffer.from('five')]), trailer: trailer(5) });
    const big = Buffer.alloc(40 * 1024 * 1024, 1); // far past the receiver's buffer
    await expect(sender.send({ header: header(4), data: Readable.from([big]), trailer: trailer(4) })).rejects.toMatchObject({ code: 'conflict' });
    sender.close();
    await receiving;
    expect(await store.epochs()).toEqual([5]);
  });

  it('never commits a checkpoint whose link dies midway, and the sender learns at once', async () => {
    const store = await new CheckpointStore(dir).open();
    await store.commit({ vm: 'probe', epoch: 1, data: Readable.from([Buffer.from('old')]), stopNs: 1n, resumeNs: 2n, qemuVersion: '7.2.22' });
    const { channel, toReceiver, toSender } = link();
    const receiving = runReceiver(toReceiver, toSender, { store }).catch((e: unknown) => e);
    const sender = new ReplicationSender(channel);
    const source = new PassThrough();
    const sending = sender.send({ header: header(2), data: source, trailer: trailer(2) }).catch((e: unknown) => e);
    source.write(Buffer.alloc(100_000));
    await new Promise((r) => setTimeout(r, 20));
    toReceiver.end(); // the link goes away mid-checkpoint
    channel.destroy();
    expect(await receiving).toBeInstanceOf(Error);
    expect(await sending).toBeInstanceOf(ReplicationError);
    expect(await store.epochs()).toEqual([1]);
    expect((await fs.readdir(dir)).sort()).toEqual(['1.ckpt', '1.json']);
  });
});
