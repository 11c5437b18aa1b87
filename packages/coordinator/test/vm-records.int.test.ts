/**
 * VmRecords against the lab witness's real etcd, on a HostLease's connection as the agent uses
 * them (`VmRecords.onLease`), with a second writer on a ClusterStore of its own (the other host's
 * agent): create-if-absent, compare-and-swap updates that lose nothing to a concurrent writer,
 * the watch (current records, puts, deletes, bad values) and the watch across a compaction and an
 * etcd restart. Runs under the lab lock like every integration test.
 */
import { int64Exact } from './protobuf-int64.js'; // first: etcd's 64-bit lease ids under vitest (see there)
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { ensureWitnessEtcd, labEtcdLog, labEtcdPid, labUp } from '../../../test/lab/lab.js';
import { spawnDaemon, spawnedDaemons } from '../../../test/lab/host.js';
import { isAlive } from '../../../test/lab/procs.js';
import { labHost } from '../../../test/lab/topology.js';
import { InvalidRecordError, RecordConflictError, VmRecords, type VmRecord } from '../src/agent/vm-records.js';
import { ClusterStore, EtcdCallError, HostLease } from '../src/lease/index.js';

const TIMING = { ttlSeconds: 1, keepaliveIntervalMs: 150, fenceAfterMs: 600, requestTimeoutMs: 500 } as const;
const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

let endpoint: string;
let run = 0;
const prefix = () => `/ftvm-test/records-${process.pid}-${Date.now()}-${++run}`;
const cleanups: Array<() => Promise<void> | void> = [];

const spec = (name: string): Omit<VmRecord, 'generation' | 'updatedAt'> => ({
  name,
  xml: `<domain><name>${name}</name></domain>`,
  primary: 'primary',
  backup: 'backup',
  protected: true,
  checkpointIntervalMs: 1000,
  keep: 3,
  reason: 'protect',
});

/** The agent's way: records on the lease's connection. */
async function agentRecords(p: string, holder = 'primary'): Promise<{ lease: HostLease; records: VmRecords }> {
  const lease = await HostLease.open({ endpoints: [endpoint], prefix: p, holder, ...TIMING });
  cleanups.push(() => lease.close());
  return { lease, records: VmRecords.onLease(lease, { timeoutMs: TIMING.requestTimeoutMs * 4 }) };
}

/** Another writer with a connection of its own. */
function otherWriter(p: string): { store: ClusterStore; records: VmRecords } {
  const store = ClusterStore.open({ endpoints: [endpoint], requestTimeoutMs: TIMING.requestTimeoutMs });
  cleanups.push(() => store.close());
  return { store, records: new VmRecords(store, p) };
}

