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
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AUDIT_DIR, checkDisksAfterFailover } from '../support/disk-audit.js';
import { killQemuAndFailOver, readRecord, reprotectToOther } from '../support/failover-runs.js';
import { other, probeOn, startAgent, startCluster, stopCluster, untilAgents, vmStatus, waitProtectedOn, type Cluster } from '../support/ft-cluster.js';
import { isAlive } from '../lab/procs.js';
import { patchedQemu } from '../support/patched-qemu.js';
import { diskCounters } from '../support/probe-client.js';

let cluster: Cluster | undefined;

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
  const to = c.primary;
  const check = await checkDisksAfterFailover({ from, to, epoch: record.lastMove!.epoch, bootId: before.bootId, checksBefore: before.ring.checks });
  // byte equality, disk by disk, at the checkpoint the backup resumed
  expect(check.disks.map((d) => d.disk).sort()).toEqual(['vda', 'vdb']);
  for (const d of check.disks) expect(d.replica, `disk ${d.disk} at epoch ${check.epoch}`).toBe(d.fleece);
  // the guest's own view: no disk/RAM mismatch in its read-back after the resume, and it writes on
  expect(check.ring.violations).toBe(0);
  expect(check.ring.state).toBe('running');
  expect(check.fs.state).toBe('running');
  const later = await untilAgents('the ring and fs advance on the new primary', async () => {
    const d = await diskCounters(probeOn(to));
    return d.ring.completed > check.ring.completed && d.fs.cycles > check.fs.cycles ? d : undefined;
  });
  expect(later.ring.violations).toBe(0);
  // the replicas as the VM resumed on them: a consistent file system, a ring of this boot
  expect(check.fsck.clean, check.fsck.output).toBe(true);
  expect(check.ringOnDisk.corrupt).toBeLessThanOrEqual(1);
  expect(check.ringOnDisk.missing).toBe(0);
  expect(check.ringOnDisk.newest).toBeGreaterThan(0n);
}

describe('disk replication', () => {
  it('a VM with local disks fails over onto a replica equal to its disks at the checkpoint, and back after a reseed', async () => {
    await failOverAndCheck();
    await reprotectToOther(cluster!); // the old primary is reseeded
    await failOverAndCheck();
    expect(fs.readdirSync(AUDIT_DIR).length).toBeGreaterThanOrEqual(4);
  }, 600_000);

  it("stopping the primary's agent hands the VM and its disks over by switchover", async () => {
    const c = cluster!;
    await reprotectToOther(c); // a failover leaves the VM unprotected
    const from = c.primary;
    const to = other(from);
    await untilAgents(`${to} keeps a warm standby`, async () => ((await vmStatus(to, c.vm))?.phase === 'protected' ? true : undefined), 120_000);
    await waitProtectedOn(from, c.vm, { committedAfter: Date.now() });
    const before = await diskCounters(probeOn(from));
    const previous = (await readRecord(c.vm)).lastMove?.at;
    const pid = c.agentPids[from];
    process.kill(pid, 'SIGTERM');
    await untilAgents(`agent on ${from} exits after SIGTERM`, async () => (isAlive(pid) ? undefined : true), 60_000, 50);
    const record = await untilAgents(`${to} runs ${c.vm} after the switchover`, async () => {
      const r = await readRecord(c.vm);
      return r.lastMove && r.lastMove.at !== previous && r.lastMove.kind === 'switchover' && r.lastMove.to === to ? r : undefined;
    });
    c.primary = to;
    const check = await checkDisksAfterFailover({ from, to, epoch: record.lastMove!.epoch, bootId: before.bootId, checksBefore: before.ring.checks });
    for (const d of check.disks) expect(d.replica, `disk ${d.disk} at the switchover's checkpoint ${check.epoch}`).toBe(d.fleece);
    expect(check.ring.violations).toBe(0);
    expect(check.fsck.clean, check.fsck.output).toBe(true);
    // the agent comes back as the backup, reseeded
    c.agentPids[from] = await startAgent(from);
    await waitProtectedOn(to, c.vm, { committedAfter: Date.now() });
    await untilAgents(`${from} keeps a standby on its reseeded replicas`, async () => ((await vmStatus(from, c.vm))?.phase === 'protected' ? true : undefined), 120_000);
  }, 300_000);
});
