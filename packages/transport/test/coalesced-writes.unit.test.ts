import net from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { coalesceWrites } from '../src/ssh/coalesced-writes.js';

let server: net.Server | undefined;
afterEach(() => server?.close());

describe('coalesceWrites', () => {
  it('hands one event-loop turn of writes to the kernel as one writev, in order and intact', async () => {
    const received: Buffer[] = [];
    const got = new Promise<Buffer>((resolve) => {
      server = net.createServer((peer) => {
        peer.on('data', (d: Buffer) => received.push(d));
        peer.on('end', () => resolve(Buffer.concat(received)));
      });
    });
    await new Promise<void>((r) => server!.listen(0, '127.0.0.1', r));
    const socket = coalesceWrites(net.connect((server!.address() as net.AddressInfo).port, '127.0.0.1'));
    await new Promise((r) => socket.once('connect', r));
    const batches: number[] = [];
    const writev = (socket as unknown as { _writev: (chunks: unknown[], cb: () => void) => void })._writev.bind(socket);
    (socket as unknown as { _writev: typeof writev })._writev = (chunks, cb) => (batches.push(chunks.length), writev(chunks, cb));

    const packets = Array.from({ length: 10 }, (_, i) => Buffer.alloc(32 * 1024, i));
    for (const p of packets) socket.write(p); // what ssh2 does for one 320 KiB channel write
    await new Promise((r) => setImmediate(r));
    socket.write(Buffer.from('next turn'));
    socket.end();
    const all = await got;
    expect(batches[0]).toBe(10);
    expect(all.equals(Buffer.concat([...packets, Buffer.from('next turn')]))).toBe(true);
  });
});
