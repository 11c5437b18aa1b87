import { execFileSync } from 'node:child_process';
import dgram from 'node:dgram';
import { afterEach, describe, expect, it } from 'vitest';
import {
  Command,
  ProbeClient,
  ProbeError,
  clockOffset,
  decodeReply,
  encodeRequest,
  hostRealtimeNs,
  offsetFromExchange,
  realtimeAnchorNs,
  setSpin,
  stepGuestClock,
  type ProbeReply,
} from '../support/probe-client.js';

/**
 * In-process stand-in for probe.c: same wire format, a clock `offsetNs` ahead of the host. By
 * default an old probe (64-byte replies, no SPIN: it drops the command); with `spin` set, today's
 * 128-byte replies whose spin counter advances 1000 per reply while on.
 */
class FakeProbe {
  readonly socket = dgram.createSocket('udp4');
  received: Buffer[] = [];
  executed: bigint[] = [];
  dropNext = 0;
  spin: { on: boolean; counter: bigint } | undefined;
  private lastId: bigint | undefined;

  constructor(private offsetNs: bigint) {}

  async start(): Promise<{ host: string; port: number }> {
    this.socket.on('message', (msg, peer) => this.onMessage(msg, peer));
    await new Promise<void>((resolve) => this.socket.bind(0, '127.0.0.1', resolve));
    return { host: '127.0.0.1', port: this.socket.address().port };
  }

  private onMessage(msg: Buffer, peer: dgram.RemoteInfo): void {
    this.received.push(msg);
    if (this.dropNext > 0) return void this.dropNext--;
    const command = msg.readUInt8(5);
    const id = msg.readBigUInt64LE(8);
    const arg = msg.readBigInt64LE(16);
    const rx = hostRealtimeNs() + this.offsetNs;
    if (command === Command.spin && !this.spin) return; // an old probe: unknown command, no reply
    if (command === Command.step && id !== this.lastId) {
      this.offsetNs += arg;
      this.executed.push(arg);
      this.lastId = id;
    }
    if (command === Command.spin && id !== this.lastId) {
      this.spin!.on = arg === 1n;
      this.executed.push(arg);
      this.lastId = id;
    }
    const reply = Buffer.alloc(this.spin ? 128 : 64);
    if (this.spin) {
      if (this.spin.on) this.spin.counter += 1000n;
      reply.writeBigUInt64LE(this.spin.counter, 120);
      reply.writeUInt8(1 | (this.spin.on ? 2 : 0), 127);
    }
    reply.write('FTVP', 0);
    reply.writeUInt8(1, 4);
    reply.writeUInt8(command | 0x80, 5);
    reply.writeBigUInt64LE(id, 8);
    reply.writeBigInt64LE(rx, 16);
    reply.writeBigInt64LE(hostRealtimeNs() + this.offsetNs, 24);
    reply.writeBigUInt64LE(42n, 40);
    this.socket.send(Buffer.from('garbage before the reply'), peer.port, peer.address);
    this.socket.send(reply, peer.port, peer.address);
  }

  close(): void {
    this.socket.close();
  }
}

const fakes: FakeProbe[] = [];
afterEach(() => fakes.splice(0).forEach((f) => f.close()));
async function fake(offsetNs: bigint): Promise<[FakeProbe, { host: string; port: number }]> {
  const probe = new FakeProbe(offsetNs);
  fakes.push(probe);
  return [probe, await probe.start()];
}

describe('wire format', () => {
  it('encodes a request', () => {
    const buf = encodeRequest(Command.step, 7n, -123_456_000n);
    expect(buf.length).toBe(24);
    expect(buf.subarray(0, 4).toString()).toBe('FTVP');
    expect([buf[4], buf[5]]).toEqual([1, Command.step]);
    expect(buf.readBigUInt64LE(8)).toBe(7n);
    expect(buf.readBigInt64LE(16)).toBe(-123_456_000n);
  });

  it('rejects anything that is not a reply', () => {
    const reply = Buffer.alloc(64);
    reply.write('FTVP', 0);
    reply.writeUInt8(1, 4);
    reply.writeUInt8(Command.time | 0x80, 5);
    expect(decodeReply(reply)).toMatchObject({ command: Command.time, status: 0 });
    expect(decodeReply(reply.subarray(0, 63))).toBeUndefined();
    expect(decodeReply(Buffer.concat([Buffer.from('XXXX'), reply.subarray(4)]))).toBeUndefined();
    reply.writeUInt8(Command.time, 5); // a request echoed back is not a reply
    expect(decodeReply(reply)).toBeUndefined();
    reply.writeUInt8(0x80 | 9, 5);
    expect(decodeReply(reply)).toBeUndefined();
  });

  it('reads the spin counter from byte 120 when the flags byte says the probe has one', () => {
    const reply = Buffer.alloc(128);
    reply.write('FTVP', 0);
    reply.writeUInt8(1, 4);
    reply.writeUInt8(Command.time | 0x80, 5);
    const older = decodeReply(reply); // a probe from before the spin worker: bytes 120..127 zero
    expect(older?.disk).toBeDefined();
    expect(older).not.toHaveProperty('spinCounter');
    expect(older).not.toHaveProperty('spinOn');
    reply.writeBigUInt64LE((1n << 56n) - 1n, 120); // the largest 56-bit count
    reply.writeUInt8(1 | 2, 127); // present, on; the flags are not part of the count
    expect(decodeReply(reply)).toMatchObject({ spinCounter: (1n << 56n) - 1n, spinOn: true });
    reply.writeUInt8(1, 127);
    expect(decodeReply(reply)).toMatchObject({ spinOn: false });
    reply.writeUInt8(Command.spin | 0x80, 5);
    expect(decodeReply(reply)?.command).toBe(Command.spin);
  });
});

