import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { QmpClient } from '../src/qmp-client.js';
import {
  QmpCommandError,
  QmpConnectionClosedError,
  QmpProtocolError,
  QmpTimeoutError,
} from '../src/errors.js';
import { actLikeQemu, FakePeer } from './fake-peer.js';

let peer: FakePeer;
afterEach(async () => peer?.close());

async function connected(): Promise<QmpClient> {
  peer = await FakePeer.listen();
  actLikeQemu(peer);
  return QmpClient.connect({ path: peer.path }, { connectTimeoutMs: 2000, commandTimeoutMs: 500 });
}

describe('QmpClient against a scripted peer', () => {
  it('negotiates oob when offered', async () => {
    const client = await connected();
    expect(peer.received[0]).toMatchObject({ execute: 'qmp_capabilities', arguments: { enable: ['oob'] } });
    expect(client.oobEnabled).toBe(true);
    expect(client.greeting?.QMP.version.qemu.major).toBe(7);
    await client.close();
  });

  it('matches replies by id even out of order, with events interleaved and chunks split', async () => {
    const client = await connected();
    const events: string[] = [];
    client.onEvent((e) => events.push(`${e.event}@${e.timestampNs}`));
    const first = client.execute('query-status');
    const second = client.execute('query-name');
    const a = await peer.messageAt(1);
    const b = await peer.messageAt(2);
    const text =
      `{"return": {"name": "vm"}, "id": "${String(b['id'])}"}\r\n` +
      '{"timestamp": {"seconds": 1732990000, "microseconds": 42}, "event": "STOP"}\r\n' +
      `{"return": {"status": "paused"}, "id": "${String(a['id'])}"}\r\n`;
    for (let i = 0; i < text.length; i += 7) await peer.send(text.slice(i, i + 7));
    await expect(first).resolves.toEqual({ status: 'paused' });
    await expect(second).resolves.toEqual({ name: 'vm' });
    expect(events).toEqual(['STOP@1732990000000042000']);
    await client.close();
  });

  it('turns an error reply into a typed error naming the command', async () => {
    const client = await connected();
    peer.onMessage = (m, p) =>
      void p.send(`${JSON.stringify({ error: { class: 'CommandNotFound', desc: 'nope' }, id: m['id'] })}\n`);
    const error = await client.execute('no-such-command').catch((e: unknown) => e);
    expect(error).toBeInstanceOf(QmpCommandError);
    expect(error).toMatchObject({ command: 'no-such-command', errorClass: 'CommandNotFound', desc: 'nope' });
    await client.close();
  });

  it('times out a command that gets no reply and stays usable', async () => {
    const client = await connected();
    peer.onMessage = undefined;
    await expect(client.execute('query-status', undefined, { timeoutMs: 50 })).rejects.toBeInstanceOf(QmpTimeoutError);
    peer.onMessage = (m, p) => void p.send(`${JSON.stringify({ return: 1, id: m['id'] })}\n`);
    await expect(client.execute('query-status')).resolves.toBe(1);
    await client.close();
  });

  it('fails outstanding commands at once when the peer dies mid-command', async () => {
    const client = await connected();
    peer.onMessage = () => void peer.socket().then((s) => s.destroy());
    const started = Date.now();
    const error = await client.execute('migrate', { uri: 'x' }, { timeoutMs: 5000 }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(QmpConnectionClosedError);
    expect((error as Error).message).toContain('migrate');
    expect(Date.now() - started).toBeLessThan(2000);
    await expect(client.execute('query-status')).rejects.toBeInstanceOf(QmpConnectionClosedError);
  });

  it('fails with a protocol error on a garbage line instead of hanging', async () => {
    const client = await connected();
    peer.onMessage = () => void peer.send('garbage\n');
    const error = await client.execute('query-status', undefined, { timeoutMs: 5000 }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(QmpProtocolError);
    expect((error as Error).message).toContain('garbage');
  });

  it('waits for an event with a deadline', async () => {
    const client = await connected();
    const resume = client.waitForEvent('RESUME', { timeoutMs: 1000 });
    await peer.send('{"timestamp": {"seconds": 5, "microseconds": 6}, "event": "RESUME"}\n');
    await expect(resume).resolves.toMatchObject({ event: 'RESUME', timestampNs: 5_000_006_000n });
    await expect(client.waitForEvent('SHUTDOWN', { timeoutMs: 30 })).rejects.toBeInstanceOf(QmpTimeoutError);
    await client.close();
  });

  it('connects once a starting QEMU listens, and gives up at the deadline with the reason', async () => {
    const socketPath = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'ftvm-qmp-')), 'late.sock');
    const connecting = QmpClient.connectWhenReady({ path: socketPath }, { timeoutMs: 5_000, retryMs: 20 });
    await new Promise((r) => setTimeout(r, 200)); // QEMU is still starting: no socket yet
    peer = await FakePeer.listen(socketPath);
    actLikeQemu(peer);
    const client = await connecting;
    expect(peer.received[0]).toMatchObject({ execute: 'qmp_capabilities' });
    await client.close();

    await expect(QmpClient.connectWhenReady({ path: '/nonexistent/qmp.sock' }, { timeoutMs: 300 })).rejects.toThrow(
      /no QMP on .*\/nonexistent\/qmp.sock within 300 ms: .*ENOENT/,
    );
  });

  it('gives a clear error when nothing listens', async () => {
    await expect(QmpClient.connect({ path: '/nonexistent/qmp.sock' })).rejects.toThrow('/nonexistent/qmp.sock');
    peer = await FakePeer.listen(); // for afterEach
  });
});
