/**
 * HostLease and ClusterStore against a real etcd: the lab witness's (single member, 20 ms
 * heartbeat, 200 ms election timeout, so a 1 s lease TTL stands). The test process runs in the
 * root namespace and reaches etcd over the lab bridge; holders that must die or be cut off run as
 * child processes (lease-holder-child.ts) inside the lab host `primary`.
 */
import { int64Exact } from './protobuf-int64.js'; // first: etcd's 64-bit lease ids under vitest (see there)
import { fileURLToPath } from 'node:url';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { cutLink, ensureWitnessEtcd, labEtcdPid, labUp, restoreLink } from '../../../test/lab/lab.js';
import { ClusterStore, EtcdCallError, HostLease, LeaseUnusableError, type HostLeaseOptions } from '../src/lease/index.js';
import { LabChild, wallOf } from './lab-child.js';

const HOLDER_SCRIPT = fileURLToPath(new URL('./lease-holder-child.ts', import.meta.url));
const TTL_MS = 1_000;
const TIMING = { ttlSeconds: 1, keepaliveIntervalMs: 150, fenceAfterMs: 600, requestTimeoutMs: 500 } as const;

let endpoint: string;
let run = 0;
const prefix = () => `/ftvm-test/lease-${process.pid}-${Date.now()}-${++run}`;
const cleanups: Array<() => Promise<void> | void> = [];
const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));
/** SIGCONT etcd (after a test froze it); nothing if it is gone. */
function thaw(pid: number): void {
  try {
    process.kill(pid, 'SIGCONT');
  } catch {
    // not running
  }
}

async function openLease(holder: string, keyPrefix: string, extra: Partial<HostLeaseOptions> = {}): Promise<HostLease> {
  const lease = await HostLease.open({ endpoints: [endpoint], prefix: keyPrefix, holder, ...TIMING, ...extra });
  cleanups.push(() => lease.close());
  return lease;
}

function startHolder(name: string, keyPrefix: string, vms: string[], extra: Record<string, unknown> = {}): LabChild {
  const child = LabChild.start(
    name,
    HOLDER_SCRIPT,
    [JSON.stringify({ endpoints: [endpoint], prefix: keyPrefix, holder: 'primary', ...TIMING, vms, ...extra })],
    'primary',
  );
  cleanups.push(() => child.kill());
  return child;
}

