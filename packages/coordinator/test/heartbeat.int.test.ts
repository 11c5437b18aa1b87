/**
 * HeartbeatService between two real processes on the lab network: side A in this test process
 * (root namespace, UDP on the bridge address, an SSH connection to `backup` from
 * test/support/lab-ssh.ts), side B a child process inside the lab host `backup`
 * (heartbeat-child.ts), with no SSH connection of its own: its beats come back over A's channel.
 * So `cutLink('backup')` cuts both paths, iptables in backup's netns cuts UDP only, and closing A's
 * SSH connection cuts the SSH path only.
 */
import dgram from 'node:dgram';
import net from 'node:net';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { SshConnection } from '@ftvm/transport';
import { cutLink, execIn, hostInfo, labUp, restoreLink } from '../../../test/lab/lab.js';
import { LAB_GATEWAY_IP } from '../../../test/lab/topology.js';
import { connectLabSsh } from '../../../test/support/lab-ssh.js';
import { HeartbeatService, type HeartbeatPath } from '../src/heartbeat/index.js';
import { LabChild, wallOf } from './lab-child.js';

const CHILD_SCRIPT = fileURLToPath(new URL('./heartbeat-child.ts', import.meta.url));
const INTERVAL_MS = 100;
const TIMEOUT_MS = 500;
const PORT = 20_000 + (process.pid % 20_000);
const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));
const now = () => wallOf(performance.now());

let a: HeartbeatService;
let b: LabChild;
let ssh: SshConnection | undefined;
let sshWanted = true;
const aBeats: Array<{ path: HeartbeatPath; at: number; seq: number }> = [];
const aEvents: Array<{ event: 'up' | 'down'; at: number; lastBeatAt?: number }> = [];
const aLog: Array<{ level: string; msg: string; fields?: object }> = [];

/** A's SSH getter: the current connection while wanted; a dead one is replaced in the background. */
let reconnecting = false;
function currentSsh(): SshConnection | undefined {
  if (!sshWanted) return undefined;
  if (ssh?.isOpen) return ssh;
  if (!reconnecting) {
    reconnecting = true;
    connectLabSsh('backup')
      .then((conn) => (sshWanted ? (ssh = conn) : conn.close()))
      .catch(() => undefined) // unreachable now: the next beat tries again
      .finally(() => (reconnecting = false));
  }
  return undefined;
}

const bBeats = (path: HeartbeatPath, since: number) => b.events.filter((e) => e.event === 'beat' && e.path === path && (e.at as number) > since);
const aBeatsOn = (path: HeartbeatPath, since: number) => aBeats.filter((x) => x.path === path && x.at > since);

async function until(check: () => boolean, timeoutMs: number, what: string): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  while (!check()) {
    if (performance.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}\n${b.describe()}\nA's log: ${JSON.stringify(aLog.slice(-10))}`);
    await sleep(10);
  }
}

function iptablesUdp(action: '-I' | '-D') {
  return Promise.all(
    (['INPUT', 'OUTPUT'] as const).map((chain) =>
      execIn('backup', ['iptables', action, chain, '-p', 'udp', '--dport', String(PORT), '-j', 'DROP'], { timeoutMs: 10_000 }),
    ),
  );
}

beforeAll(async () => {
  await labUp();
  ssh = await connectLabSsh('backup');
  a = await HeartbeatService.start({
    host: 'tester',
    listen: { udpAddress: LAB_GATEWAY_IP, port: PORT },
    intervalMs: INTERVAL_MS,
    timeoutMs: TIMEOUT_MS,
    payload: () => ({ vm1: { role: 'primary', running: true, epoch: 42 } }),
    log: (level, msg, fields) => aLog.push({ level, msg, ...(fields ? { fields } : {}) }),
  });
  a.onBeat((_name, path, beat) => aBeats.push({ path, at: now(), seq: beat.seq }));
  a.onPeerUp(() => aEvents.push({ event: 'up', at: now() }));
  a.onPeerDown((_name, lastBeatAt) => aEvents.push({ event: 'down', at: now(), lastBeatAt: wallOf(lastBeatAt) }));
  b = LabChild.start(
    'backup heartbeat',
    CHILD_SCRIPT,
    [JSON.stringify({ host: 'backup', listen: { udpAddress: hostInfo('backup').ip, port: PORT }, intervalMs: INTERVAL_MS, timeoutMs: TIMEOUT_MS, peers: [{ name: 'tester', address: LAB_GATEWAY_IP, port: PORT }] })],
    'backup',
  );
  await b.waitFor((e) => e.event === 'started', 20_000, 'the service in backup to start');
  a.addPeer({ name: 'backup', address: hostInfo('backup').ip, port: PORT, ssh: currentSsh });
});

