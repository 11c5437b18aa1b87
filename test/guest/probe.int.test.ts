import { execFileSync } from 'node:child_process';
import dgram from 'node:dgram';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SECTOR, createProbeDisks, fsckCopy, readRing, type DiskFormat } from '../support/disk-check.js';
import {
  clockOffset,
  diskCounters,
  hostRealtimeNs,
  setGuestClock,
  setSpin,
  startWorkload,
  stepGuestClock,
  syncGuestClock,
  waitForProbe,
  type ClockOffset,
} from '../support/probe-client.js';
import { bootGuest, buildGuest, type BootedGuest, type GuestImage } from './boot-qemu.js';

// Real guest under TCG: every number asserted here is measured through slirp and the probe.
const MS = 1_000_000n;
const abs = (v: bigint): bigint => (v < 0n ? -v : v);
const ms = (ns: bigint): string => `${(Number(ns) / 1e6).toFixed(3)} ms`;
const report = (what: string, o: ClockOffset): void =>
  console.log(`${what}: offset ${ms(o.offsetNs)} ± ${ms(o.errorNs)}, rtt ${ms(o.rttNs)}, ${o.samples} samples`);

let image: GuestImage;
let guest: BootedGuest;

beforeAll(async () => {
  image = await buildGuest();
  guest = await bootGuest({ image });
  console.log(`guest ready (probe answering) ${guest.bootMs.toFixed(0)} ms after QEMU spawn`);
});

afterAll(async () => {
  await guest?.kill();
});

