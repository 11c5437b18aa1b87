import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { $ } from 'zx';
import {
  cutLink,
  execIn,
  freezeHost,
  hostInfo,
  killHost,
  labDown,
  labKnownHosts,
  labLeftovers,
  labRemoteLibvirtUri,
  labSshKey,
  labStatus,
  labUp,
  restartHost,
  restoreLink,
  thawHost,
} from './lab.js';

$.quiet = true;

/** ssh from inside one lab host to another, with the pinned host keys and a short deadline. */
const sshFrom = (from: 'primary' | 'backup', toIp: string) =>
  execIn(from, [
    'ssh', '-i', labSshKey(), '-o', `UserKnownHostsFile=${labKnownHosts()}`, '-o', 'StrictHostKeyChecking=yes',
    '-o', 'BatchMode=yes', '-o', 'ConnectTimeout=2', `root@${toIp}`, 'hostname',
  ], { timeoutMs: 10_000 }).nothrow();

beforeAll(async () => {
  await labUp();
});
afterAll(async () => {
  await thawHost('primary').catch(() => undefined);
  await labUp(); // leave a healthy lab for the next file (scripts/test.sh tears it down at the end)
});

describe('lab hosts', () => {
  it('brings up three hosts, each with its own libvirtd and sshd', async () => {
    const status = await labStatus();
    expect(status.map((h) => [h.name, h.libvirt, h.ssh])).toEqual([
      ['primary', true, true],
      ['backup', true, true],
      ['witness', true, true],
    ]);
    for (const name of ['primary', 'backup', 'witness'] as const) {
      const out = await $`virsh -c ${hostInfo(name).libvirtUri} hostname`;
      expect(out.stdout.trim()).toBe(name); // each libvirtd lives in its host's own UTS namespace
    }
    const ssh = await sshFrom('primary', hostInfo('backup').ip);
    expect(ssh.stdout.trim()).toBe('backup');
    const remote = await execIn('primary', ['virsh', '-c', labRemoteLibvirtUri('backup'), 'hostname']);
    expect(remote.stdout.trim()).toBe('backup');
  });

  it('keeps each host in its own /run', async () => {
    const primaryRun = (await execIn('primary', ['cat', '/run/libvirtd.pid'])).stdout.trim();
    const backupRun = (await execIn('backup', ['cat', '/run/libvirtd.pid'])).stdout.trim();
    expect(primaryRun).not.toBe(backupRun);
  });

  it('is a no-op to bring up again', async () => {
    const holder = hostInfo('primary').holderPid;
    const started = Date.now();
    await labUp();
    expect(hostInfo('primary').holderPid).toBe(holder);
    expect(Date.now() - started).toBeLessThan(10_000);
  });

  it('kills a host and brings it back', async () => {
    await killHost('backup');
    expect((await sshFrom('primary', hostInfo('backup').ip)).exitCode).not.toBe(0);
    expect((await $`virsh -c ${hostInfo('backup').libvirtUri} version`.nothrow()).exitCode).not.toBe(0);
    await restartHost('backup');
    expect((await sshFrom('primary', hostInfo('backup').ip)).stdout.trim()).toBe('backup');
  });

  it('cuts a host off the network and restores it', async () => {
    await cutLink('primary');
    expect((await sshFrom('backup', hostInfo('primary').ip)).exitCode).not.toBe(0);
    await restoreLink('primary');
    expect((await sshFrom('backup', hostInfo('primary').ip)).stdout.trim()).toBe('primary');
  });

  it('freezes a host and thaws it', async () => {
    await freezeHost('primary');
    expect((await labStatus()).find((h) => h.name === 'primary')?.frozen).toBe(true);
    expect((await $({ timeout: 3_000 })`virsh -c ${hostInfo('primary').libvirtUri} version`.nothrow()).exitCode).not.toBe(0);
    await thawHost('primary');
    expect((await sshFrom('backup', hostInfo('primary').ip)).stdout.trim()).toBe('primary');
  });

  it('leaves nothing behind when brought down', async () => {
    await labDown();
    expect(labLeftovers()).toEqual([]);
    const stray = (await $`pgrep -f ${'/var/lib/ftvm-lab/'}`.nothrow()).stdout.trim();
    expect(stray).toBe('');
    await labDown(); // idempotent
    expect(labLeftovers()).toEqual([]);
  });
});