afterAll(async () => {
  await restoreLink('backup');
  await iptablesUdp('-D').catch(() => undefined); // left by a failed test, or nothing to delete
  await b?.kill();
  await a?.close();
  sshWanted = false;
  ssh?.close();
});

describe('HeartbeatService', () => {
  it('delivers beats over both paths, both ways', async () => {
    await until(() => aBeatsOn('udp', 0).length > 3 && aBeatsOn('ssh', 0).length > 3, 10_000, 'A to get beats on both paths');
    await until(() => bBeats('udp', 0).length > 3 && bBeats('ssh', 0).length > 3, 10_000, 'B to get beats on both paths');
    const peer = a.peer('backup')!;
    expect(peer.alive).toBe(true);
    expect(peer.sshPath).toBe('channel');
    expect(peer.last).toMatchObject({ from: 'backup', vms: { vm1: { role: 'backup', running: false, epoch: 7 } } });
    expect(b.events.find((e) => e.event === 'beat')).toMatchObject({ from: 'tester', vms: { vm1: { role: 'primary', running: true, epoch: 42 } } });
    expect(b.events.some((e) => e.event === 'up' && e.peer === 'tester')).toBe(true);
    // Each beat goes out once per path: the same seq arrives on both.
    const udpSeqs = new Set(aBeatsOn('udp', 0).map((x) => x.seq));
    expect(aBeatsOn('ssh', 0).some((x) => udpSeqs.has(x.seq))).toBe(true);
  });

  it('without the SSH connection, the peer stays alive over UDP; the SSH path comes back with a new connection', async () => {
    const t0 = now();
    sshWanted = false;
    ssh?.close();
    await sleep(3 * TIMEOUT_MS);
    const settled = t0 + 300; // beats already on the wire
    expect(aBeatsOn('ssh', settled), 'A still got beats over SSH: the path was not cut').toHaveLength(0);
    expect(bBeats('ssh', settled), 'B still got beats over SSH: the path was not cut').toHaveLength(0);
    expect(aBeatsOn('udp', settled).length).toBeGreaterThan(8);
    expect(bBeats('udp', settled).length).toBeGreaterThan(8);
    expect(aEvents.filter((e) => e.at > t0)).toEqual([]);
    expect(b.events.filter((e) => (e.event === 'down' || e.event === 'up') && (e.at as number) > t0)).toEqual([]);
    expect(a.peer('backup')!.alive).toBe(true);
    expect(a.peer('backup')!.sshPath).toBe('none');

    const t1 = now();
    sshWanted = true;
    await until(() => aBeatsOn('ssh', t1).length > 0 && bBeats('ssh', t1).length > 0, 10_000, 'the SSH path to come back');
    console.log(`SSH path back ${(Math.min(aBeatsOn('ssh', t1)[0]!.at, bBeats('ssh', t1)[0]!.at as number) - t1).toFixed(0)} ms after a connection was available again`);
  });

  it('with UDP dropped (iptables in backup), the peer stays alive over SSH', async () => {
    await until(() => a.peer('backup')!.sshPath === 'channel', 10_000, 'the SSH path');
    await iptablesUdp('-I');
    const t0 = now();
    try {
      await sleep(3 * TIMEOUT_MS);
      const settled = t0 + 200;
      expect(aBeatsOn('udp', settled), 'A still got UDP beats: the block did not work').toHaveLength(0);
      expect(bBeats('udp', settled), 'B still got UDP beats: the block did not work').toHaveLength(0);
      expect(aBeatsOn('ssh', settled).length).toBeGreaterThan(8);
      expect(bBeats('ssh', settled).length).toBeGreaterThan(8);
      expect(aEvents.filter((e) => e.at > t0)).toEqual([]);
      expect(b.events.filter((e) => (e.event === 'down' || e.event === 'up') && (e.at as number) > t0)).toEqual([]);
    } finally {
      await iptablesUdp('-D');
    }
    const t1 = now();
    await until(() => aBeatsOn('udp', t1).length > 0 && bBeats('udp', t1).length > 0, 5_000, 'UDP beats again');
  });

  it('a cut link makes the peer down within timeoutMs + interval on both sides, and up again when restored', async () => {
    await until(() => aBeatsOn('udp', now() - 200).length > 0 && aBeatsOn('ssh', now() - 200).length > 0, 10_000, 'both paths working');
    const cutAt = now();
    await cutLink('backup');
    try {
      await until(() => aEvents.some((e) => e.event === 'down' && e.at > cutAt), TIMEOUT_MS + 3_000, 'A to see backup down');
      await b.waitFor((e) => e.event === 'down' && (e.at as number) > cutAt, TIMEOUT_MS + 3_000, 'B to see tester down');
    } finally {
      await restoreLink('backup');
    }
    // A beat can cross the restored link before restoreLink() returns, so "up" is looked for
    // after each side's own "down", not after this instant.
    const restoredAt = now();
    const aDown = aEvents.find((e) => e.event === 'down' && e.at > cutAt)!;
    const bDown = b.events.find((e) => e.event === 'down' && (e.at as number) > cutAt)!;
    const aLatency = aDown.at - cutAt;
    const bLatency = (bDown.at as number) - cutAt;
    console.log(
      `cut → peer down: A ${aLatency.toFixed(0)} ms (${(aDown.at - aDown.lastBeatAt!).toFixed(0)} ms after its last beat), ` +
        `B ${bLatency.toFixed(0)} ms (${((bDown.at as number) - (bDown.lastBeatAt as number)).toFixed(0)} ms after its last beat); timeoutMs ${TIMEOUT_MS}, intervalMs ${INTERVAL_MS}`,
    );
    for (const latency of [aLatency, bLatency]) {
      expect(latency).toBeGreaterThan(TIMEOUT_MS - INTERVAL_MS - 20); // the last beat came at most one interval before the cut
      expect(latency).toBeLessThanOrEqual(TIMEOUT_MS + INTERVAL_MS + 150); // 150 ms for a loaded 2-core machine
    }
    expect(a.peer('backup')!.alive).toBe(false);

    await until(() => aEvents.some((e) => e.event === 'up' && e.at > aDown.at), 5_000, 'A to see backup up again');
    const bUp = await b.waitFor((e) => e.event === 'up' && (e.at as number) > (bDown.at as number), 5_000, 'B to see tester up again');
    const aUp = aEvents.find((e) => e.event === 'up' && e.at > aDown.at)!;
    console.log(`restore → peer up: A ${(aUp.at - restoredAt).toFixed(0)} ms, B ${((bUp.at as number) - restoredAt).toFixed(0)} ms`);
    expect(a.peer('backup')!.alive).toBe(true);
    // The SSH path recovers too (the connection may have died of its keepalive timeout meanwhile).
    await until(() => aBeatsOn('ssh', restoredAt).length > 0 && bBeats('ssh', restoredAt).length > 0, 15_000, 'the SSH path after the cut');
    console.log(`restore → SSH path delivering again after ${(Math.max(aBeatsOn('ssh', restoredAt)[0]!.at, bBeats('ssh', restoredAt)[0]!.at as number) - restoredAt).toFixed(0)} ms`);
  });

  it('drops what is not a heartbeat, logs it once, and keeps going', async () => {
    const before = a.invalidCount;
    const logsBefore = aLog.filter((l) => /not a heartbeat/.test(l.msg)).length;
    const socket = dgram.createSocket('udp4');
    const send = (text: string) => new Promise<void>((resolve, reject) => socket.send(text, PORT, LAB_GATEWAY_IP, (e) => (e ? reject(e) : resolve())));
    try {
      await send('garbage');
      await send(JSON.stringify({ from: 'backup', seq: 'x', sentAtMs: 1, vms: {} }));
      await send(JSON.stringify({ from: 'backup', seq: 1, sentAtMs: 1, vms: { vm1: { role: 'boss', running: true } } }));
      await send(JSON.stringify({ from: 'stranger', seq: 1, sentAtMs: 1, vms: {} })); // valid, but not a peer
    } finally {
      socket.close();
    }
    const tcp = net.connect({ host: '127.0.0.1', port: PORT });
    await new Promise<void>((resolve, reject) => tcp.once('connect', resolve).once('error', reject));
    tcp.write('{"not":"a beat"}\n');
    tcp.write(`${'x'.repeat(70_000)}`); // no newline, too long: the connection is closed
    await new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, 2_000);
      tcp.once('close', () => (clearTimeout(timer), resolve()));
    });
    expect(tcp.destroyed).toBe(true);
    await until(() => a.invalidCount.udp >= before.udp + 3 && a.invalidCount.ssh >= before.ssh + 2, 2_000, 'the invalid messages to be counted');
    const dropLogs = aLog.filter((l) => /not a heartbeat/.test(l.msg)).length - logsBefore;
    expect(dropLogs).toBeLessThanOrEqual(2); // at most once per path (a minute apart)
    expect(aLog.some((l) => /not a peer/.test(l.msg) && JSON.stringify(l.fields).includes('stranger'))).toBe(true);
    expect(a.peer('stranger')).toBeUndefined();
    const t = now();
    await until(() => aBeatsOn('udp', t).length > 2, 2_000, 'beats to continue');
    expect(a.peer('backup')!.alive).toBe(true);
  });
});
