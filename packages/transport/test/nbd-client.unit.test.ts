// The client's state machine against a scripted fake server over an in-memory Duplex pair: the
// handshake's decisions, reply assembly, deadlines and failure propagation. The real server
// (qemu-nbd) is exercised in nbd-qemu.int.test.ts.
import { duplexPair, type Duplex } from 'node:stream';
import { describe, expect, it } from 'vitest';
import {
  NbdClient,
  NbdCmd,
  NbdError,
  NbdOpt,
  NbdProtocolError,
  NbdRep,
  decodeRequest,
  encodeBlockStatus,
  encodeGreeting,
  encodeInfoExport,
  encodeMetaContext,
  encodeOffsetData,
  encodeOffsetHole,
  encodeOptionReply,
  encodeErrorChunk,
  readExtents,
  dirtyExtents,
  type NbdRequest,
} from '../src/index.js';

/** The server end: reads exactly n bytes of what the client sent. */
class Peer {
  private buf = Buffer.alloc(0);
  private wake: (() => void) | undefined;
  ended = false;
  constructor(readonly io: Duplex) {
    io.on('data', (c: Buffer) => {
      this.buf = Buffer.concat([this.buf, c]);
      this.wake?.();
    });
    io.on('end', () => {
      this.ended = true;
      this.wake?.();
    });
  }
  async take(n: number): Promise<Buffer> {
    while (this.buf.length < n) {
      if (this.ended) throw new Error(`client closed with ${this.buf.length}/${n} bytes`);
      await new Promise<void>((r) => (this.wake = r));
    }
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }
  async option(): Promise<{ option: number; data: Buffer }> {
    const h = await this.take(16);
    expect(h.subarray(0, 8).toString()).toBe('IHAVEOPT');
    return { option: h.readUInt32BE(8), data: await this.take(h.readUInt32BE(12)) };
  }
  async request(): Promise<Required<NbdRequest>> {
    return decodeRequest(await this.take(28));
  }
  send(...bufs: Buffer[]): void {
    this.io.write(Buffer.concat(bufs));
  }
}

const SIZE = 1 << 20;

/** The error a promise rejects with; a test failure if it resolves. */
function rejection<E extends Error = NbdError>(p: Promise<unknown>): Promise<E> {
  return p.then(
    (v) => {
      throw new Error(`expected a rejection, got ${String(v)}`);
    },
    (e: unknown) => e as E,
  );
}

/** A server that negotiates like QEMU: structured replies, contexts by name, GO with the export. */
async function serve(peer: Peer, exportName = 'vda', offered = ['base:allocation', 'qemu:dirty-bitmap:b']): Promise<void> {
  peer.send(encodeGreeting(3));
  expect((await peer.take(4)).readUInt32BE(0)).toBe(3); // C_FIXED_NEWSTYLE | C_NO_ZEROES
  for (;;) {
    const { option, data } = await peer.option();
    if (option === NbdOpt.STRUCTURED_REPLY) peer.send(encodeOptionReply(option, NbdRep.ACK));
    else if (option === NbdOpt.SET_META_CONTEXT) {
      const n = data.readUInt32BE(0);
      let p = 4 + n + 4;
      const queries: string[] = [];
      for (let i = 0; i < data.readUInt32BE(4 + n); i++) {
        const len = data.readUInt32BE(p);
        queries.push(data.toString('utf8', p + 4, p + 4 + len));
        p += 4 + len;
      }
      queries.forEach((q) => offered.includes(q) && peer.send(encodeOptionReply(option, NbdRep.META_CONTEXT, encodeMetaContext(offered.indexOf(q) + 1, q))));
      peer.send(encodeOptionReply(option, NbdRep.ACK));
    } else if (option === NbdOpt.GO) {
      const name = data.toString('utf8', 4, 4 + data.readUInt32BE(0));
      if (name !== exportName) {
        peer.send(encodeOptionReply(option, NbdRep.ERR_UNKNOWN, Buffer.from(`export '${name}' not present`)));
        continue;
      }
      peer.send(encodeOptionReply(option, NbdRep.INFO, encodeInfoExport(SIZE, 3)), encodeOptionReply(option, NbdRep.ACK));
      return;
    } else if (option === NbdOpt.ABORT) {
      peer.send(encodeOptionReply(option, NbdRep.ACK));
      peer.io.end();
      return;
    }
  }
}

async function connected(options: { requestTimeoutMs?: number; metaContexts?: string[] } = {}): Promise<{ client: NbdClient; peer: Peer }> {
  const [a, b] = duplexPair();
  const peer = new Peer(b);
  const server = serve(peer);
  const client = await NbdClient.connect(a, { exportName: 'vda', metaContexts: ['base:allocation', 'qemu:dirty-bitmap:b'], label: 'fake', ...options });
  await server;
  return { client, peer };
}

