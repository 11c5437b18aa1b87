// The NBD client against real qemu-nbd (QEMU 7.2) exporting a qcow2 with persistent dirty bitmaps
// at 4 KiB and 64 KiB granularity, cross-checked with libnbd's nbdinfo. Needs qemu-utils and
// libnbd-bin (scripts/bootstrap.sh installs both). Standalone processes in the root namespace:
// no lab lock needed.
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  BASE_ALLOCATION,
  NbdClient,
  NbdError,
  NbdTransmissionFlag,
  allocatedExtents,
  dirtyExtents,
  readExtents,
  type DiskRange,
} from '../src/index.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 64 * MiB;
const B4K = 'qemu:dirty-bitmap:b4k';
const B64K = 'qemu:dirty-bitmap:b64k';

let dir: string;
let image: string;
let socket: string;
const servers: ChildProcess[] = [];
const clients: NbdClient[] = [];

/** Writes before the bitmaps exist (allocated, not dirty), then after (dirty), as qemu-io commands. */
const BEFORE = [{ cmd: 'write -P 0xaa 0 64k', offset: 0, length: 64 * KiB, byte: 0xaa }];
const AFTER = [
  { cmd: 'write -P 0xee 32k 4k', offset: 32 * KiB, length: 4 * KiB, byte: 0xee },
  { cmd: 'write -P 0xbb 1M 4k', offset: MiB, length: 4 * KiB, byte: 0xbb },
  { cmd: 'write -P 0xcc 3149824 8k', offset: 3 * MiB + 4 * KiB, length: 8 * KiB, byte: 0xcc },
  { cmd: 'write -P 0x11 5M 4k', offset: 5 * MiB, length: 4 * KiB, byte: 0x11 },
  { cmd: 'write -P 0x22 5246976 4k', offset: 5 * MiB + 4 * KiB, length: 4 * KiB, byte: 0x22 },
  { cmd: 'write -z 8M 128k', offset: 8 * MiB, length: 128 * KiB, byte: 0 },
  { cmd: 'write -P 0xdd 20M 6M', offset: 20 * MiB, length: 6 * MiB, byte: 0xdd },
];
const expected = Buffer.alloc(SIZE);
for (const w of [...BEFORE, ...AFTER]) expected.fill(w.byte, w.offset, w.offset + w.length);

const run = (cmd: string, args: string[]): string => execFileSync(cmd, args, { encoding: 'utf8', timeout: 60_000 });