/** Waits (bounded) for the watcher's list of owners to contain an entry matching `match`. */
async function waitForOwner(seen: Array<{ owner: string | undefined; at: number }>, match: (owner: string | undefined) => boolean, timeoutMs: number, what: string) {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    const hit = seen.find((s) => match(s.owner));
    if (hit) return hit;
    if (performance.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}; saw ${JSON.stringify(seen)}`);
    await sleep(5);
  }
}

beforeAll(async () => {
  expect(int64Exact(), 'protobufjs decodes 64-bit integers exactly').toBe(true);
  await labUp();
  ({ endpoint } = await ensureWitnessEtcd());
});

afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

afterAll(async () => {
  // Whatever a failed test left cut or frozen.
  await restoreLink('primary');
  const etcd = labEtcdPid();
  if (etcd) thaw(etcd);
});

describe('HostLease', () => {
  it('claims, refuses a held key to another holder, releases only its own', async () => {
    const p = prefix();
    const a = await openLease('primary', p);
    const b = await openLease('backup', p);
    expect(a.id).toMatch(/^\d+$/);
    expect(a.id).not.toBe(b.id);
    expect(a.ttlSeconds).toBe(1);
    expect(a.healthy).toBe(true);

    expect(await a.owner('vm1')).toBeUndefined();
    expect(await a.claim('vm1')).toBe(true);
    expect(await a.claim('vm1')).toBe(true); // already ours, same lease
    expect(await b.claim('vm1')).toBe(false);
    expect(await b.owner('vm1')).toBe('primary');

    expect(await b.release('vm1')).toBe(false); // not b's: untouched
    expect(await b.owner('vm1')).toBe('primary');
    expect(await a.release('vm1')).toBe(true);
    expect(await a.owner('vm1')).toBeUndefined();
    expect(await b.claim('vm1')).toBe(true);
    expect(await a.claim('vm1')).toBe(false);
    expect(await a.owner('vm1')).toBe('backup');
  });

  it('renews at keepaliveIntervalMs, each renewal stamped with its send time', async () => {
    const a = await openLease('primary', prefix());
    const renewals: Array<[number, number]> = [];
    a.onRenewed((sentAt, answeredAt) => renewals.push([sentAt, answeredAt]));
    await sleep(1_000);
    // 1 s / 150 ms ≈ 6–7 keepalives; under load a few fewer, never a TTL/3 cadence (≤ 3).
    expect(renewals.length).toBeGreaterThanOrEqual(4);
    for (const [sentAt, answeredAt] of renewals) expect(answeredAt).toBeGreaterThanOrEqual(sentAt);
    expect(a.lastRenewedAt).toBe(renewals.at(-1)![0]);
    expect(a.healthy).toBe(true);
    const rtts = renewals.map(([s, r]) => r - s).sort((x, y) => x - y);
    console.log(`keepalives in 1 s: ${renewals.length}; round trip median ${rtts[rtts.length >> 1]!.toFixed(2)} ms, max ${rtts.at(-1)!.toFixed(2)} ms`);
  });

  it('after close() (revoke) another holder claims at once', async () => {
    const p = prefix();
    const a = await HostLease.open({ endpoints: [endpoint], prefix: p, holder: 'primary', ...TIMING });
    const b = await openLease('backup', p);
    expect(await a.claim('vm1')).toBe(true);
    expect(await b.claim('vm1')).toBe(false);
    await a.close();
    expect(a.state).toBe('closed');
    expect(await b.claim('vm1')).toBe(true); // no waiting for a TTL
    await expect(a.claim('vm1')).rejects.toBeInstanceOf(LeaseUnusableError);
  });

  it('a holder that dies loses its keys TTL + ≤0.5 s after its last keepalive, and a watcher sees it', async () => {
    const p = prefix();
    const holder = startHolder('holder', p, ['vm1']);
    expect((await holder.waitFor((e) => e.event === 'claimed', 15_000, 'the claim')).ok).toBe(true);
    await holder.waitFor((e) => e.event === 'renewed', 5_000, 'a renewal');

    const b = await openLease('backup', p);
    const seen: Array<{ owner: string | undefined; at: number }> = [];
    const stop = await b.watchOwner('vm1', (owner) => seen.push({ owner, at: wallOf(performance.now()) }));
    cleanups.push(stop);
    expect(seen).toEqual([{ owner: 'primary', at: expect.any(Number) }]); // the current owner first

    await sleep(300);
    holder.signal('SIGKILL');
    const gone = await waitForOwner(seen, (o) => o === undefined, TTL_MS + 3_000, 'the owner key to expire');
    // The newest keepalive etcd answered before the kill (its send time); etcd may have processed
    // one more, sent at most one interval later and unreported — that only makes the delay longer.
    const lastSent = Math.max(...holder.events.filter((e) => e.event === 'renewed').map((e) => e.sentAt as number));
    const delay = gone.at - lastSent;
    console.log(`owner key gone ${delay.toFixed(0)} ms after the dead holder's last answered keepalive was sent (TTL ${TTL_MS} ms, etcd's expiry loop 500 ms, keepalive interval ${TIMING.keepaliveIntervalMs} ms)`);
    expect(delay).toBeGreaterThanOrEqual(TTL_MS - 2); // never before the TTL (2 ms: clock mapping between processes)
    expect(delay).toBeLessThanOrEqual(TTL_MS + 500 + TIMING.keepaliveIntervalMs + 400); // 400 ms slack for a loaded 2-core machine
    expect(await b.claim('vm1')).toBe(true);
    await waitForOwner(seen, (o) => o === 'backup', 3_000, 'the watcher to see the new owner');
  });

  it('a holder cut off from etcd fences before the lease expires and anyone else can claim, then gets a new lease when the link is back', async () => {
    const p = prefix();
    const holder = startHolder('holder', p, ['vm1'], { renewAfterFence: true });
    expect((await holder.waitFor((e) => e.event === 'claimed', 15_000, 'the claim')).ok).toBe(true);
    await holder.waitFor((e) => e.event === 'renewed', 5_000, 'a renewal');
    const b = await openLease('backup', p);
    expect(await b.claim('vm1')).toBe(false);

    await sleep(200);
    const cutAt = wallOf(performance.now());
    await cutLink('primary');
    cleanups.push(() => restoreLink('primary'));
    // Claim as fast as etcd answers until it works: the first success is the earliest moment
    // another host could start the VM.
    let claimSentAt: number | undefined;
    const deadline = performance.now() + TTL_MS + 3_000;
    while (claimSentAt === undefined && performance.now() < deadline) {
      const sentAt = wallOf(performance.now());
      if (await b.claim('vm1')) claimSentAt = sentAt;
      else await sleep(10);
    }
    expect(claimSentAt, 'the backup never got the key').toBeDefined();
    const fence = await holder.waitFor((e) => e.event === 'fence', 2_000, 'the fence');
    const lastSent = Math.max(...holder.events.filter((e) => e.event === 'renewed').map((e) => e.sentAt as number));
    const fenceAt = fence.at as number;
    console.log(
      `cut → fence ${(fenceAt - cutAt).toFixed(0)} ms (${(fenceAt - lastSent).toFixed(0)} ms after the last answered keepalive was sent); ` +
        `fence → first successful claim by the other host ${(claimSentAt! - fenceAt).toFixed(0)} ms; fence reason: ${fence.reason as string}`,
    );
    expect(fenceAt).toBeLessThan(claimSentAt!);
    expect(fenceAt - lastSent).toBeGreaterThan(TIMING.fenceAfterMs);
    expect(holder.events.some((e) => e.event === 'lost')).toBe(false); // it fenced on its own, etcd never got to say so

    const restoredAt = wallOf(performance.now());
    await restoreLink('primary');
    const regranted = await holder.waitFor((e) => e.event === 'regranted', 15_000, 'a new lease after the link came back');
    console.log(`link restored → new lease granted in ${((regranted.at as number) - restoredAt).toFixed(0)} ms`);
    expect(regranted.id).not.toBe(holder.events.find((e) => e.event === 'granted')!.id);
    await holder.waitFor((e) => e.event === 'renewed' && (e.sentAt as number) > (regranted.at as number), 5_000, 'renewals of the new lease');
  });

  it('fences a holder whose etcd stops answering, and refuses claims from then on', async () => {
    const a = await openLease('primary', prefix());
    expect(await a.claim('vm1')).toBe(true);
    const etcd = labEtcdPid();
    expect(etcd, 'the witness runs etcd').toBeDefined();
    const fences: Array<{ reason: string; at: number }> = [];
    a.onFence((reason) => fences.push({ reason, at: performance.now() }));
    await sleep(200);
    const lastRenewed = a.lastRenewedAt!;
    process.kill(etcd!, 'SIGSTOP');
    cleanups.push(() => thaw(etcd!));
    const deadline = performance.now() + 3_000;
    while (fences.length === 0 && performance.now() < deadline) await sleep(10);
    process.kill(etcd!, 'SIGCONT');
    expect(fences).toHaveLength(1);
    const fenceDelay = fences[0]!.at - lastRenewed;
    console.log(`etcd frozen: fence ${fenceDelay.toFixed(0)} ms after the last answered keepalive was sent (fenceAfterMs ${TIMING.fenceAfterMs}); reason: ${fences[0]!.reason}`);
    expect(fenceDelay).toBeGreaterThan(TIMING.fenceAfterMs);
    expect(fenceDelay).toBeLessThan(TTL_MS); // a timer, not a failure, fired it: well before the TTL
    expect(a.state).toBe('fenced');
    expect(a.healthy).toBe(false);
    await expect(a.claim('vm1')).rejects.toThrow(/cannot claim vm1: the lease is fenced \(no keepalive answered/);
    await sleep(300);
    expect(fences).toHaveLength(1); // once
    // renew() gives a working lease again, now that etcd answers; revoking the old one (its VMs
    // are "stopped") frees its keys at once instead of at expiry.
    const oldId = a.id;
    const id = await a.renew({ revokeOld: true });
    expect(id).not.toBe(oldId);
    expect(a.state).toBe('held');
    expect(a.healthy).toBe(true);
    expect(await a.claim('vm1')).toBe(true);
    await expect(a.renew()).rejects.toThrow(/cannot renew: the lease is held/);
  });

  it('reclaim: the key onto a new lease of the same host (failsafe\'s return), never from another host', async () => {
    const p = prefix();
    const a = await openLease('primary', p);
    expect(await a.claim('vm1')).toBe(true);
    expect(a.silentForMs()).toBeLessThan(TIMING.keepaliveIntervalMs * 2);
    // etcd frozen: silentForMs grows from the first unanswered keepalive, and fences later
    const etcd = labEtcdPid();
    expect(etcd, 'the witness runs etcd').toBeDefined();
    process.kill(etcd!, 'SIGSTOP');
    cleanups.push(() => thaw(etcd!));
    await sleep(400);
    const silent = a.silentForMs();
    process.kill(etcd!, 'SIGCONT');
    expect(silent).toBeGreaterThan(TIMING.keepaliveIntervalMs);
    // the same host on a second lease (what renew() gives after a fence) takes its own key over
    const again = await openLease('primary', p);
    expect(await again.reclaim('vm1')).toBe(true);
    await a.close(); // revokes the first lease: the key stays, it is on the second now
    expect(await again.owner('vm1')).toBe('primary');
    // another host never reclaims a key it does not hold; an absent key is claimed
    const b = await openLease('backup', p);
    expect(await b.reclaim('vm1')).toBe(false);
    expect(await b.reclaim('vm2')).toBe(true);
    expect(await again.owner('vm2')).toBe('backup');
  });

  it('reports an error at once when etcd cannot be reached', async () => {
    const started = performance.now();
    const error = await HostLease.open({ endpoints: ['http://127.0.0.1:9'], prefix: '/x', holder: 'h', ...TIMING }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(EtcdCallError);
    expect((error as EtcdCallError).unavailable).toBe(true);
    expect((error as Error).message).toMatch(/^etcd http:\/\/127\.0\.0\.1:9: grant a 1 s lease: /);
    expect(performance.now() - started).toBeLessThan(TIMING.requestTimeoutMs + 500);
    await expect(HostLease.open({ endpoints: [endpoint], prefix: '/x', holder: 'h', ...TIMING, fenceAfterMs: 1_000 })).rejects.toThrow(/fenceAfterMs must be positive and below the TTL/);
  });
});

describe('HostLease.open with openRetryMs', () => {
  it('waits out an etcd that does not answer for a while, and still gives up at its deadline', async () => {
    const etcd = labEtcdPid();
    expect(etcd, 'the witness runs etcd').toBeDefined();
    process.kill(etcd!, 'SIGSTOP');
    cleanups.push(() => thaw(etcd!));
    const thawAt = performance.now() + 1_500;
    setTimeout(() => thaw(etcd!), 1_500);
    const retried: string[] = [];
    const lease = await openLease('primary', prefix(), { openRetryMs: 10_000, log: (_level, message) => void (/asking again/.test(message) && retried.push(message)) });
    expect(performance.now()).toBeGreaterThan(thawAt);
    expect(lease.state).toBe('held');
    expect(retried.length, 'it asked again at least once while etcd was frozen').toBeGreaterThan(0);
    // Without an answer at all it fails after openRetryMs, with etcd's error.
    const started = performance.now();
    const error = await HostLease.open({ endpoints: ['http://127.0.0.1:9'], prefix: '/x', holder: 'h', ...TIMING, openRetryMs: 2_000 }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(EtcdCallError);
    expect(performance.now() - started).toBeGreaterThan(1_500);
    expect(performance.now() - started).toBeLessThan(2_000 + TIMING.requestTimeoutMs + 1_000);
  });
});

describe('watches across an outage', () => {
  it('owner and prefix watches report the outage, re-establish, and deliver what changed meanwhile', async () => {
    const p = prefix();
    const a = await openLease('primary', p);
    const b = await openLease('backup', p);
    const store = ClusterStore.open({ endpoints: [endpoint], requestTimeoutMs: TIMING.requestTimeoutMs });
    cleanups.push(() => store.close());
    expect(await a.claim('vm1')).toBe(true);
    expect(await store.putJson(`${p}/vms/vm1/spec`, { name: 'vm1', generation: 1 })).toBe(true);

    const owners: Array<{ owner: string | undefined; at: number }> = [];
    const ownerErrors: Error[] = [];
    const errorAt: Record<string, number> = {};
    let ownerResumed = 0;
    cleanups.push(await b.watchOwner('vm1', (owner) => owners.push({ owner, at: performance.now() }), { onError: (e) => (ownerErrors.push(e), (errorAt.owner ??= performance.now())), onResumed: () => ownerResumed++ }));
    const changes: Array<[string, unknown]> = [];
    const prefixErrors: Error[] = [];
    let prefixResumed = 0;
    // Owner keys hold a plain host name, not JSON: the filter leaves them out.
    const specs = (key: string) => key.endsWith('/spec');
    cleanups.push(await store.watchPrefix(`${p}/vms/`, (key, value) => changes.push([key.slice(p.length), value]), { filter: specs, onError: (e) => (prefixErrors.push(e), (errorAt.prefix ??= performance.now())), onResumed: () => prefixResumed++ }));
    expect(owners.map((o) => o.owner)).toEqual(['primary']);
    expect(changes).toEqual([['/vms/vm1/spec', { name: 'vm1', generation: 1 }]]);

    // etcd stops answering for 2.5 s: a's lease expires on etcd once it is back (nobody renewed it).
    const etcd = labEtcdPid()!;
    process.kill(etcd, 'SIGSTOP');
    cleanups.push(() => thaw(etcd));
    const frozenAt = performance.now();
    const deadline = frozenAt + 5_000;
    while ((ownerErrors.length === 0 || prefixErrors.length === 0) && performance.now() < deadline) await sleep(20);
    console.log(
      `etcd frozen → owner watch (the lease's connection) reports ${((errorAt.owner ?? NaN) - frozenAt).toFixed(0)} ms later: ${ownerErrors[0]?.message}\n` +
        `etcd frozen → prefix watch (a ClusterStore of its own, probe-driven) reports ${((errorAt.prefix ?? NaN) - frozenAt).toFixed(0)} ms later: ${prefixErrors[0]?.message}`,
    );
    expect(ownerErrors).toHaveLength(1);
    expect(prefixErrors).toHaveLength(1);
    expect(ownerErrors[0]).toBeInstanceOf(EtcdCallError);
    expect(ownerErrors[0]!.message).toMatch(/vms\/vm1\/owner/);
    await sleep(Math.max(0, 2_500 - (performance.now() - frozenAt)));
    process.kill(etcd, 'SIGCONT');
    const thawedAt = performance.now();

    const gone = await waitForOwner(owners, (o) => o === undefined, 8_000, 'the watcher to see the expired owner');
    console.log(`after etcd came back: owner watch saw the expiry ${(gone.at - thawedAt).toFixed(0)} ms later`);
    const resumeDeadline = performance.now() + 5_000;
    while ((ownerResumed === 0 || prefixResumed === 0) && performance.now() < resumeDeadline) await sleep(20);
    expect(ownerResumed).toBe(1);
    expect(prefixResumed).toBe(1);
    expect(ownerErrors).toHaveLength(1); // one report per outage
    expect(a.state).toBe('fenced');

    // And the watches work on: new changes arrive.
    expect(await b.renew()).toMatch(/^\d+$/);
    expect(await b.claim('vm1')).toBe(true);
    await waitForOwner(owners, (o) => o === 'backup', 3_000, 'the new owner');
    await store.putJson(`${p}/vms/vm1/spec`, { name: 'vm1', generation: 2 });
    const t = performance.now() + 3_000;
    while (!changes.some(([, v]) => (v as { generation?: number } | undefined)?.generation === 2) && performance.now() < t) await sleep(10);
    expect(changes.at(-1)).toEqual(['/vms/vm1/spec', { name: 'vm1', generation: 2 }]);
  });

  it('ClusterStore: JSON records, compare-and-swap on the mod revision', async () => {
    const p = prefix();
    const store = ClusterStore.open({ endpoints: [endpoint], requestTimeoutMs: TIMING.requestTimeoutMs });
    cleanups.push(() => store.close());
    const key = `${p}/vms/vm1/spec`;
    expect(await store.getJson(key)).toBeUndefined();
    expect(await store.putJson(key, { v: 1 }, { ifModRevision: '0' })).toBe(true); // create-only
    expect(await store.putJson(key, { v: 9 }, { ifModRevision: '0' })).toBe(false);
    const entry = await store.getJsonEntry<{ v: number }>(key);
    expect(entry?.value).toEqual({ v: 1 });
    expect(await store.putJson(key, { v: 2 }, { ifModRevision: entry!.modRevision })).toBe(true);
    expect(await store.putJson(key, { v: 3 }, { ifModRevision: entry!.modRevision })).toBe(false); // stale
    expect(await store.getJson(key)).toEqual({ v: 2 });
    await store.client.put(`${p}/vms/vm1/owner`).value('primary'); // not JSON, filtered out
    expect(await store.listJson(`${p}/vms/`, (k) => k.endsWith('/spec'))).toEqual(new Map([[key, { v: 2 }]]));
    await expect(store.listJson(`${p}/vms/`)).rejects.toThrow(/vms\/vm1\/owner: the value is not JSON/);
    await store.client.put(`${p}/vms/vm2/spec`).value('not json');
    await expect(store.getJson(`${p}/vms/vm2/spec`)).rejects.toThrow(/vms\/vm2\/spec: the value is not JSON/);
    expect(await store.delete(key, { ifModRevision: '1' })).toBe(false);
    expect(await store.delete(key)).toBe(true);
    expect(await store.getJson(key)).toBeUndefined();
  });
});
