/**
 * A LibvirtConnection outlives a restart of the libvirtd it talks to (lab host primary): the next
 * call reopens it and is retried, `reconnects` counts it, and a connection that cannot ask never
 * answers "absent".
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LibvirtConnection, LibvirtConnectionError, type BrokenEvent, type ReconnectEvent } from '@ftvm/libvirt';
import { hostInfo, labUp } from '../../../test/lab/lab.js';
import { daemonPids } from '../../../test/lab/host.js';
import { restartLibvirtd, startLibvirtd, stopLibvirtd } from '../../../test/lab/libvirtd.js';
import { labHost } from '../../../test/lab/topology.js';

const NAME = 'lv-reconn';
const TINY = `<domain type='qemu'><name>${NAME}</name><memory unit='MiB'>32</memory><os><type arch='x86_64'>hvm</type></os></domain>`;
const uri = () => hostInfo('primary').libvirtUri;

let conn: LibvirtConnection | undefined;
const broken: BrokenEvent[] = [];
const reopened: ReconnectEvent[] = [];

beforeAll(async () => {
  await labUp();
  conn = await LibvirtConnection.connect(uri(), {
    timeoutMs: 20_000,
    onBroken: (e) => broken.push(e),
    onReconnect: (e) => reopened.push(e),
  });
  await conn.remove(NAME);
});

afterAll(async () => {
  // whatever happened, leave primary with a running libvirtd and without the test domain
  if (daemonPids(labHost('primary')).libvirtd === undefined) await startLibvirtd('primary');
  await conn?.remove(NAME).catch(() => undefined);
  await conn?.close();
});

describe('LibvirtConnection across a libvirtd restart', () => {
  it('reads after a restart reopen the connection and are retried; reconnects counts it', async () => {
    const c = conn!;
    await c.define(TINY);
    expect(await c.list()).toContain(NAME);

    const { oldPid, newPid } = await restartLibvirtd('primary');
    expect(newPid).not.toBe(oldPid);

    const t0 = performance.now();
    expect(await c.exists(NAME, { timeoutMs: 10_000 })).toBe(true);
    const ms = performance.now() - t0;
    expect(c.reconnects).toBe(1);
    expect(c.broken).toBeUndefined();
    expect(broken).toHaveLength(1);
    expect(broken[0]).toMatchObject({ uri: uri(), operation: 'lookup', domain: NAME });
    expect(broken[0]!.reason).toMatch(/Broken pipe|client socket is closed|End of file|Cannot recv data|Cannot write data/);
    expect(reopened).toEqual([expect.objectContaining({ uri: uri(), reason: broken[0]!.reason, reconnects: 1, attempts: 1 })]);
    expect(await c.state(NAME)).toBe('shutoff');
    expect(await c.list()).toContain(NAME);
    console.log(`first call after the restart: ${Math.round(ms)} ms (reconnect ${reopened[0]!.durationMs} ms); broken by: ${broken[0]!.reason}`);
  });

  it('a mutating call after a restart is retried: its lookup failed before anything was sent', async () => {
    const c = conn!;
    await restartLibvirtd('primary');
    await c.undefine(NAME, { timeoutMs: 10_000 });
    expect(c.reconnects).toBe(2);
    expect(await c.exists(NAME)).toBe(false);
    // and define, whose only RPC is the mutating one: libvirt says the request was never written
    await restartLibvirtd('primary');
    expect((await c.define(TINY, { timeoutMs: 10_000 })).name).toBe(NAME);
    expect(c.reconnects).toBe(3);
    expect(await c.exists(NAME)).toBe(true);
  });

  it('while libvirtd is down, exists() throws a connection error within its deadline (never "absent"); once it is back, calls work again', async () => {
    const c = conn!;
    await stopLibvirtd('primary');
    try {
      const t0 = performance.now();
      const error = await c.exists(NAME, { timeoutMs: 1_500 }).catch((e: unknown) => e);
      const ms = performance.now() - t0;
      expect(error).toBeInstanceOf(LibvirtConnectionError);
      expect((error as Error).message).toMatch(/connection unusable: .*reconnecting failed: \d+ attempt\(s\)/);
      expect(ms).toBeGreaterThanOrEqual(1_400); // it kept trying (backoff) until the deadline
      expect(ms).toBeLessThan(3_000);
      expect(c.broken).toBeDefined();
    } finally {
      await startLibvirtd('primary');
    }
    expect(await c.exists(NAME, { timeoutMs: 10_000 })).toBe(true);
    expect(c.broken).toBeUndefined();
    expect(c.reconnects).toBe(4);
  });

  it('reconnect: false keeps a broken connection broken (every call fails at once)', async () => {
    const fixed = await LibvirtConnection.connect(uri(), { reconnect: false });
    try {
      expect(await fixed.exists(NAME)).toBe(true);
      await restartLibvirtd('primary');
      const first = await fixed.exists(NAME).catch((e: unknown) => e);
      expect(first).toBeInstanceOf(LibvirtConnectionError);
      expect(fixed.broken).toBeDefined();
      const t0 = performance.now();
      const second = await fixed.list().catch((e: unknown) => e);
      expect(second).toBeInstanceOf(LibvirtConnectionError);
      expect((second as Error).message).toMatch(/connection unusable/);
      expect(performance.now() - t0).toBeLessThan(100);
      expect(fixed.reconnects).toBe(0);
      await fixed.reconnect().catch(() => undefined); // refused too: reconnect is off
      expect(fixed.broken).toBeDefined();
    } finally {
      await fixed.close();
    }
    // the reconnecting connection took the same restart in its stride
    expect(await conn!.exists(NAME, { timeoutMs: 10_000 })).toBe(true);
  });
});