describe('clock probe in a real TCG guest', () => {
  it('measures the guest clock offset with ≤ 1 ms error', async () => {
    const o = await clockOffset(guest.probe);
    report('initial', o);
    expect(o.samples).toBe(16);
    expect(o.errorNs).toBeLessThanOrEqual(1n * MS);
    expect(o.rttNs).toBeGreaterThan(0n);
    expect(o.guestMonotonicNs).toBeGreaterThan(0n);
    // without disks the reply still carries the (128-byte) disk section, with both workloads off
    expect(o.disk?.ring.state).toBe('off');
    expect(o.disk?.fs.state).toBe('off');
  });

  // The instrument is validated against offsets we put there ourselves: the step happens inside
  // the guest kernel (ADJ_SETOFFSET), so it is exact and anything else is measurement error.
  it.each([250n * MS, -123_456_000n])('sees a known step of %d ns to within 1 ms', async (delta) => {
    const before = await clockOffset(guest.probe);
    await stepGuestClock(guest.probe, delta);
    const after = await clockOffset(guest.probe);
    const residual = after.offsetNs - before.offsetNs - delta;
    console.log(`step ${ms(delta)}: residual ${ms(residual)} (bound ${ms(before.errorNs + after.errorNs)})`);
    expect(abs(residual)).toBeLessThanOrEqual(1n * MS);
  });

  it('SET puts the guest clock where asked, and sync brings it onto host time', async () => {
    await setGuestClock(guest.probe, hostRealtimeNs() + 10_000n * MS);
    const ahead = await clockOffset(guest.probe);
    report('after SET host+10 s', ahead);
    // A bare SET lands late by whatever passes between computing the value and the guest applying
    // it (socket setup included: ~2-3 ms here); syncGuestClock() removes that with a STEP.
    expect(abs(ahead.offsetNs - 10_000n * MS)).toBeLessThanOrEqual(10n * MS);

    const synced = await syncGuestClock(guest.probe);
    report('after sync', synced);
    expect(abs(synced.offsetNs)).toBeLessThanOrEqual(2n * MS);
  });

  it('runs the workload: its counter only grows while it runs, and stops when stopped', async () => {
    const idle = await waitForProbe(guest.probe, 5_000);
    expect(idle.workloadMiBps).toBe(0);
    await startWorkload(guest.probe, 16);
    const readings: bigint[] = [];
    for (let i = 0; i < 5; i++) {
      await new Promise((r) => setTimeout(r, 300));
      readings.push((await clockOffset(guest.probe, { samples: 2 })).workloadCounter);
    }
    console.log(`workload counter at 16 MiB/s, every 300 ms: ${readings.join(', ')}`);
    for (let i = 1; i < readings.length; i++) expect(readings[i]).toBeGreaterThanOrEqual(readings[i - 1]!);
    expect(readings.at(-1)!).toBeGreaterThan(readings[0]!);

    // The clock stays measurable under load.
    const loaded = await clockOffset(guest.probe);
    report('under 16 MiB/s workload', loaded);
    expect(loaded.errorNs).toBeLessThanOrEqual(1n * MS);

    await startWorkload(guest.probe, 0);
    await new Promise((r) => setTimeout(r, 100)); // the thread notices within one 5 ms pacing slice
    const stopped = (await waitForProbe(guest.probe, 5_000)).workloadCounter;
    await new Promise((r) => setTimeout(r, 300));
    expect((await waitForProbe(guest.probe, 5_000)).workloadCounter).toBe(stopped);
  });

  it('runs the spin worker: its counter stands still while off, grows while on, and stops again', async () => {
    const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
    const idle = await waitForProbe(guest.probe, 5_000);
    expect(idle.spinOn).toBe(false);
    expect(idle.spinCounter).toBeDefined();
    await sleep(300);
    expect((await waitForProbe(guest.probe, 5_000)).spinCounter).toBe(idle.spinCounter);

    try {
      const on = await setSpin(guest.probe, true);
      expect(on.spinOn).toBe(true);
      const readings = [on];
      for (let i = 0; i < 5; i++) {
        await sleep(300);
        readings.push(await waitForProbe(guest.probe, 5_000));
      }
      // Rates on the guest's clock, per interval: every interval moves the counter.
      const rates = readings.slice(1).map((r, i) => {
        const prev = readings[i]!;
        expect(r.bootId).toBe(prev.bootId);
        expect(r.spinOn).toBe(true);
        expect(r.spinCounter!).toBeGreaterThan(prev.spinCounter!);
        return Number(r.spinCounter! - prev.spinCounter!) / (Number(r.monotonicNs - prev.monotonicNs) / 1e9);
      });
      const first = readings[0]!, last = readings.at(-1)!;
      const mean = Number(last.spinCounter! - first.spinCounter!) / (Number(last.monotonicNs - first.monotonicNs) / 1e9);
      console.log(
        `spin: ${(mean / 1e6).toFixed(1)} M iterations/s (guest clock; per 300 ms: ${rates.map((r) => (r / 1e6).toFixed(1)).join(', ')})`,
      );

      // The reply path preempts the SCHED_IDLE spinner: the clock stays measurable while it spins.
      const spinning = await clockOffset(guest.probe);
      report('while spinning', spinning);
      expect(spinning.spinOn).toBe(true);
      expect(spinning.errorNs).toBeLessThanOrEqual(1n * MS);
    } finally {
      await setSpin(guest.probe, false);
    }
    await sleep(100); // a spinner preempted mid-batch publishes that batch, then sees it is off
    const stopped = await waitForProbe(guest.probe, 5_000);
    expect(stopped.spinOn).toBe(false);
    await sleep(300);
    expect((await waitForProbe(guest.probe, 5_000)).spinCounter).toBe(stopped.spinCounter);
  });

  it('ignores garbled packets, counts them, and keeps answering', async () => {
    const before = (await waitForProbe(guest.probe, 5_000)).badPackets;
    const socket = dgram.createSocket('udp4');
    const garbage = [Buffer.from('hello'), Buffer.alloc(24), Buffer.from('FTVP\x01\x63' + '\0'.repeat(18), 'latin1')];
    await Promise.all(
      garbage.map((buf) => new Promise((r) => socket.send(buf, guest.probe.port, guest.probe.host, r))),
    );
    socket.close();
    const deadline = Date.now() + 5_000;
    let after = before;
    while (after < before + garbage.length && Date.now() < deadline) {
      after = (await waitForProbe(guest.probe, 5_000)).badPackets;
    }
    expect(after).toBe(before + garbage.length);
  });

  it('has a guest agent answering guest-ping on its virtio-serial port', async () => {
    const reply = await agentCommand(guest.gaSocket, '{"execute":"guest-ping"}', 10_000);
    expect(JSON.parse(reply)).toEqual({ return: {} });
  });
});

describe('boot-time workload (ftvm.workload=)', () => {
  let loaded: BootedGuest | undefined;
  afterAll(async () => {
    await loaded?.kill();
  });

  it('starts the workload from the kernel command line', async () => {
    loaded = await bootGuest({ image, workloadMiBps: 8 });
    const first = await waitForProbe(loaded.probe, 5_000);
    expect(first.workloadMiBps).toBe(8);
    await new Promise((r) => setTimeout(r, 500));
    const later = await waitForProbe(loaded.probe, 5_000);
    expect(later.bootId).toBe(first.bootId);
    expect(later.workloadCounter).toBeGreaterThan(first.workloadCounter);
  });
});

