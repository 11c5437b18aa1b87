/**
 * Failover by the agents of a guest on the narrowest clocksource a PC machine offers (acpi_pm:
 * 2.34 s per read) with 2 vCPUs, killed late in a 4 s checkpoint interval so that the outage
 * (the resumed checkpoint's stop → the resume) is over 3 s. The staged restore carries at most
 * the machine's safe step in the clock sections and gives the rest back in place; the whole gap
 * in one step would be lost (test/clock/clocksource-failover.int.test.ts shows that loss).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { agentLogEntries, startCluster, stopCluster, type Cluster } from '../support/ft-cluster.js';
import { runFault } from '../support/failover-runs.js';
import { patchedQemu } from '../support/patched-qemu.js';

let cluster: Cluster | undefined;

describe('agent failover of an acpi_pm guest with 2 vCPUs, outage over 3 s', () => {
  beforeAll(async () => {
    cluster = await startCluster({ vm: 'ft-acpipm', emulator: patchedQemu(), workloadMiBps: 4, checkpointIntervalMs: 4000, clocksource: 'acpi_pm', vcpus: 2 });
  }, 240_000);
  afterAll(async () => {
    await stopCluster(cluster);
  }, 60_000);

  it('resumes with the whole outage given back: the guest clock moves by at most 5 ms', async () => {
    for (let i = 0; i < 2; i++) {
      const to = cluster!.primary === 'primary' ? 'backup' : 'primary';
      const run = await runFault(cluster!, 'kill', (line) => console.log(line), { afterCommitMs: 2500 });
      console.log(JSON.stringify(run));
      expect(run.continuityOk, 'workload continues from the last committed checkpoint').toBe(true);
      expect(run.doubleActive).toBe(false);
      expect(run.outageMs, 'the outage must exceed what acpi_pm can show at once, or this proves nothing').toBeGreaterThan(3000);
      const resumed = agentLogEntries(to, 'VM resumed from its last committed checkpoint').at(-1)!;
      expect(resumed['firstStepMs']).toBeLessThanOrEqual(1172);
      expect(resumed['inPlaceSteps']).toBeGreaterThanOrEqual(2);
      expect(resumed['uncorrectedMs']).toBe(0);
      expect(Math.abs(run.offsetMs)).toBeLessThanOrEqual(5);
    }
  }, 600_000);
});
