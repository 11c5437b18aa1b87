/**
 * A backup's store can hold checkpoints of an earlier run of protection: from before an
 * unprotect, or from the last time that host was the backup. When the primary dies before the
 * first checkpoint of the current run reaches the backup, there is nothing to take over from:
 * resuming an older checkpoint would bring back a past state of the VM (the guest's counter going
 * back by however long it ran unprotected). The VM is lost instead, and stays down.
 *
 * The first checkpoint of the new run is kept off the backup by its store refusing writes
 * (the immutable flag: even root cannot create a file there), so every attempt is nacked.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { $ } from 'zx';
import { hostInfo, killHost } from '../lab/lab.js';
import { sleep } from '../lab/wait.js';
import { readRecord } from '../support/failover-runs.js';
import { agentLog, agentLogEntries, controlClient, other, reviveHost, startCluster, stopCluster, untilAgents, virsh, waitProtectedOn, type Cluster } from '../support/ft-cluster.js';
import { patchedQemu } from '../support/patched-qemu.js';

let cluster: Cluster | undefined;
let immutable: string | undefined;

describe('a run of protection', () => {
  beforeAll(async () => {
    cluster = await startCluster({ emulator: patchedQemu(), workloadMiBps: 2, checkpointIntervalMs: 200, agent: true });
  }, 240_000);
  afterAll(async () => {
    if (immutable) await $`chattr -i ${immutable}`.nothrow();
    await stopCluster(cluster);
  }, 120_000);

  it('a backup never resumes a checkpoint from before the current protection', async () => {
    const { vm } = cluster!;
    const from = cluster!.primary;
    const to = other(from);
    await waitProtectedOn(from, vm, { committedAfter: Date.now() });
    const oldEpochs = fs.readdirSync(path.join(hostInfo(to).libvirtLibDir, 'ftvm', 'checkpoints', vm)).filter((n) => /^\d+\.json$/.test(n));
    expect(oldEpochs.length, 'the backup holds checkpoints of the first run').toBeGreaterThan(0);

    await controlClient(from).unprotect(vm, () => undefined);
    await sleep(1_500); // the VM runs on unprotected: its state moves past every checkpoint the backup has
    immutable = path.join(hostInfo(to).libvirtLibDir, 'ftvm', 'checkpoints', vm);
    await $`chattr +i ${immutable}`;
    const protectAt = Date.now();
    // protect waits for a committed checkpoint, which cannot come: not awaited
    const protecting = controlClient(from)
      .protect({ vm, backup: to, checkpointIntervalMs: 200 }, () => undefined)
      .then(
        () => 'protected',
        (error: Error) => error.message,
      );
    const record = await untilAgents('the record says protected again, from a new run', async () => {
      const r = await readRecord(vm);
      return r.protected && (r.checkpointsSince ?? 0) >= protectAt ? r : undefined;
    });
    await untilAgents('a checkpoint of the new run nacked by the backup', async () =>
      agentLogEntries(from, 'checkpoint failed').some((e) => Date.parse(String(e['time'])) >= protectAt && /not permitted|EPERM|permission/i.test(String(e['err']))) ? true : undefined,
    );
    const logOffset = fs.statSync(agentLog(to)).size;
    const killedAt = Date.now();
    await killHost(from);
    // well past the lease TTL, the staging and a take-over
    await sleep(8_000);
    const after = fs.readFileSync(agentLog(to), 'utf8').slice(logOffset);
    console.log(`record since ${record.checkpointsSince}; backup's checkpoints ${oldEpochs.join(', ')}; protect said: ${await Promise.race([protecting, sleep(0).then(() => '(still waiting)')])}`);
    expect(after, 'the backup took the VM over from a checkpoint of an earlier run').not.toMatch(/"msg":"owner key acquired: taking over"/);
    expect(after).toMatch(/no committed checkpoint yet: nothing to take over from/);
    expect((await virsh(to, 'domstate', vm).catch(() => 'absent')).trim()).not.toBe('running');
    expect(Date.now() - killedAt).toBeGreaterThanOrEqual(8_000);

    await $`chattr -i ${immutable}`;
    immutable = undefined;
    await reviveHost(from, cluster!);
  }, 240_000);
});