describe('offset arithmetic', () => {
  const reply = (rx: bigint, tx: bigint): ProbeReply => ({
    command: Command.time, status: 0, id: 1n, rxRealtimeNs: rx, realtimeNs: tx, monotonicNs: 0n,
    workloadCounter: 0n, workloadMiBps: 0, badPackets: 0, bootId: 0n,
  });

  it('uses both guest stamps: error is half the delay without the guest turnaround', () => {
    // Guest 1 s ahead; 100 µs each way; guest holds the request 300 µs.
    const sample = offsetFromExchange({ reply: reply(1_000_100_000n, 1_000_400_000n), sentMonoNs: 0n, receivedMonoNs: 500_000n }, 0n);
    expect(sample).toMatchObject({ offsetNs: 1_000_000_000n, errorNs: 100_000n, rttNs: 500_000n });
  });

  it('falls back to the reply stamp alone when the receive stamp is inconsistent', () => {
    const sample = offsetFromExchange({ reply: reply(9n, 1_000_250_000n), sentMonoNs: 0n, receivedMonoNs: 500_000n }, 0n);
    expect(sample).toMatchObject({ offsetNs: 1_000_000_000n, errorNs: 250_000n });
  });
});

describe('host realtime', () => {
  it('brackets an independent CLOCK_REALTIME reading (date +%s%N) between two of its own', () => {
    const anchor = realtimeAnchorNs();
    const before = hostRealtimeNs(anchor);
    const fromDate = BigInt(execFileSync('date', ['+%s%N'], { encoding: 'utf8' }).trim());
    const after = hostRealtimeNs(anchor);
    const slack = 20_000n; // the anchor is good to a few µs; allow some margin
    expect(fromDate).toBeGreaterThanOrEqual(before - slack);
    expect(fromDate).toBeLessThanOrEqual(after + slack);
  });
});

describe('ProbeClient against a fake probe', () => {
  it('measures a known offset within its error bound', async () => {
    const [, target] = await fake(5_000_000_000n);
    const result = await clockOffset(target, { samples: 8 });
    expect(result.samples).toBe(8);
    expect(result.workloadCounter).toBe(42n);
    const miss = result.offsetNs - 5_000_000_000n;
    expect(miss < 0n ? -miss : miss).toBeLessThanOrEqual(result.errorNs + 50_000n);
    expect(result.errorNs).toBeLessThan(5_000_000n);
  });

  it('retries a lost STEP with the same id, so the probe runs it once', async () => {
    const [probe, target] = await fake(0n);
    probe.dropNext = 1;
    await stepGuestClock(target, 250_000_000n, { requestTimeoutMs: 50, timeoutMs: 2_000 });
    expect(probe.received).toHaveLength(2);
    expect(probe.received[0]!.readBigUInt64LE(8)).toBe(probe.received[1]!.readBigUInt64LE(8));
    expect(probe.executed).toEqual([250_000_000n]);
  });

  it('gives TIME retries fresh ids, so a late reply cannot pair with the wrong send stamp', async () => {
    const [probe, target] = await fake(0n);
    probe.dropNext = 2;
    const client = await ProbeClient.open(target);
    try {
      await client.request(Command.time, 0n, { requestTimeoutMs: 50, timeoutMs: 2_000 });
    } finally {
      client.close();
    }
    const ids = new Set(probe.received.map((m) => m.readBigUInt64LE(8)));
    expect(ids.size).toBe(3);
  });

  it('switches the spin worker, retrying a lost SPIN with its id, and reports its counter', async () => {
    const [probe, target] = await fake(0n);
    probe.spin = { on: false, counter: 0n };
    expect(await clockOffset(target, { samples: 2 })).toMatchObject({ spinCounter: 0n, spinOn: false });
    probe.dropNext = 1;
    const on = await setSpin(target, true, { requestTimeoutMs: 50, timeoutMs: 2_000 });
    expect(on).toMatchObject({ command: Command.spin, spinOn: true });
    expect(probe.received).toHaveLength(4);
    expect(probe.received[2]!.readBigUInt64LE(8)).toBe(probe.received[3]!.readBigUInt64LE(8));
    expect(probe.received[3]!.readBigInt64LE(16)).toBe(1n);
    const running = await clockOffset(target, { samples: 2 });
    expect(running.spinCounter).toBeGreaterThan(on.spinCounter!);
    await setSpin(target, false);
    const stopped = await clockOffset(target, { samples: 2 });
    expect(stopped.spinOn).toBe(false);
    expect((await clockOffset(target, { samples: 2 })).spinCounter).toBe(stopped.spinCounter);
    expect(probe.executed).toEqual([1n, 0n]);
  });

  it('says so when a probe from before the spin worker ignores SPIN, and reports no spin counter', async () => {
    const [, target] = await fake(0n);
    expect(await clockOffset(target, { samples: 1 })).not.toHaveProperty('spinCounter');
    const client = await ProbeClient.open(target);
    try {
      const error = await client.setSpin(true, { timeoutMs: 300, requestTimeoutMs: 100 }).catch((e: unknown) => e);
      expect(error).toBeInstanceOf(ProbeError);
      expect((error as Error).message).toMatch(/no answer to SPIN within 300 ms .*built before the spin worker/);
    } finally {
      client.close();
    }
  });

  it('fails with a clear error by the deadline when nobody answers', async () => {
    const [probe, target] = await fake(0n);
    probe.dropNext = Infinity;
    const started = performance.now();
    const error = await clockOffset(target, { timeoutMs: 400, requestTimeoutMs: 100 }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(ProbeError);
    expect((error as Error).message).toMatch(/no answer to TIME within 400 ms/);
    expect(performance.now() - started).toBeLessThan(1_000);
  });
});
