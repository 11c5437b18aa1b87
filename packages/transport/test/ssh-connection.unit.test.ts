import net from 'node:net';
import { once } from 'node:events';
import { generateKeyPairSync } from 'node:crypto';
import { afterEach, describe, expect, it } from 'vitest';
import { SshConnection, SshError } from '../src/ssh/index.js';

// A peer that accepts TCP and never speaks SSH (a host half-way through a partition, a wedged sshd).
let server: net.Server | undefined;
afterEach(() => server?.close());

async function silentPeer(): Promise<number> {
  const sockets: net.Socket[] = [];
  server = net.createServer((socket) => sockets.push(socket));
  server.on('close', () => sockets.forEach((s) => s.destroy()));
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return (server.address() as net.AddressInfo).port;
}

describe('SshConnection.connect', () => {
  it('rejects at the handshake deadline, and the errors ssh2 emits while the attempt is torn down are not thrown at the process', async () => {
    const port = await silentPeer();
    const privateKey = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ type: 'pkcs1', format: 'pem' }).toString();
    const uncaught: Error[] = [];
    const record = (error: Error) => uncaught.push(error);
    process.on('uncaughtException', record);
    try {
      const attempt = SshConnection.connect(
        { host: '127.0.0.1', port, username: 'ftvm', privateKey, hostKeyFingerprint: 'SHA256:none' },
        { readyTimeoutMs: 300 },
      );
      await expect(attempt).rejects.toThrow(SshError);
      await expect(attempt).rejects.toMatchObject({ stage: 'connect' });
      await new Promise((r) => setTimeout(r, 300)); // what the torn-down client emits comes after
      expect(uncaught.map((e) => e.message)).toEqual([]);
    } finally {
      process.off('uncaughtException', record);
    }
  });
});
