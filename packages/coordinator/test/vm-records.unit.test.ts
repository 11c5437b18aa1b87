/**
 * VmRecords' pure parts: validating a record (what a reader refuses and what a writer is refused),
 * telling record keys from the other keys under the prefix, and the option checks. What it does
 * against etcd is in vm-records.int.test.ts.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { InvalidRecordError, VmRecords, checkRecord, type VmRecord } from '../src/agent/vm-records.js';
import { ClusterStore } from '../src/lease/cluster-store.js';
import { EtcdSession } from '../src/lease/etcd-session.js';
import { vmOfSpecKey } from '../src/lease/keys.js';

const KEY = '/ftvm/vms/vm1/spec';
const record: VmRecord = {
  name: 'vm1',
  xml: '<domain/>',
  primary: 'alpha',
  backup: 'beta',
  protected: true,
  checkpointIntervalMs: 1000,
  keep: 3,
  generation: 1,
  updatedAt: '2026-12-01T00:00:00.000Z',
  reason: 'protect',
};

function invalid(value: unknown, vm?: string): InvalidRecordError {
  try {
    checkRecord(KEY, value, vm);
  } catch (error) {
    expect(error).toBeInstanceOf(InvalidRecordError);
    return error as InvalidRecordError;
  }
  throw new Error(`accepted ${JSON.stringify(value)}`);
}

describe('checkRecord', () => {
  it('accepts a valid record and drops fields the schema does not know', () => {
    expect(checkRecord(KEY, record, 'vm1')).toEqual(record);
    expect(checkRecord(KEY, { ...record, stray: 1 })).toEqual(record);
    const moved = { ...record, lastMove: { kind: 'failover', from: 'alpha', to: 'beta', epoch: 7, stopNs: '1', resumeNs: '2', at: 'x' } };
    expect(checkRecord(KEY, moved)).toEqual(moved);
  });

  it('names the key and every bad field', () => {
    const error = invalid({ ...record, primary: '', checkpointIntervalMs: -5, generation: undefined });
    expect(error.key).toBe(KEY);
    expect(error.message).toMatch(/^\/ftvm\/vms\/vm1\/spec: bad VM record: /);
    expect(error.message).toMatch(/primary: /);
    expect(error.message).toMatch(/checkpointIntervalMs: /);
    expect(error.message).toMatch(/generation: /);
    expect(invalid({ ...record, lastMove: { kind: 'teleport' } }).message).toMatch(/lastMove\.kind: /);
  });

  it('refuses what is not an object at all, and a record filed under another VM', () => {
    expect(invalid('vm1').message).toMatch(/bad VM record: \(the record\): /);
    expect(invalid(null).message).toMatch(/bad VM record: \(the record\): /);
    expect(invalid(record, 'vm2').message).toBe(`${KEY}: bad VM record: name: "vm1" is not the VM of its key (vm2)`);
  });
});

describe('vmOfSpecKey', () => {
  it('finds the VM of a record key and nothing in any other key', () => {
    expect(vmOfSpecKey('/ftvm', '/ftvm/vms/vm1/spec')).toBe('vm1');
    expect(vmOfSpecKey('/ftvm/', '/ftvm/vms/db-2.prod/spec')).toBe('db-2.prod');
    expect(vmOfSpecKey('/ftvm', '/ftvm/vms/vm1/owner')).toBeUndefined();
    expect(vmOfSpecKey('/ftvm', '/ftvm/vms/a/b/spec')).toBeUndefined(); // not a VM name
    expect(vmOfSpecKey('/ftvm', '/ftvm/vms//spec')).toBeUndefined();
    expect(vmOfSpecKey('/ftvm', '/other/vms/vm1/spec')).toBeUndefined();
    expect(vmOfSpecKey('/ftvm', '/ftvm2/vms/vm1/spec')).toBeUndefined();
  });
});

describe('VmRecords options', () => {
  const stores: ClusterStore[] = [];
  afterEach(async () => {
    for (const store of stores.splice(0)) await store.close();
  });
  // No etcd call is made: constructing a store only creates the client.
  const store = () => {
    const s = ClusterStore.open({ endpoints: ['http://127.0.0.1:9'], requestTimeoutMs: 100 });
    stores.push(s);
    return s;
  };

  it('normalises the prefix as the lease does and refuses VM names that cannot be keys', () => {
    const records = new VmRecords(store(), '/ftvm/');
    expect(records.prefix).toBe('/ftvm');
    expect(records.key('vm1')).toBe('/ftvm/vms/vm1/spec');
    expect(() => records.key('a/b')).toThrow(/not a VM name usable in an etcd key: "a\/b"/);
    expect(() => new VmRecords(store(), 'ftvm')).toThrow(/prefix must start with '\/'/);
  });

  it('refuses a deadline that is not positive', async () => {
    expect(() => new VmRecords(store(), '/ftvm', { timeoutMs: 0 })).toThrow('VmRecords: timeoutMs must be positive, got 0');
    const session = new EtcdSession(['http://127.0.0.1:9'], 100);
    try {
      let ran = false;
      await expect(session.call('get x', async () => (ran = true), -1)).rejects.toThrow('etcd: get x: the deadline must be positive, got -1 ms');
      expect(ran).toBe(false);
    } finally {
      session.close();
    }
  });
});
