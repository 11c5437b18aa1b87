/**
 * The service client (test/support/service-client.ts) against an in-process fake of the probe
 * guest's service: datagrams every ms, a TCP server, and the failures a failover brings (values
 * rolled back, a connection that breaks or hangs). The client runs as its real child process, in
 * this namespace instead of the witness.
 */
import dgram from 'node:dgram';
import net from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { ServiceClient } from '../support/service-client.js';
import { decodeRequest, encodeDatagram, encodeResponse, REQUEST_SIZE } from '../support/service-wire.js';

/** The guest's state, as a test moves it: counter and datagram sequence (both in guest RAM). */
interface FakeGuest {
  counter: bigint;
  seq: bigint;
  bootId: bigint;
  tcpPort: number;
  /** The open connections stop answering (a connection whose guest end rolled back: nothing comes); new ones answer. */
  muteConnections(): void;
  /** Drop every open connection. */
  dropConnections(): void;
  close(): Promise<void>;
}

async function fakeGuest(udpTarget: () => number): Promise<FakeGuest> {
  const sockets = new Set<net.Socket>();
  const muted = new WeakSet<net.Socket>();
  const udp = dgram.createSocket('udp4');
  const guest: FakeGuest = {
    counter: 1000n,
    seq: 0n,
    bootId: 0xabcdef0123456789n,
    tcpPort: 0,
    muteConnections: () => sockets.forEach((s) => muted.add(s)),
    dropConnections: () => sockets.forEach((s) => s.destroy()),
    close: async () => {
      clearInterval(timer);
      guest.dropConnections();
      udp.close();
      await new Promise((resolve) => server.close(resolve));
    },
  };
  const timer = setInterval(() => {
    guest.counter += 3n;
    const port = udpTarget();
    if (port) udp.send(encodeDatagram({ bootId: guest.bootId, seq: ++guest.seq, counter: guest.counter, guestRealtimeNs: BigInt(Date.now()) * 1_000_000n }), port, '127.0.0.1');
  }, 1);
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.once('close', () => sockets.delete(socket));
    socket.on('error', () => undefined); // the client resets connections it gives up on
    let buf = Buffer.alloc(0);
    socket.on('data', (chunk) => {
      buf = Buffer.concat([buf, chunk]);
      while (buf.length >= REQUEST_SIZE) {
        const id = decodeRequest(buf.subarray(0, REQUEST_SIZE));
        buf = buf.subarray(REQUEST_SIZE);
        if (id === undefined) return void socket.destroy();
        if (!muted.has(socket)) socket.write(encodeResponse({ requestId: id, counter: guest.counter, bootId: guest.bootId, guestRealtimeNs: 0n }));
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  guest.tcpPort = (server.address() as net.AddressInfo).port;
  return guest;
}

let client: ServiceClient | undefined;
let guest: FakeGuest | undefined;
afterEach(async () => {
  await client?.stop();
  await guest?.close();
  client = guest = undefined;
});

async function setUp(options: { tcpIntervalMs?: number; requestTimeoutMs?: number } = {}): Promise<{ client: ServiceClient; guest: FakeGuest }> {
  let udpPort = 0;
  guest = await fakeGuest(() => udpPort);
  client = await ServiceClient.start('127.0.0.1', { host: 'root', udpPort: 0, tcpPort: guest.tcpPort, reconnectDelayMs: 20, ...options });
  udpPort = client.udpPort;
  return { client, guest };
}

describe('service client', () => {
  it('counts datagrams and TCP answers, with latencies, on one connection', async () => {
    const { client, guest } = await setUp();
    const s = await client.waitFor('datagrams and answers', (st) => st.udpCount >= 200 && st.tcpResponses >= 200, 8_000);
    expect(s.lastBootId).toBe(guest.bootId);
    expect(s.highestUdpCounter).toBeGreaterThan(1000n);
    expect(s.highestTcpCounter).toBeGreaterThan(1000n);
    expect(s.highestUdpCounter! <= guest.counter).toBe(true);
    expect(s).toMatchObject({ udpBad: 0, udpLost: 0, tcpErrors: 0, tcpReconnects: 0, tcpConnects: 1, tcpConnected: true, rollbacks: [] });
    expect(s.latencyUs.count).toBeGreaterThanOrEqual(200);
    expect(s.latencyUs.p50).toBeGreaterThan(0);
    const raw = await client.stats({ rawLatencies: true, resetLatencies: true });
    expect(raw.latencyUs.raw!.length).toBe(raw.latencyUs.count);
    expect((await client.stats()).latencyUs.count).toBeLessThan(raw.latencyUs.count);
    const final = await client.stop();
    expect(final!.tcpResponses).toBeGreaterThanOrEqual(s.tcpResponses);
  });

  it('paces requests in interval mode', async () => {
    const { client } = await setUp({ tcpIntervalMs: 20 });
    await new Promise((resolve) => setTimeout(resolve, 1_000));
    const s = await client.stats();
    // 50 per second at most (a slow start may give fewer)
    expect(s.tcpResponses).toBeGreaterThan(10);
    expect(s.tcpResponses).toBeLessThanOrEqual(55);
  });

  it('records values the guest took back (a restored checkpoint) as rollbacks, with what was lost', async () => {
    const { client, guest } = await setUp();
    await client.waitFor('traffic', (st) => st.udpCount >= 300 && st.tcpResponses >= 10, 8_000);
    // the guest goes back to an older state of itself: lower counter, lower datagram sequence
    guest.counter -= 600n;
    guest.seq -= 200n;
    const s = await client.waitFor('the rollback to be over', (st) => st.rollbacks.length >= 3 && st.rollbacks.every((r) => !r.open), 8_000);
    const via = Object.fromEntries(s.rollbacks.map((r) => [r.via, r]));
    expect(via['udp-seq']!.lost).toBeGreaterThanOrEqual(190n);
    expect(via['udp-seq']!.lost).toBeLessThanOrEqual(200n);
    expect(via['udp-counter']!.lost).toBeGreaterThan(500n);
    expect(via['tcp-counter']!.lost).toBeGreaterThan(0n);
    expect(s.rollbacks.every((r) => r.bootId === guest.bootId && r.replies > 0)).toBe(true);
  });

  it('reconnects when the connection breaks, and when answers stop coming', async () => {
    const { client, guest } = await setUp({ requestTimeoutMs: 300 });
    await client.waitFor('answers', (st) => st.tcpResponses >= 10, 8_000);
    guest.dropConnections();
    const broken = await client.waitFor('a reconnect', (st) => st.tcpReconnects === 1 && st.tcpConnected, 5_000);
    expect(broken.tcpErrors).toBe(1);
    expect(broken.tcpLastError).toMatch(/closed by the guest|ECONNRESET|EPIPE/);
    guest.muteConnections();
    const hung = await client.waitFor('answers on a new connection', (st) => st.tcpReconnects === 2 && st.tcpResponses > broken.tcpResponses + 5, 5_000);
    expect(hung.tcpLastError).toMatch(/no response within 300 ms/);
    expect(hung.tcpMaxGapMs).toBeGreaterThanOrEqual(300);
  });

  it('fails to start with a clear message when the UDP port is taken', async () => {
    const taken = dgram.createSocket('udp4');
    await new Promise<void>((resolve) => taken.bind(0, '0.0.0.0', resolve));
    try {
      await expect(ServiceClient.start('127.0.0.1', { host: 'root', udpPort: taken.address().port, startTimeoutMs: 15_000 })).rejects.toThrow(/service client \(in root\): exited .*EADDRINUSE|udp socket/s);
    } finally {
      taken.close();
    }
  });
});