/** Starts qemu-nbd and waits (deadline 10 s) until its socket accepts connections. */
async function startNbd(sock: string, args: string[]): Promise<ChildProcess> {
  const proc = spawn('qemu-nbd', [`--socket=${sock}`, '--persistent', '--shared=8', ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  servers.push(proc);
  let stderr = '';
  proc.stderr!.on('data', (c: Buffer) => (stderr += c.toString()));
  const deadline = Date.now() + 10_000;
  while (!fs.existsSync(sock)) {
    if (proc.exitCode !== null) throw new Error(`qemu-nbd exited with ${proc.exitCode}: ${stderr}`);
    if (Date.now() > deadline) throw new Error(`qemu-nbd did not create ${sock} within 10 s: ${stderr}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  return proc;
}

async function stop(proc: ChildProcess, ms = 5_000): Promise<void> {
  if (proc.exitCode !== null || proc.signalCode !== null) return;
  const exited = new Promise<void>((r) => proc.once('exit', () => r()));
  proc.kill('SIGCONT');
  proc.kill('SIGTERM');
  const timer = setTimeout(() => proc.kill('SIGKILL'), ms);
  await exited;
  clearTimeout(timer);
}

async function connect(options: { exportName?: string; metaContexts?: string[]; sock?: string } = {}): Promise<NbdClient> {
  const client = await NbdClient.connect(options.sock ?? socket, {
    exportName: options.exportName ?? 'vda',
    metaContexts: options.metaContexts ?? [BASE_ALLOCATION, B4K, B64K],
    handshakeTimeoutMs: 10_000,
    requestTimeoutMs: 30_000,
  });
  clients.push(client);
  return client;
}

/** The error a promise rejects with; a test failure if it resolves. */
function rejection(p: Promise<unknown>): Promise<NbdError> {
  return p.then(
    (v) => {
      throw new Error(`expected a rejection, got ${String(v)}`);
    },
    (e: unknown) => e as NbdError,
  );
}

async function collect<T>(it: AsyncIterable<T>): Promise<T[]> {
  const out: T[] = [];
  for await (const x of it) out.push(x);
  return out;
}

type MapEntry = { offset: number; length: number; type: number };
const nbdinfoMap = (context: string): MapEntry[] =>
  JSON.parse(run('nbdinfo', ['--json', `--map=${context}`, `nbd+unix:///vda?socket=${socket}`])) as MapEntry[];

/** Per 512-byte sector: 0 not selected, 1 data, 2 zero. */
function sectors(ranges: DiskRange[]): Uint8Array {
  const s = new Uint8Array(SIZE / 512);
  for (const r of ranges) s.fill(r.zero ? 2 : 1, r.offset / 512, (r.offset + r.length) / 512);
  return s;
}

function sectorsFromMaps(base: MapEntry[], select: (alloc: number, sector: number) => boolean): Uint8Array {
  const alloc = new Uint32Array(SIZE / 512);
  for (const e of base) alloc.fill(e.type, e.offset / 512, (e.offset + e.length) / 512);
  return Uint8Array.from(alloc, (a, i) => (!select(a, i) ? 0 : a & 2 ? 2 : 1));
}

/** Walk output invariants: in order, disjoint, ≤ maxLength, adjacent same-kind only where a run was cut. */
function checkShape(ranges: DiskRange[], maxLength: number): void {
  for (let i = 0; i < ranges.length; i++) {
    const r = ranges[i]!;
    expect(r.length).toBeGreaterThan(0);
    expect(r.length).toBeLessThanOrEqual(maxLength);
    const prev = ranges[i - 1];
    if (!prev) continue;
    expect(r.offset).toBeGreaterThanOrEqual(prev.offset + prev.length);
    if (r.offset === prev.offset + prev.length && r.zero === prev.zero) expect(prev.length).toBe(maxLength);
  }
}

beforeAll(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ftvm-nbd-int-'));
  image = path.join(dir, 'disk.qcow2');
  socket = path.join(dir, 'nbd.sock');
  run('qemu-img', ['create', '-q', '-f', 'qcow2', image, String(SIZE)]);
  run('qemu-io', ['-f', 'qcow2', ...BEFORE.flatMap((w) => ['-c', w.cmd]), image]);
  run('qemu-img', ['bitmap', '--add', '--enable', '-g', '4096', image, 'b4k']);
  run('qemu-img', ['bitmap', '--add', '--enable', '-g', '65536', image, 'b64k']);
  run('qemu-io', ['-f', 'qcow2', ...AFTER.flatMap((w) => ['-c', w.cmd]), image]);
  await startNbd(socket, ['-f', 'qcow2', '-x', 'vda', '-B', 'b4k', '-B', 'b64k', '--read-only', image]);
});

afterAll(async () => {
  await Promise.allSettled(clients.map((c) => c.close(2_000)));
  await Promise.all(servers.map((p) => stop(p)));
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

describe('NbdClient against qemu-nbd', () => {
  it('negotiates the export: size, read-only, contexts', async () => {
    const client = await connect();
    expect(client.size).toBe(SIZE);
    expect(client.transmissionFlags & NbdTransmissionFlag.READ_ONLY).toBeTruthy();
    expect([...client.contexts.keys()].sort()).toEqual([BASE_ALLOCATION, B4K, B64K]);
    expect(client.blockSize).toEqual({ minimum: 1, preferred: 4096, maximum: 32 * MiB });
  });

  it('reads the written patterns, with holes and zero clusters as zeros', async () => {
    const client = await connect();
    for (const [offset, length] of [
      [0, 64 * KiB],
      [60 * KiB, 8 * KiB], // data then a hole
      [MiB - 512, 8 * KiB], // hole, data, rest of the allocated cluster
      [8 * MiB - 4 * KiB, 136 * KiB], // around the zero write
      [20 * MiB - 1, 32 * MiB], // the largest read QEMU takes, unaligned
      [SIZE - 4096, 4096],
    ] as const) {
      expect((await client.read(offset, length)).equals(expected.subarray(offset, offset + length)), `read ${length} at ${offset}`).toBe(true);
    }
    // Many reads in flight at once come back matched to their cookies.
    const offsets = Array.from({ length: 64 }, (_, i) => i * 997 * 1024);
    const datas = await Promise.all(offsets.map((o) => client.read(o, 65536)));
    datas.forEach((d, i) => expect(d.equals(expected.subarray(offsets[i]!, offsets[i]! + 65536))).toBe(true));
  });

  it('dirtyExtents gives exactly the writes since the bitmap, at its granularity', async () => {
    const client = await connect();
    const r = (offset: number, length: number, zero = false): DiskRange => ({ offset, length, zero });
    expect(await collect(dirtyExtents(client, { bitmap: B4K }))).toEqual([
      r(32 * KiB, 4 * KiB),
      r(MiB, 4 * KiB),
      r(3 * MiB + 4 * KiB, 8 * KiB),
      r(5 * MiB, 8 * KiB), // two adjacent writes, coalesced
      r(8 * MiB, 128 * KiB, true), // the zero write: dirty, reads as zeros
      r(20 * MiB, 4 * MiB), // 6 MiB cut at the default maxLength
      r(24 * MiB, 2 * MiB),
    ]);
    expect(await collect(dirtyExtents(client, { bitmap: B64K }))).toEqual([
      r(0, 64 * KiB),
      r(MiB, 64 * KiB),
      r(3 * MiB, 64 * KiB),
      r(5 * MiB, 64 * KiB),
      r(8 * MiB, 128 * KiB, true),
      r(20 * MiB, 4 * MiB),
      r(24 * MiB, 2 * MiB),
    ]);
    expect(await collect(dirtyExtents(client, { bitmap: B4K, maxLength: 1536 * KiB }))).toHaveLength(4 + 1 + 4);
  });

  it('readExtents returns the bytes of every dirty data extent, in order, and zero extents really are zeros', async () => {
    const client = await connect();
    const out = await collect(readExtents(client, dirtyExtents(client, { bitmap: B4K, maxLength: 256 * KiB }), { concurrency: 3 }));
    expect(out.length).toBe(4 + 1 + 24);
    let last = -1;
    for (const e of out) {
      expect(e.offset).toBeGreaterThan(last);
      last = e.offset;
      const want = expected.subarray(e.offset, e.offset + e.length);
      if (e.data) expect(e.data.equals(want)).toBe(true);
      else expect(want.every((b) => b === 0)).toBe(true);
    }
  });

  it('allocatedExtents and dirtyExtents agree with nbdinfo --map, sector by sector', async () => {
    const client = await connect();
    const base = nbdinfoMap(BASE_ALLOCATION);
    const allocated = await collect(allocatedExtents(client, { maxLength: MiB }));
    checkShape(allocated, MiB);
    expect(Buffer.from(sectors(allocated)).equals(Buffer.from(sectorsFromMaps(base, (a) => (a & 3) !== 3)))).toBe(true);
    expect(allocated.reduce((n, e) => n + e.length, 0)).toBe(4 * 64 * KiB + 6 * MiB);

    for (const bitmap of [B4K, B64K]) {
      const dirtyMap = nbdinfoMap(bitmap);
      const dirty = new Uint8Array(SIZE / 512);
      for (const e of dirtyMap) dirty.fill(e.type & 1, e.offset / 512, (e.offset + e.length) / 512);
      const ours = await collect(dirtyExtents(client, { bitmap, maxLength: 64 * KiB }));
      checkShape(ours, 64 * KiB);
      expect(Buffer.from(sectors(ours)).equals(Buffer.from(sectorsFromMaps(base, (_, i) => dirty[i] === 1))), bitmap).toBe(true);
    }
    // And a seed read through readExtents reproduces the image.
    const copy = Buffer.alloc(SIZE);
    for await (const e of readExtents(client, allocatedExtents(client))) e.data?.copy(copy, e.offset);
    expect(copy.equals(expected)).toBe(true);
  });

  it('an unknown export name is a clear error naming it', async () => {
    const e = await rejection(connect({ exportName: 'vdz' }));
    expect(e).toBeInstanceOf(NbdError);
    expect(e.code).toBe('EXPORT_UNKNOWN');
    expect(e.message).toContain(`NBD server unix:${socket} has no export 'vdz'`);
    expect(e.message).toContain("export 'vdz' not present"); // QEMU's own words
  });

  it('a bitmap that is not exported is a clear error naming it', async () => {
    const e = await rejection(connect({ metaContexts: [BASE_ALLOCATION, 'qemu:dirty-bitmap:nope'] }));
    expect(e.code).toBe('CONTEXT_UNAVAILABLE');
    expect(e.message).toContain("does not offer metadata context 'qemu:dirty-bitmap:nope'");
  });

  it('qemu-nbd killed with requests in flight: they fail at once with a clear error, no hang', async () => {
    const sock = path.join(dir, 'kill.sock');
    const proc = await startNbd(sock, ['-f', 'qcow2', '-x', 'vda', '--read-only', image]);
    const client = await connect({ sock, metaContexts: [BASE_ALLOCATION] });
    expect((await client.read(0, 4096)).equals(expected.subarray(0, 4096))).toBe(true);
    // Frozen first, so the requests are certainly in flight when it dies.
    proc.kill('SIGSTOP');
    const pending = [client.read(0, 32 * MiB), client.read(20 * MiB, 4 * MiB), client.blockStatus(0, SIZE)].map((p) => rejection(p));
    await new Promise((r) => setTimeout(r, 200));
    expect(client.pending).toBe(3);
    const t0 = Date.now();
    proc.kill('SIGKILL');
    const errors = await Promise.all(pending);
    const ms = Date.now() - t0;
    expect(ms).toBeLessThan(2_000); // the request deadline is 30 s: this is the close, not a timeout
    for (const e of errors) {
      expect(e).toBeInstanceOf(NbdError);
      expect(e.code).toBe('DISCONNECTED');
      // A clean close or a reset (qemu-nbd dies with our requests unread in its socket buffer).
      expect(e.message).toMatch(new RegExp(`NBD (server unix:${sock} closed the connection|connection to unix:${sock} failed) \\(transmission\\)`));
    }
    expect(errors[0]!.message).toMatch(/^NBD_CMD_READ of 33554432 bytes at 0 failed: /);
    await expect(client.read(0, 1)).rejects.toMatchObject({ code: 'DISCONNECTED' });
  });
});

describe('read throughput over a unix socket (reported, not asserted)', () => {
  it('readExtents over a fully written 256 MiB image', async () => {
    const BIG = 256 * MiB;
    const raw = path.join(dir, 'big.raw');
    const fd = fs.openSync(raw, 'w');
    const hash = createHash('sha256');
    for (let o = 0; o < BIG; o += 4 * MiB) {
      const b = randomBytes(4 * MiB);
      hash.update(b);
      fs.writeSync(fd, b, 0, b.length, o);
    }
    fs.closeSync(fd);
    const digest = hash.digest('hex');
    const qcow2 = path.join(dir, 'big.qcow2');
    run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, qcow2]);
    const results: Record<string, number> = {};
    for (const [format, file] of [
      ['raw', raw],
      ['qcow2', qcow2],
    ] as const) {
      const sock = path.join(dir, `big-${format}.sock`);
      const proc = await startNbd(sock, ['-f', format, '-x', 'big', '--read-only', file]);
      const client = await connect({ sock, exportName: 'big', metaContexts: [BASE_ALLOCATION] });
      // Correctness first (hashing is not timed), then timed passes.
      const h = createHash('sha256');
      for await (const e of readExtents(client, allocatedExtents(client))) h.update(e.data ?? Buffer.alloc(e.length));
      expect(h.digest('hex')).toBe(digest);
      for (const concurrency of [1, 4, 8]) {
        const t0 = process.hrtime.bigint();
        let bytes = 0;
        for await (const e of readExtents(client, allocatedExtents(client), { concurrency })) bytes += e.data?.length ?? 0;
        const s = Number(process.hrtime.bigint() - t0) / 1e9;
        expect(bytes).toBe(BIG);
        results[`${format}_c${concurrency}_MBps`] = Math.round(BIG / 1e6 / s);
      }
      await client.close(2_000);
      await stop(proc);
    }
    console.log(`nbd readExtents throughput (256 MiB, 4 MiB extents, MB/s): ${JSON.stringify(results)}`);
  });
});
