import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { CheckpointStore, CheckpointStoreError, type StreamVerifier } from '../src/store/index.js';

let dir: string;
beforeEach(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'ftvm-store-'));
});
afterEach(async () => fs.rm(dir, { recursive: true, force: true }));

const input = (epoch: number, data: Buffer | Readable, verifier?: StreamVerifier) => ({
  vm: 'probe',
  epoch,
  data: Buffer.isBuffer(data) ? Readable.from([data]) : (data as Readable),
  stopNs: 1_000n + BigInt(epoch),
  resumeNs: 2_000n + BigInt(epoch),
  qemuVersion: '7.2.22',
  ...(verifier ? { verifier } : {}),
});

describe('CheckpointStore', () => {
  it('commits checkpoints with metadata and keeps only the newest K', async () => {
    const store = await new CheckpointStore(dir, 2).open();
    for (const epoch of [1, 2, 3]) await store.commit(input(epoch, Buffer.from(`checkpoint ${epoch}`)));
    // pruning follows the commit (the ack does not wait for it)
    await store.pruned();
    expect(await store.epochs()).toEqual([2, 3]);
    const meta = await store.verify(3);
    expect(meta).toMatchObject({ vm: 'probe', epoch: 3, bytes: 12, stopNs: '1003', resumeNs: '2003' });
    expect(await fs.readFile(store.dataPath(3), 'utf8')).toBe('checkpoint 3');
  });

  it('prunes only after the commit has resolved, and reports a prune that fails without failing a commit', async () => {
    const errors: Error[] = [];
    const store = await new CheckpointStore(dir, 1, { onPruneError: (e) => errors.push(e) }).open();
    await store.commit(input(1, Buffer.from('one')));
    await store.commit(input(2, Buffer.from('two')));
    expect(await store.epochs()).toEqual([1, 2]); // 1 is still there when the commit of 2 resolves
    await store.pruned();
    expect(await store.epochs()).toEqual([2]);
    // a data file that cannot be removed (here: a directory in its place)
    await fs.rm(store.dataPath(2));
    await fs.mkdir(path.join(store.dataPath(2), 'x'), { recursive: true });
    const meta = await store.commit(input(3, Buffer.from('three')));
    expect(meta.epoch).toBe(3);
    await store.pruned();
    expect(errors).toHaveLength(1);
    expect(errors[0]).toBeInstanceOf(CheckpointStoreError);
    expect(await store.epochs()).toEqual([3]);
    expect((await store.latestVerified())?.metadata.epoch).toBe(3);
  });

  it('never commits a stream the verifier rejects, and keeps the previous checkpoint', async () => {
    const store = await new CheckpointStore(dir).open();
    await store.commit(input(1, Buffer.from('good')));
    const rejecting: StreamVerifier = { update: () => {}, end: () => { throw new Error('stream ends inside section ram'); } };
    const error = await store.commit(input(2, Buffer.from('torn'), rejecting)).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(CheckpointStoreError);
    expect((error as CheckpointStoreError).code).toBe('verify');
    expect((error as Error).message).toContain('stream ends inside section ram');
    expect(await store.epochs()).toEqual([1]);
    expect(await fs.readdir(dir)).toEqual(['1.ckpt', '1.json']);
  });

  it('leaves nothing when the source stream dies midway', async () => {
    const store = await new CheckpointStore(dir).open();
    await store.commit(input(1, Buffer.from('good')));
    const dying = new Readable({ read() {} });
    dying.push(Buffer.alloc(1000));
    setTimeout(() => dying.destroy(new Error('ssh channel closed')), 10);
    await expect(store.commit(input(2, dying))).rejects.toThrow('ssh channel closed');
    expect(await store.epochs()).toEqual([1]);
    expect((await store.latestVerified())?.metadata.epoch).toBe(1);
  });

  it('refuses a source that failed before the store got to read it, without an uncaught error', async () => {
    const store = await new CheckpointStore(dir).open();
    await store.commit(input(1, Buffer.from('good')));
    const dead = new Readable({ read() {} });
    const committing = store.commit(input(2, dead)); // waits for the prune after epoch 1 first
    dead.destroy(new Error('ssh channel closed'));
    await expect(committing).rejects.toThrow('ssh channel closed');
    expect(await store.epochs()).toEqual([1]);
  });

  it('detects a flipped byte and falls back to the previous intact checkpoint', async () => {
    const store = await new CheckpointStore(dir).open();
    await store.commit(input(1, Buffer.from('first checkpoint')));
    await store.commit(input(2, Buffer.from('second checkpoint')));
    const file = await fs.open(store.dataPath(2), 'r+');
    await file.write(Buffer.from('X'), 0, 1, 3);
    await file.close();
    const corrupt: CheckpointStoreError[] = [];
    const latest = await store.latestVerified((e) => corrupt.push(e));
    expect(latest?.metadata.epoch).toBe(1);
    expect(corrupt).toHaveLength(1);
    expect(corrupt[0]!.message).toContain('checkpoint 2 is corrupt');
  });

  it('refuses an epoch that is not newer than the latest', async () => {
    const store = await new CheckpointStore(dir).open();
    await store.commit(input(5, Buffer.from('x')));
    await expect(store.commit(input(5, Buffer.from('y')))).rejects.toThrow('not newer');
    expect(await fs.readFile(store.dataPath(5), 'utf8')).toBe('x');
  });

  it('cleans what a crash left behind and never calls it committed', async () => {
    const store = await new CheckpointStore(dir).open();
    await store.commit(input(1, Buffer.from('committed')));
    await fs.writeFile(path.join(dir, '2.ckpt'), 'renamed but no metadata');
    await fs.writeFile(path.join(dir, '3.ckpt.123.tmp'), 'half written');
    expect(await store.latestEpoch()).toBe(1);
    await store.open();
    expect((await fs.readdir(dir)).sort()).toEqual(['1.ckpt', '1.json']);
  });

  it('rejects metadata with a bad field, naming it', async () => {
    const store = await new CheckpointStore(dir).open();
    await store.commit(input(1, Buffer.from('x')));
    const metaPath = path.join(dir, '1.json');
    const meta = JSON.parse(await fs.readFile(metaPath, 'utf8')) as Record<string, unknown>;
    await fs.writeFile(metaPath, JSON.stringify({ ...meta, sha256: 'nope' }));
    await expect(store.metadata(1)).rejects.toThrow('invalid sha256');
  });
});
