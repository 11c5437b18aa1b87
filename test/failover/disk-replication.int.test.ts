/**
 * Disk replication on real processes (issue #15): the probe guest with two local qcow2 disks — a
 * counter ring written with O_DIRECT|O_DSYNC, and ext4 under continuous file writes — protected
 * by two `ftvm agent`s without shared storage. After each failover:
 * - byte equality: the replica the backup resumed on hashes exactly as the primary's fleecing
 *   point did at that checkpoint's stop instant (both hashed by the agents in audit mode);
 * - the guest's view: its own read-back of the ring finds the disk neither older nor newer than
 *   its RAM, and it keeps writing;
 * - a copy of the replica's file system is clean after journal replay;
 * - reprotect reseeds the old primary, and a failover back works the same way.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { fsckCopy, readRing } from '../support/disk-check.js';
import { killQemuAndFailOver, reprotectToOther } from '../support/failover-runs.js';
import { agentLogEntries, CLUSTER_DIR, probeOn, startCluster, stopCluster, untilAgents, waitProtectedOn, type AgentHost, type Cluster } from '../support/ft-cluster.js';
import { patchedQemu } from '../support/patched-qemu.js';
import { diskCounters } from '../support/probe-client.js';

const AUDIT_DIR = path.join(CLUSTER_DIR, 'disk-audit');
let cluster: Cluster | undefined;

interface Audit {
  role: 'fleece' | 'replica';
  epoch: number;
  disk: string;
  sha256: string;
  copy?: string;
}

const audits = (host: AgentHost, role: Audit['role']) => (agentLogEntries(host, 'disk audit') as unknown as Audit[]).filter((a) => a.role === role);

beforeAll(async () => {
  // the agents inherit it (test harness only): fleece hashes per checkpoint, replica copies at failover
  process.env['FTVM_TEST_DISK_AUDIT'] = AUDIT_DIR;
  cluster = await startCluster({ vm: 'ft-disk', emulator: patchedQemu(), checkpointIntervalMs: 1000, disks: { format: 'qcow2', ringMiB: 4, fsMiB: 32 } });
}, 240_000);

afterAll(async () => {
  await stopCluster(cluster);
  delete process.env['FTVM_TEST_DISK_AUDIT'];
}, 60_000);

/** Kills the VM's QEMU where it runs and checks what the backup resumed on. */
async function failOverAndCheck(): Promise<void> {
  const c = cluster!;
  const from = c.primary;
  await waitProtectedOn(from, c.vm, { committedAfter: Date.now() + 500 });
  const before = await diskCounters(probeOn(from));
  expect(before.ring.state).toBe('running');
  expect(before.fs.state).toBe('running');
  const { record, doubles } = await killQemuAndFailOver(c);
  expect(doubles).toBe(0);
  const epoch = record.lastMove!.epoch;
  const to = c.primary;

  // byte equality, disk by disk, at the checkpoint the backup resumed
  const replicas = await untilAgents(`${to} audits its replicas of epoch ${epoch}`, async () => {
    const found = audits(to, 'replica').filter((a) => a.epoch === epoch);
    return found.length === 2 ? found : undefined;
  });
  const fleeces = audits(from, 'fleece').filter((a) => a.epoch === epoch);
  expect(fleeces.map((f) => f.disk).sort()).toEqual(['vda', 'vdb']);
  for (const replica of replicas) expect(replica.sha256, `disk ${replica.disk} at epoch ${epoch}`).toBe(fleeces.find((f) => f.disk === replica.disk)!.sha256);

  // the guest's own view: a read-back check after the resume found no disk/RAM mismatch, and it writes on
  const after = await untilAgents(`the guest on ${to} checks its ring after the resume`, async () => {
    const d = await diskCounters(probeOn(to));
    return d.bootId === before.bootId && d.ring.checks > before.ring.checks && d.ring.completed > before.ring.completed - 2000n ? d : undefined;
  });
  expect(after.ring.violations).toBe(0);
  expect(after.ring.state).toBe('running');
  expect(after.fs.state).toBe('running');
  const later = await untilAgents('the ring and fs advance on the new primary', async () => {
    const d = await diskCounters(probeOn(to));
    return d.ring.completed > after.ring.completed && d.fs.cycles > after.fs.cycles ? d : undefined;
  });
  expect(later.ring.violations).toBe(0);

  // the replicas as the VM resumed on them: a consistent file system, a ring of this boot
  const fsCopy = replicas.find((r) => r.disk === 'vdb')!.copy!;
  const fsck = await fsckCopy(path.join(AUDIT_DIR, path.basename(fsCopy)), 'raw');
  expect(fsck.clean, fsck.output).toBe(true);
  const ring = await readRing(path.join(AUDIT_DIR, path.basename(replicas.find((r) => r.disk === 'vda')!.copy!)), 'raw', { bootId: before.bootId });
  expect(ring.corrupt).toBeLessThanOrEqual(1);
  expect(ring.missing).toBe(0);
  expect(ring.newest).toBeGreaterThan(0n);
}

describe('disk replication', () => {
  it('a VM with local disks fails over onto a replica equal to its disks at the checkpoint, and back after a reseed', async () => {
    await failOverAndCheck();
    await reprotectToOther(cluster!); // the old primary is reseeded
    await failOverAndCheck();
    expect(fs.readdirSync(AUDIT_DIR).length).toBeGreaterThanOrEqual(4);
  }, 600_000);
});
