import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  DomainNotFoundError,
  DomainStateError,
  LibvirtConnection,
  LibvirtConnectionError,
  LibvirtTimeoutError,
  LifecycleEventStream,
  validateDomainXml,
} from '@ftvm/libvirt';
import { hostInfo, labRemoteLibvirtUri, labSshKey, labUp } from '../../../test/lab/lab.js';
import { labProbeGuest } from './lab-guest.js';

const NAME = 'lv-ctl';
let conn: LibvirtConnection;
let events: LifecycleEventStream;

beforeAll(async () => {
  await labUp();
  conn = await LibvirtConnection.connect(hostInfo('primary').libvirtUri);
  await conn.remove(NAME);
  events = await conn.events({ domain: NAME });
});

afterAll(async () => {
  await events?.close();
  await conn?.remove(NAME).catch(() => undefined);
  await conn?.close();
});

describe('domain control on a lab libvirtd', () => {
  it('define → start paused → resume → suspend → destroy → undefine, with lifecycle events', async () => {
    const guest = await labProbeGuest('primary', NAME, 5711);
    expect((await validateDomainXml(guest.xml)).valid).toBe(true);
    const t: Record<string, number> = {};
    const timed = async <T>(label: string, fn: () => Promise<T>) => {
      const t0 = performance.now();
      const out = await fn();
      t[label] = Math.round(performance.now() - t0);
      return out;
    };

    const { uuid } = await timed('define', () => conn.define(guest.xml));
    expect(uuid).toMatch(/^[0-9a-f-]{36}$/);
    await events.waitForEvent(NAME, 'defined', { timeoutMs: 5_000, includePast: true });
    expect(await conn.state(NAME)).toBe('shutoff');
    // libvirt keeps ftvm's metadata and QEMU arguments as they were
    const defined = await conn.xml(NAME, { inactive: true });
    expect(defined).toContain('<ftvm:protection xmlns:ftvm="https://ftvm.dev/xmlns/1" version="1">');
    expect(defined).toContain(`socket,id=ftvm-qmp,path=/run/ftvm/${NAME}.qmp,server=on,wait=off`);

    await timed('start paused', () => conn.start(NAME, { paused: true }));
    expect(await conn.state(NAME)).toBe('paused');
    expect(await conn.stateReason(NAME)).toEqual({ state: 'paused', reason: 'user' });
    expect(fs.existsSync(guest.outside(`/run/ftvm/${NAME}.qmp`))).toBe(true);

    const resumed = events.waitForEvent(NAME, 'resumed', { timeoutMs: 5_000 });
    await timed('resume', () => conn.resume(NAME));
    expect((await resumed).detail).toBe('Unpaused');
    expect(await conn.state(NAME)).toBe('running');

    await timed('suspend', () => conn.suspend(NAME));
    expect(await conn.stateReason(NAME)).toEqual({ state: 'paused', reason: 'user' });

    const stopped = events.waitForEvent(NAME, 'stopped', { timeoutMs: 10_000 });
    await timed('destroy', () => conn.destroy(NAME));
    expect((await stopped).detail).toBe('Destroyed');
    expect(await conn.state(NAME)).toBe('shutoff');

    await timed('undefine', () => conn.undefine(NAME));
    await events.waitForEvent(NAME, 'undefined', { timeoutMs: 5_000, includePast: true });
    expect(await conn.exists(NAME)).toBe(false);
    // (QEMU's SHUTDOWN event on destroy shows up as 'shutdown Finished after host request' first)
    expect(events.events.filter((e) => e.event !== 'shutdown').map((e) => `${e.event} ${e.detail}`)).toEqual([
      'defined Added',
      'started Booted',
      'suspended Paused',
      'resumed Unpaused',
      'suspended Paused',
      'stopped Destroyed',
      'undefined Removed',
    ]);
    console.log(`libvirt call times (ms) on primary: ${JSON.stringify(t)}`);
  });

  it('errors name the domain and the operation', async () => {
    const missing = await conn.resume('lv-nope').catch((e: unknown) => e);
    expect(missing).toBeInstanceOf(DomainNotFoundError);
    expect((missing as Error).message).toMatch(/^libvirt lookup of domain 'lv-nope' on qemu:\/\/\/system\?socket=.* failed: Domain not found/);

    const guest = await labProbeGuest('primary', NAME, 5711);
    await conn.remove(NAME);
    await conn.define(guest.xml);
    const notRunning = await conn.resume(NAME).catch((e: unknown) => e);
    expect(notRunning).toBeInstanceOf(DomainStateError);
    expect((notRunning as Error).message).toMatch(new RegExp(`^libvirt resume of domain '${NAME}' .* failed: Requested operation is not valid: domain is not running`));
    const viaVirsh = await conn.stateReason('lv-nope').catch((e: unknown) => e);
    expect(viaVirsh).toBeInstanceOf(DomainNotFoundError);
    await conn.undefine(NAME);
  });

  it('every call has a deadline: a daemon that never answers', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lv-silent-'));
    const sock = path.join(dir, 'libvirt-sock');
    const held: net.Socket[] = [];
    const server = net.createServer((s) => held.push(s)); // accepts, never speaks
    await new Promise<void>((r) => server.listen(sock, r));
    try {
      const uri = `qemu:///system?socket=${sock}`;
      const t0 = performance.now();
      const error = await LibvirtConnection.connect(uri, { connectTimeoutMs: 500 }).catch((e: unknown) => e);
      expect(error).toBeInstanceOf(LibvirtTimeoutError);
      expect(performance.now() - t0).toBeLessThan(1_500);
      const events = await LifecycleEventStream.open(uri, { readyTimeoutMs: 500 }).catch((e: unknown) => e);
      expect(events).toBeInstanceOf(LibvirtTimeoutError);
      const refused = await LibvirtConnection.connect(`qemu:///system?socket=${dir}/none`).catch((e: unknown) => e);
      expect(refused).toBeInstanceOf(LibvirtConnectionError);
    } finally {
      held.forEach((s) => s.destroy());
      server.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('connects over qemu+libssh:// and qemu+ssh://', async () => {
    for (const uri of [labRemoteLibvirtUri('backup'), `qemu+ssh://root@${hostInfo('backup').ip}/system?keyfile=${labSshKey()}&no_verify=1`]) {
      const t0 = performance.now();
      const remote = await LibvirtConnection.connect(uri);
      try {
        expect(await remote.hostname()).toBe('backup');
        expect(Array.isArray(await remote.list())).toBe(true);
        expect(await remote.virsh(['hostname'])).toMatch(/^backup/);
      } finally {
        await remote.close();
      }
      console.log(`${uri.split(':')[0]}: connect + 3 calls in ${Math.round(performance.now() - t0)} ms`);
    }
  });
});