describe('NbdClient against a scripted server', () => {
  it('negotiates size and contexts, and assembles reads from chunks in any order, holes zeroed', async () => {
    const { client, peer } = await connected();
    expect(client.size).toBe(SIZE);
    expect([...client.contexts]).toEqual([['base:allocation', 1], ['qemu:dirty-bitmap:b', 2]]);
    const r1 = client.read(4096, 8192);
    const r2 = client.read(0, 4);
    const q1 = await peer.request();
    const q2 = await peer.request();
    expect([q1.command, q1.offset, q1.length, q2.offset]).toEqual([NbdCmd.READ, 4096, 8192, 0]);
    // Replies interleaved and out of order: r2 first, then r1 as data-hole-data.
    const a = Buffer.alloc(1000, 0xaa);
    const c = Buffer.alloc(8192 - 3000, 0xcc);
    peer.send(
      encodeOffsetData(q1.cookie, 4096 + 3000, c, false),
      encodeOffsetData(q2.cookie, 0, Buffer.from('abcd'), true),
      encodeOffsetHole(q1.cookie, 4096 + 1000, 2000, false),
      encodeOffsetData(q1.cookie, 4096, a, true),
    );
    expect((await r2).toString()).toBe('abcd');
    expect(await r1).toEqual(Buffer.concat([a, Buffer.alloc(2000), c]));
    const closed = client.close();
    expect((await peer.request()).command).toBe(NbdCmd.DISC);
    peer.io.end();
    await closed;
    await expect(client.read(0, 1)).rejects.toThrow(/was closed/);
  });

  it('walks dirty extents across replies that stop short, and reads them in order', async () => {
    const { client, peer } = await connected();
    const walked = (async () => {
      const out = [];
      for await (const e of readExtents(client, dirtyExtents(client, { bitmap: 'qemu:dirty-bitmap:b', maxLength: 3000 }), { concurrency: 2 })) out.push(e);
      return out;
    })();
    // First reply: base:allocation covers 8 KiB, the bitmap only 4 KiB → the walk asks again from 4 KiB.
    let q = await peer.request();
    expect([q.command, q.offset, q.length]).toEqual([NbdCmd.BLOCK_STATUS, 0, SIZE]);
    peer.send(
      encodeBlockStatus(q.cookie, 1, [{ length: 2048, flags: 0 }, { length: 6144, flags: 3 }], false),
      encodeBlockStatus(q.cookie, 2, [{ length: 1024, flags: 0 }, { length: 3072, flags: 1 }], true),
    );
    // The read of the first dirty data goes out as soon as it is known, before the walk goes on.
    const read = await peer.request();
    expect([read.command, read.offset, read.length]).toEqual([NbdCmd.READ, 1024, 1024]);
    q = await peer.request();
    expect([q.command, q.offset, q.length]).toEqual([NbdCmd.BLOCK_STATUS, 4096, SIZE - 4096]);
    peer.send(
      encodeBlockStatus(q.cookie, 1, [{ length: SIZE, flags: 3 }], false), // reaches past the end: clipped
      encodeBlockStatus(q.cookie, 2, [{ length: 1024, flags: 1 }, { length: SIZE - 5120, flags: 0 }], true),
    );
    // Dirty: [1024, 5120). Data [1024, 2048), zero [2048, 5120) split at 3000.
    peer.send(encodeOffsetData(read.cookie, 1024, Buffer.alloc(1024, 7), true));
    expect(await walked).toEqual([
      { offset: 1024, length: 1024, data: Buffer.alloc(1024, 7) },
      { offset: 2048, length: 3000 },
      { offset: 5048, length: 72 },
    ]);
  });

  it('fails a command with the server errno and message, and the connection stays usable', async () => {
    const { client, peer } = await connected();
    const r = client.read(0, 512);
    const q = await peer.request();
    peer.send(encodeErrorChunk(q.cookie, 5, 'I/O error reading sector', false, 256), encodeOffsetHole(q.cookie, 0, 256, true));
    const e = await rejection(r);
    expect(e).toBeInstanceOf(NbdError);
    expect(e.code).toBe('COMMAND_FAILED');
    expect(e.message).toBe("NBD_CMD_READ of 512 bytes at 0 on export 'vda' at fake failed: EIO at offset 256: I/O error reading sector");
    const r2 = client.read(0, 1);
    const q2 = await peer.request();
    peer.send(encodeOffsetData(q2.cookie, 0, Buffer.from([9]), true));
    expect(await r2).toEqual(Buffer.from([9]));
  });

  it('a request past its deadline fails with TIMEOUT and takes the connection down with it', async () => {
    const { client, peer } = await connected({ requestTimeoutMs: 200 });
    const t0 = Date.now();
    const slow = rejection(client.read(0, 512));
    const other = rejection(client.read(512, 512, { timeoutMs: 60_000 }));
    await peer.request();
    const [e1, e2] = await Promise.all([slow, other]);
    expect(Date.now() - t0).toBeLessThan(2_000);
    expect(e1.code).toBe('TIMEOUT');
    expect(e1.message).toMatch(/NBD_CMD_READ of 512 bytes at 0 on export 'vda' at fake got no complete reply within 200 ms/);
    expect(e2.code).toBe('DISCONNECTED');
    expect(e2.message).toMatch(/NBD_CMD_READ of 512 bytes at 512 failed: .*within 200 ms/);
    await expect(client.read(0, 1)).rejects.toMatchObject({ code: 'DISCONNECTED' });
  });

  it('the server closing fails every request in flight at once, naming the cut', async () => {
    const { client, peer } = await connected();
    const reads = [client.read(0, 4096), client.read(4096, 4096)].map((p) => rejection(p));
    const q = await peer.request();
    peer.send(encodeOffsetData(q.cookie, 0, Buffer.alloc(4096), true).subarray(0, 100));
    peer.io.end();
    for (const e of await Promise.all(reads)) {
      expect(e).toBeInstanceOf(NbdError);
      expect(e.code).toBe('DISCONNECTED');
      expect(e.message).toMatch(/NBD server fake closed the connection \(transmission\) \(nbd: the stream ends 4024 bytes before the end of the OFFSET_DATA chunk/);
    }
  });

  it('a reply that breaks the protocol fails its request with the coded error', async () => {
    const { client, peer } = await connected();
    const r = rejection<NbdProtocolError>(client.read(0, 4096));
    const other = rejection(client.read(0, 16));
    const q = await peer.request();
    // Overlapping content chunks: both legal alone, together the read's bytes are ambiguous.
    peer.send(encodeOffsetData(q.cookie, 0, Buffer.alloc(3000), false), encodeOffsetData(q.cookie, 2000, Buffer.alloc(2096), true));
    const e = await r;
    expect(e).toBeInstanceOf(NbdProtocolError);
    expect(e.code).toBe('BAD_REPLY');
    expect(e.message).toMatch(/the reply to NBD_CMD_READ of 4096 bytes at 0 overlaps itself at 2000/);
    expect((await other).code).toBe('DISCONNECTED');
  });

  it('an unknown export is named in the error, and the client aborts politely', async () => {
    const [a, b] = duplexPair();
    const peer = new Peer(b);
    const server = serve(peer, 'vda');
    const e = await rejection(NbdClient.connect(a, { exportName: 'nope', label: 'fake' }));
    expect(e.code).toBe('EXPORT_UNKNOWN');
    expect(e.message).toBe("NBD server fake has no export 'nope' (NBD_OPT_GO answered NBD_REP_ERR_UNKNOWN: export 'nope' not present)");
    await server; // it received NBD_OPT_ABORT
  });

  it('a metadata context the export does not offer is a clear error', async () => {
    const [a, b] = duplexPair();
    const server = serve(new Peer(b)).catch(() => undefined);
    const e = await rejection(NbdClient.connect(a, { exportName: 'vda', metaContexts: ['base:allocation', 'qemu:dirty-bitmap:gone'], label: 'fake' }));
    expect(e.code).toBe('CONTEXT_UNAVAILABLE');
    expect(e.message).toBe("export 'vda' at fake does not offer metadata context 'qemu:dirty-bitmap:gone' (the server selected: base:allocation)");
    await server;
  });

  it('a silent server fails the handshake at its deadline', async () => {
    const [a] = duplexPair();
    const t0 = Date.now();
    const e = await rejection(NbdClient.connect(a, { exportName: 'vda', handshakeTimeoutMs: 150, label: 'fake' }));
    expect(Date.now() - t0).toBeLessThan(2_000);
    expect(e.code).toBe('TIMEOUT');
    expect(e.message).toBe("NBD handshake with fake for export 'vda' did not finish within 150 ms (waiting for the server greeting)");
  });

  it('a missing socket is a clear error', async () => {
    const e = await rejection(NbdClient.connect('/nonexistent/nbd.sock', { exportName: 'vda' }));
    expect(e.code).toBe('DISCONNECTED');
    expect(e.message).toMatch(/NBD connection to unix:\/nonexistent\/nbd.sock failed .*ENOENT/);
  });
});
