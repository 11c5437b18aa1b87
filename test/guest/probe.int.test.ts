import dgram from 'node:dgram';
import net from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  clockOffset,
  hostRealtimeNs,
  setGuestClock,
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