async function waitFor(what: string, done: () => boolean, timeoutMs: number, seen: () => unknown): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  while (!done()) {
    if (performance.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}; saw ${JSON.stringify(seen())}`);
    await sleep(10);
  }
}

/** SIGKILLs the witness's etcd and starts it again on the same data dir (nothing is wiped). */
async function restartEtcdKeepingData(): Promise<{ downAt: number; upAt: number }> {
  const witness = labHost('witness');
  const daemon = spawnedDaemons(witness).find((d) => d.argv[0] === '/usr/bin/etcd');
  if (!daemon) throw new Error('the witness runs no etcd of the lab');
  process.kill(daemon.pid, 'SIGKILL');
  const downAt = performance.now();
  const deadline = downAt + 5_000;
  while (isAlive(daemon.pid)) {
    if (performance.now() > deadline) throw new Error(`etcd (pid ${daemon.pid}) still alive 5 s after SIGKILL`);
    await sleep(10);
  }
  // Down for a while, so that every user of it notices.
  await sleep(1_000);
  spawnDaemon(witness, daemon.argv, labEtcdLog());
  await ensureWitnessEtcd(); // an etcd of ours runs: this only waits for it to be healthy
  return { downAt, upAt: performance.now() };
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
  // Whatever a failed test left frozen or stopped.
  const pid = labEtcdPid();
  if (pid) process.kill(pid, 'SIGCONT');
  await ensureWitnessEtcd();
});

describe('VmRecords', () => {
  it('creates a record only if absent, reads and lists records (not owner keys), removes them', async () => {
    const p = prefix();
    const { lease, records } = await agentRecords(p);
    expect(await records.get('vm1')).toBeUndefined();
    expect(await records.list()).toEqual([]);

    const created = await records.create(spec('vm1'));
    expect(created).toMatchObject({ ...spec('vm1'), generation: 1 });
    // A second create (another host, a restarted agent) gets the record that is there, untouched.
    const again = await otherWriter(p).records.create({ ...spec('vm1'), primary: 'backup', backup: 'primary' });
    expect(again).toEqual(created);
    expect(await records.get('vm1')).toEqual(created);

    expect(await lease.claim('vm1')).toBe(true); // the owner key beside it is not a record
    await records.create(spec('vm2'));
    expect((await records.list()).map((r) => r.name)).toEqual(['vm1', 'vm2']);
    const entry = await records.getEntry('vm1');
    expect(entry?.modRevision).toMatch(/^\d+$/);

    expect(await records.remove('vm2')).toBe(true);
    expect(await records.remove('vm2')).toBe(false);
    expect((await records.list()).map((r) => r.name)).toEqual(['vm1']);
  });

  it('refuses invalid records: before writing them, and when reading them (naming the key)', async () => {
    const p = prefix();
    const { records } = await agentRecords(p);
    const { store } = otherWriter(p);
    await expect(records.create({ ...spec('vm1'), checkpointIntervalMs: -1 })).rejects.toThrow(/vms\/vm1\/spec: bad VM record: checkpointIntervalMs: /);
    expect(await records.get('vm1')).toBeUndefined(); // nothing written
    await records.create(spec('vm1'));
    await expect(records.update('vm1', () => ({ primary: '' }))).rejects.toThrow(InvalidRecordError);
    expect((await records.get('vm1'))?.generation).toBe(1); // nothing written

    await store.putJson(`${p}/vms/vm2/spec`, { name: 'vm2', xml: '<domain/>' });
    await expect(records.get('vm2')).rejects.toThrow(/vms\/vm2\/spec: bad VM record: primary: /);
    await expect(records.list()).rejects.toThrow(/vms\/vm2\/spec: bad VM record/);
    await store.putJson(`${p}/vms/vm3/spec`, { ...spec('vm1'), generation: 1, updatedAt: 'x' });
    await expect(records.get('vm3')).rejects.toThrow(/vms\/vm3\/spec: bad VM record: name: "vm1" is not the VM of its key \(vm3\)/);
    await expect(records.update('vm3', () => ({ protected: false }))).rejects.toThrow(InvalidRecordError);
    await expect(records.update('nope', () => ({ protected: false }))).rejects.toThrow(new RecordConflictError(`no record for VM 'nope' in etcd (${p}/vms/nope/spec)`));
  });

  it('updates by compare-and-swap: a concurrent writer\'s change is kept, and the change re-applied on top of it', async () => {
    const p = prefix();
    const { records } = await agentRecords(p);
    const other = otherWriter(p).records;
    await records.create(spec('vm1'));

    // The other host's agent writes between our read and our write: our first write must fail
    // its compare, and our change be applied again to what the other one wrote.
    const seen: VmRecord[] = [];
    const result = await records.update('vm1', async (current) => {
      seen.push(current);
      if (seen.length === 1) await other.update('vm1', () => ({ backup: 'witness', reason: 'other' }));
      return { protected: false, reason: 'unprotect' };
    });
    expect(seen.map((r) => r.generation)).toEqual([1, 2]);
    expect(seen[1]!.backup).toBe('witness');
    expect(result).toMatchObject({ backup: 'witness', protected: false, reason: 'unprotect', generation: 3 });
    expect(await records.get('vm1')).toEqual(result);

    // A change that returns nothing writes nothing.
    expect(await records.update('vm1', () => undefined)).toEqual(result);
    expect((await records.get('vm1'))?.generation).toBe(3);

    // Another writer getting in first every time: a bounded number of attempts, then an error.
    let attempts = 0;
    const error = await records
      .update('vm1', async () => {
        attempts++;
        await other.update('vm1', (r) => ({ keep: r.keep + 1 }));
        return { reason: 'never lands' };
      })
      .catch((e: unknown) => e);
    expect(error).toBeInstanceOf(RecordConflictError);
    expect((error as Error).message).toBe(`record of 'vm1' (${p}/vms/vm1/spec) was changed by another writer on each of 5 attempts`);
    expect(attempts).toBe(5);
    const final = await records.get('vm1');
    expect(final).toMatchObject({ keep: 8, generation: 8, reason: 'unprotect' });
  });

  it('watch: the current records, then puts and deletes; owner keys ignored; bad values reported, not delivered', async () => {
    const p = prefix();
    const { lease, records } = await agentRecords(p);
    const other = otherWriter(p);
    await records.create(spec('vm1'));
    const events: Array<[string, number | undefined]> = [];
    const errors: Error[] = [];
    cleanups.push(await records.watch((vm, record) => events.push([vm, record?.generation]), (error) => errors.push(error)));
    expect(events).toEqual([['vm1', 1]]);

    await other.records.create(spec('vm2'));
    await other.records.update('vm1', () => ({ reason: 'x' }));
    expect(await lease.claim('vm1')).toBe(true);
    await other.records.remove('vm2');
    await other.store.putJson(`${p}/vms/vm3/spec`, 'not a record');
    await other.store.client.put(`${p}/vms/vm4/spec`).value('{not json');
    await other.records.update('vm1', () => ({ reason: 'y' }));
    await waitFor('the second update of vm1', () => events.some(([vm, g]) => vm === 'vm1' && g === 3), 3_000, () => ({ events, errors }));
    expect(events).toEqual([
      ['vm1', 1],
      ['vm2', 1],
      ['vm1', 2],
      ['vm2', undefined],
      ['vm1', 3],
    ]);
    expect(errors.map((e) => [e.constructor, (e as InvalidRecordError).key])).toEqual([
      [InvalidRecordError, `${p}/vms/vm3/spec`],
      [InvalidRecordError, `${p}/vms/vm4/spec`],
    ]);
    expect(errors[0]!.message).toMatch(/vms\/vm3\/spec: bad VM record: \(the record\): /);
    expect(errors[1]!.message).toMatch(/vms\/vm4\/spec: the value is not JSON/);

    // Compacting etcd's history away under the watch disturbs nothing: later changes still come.
    const { header } = await other.store.client.kv.range({ key: Buffer.from('/'), count_only: true });
    await other.store.client.kv.compact({ revision: header.revision, physical: true });
    await other.records.update('vm1', () => ({ reason: 'after compaction' }));
    await waitFor('the update after the compaction', () => events.at(-1)?.[1] === 4, 3_000, () => ({ events, errors }));
    expect(errors).toHaveLength(2);
  });

  it('watch survives an etcd restart: reports the outage once, resumes, and delivers what changed', async () => {
    const p = prefix();
    const { records } = await agentRecords(p);
    await records.create(spec('vm1'));
    await records.create(spec('vm2'));
    const events: Array<{ vm: string; generation: number | undefined; at: number }> = [];
    const errors: Array<{ error: Error; at: number }> = [];
    let resumedAt: number | undefined;
    let resumed = 0;
    cleanups.push(
      await records.watch(
        (vm, record) => events.push({ vm, generation: record?.generation, at: performance.now() }),
        (error) => errors.push({ error, at: performance.now() }),
        { onResumed: () => (resumed++, (resumedAt = performance.now())) },
      ),
    );
    expect(events.map((e) => [e.vm, e.generation])).toEqual([
      ['vm1', 1],
      ['vm2', 1],
    ]);

    const { downAt, upAt } = await restartEtcdKeepingData();
    // Written the moment etcd answers again, likely before the watch is back: the re-read (or the
    // new stream) must deliver them.
    const other = otherWriter(p).records;
    await other.update('vm1', () => ({ reason: 'while the watch was down' }));
    await other.remove('vm2');
    await waitFor('the watch to resume', () => resumed > 0, 10_000, () => ({ events, errors: errors.map((e) => e.error.message) }));
    await waitFor('the changes made around the restart', () => events.some((e) => e.vm === 'vm2' && e.generation === undefined) && events.some((e) => e.vm === 'vm1' && e.generation === 2), 5_000, () => events);
    console.log(
      `etcd killed → records watch reported ${(errors[0]!.at - downAt).toFixed(0)} ms later (${errors[0]!.error.message}); ` +
        `etcd healthy again → watch resumed ${(resumedAt! - upAt).toFixed(0)} ms later`,
    );
    expect(errors).toHaveLength(1); // once per outage
    expect(errors[0]!.error).toBeInstanceOf(EtcdCallError);
    expect(resumed).toBe(1);
    // Nothing delivered twice or out of order: after the initial two, only the two changes.
    expect(events.slice(2).map((e) => [e.vm, e.generation]).sort()).toEqual([
      ['vm1', 2],
      ['vm2', undefined],
    ]);

    // And it works on.
    await other.update('vm1', () => ({ reason: 'after' }));
    await waitFor('a change after the resume', () => events.at(-1)?.generation === 3, 3_000, () => events);
  });
});