/** One raw JSON command to qemu-ga; returns the first line it answers. */
function agentCommand(socketPath: string, command: string, timeoutMs: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = net.createConnection(socketPath);
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`guest agent: no answer to ${command} within ${timeoutMs} ms`));
    }, timeoutMs);
    let buffered = '';
    socket.on('connect', () => socket.write(`${command}\n`));
    socket.on('data', (chunk) => {
      buffered += chunk.toString('utf8');
      const newline = buffered.indexOf('\n');
      if (newline < 0) return;
      clearTimeout(timer);
      socket.destroy();
      resolve(buffered.slice(0, newline));
    });
    socket.on('error', (error) => {
      clearTimeout(timer);
      reject(error);
    });
  });
}

// The disk workloads against real images: qemu-img/mke2fs-made, attached with cache=none
// aio=native, written by the guest, then QEMU is SIGKILLed (a host crash as far as the images go:
// QEMU's own caches die with it) and the images are read back.
describe.each<DiskFormat>(['qcow2', 'raw'])('disk workloads on %s images', (format) => {
  let dir: string;
  let disks: Awaited<ReturnType<typeof createProbeDisks>>;
  let booted: BootedGuest | undefined;
  let killedBootId: bigint | undefined;
  beforeAll(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), `ftvm-disks-${format}-`));
    disks = await createProbeDisks(dir, { format });
    booted = await bootGuest({ image, disks });
  });
  afterAll(async () => {
    await booted?.kill();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('ring and fs advance, the ring on disk stays between completed and issued, fsck is clean after a kill', async () => {
    const guest = booted!;
    // Counters advance, completed ≤ issued in every reply, neither ever goes back.
    const readings: Awaited<ReturnType<typeof diskCounters>>[] = [];
    for (let i = 0; i < 8; i++) {
      readings.push(await diskCounters(guest.probe));
      await new Promise((r) => setTimeout(r, 250));
    }
    const first = readings[0]!;
    for (const [i, r] of readings.entries()) {
      expect(r.ring.state, `ring errno ${r.ring.errno}`).toBe('running');
      expect(r.fs.state, `fs errno ${r.fs.errno}`).toBe('running');
      expect(r.bootId).toBe(first.bootId);
      expect(r.ring.completed).toBeLessThanOrEqual(r.ring.issued);
      if (i > 0) {
        const prev = readings[i - 1]!;
        expect(r.ring.completed).toBeGreaterThanOrEqual(prev.ring.completed);
        expect(r.ring.issued).toBeGreaterThanOrEqual(prev.ring.issued);
        expect(r.fs.cycles).toBeGreaterThanOrEqual(prev.fs.cycles);
      }
    }
    const last = readings.at(-1)!;
    expect(last.ring.completed).toBeGreaterThan(first.ring.completed);
    expect(last.fs.cycles).toBeGreaterThan(first.fs.cycles);
    // the guest's own read-back checks ran and found its disk consistent with its RAM
    expect(last.ring.checks).toBeGreaterThan(0);
    expect(last.ring.violations).toBe(0);
    const seconds = Number(last.monotonicNs - first.monotonicNs) / 1e9;
    const writes = Number(last.ring.completed - first.ring.completed);
    const writeMs = Number(last.ring.writeNs - first.ring.writeNs) / 1e6 / writes;
    console.log(
      `${format}: ring ${(writes / seconds).toFixed(0)} writes/s = ${((writes * SECTOR) / seconds / 1024).toFixed(0)} KiB/s ` +
        `(O_DIRECT|O_DSYNC pwrite ${writeMs.toFixed(2)} ms mean); fs ${(Number(last.fs.cycles - first.fs.cycles) / seconds).toFixed(1)} cycles/s = ` +
        `${(Number(last.fs.bytes - first.fs.bytes) / seconds / 1024).toFixed(0)} KiB/s (guest clock, ${seconds.toFixed(2)} s)`,
    );

    // The clock replies stay prompt while both disk threads write.
    const loaded = await clockOffset(guest.probe);
    report(`${format}: under disk load`, loaded);
    expect(loaded.errorNs).toBeLessThanOrEqual(1n * MS);

    // Live: completed (before the read) ≤ newest on disk ≤ issued (after the read).
    const before = await diskCounters(guest.probe);
    const live = await readRing(disks.ring.path, format);
    const after = await diskCounters(guest.probe);
    console.log(`${format}: live ring: completed ${before.ring.completed} ≤ newest ${live.newest} ≤ issued ${after.ring.issued}`);
    expect(live.bootId).toBe(before.bootId);
    expect(live.newest).toBeGreaterThanOrEqual(before.ring.completed);
    expect(live.newest).toBeLessThanOrEqual(after.ring.issued);

    // Hard kill. The ring grows by at most one write per guest ms (missed ticks are skipped), so
    // issued at the kill is at most issued at the last reply + the ms from that request to the kill.
    const sentAt = performance.now();
    const seen = await diskCounters(guest.probe);
    process.kill(guest.pid, 'SIGKILL');
    const killedAt = performance.now();
    await guest.exited;
    const issuedBound = seen.ring.issued + BigInt(Math.ceil(killedAt - sentAt)) + 1n;

    const ring = await readRing(disks.ring.path, format);
    console.log(
      `${format}: after SIGKILL: completed ${seen.ring.completed} ≤ newest ${ring.newest} ≤ ${issuedBound} ` +
        `(issued ${seen.ring.issued} + ${(killedAt - sentAt).toFixed(0)} ms); valid ${ring.valid}, corrupt ${ring.corrupt}, missing ${ring.missing}`,
    );
    expect(ring.bootId).toBe(seen.bootId);
    expect(ring.newest).toBeGreaterThanOrEqual(seen.ring.completed);
    expect(ring.newest).toBeLessThanOrEqual(issuedBound);
    expect(ring.missing).toBe(0); // every counter before the newest in the window is on disk
    expect(ring.corrupt).toBeLessThanOrEqual(1); // at most the write in flight, torn
    expect(ring.valid).toBeGreaterThanOrEqual(Math.min(Number(ring.newest), ring.slots - 1));

    // The check can fail: a copy with one record's crc broken shows it as corrupt and missing.
    const raw = rawRing(disks.ring.path, format, dir);
    const victim = Number((ring.newest - 5n - 1n) % BigInt(ring.slots)) + 1; // sector of counter newest − 5
    raw[victim * SECTOR + 100]! ^= 0xff;
    const damaged = await readRing(raw, 'raw');
    expect(damaged.corrupt).toBe(ring.corrupt + 1);
    expect(damaged.missing).toBe(1);

    // File system: consistent after journal replay, and holds every cycle the guest saw fsynced.
    const fsck = await fsckCopy(disks.fs.path, format);
    console.log(
      `${format}: fsck clean=${fsck.clean} (journal replay needed: ${fsck.needsRecovery}); current cycle ${fsck.current?.cycle}, ` +
        `log ${fsck.logLast}, fs cycles seen ${seen.fs.cycles}`,
    );
    expect(fsck.clean, fsck.output).toBe(true);
    expect(fsck.current?.bootId).toBe(seen.bootId);
    expect(fsck.current!.cycle).toBeGreaterThanOrEqual(seen.fs.cycles);
    expect(fsck.logLast!).toBeGreaterThanOrEqual(seen.fs.cycles);
    killedBootId = seen.bootId;

    // The check can fail: a replayed copy with /current's inode cleared is not clean.
    const broken = path.join(dir, 'fs-broken.raw');
    execFileSync('qemu-img', ['convert', '-f', format, '-O', 'raw', disks.fs.path, broken], { timeout: 60_000 });
    execFileSync('e2fsck', ['-E', 'journal_only', '-y', broken], { timeout: 60_000, stdio: 'ignore' });
    execFileSync('debugfs', ['-w', '-R', 'clri /current', broken], { timeout: 60_000, stdio: 'ignore' });
    const bad = await fsckCopy(broken, 'raw');
    expect(bad.clean).toBe(false);
    expect(bad.exitCode).toBe(4);
  });

  it('boots again on the crashed disks: the kernel replays the journal, the probe takes the ring over', async () => {
    expect(killedBootId, 'needs the previous test').toBeDefined();
    await booted?.kill();
    booted = await bootGuest({ image, disks });
    const deadline = performance.now() + 15_000;
    let again = await diskCounters(booted.probe);
    while ((again.ring.completed === 0n || again.fs.cycles === 0n) && performance.now() < deadline) {
      await new Promise((r) => setTimeout(r, 100));
      again = await diskCounters(booted.probe);
    }
    expect(again.ring.state, `ring errno ${again.ring.errno}`).toBe('running');
    expect(again.fs.state, `fs errno ${again.fs.errno}`).toBe('running');
    expect(again.fs.cycles).toBeGreaterThan(0n);
    expect(again.bootId).not.toBe(killedBootId);
    const ring = await readRing(disks.ring.path, format);
    expect(ring.bootId).toBe(again.bootId);
    expect(ring.newest).toBeGreaterThanOrEqual(again.ring.completed);
  });
});

/** The ring image's raw bytes (a qcow2 converted through a temporary file). */
function rawRing(image: string, format: DiskFormat, dir: string): Buffer {
  if (format === 'raw') return fs.readFileSync(image);
  const out = path.join(dir, 'ring-copy.raw');
  execFileSync('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', image, out], { timeout: 60_000 });
  return fs.readFileSync(out);
}
