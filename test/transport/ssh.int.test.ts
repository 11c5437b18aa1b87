import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { once } from 'node:events';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SshConnection, SshError } from '@ftvm/transport';
import { cutLink, freezeHost, labUp, restoreLink, thawHost } from '../lab/lab.js';
import { labSshEndpoint } from '../support/lab-ssh.js';

// ssh2 against the backup's real OpenSSH sshd, across the lab bridge.
beforeAll(async () => {
  await labUp();
});
afterAll(async () => {
  await thawHost('backup');
  await restoreLink('backup');
});

async function run(ssh: SshConnection, command: string): Promise<string> {
  const channel = await ssh.exec(command);
  let out = '';
  channel.on('data', (chunk: Buffer) => (out += chunk.toString()));
  await once(channel, 'close');
  return out;
}

describe('SshConnection to a lab host', () => {
  it('authenticates with the lab key against the pinned host key and runs a command', async () => {
    const ssh = await SshConnection.connect(labSshEndpoint('backup'));
    expect((await run(ssh, 'hostname')).trim()).toBe('backup');
    ssh.close();
  });

  it('refuses a host whose key does not match the pinned one', async () => {
    const endpoint = { ...labSshEndpoint('backup'), hostKeyFingerprint: 'SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA' };
    const error = await SshConnection.connect(endpoint).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(SshError);
    expect(error).toMatchObject({ stage: 'host-key' });
    expect((error as Error).message).toContain('does not match the pinned');
  });

  it('reports a key the server does not accept as an authentication error', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ftvm-key-'));
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', path.join(dir, 'k')]);
    const endpoint = { ...labSshEndpoint('backup'), privateKey: fs.readFileSync(path.join(dir, 'k')) };
    fs.rmSync(dir, { recursive: true });
    const error = await SshConnection.connect(endpoint).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(SshError);
    expect(error).toMatchObject({ stage: 'auth' });
  });

  it('times out connecting to a host cut off the network', async () => {
    await cutLink('backup');
    try {
      const started = Date.now();
      const error = await SshConnection.connect(labSshEndpoint('backup'), { readyTimeoutMs: 1_500 }).catch((e: unknown) => e);
      expect(error).toBeInstanceOf(SshError);
      expect(Date.now() - started).toBeLessThan(5_000);
    } finally {
      await restoreLink('backup');
    }
  });

  it('notices a frozen peer through keepalives', async () => {
    const ssh = await SshConnection.connect(labSshEndpoint('backup'), { keepaliveIntervalMs: 300, keepaliveCountMax: 2 });
    const closed = new Promise<string>((resolve) => ssh.onClose(resolve));
    await freezeHost('backup');
    try {
      const started = Date.now();
      const reason = await Promise.race([closed, new Promise<string>((r) => setTimeout(() => r('still open'), 5_000))]);
      expect(reason).not.toBe('still open');
      expect(Date.now() - started).toBeLessThan(5_000);
      expect(ssh.isOpen).toBe(false);
    } finally {
      await thawHost('backup');
    }
  });

  it('carries 64 MiB through a channel with backpressure, intact', async () => {
    const ssh = await SshConnection.connect(labSshEndpoint('backup'));
    const channel = await ssh.exec('sha256sum');
    let out = '';
    channel.on('data', (chunk: Buffer) => (out += chunk.toString()));
    const { createHash } = await import('node:crypto');
    const hash = createHash('sha256');
    for (let i = 0; i < 64; i++) {
      const block = Buffer.alloc(1024 * 1024, i); // a fresh buffer: the channel keeps a reference until sent
      hash.update(block);
      if (!channel.write(block)) await once(channel, 'drain');
    }
    channel.end();
    await once(channel, 'close');
    expect(out.split(/\s/)[0]).toBe(hash.digest('hex'));
    ssh.close();
  });

  it('reports a private key it cannot parse', async () => {
    const error = await SshConnection.connect({ ...labSshEndpoint('backup'), privateKey: 'not a key' }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(SshError);
    expect((error as Error).message).toContain('bad private key');
  });
});
