/**
 * The failover coordinator end to end on real processes: two `ftvm agent`s in the lab, etcd on the
 * witness, the protected probe guest with its workload. Each fault hits whichever host runs the
 * VM; the other takes over from the last committed checkpoint, and `reprotect` turns the old one
 * into the new backup. Speed and clock accuracy are measured by `pnpm bench:failover`; here the
 * properties that must always hold are asserted.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { controlClient, probeOn, startCluster, stopCluster, waitProtectedOn, type Cluster } from '../support/ft-cluster.js';
import { runFault, type FaultKind } from '../support/failover-runs.js';
import { patchedQemu } from '../support/patched-qemu.js';
import { clockOffset } from '../support/probe-client.js';

// the count: 10 of each fault, every run checked (bench:failover measures the same runs)
const RUNS = Number(process.env.FTVM_FAILOVER_TEST_RUNS ?? 10);
let cluster: Cluster | undefined;

describe('failover coordinator in the lab', () => {
  beforeAll(async () => {
    cluster = await startCluster({ emulator: patchedQemu(), workloadMiBps: 4, checkpointIntervalMs: 1000 });
  }, 240_000);
  afterAll(async () => {
    await stopCluster(cluster);
  }, 60_000);

  it('reports status and takes a checkpoint on demand', async () => {
    const status = await controlClient(cluster!.primary).status();
    const vm = status.vms.find((v) => v.name === cluster!.vm)!;
    expect(vm.role).toBe('primary');
    expect(vm.leaseHolder).toBe(cluster!.primary);
    expect(status.lease.healthy).toBe(true);
    const before = vm.lastCheckpoint!;
    const now = await controlClient(cluster!.primary).checkpointNow(cluster!.vm);
    expect(now.epoch).toBeGreaterThan(before.epoch);
    // with ftvm's QEMU it builds on the last one and carries what changed since, not the guest
    expect(now.base).toBeGreaterThanOrEqual(before.epoch);
    expect(now.bytes).toBeGreaterThan(10_000);
    expect(now.bytes).toBeLessThan(64 * 1024 * 1024);
    const backup = await controlClient(cluster!.primary === 'primary' ? 'backup' : 'primary').status();
    expect(backup.vms.find((v) => v.name === cluster!.vm)?.role).toBe('backup');
  }, 60_000);

  it('moves the VM with a planned switchover, clock kept', async () => {
    const from = cluster!.primary;
    const to = from === 'primary' ? 'backup' : 'primary';
    const before = await clockOffset(probeOn(from), { samples: 16 });
    const result = await controlClient(from).switchover(cluster!.vm, () => undefined);
    expect(result.to).toBe(to);
    cluster!.primary = to;
    const after = await clockOffset(probeOn(to), { samples: 16 });
    expect(after.bootId).toBe(before.bootId);
    // without the clock rewrite the guest would be behind by the whole downtime
    expect(Math.abs(Number(after.offsetNs - before.offsetNs)) / 1e6).toBeLessThan(Math.max(20, result.downtimeMs / 4));
    await waitProtectedOn(to, cluster!.vm, { committedAfter: Date.now() });
  }, 120_000);

  for (const kind of ['kill', 'partition', 'freeze'] as FaultKind[]) {
    it(`takes over after ${kind} of the primary, never two copies (${RUNS} runs)`, async () => {
      for (let i = 0; i < RUNS; i++) {
        const run = await runFault(cluster!, kind, (line) => console.log(line));
        console.log(JSON.stringify(run));
        expect(run.continuityOk, 'workload continues from the last committed checkpoint').toBe(true);
        expect(run.doubleActive, 'two running copies').toBe(false);
        if (kind !== 'kill') expect(run.oldStoppedFirst, "the old copy's STOP precedes the new RESUME").toBe(true);
        if (kind === 'freeze') expect(run.frozenNeverRanAgain).toBe(true);
        // the clock was moved forward over the outage (uncorrected it would be > 1000 ms behind)
        expect(Math.abs(run.offsetMs)).toBeLessThan(100);
      }
    }, 900_000);
  }
});
