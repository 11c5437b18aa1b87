import { execFileSync } from 'node:child_process';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { CheckpointStore, CheckpointStoreError } from '../src/store/index.js';

// Real filesystem faults: a 1 MiB tmpfs fills up, then is remounted read-only (root bypasses
// permission bits, so a read-only mount is the honest way to get a refusal as root).
let mountPoint: string;
beforeEach(async () => {
  mountPoint = await fs.mkdtemp(path.join(os.tmpdir(), 'ftvm-store-tmpfs-'));
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'ftvm-store-test', mountPoint]);
});
afterEach(async () => {
  execFileSync('umount', [mountPoint]);
  await fs.rm(mountPoint, { recursive: true, force: true });
});

const commitInput = (epoch: number, bytes: number) => ({
  vm: 'probe',
  epoch,
  data: Readable.from([Buffer.alloc(bytes, epoch)]),
  stopNs: 1n,
  resumeNs: 2n,
  qemuVersion: '7.2.22',
});

describe('CheckpointStore on a failing filesystem', () => {
  it('reports a full disk clearly and keeps the previous checkpoint intact', async () => {
    const store = await new CheckpointStore(path.join(mountPoint, 'store'), 3).open();
    await store.commit(commitInput(1, 300 * 1024));
    const error = await store.commit(commitInput(2, 900 * 1024)).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(CheckpointStoreError);
    expect((error as CheckpointStoreError).code).toBe('no-space');
    expect((error as Error).message).toContain('disk full');
    expect(await store.epochs()).toEqual([1]);
    await expect(store.verify(1)).resolves.toMatchObject({ epoch: 1, bytes: 300 * 1024 });
    // The failed attempt left no temporary behind, so the space is there for the next one.
    await expect(store.commit(commitInput(3, 300 * 1024))).resolves.toMatchObject({ epoch: 3 });
  });

  it('reports a read-only store clearly and keeps what it has', async () => {
    const store = await new CheckpointStore(path.join(mountPoint, 'store'), 3).open();
    await store.commit(commitInput(1, 1024));
    execFileSync('mount', ['-o', 'remount,ro', mountPoint]);
    try {
      const error = await store.commit(commitInput(2, 1024)).catch((e: unknown) => e);
      expect(error).toBeInstanceOf(CheckpointStoreError);
      expect((error as CheckpointStoreError).code).toBe('permission');
      expect(await store.epochs()).toEqual([1]);
      await expect(store.verify(1)).resolves.toMatchObject({ epoch: 1 });
    } finally {
      execFileSync('mount', ['-o', 'remount,rw', mountPoint]);
    }
  });
});
