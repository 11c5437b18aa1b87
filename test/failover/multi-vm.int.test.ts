/**
 * Many VMs per host pair, on the real agents in the lab: four probe guests (128 MiB, workload
 * running), ft-m1/ft-m2 with their primary on `primary`, ft-m3/ft-m4 on `backup`, each host the
 * other's backup. Killing `primary` fails its two over to `backup`; the two that already ran there
 * keep running without their backup and say so; `primary` comes back, `ftvm reprotect` makes it
 * the backup of the two that moved, and all four are protected again. Failover time and clock
 * offset per VM are measured by `pnpm bench:failover` (multi_vm); here the properties are asserted.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { controlClient } from '../support/ft-cluster.js';
import { MULTI_VMS, runMultiKill, startMultiCluster, stopMultiCluster, type MultiCluster } from '../support/multi-vm.js';
import { patchedQemu } from '../support/patched-qemu.js';

let mc: MultiCluster | undefined;

describe('four VMs on one host pair', () => {
  beforeAll(async () => {
    mc = await startMultiCluster({ emulator: patchedQemu(), memoryMiB: 128, workloadMiBps: 1, checkpointIntervalMs: 1000 });
  }, 420_000);
  afterAll(async () => {
    await stopMultiCluster(mc);
  }, 120_000);

  it('runs two protected VMs as primary on each host, each the backup of the other two', async () => {
    for (const host of ['primary', 'backup'] as const) {
      const status = await controlClient(host).status();
      for (const spec of MULTI_VMS) {
        const vm = status.vms.find((v) => v.name === spec.name);
        expect(vm, `${spec.name} on ${host}`).toBeDefined();
        expect(vm!.role, `${spec.name}'s role on ${host}`).toBe(spec.home === host ? 'primary' : 'backup');
        if (spec.home === host) expect(vm!.phase, `${spec.name} on ${host}: ${vm!.reason}`).toBe('protected');
      }
    }
  }, 60_000);

  it('kill of primary: its two fail over, the other two keep running and say they lost their backup, reprotect protects all four', async () => {
    const run = await runMultiKill(mc!, 'primary', (line) => console.log(line));
    console.log(JSON.stringify(run, null, 2));

    expect(run.failedOver.map((f) => f.vm).sort()).toEqual(['ft-m1', 'ft-m2']);
    for (const f of run.failedOver) {
      expect(f.continuityOk, `${f.vm}: workload continues from the last committed checkpoint`).toBe(true);
      expect(f.doubleActive, `${f.vm}: two running copies`).toBe(false);
      expect(f.failoverS, `${f.vm}: the move records the backup's last heartbeat`).toBeDefined();
      // the clock was moved forward over the outage (uncorrected it would be > 1000 ms behind)
      expect(Math.abs(f.offsetMs), `${f.vm}: clock offset change`).toBeLessThan(100);
    }

    expect(run.bystanders.map((b) => b.vm).sort()).toEqual(['ft-m3', 'ft-m4']);
    for (const b of run.bystanders) {
      expect(b.phaseBefore, `${b.vm} before the kill`).toBe('protected');
      expect(b.keptRunning, `${b.vm}: same boot, counting, answering only from backup`).toBe(true);
      // answered throughout: never a silence longer than a slow checkpoint (not a restart, not a move)
      expect(b.longestSilenceMs, `${b.vm}: longest time without a probe answer`).toBeLessThan(2_000);
      expect(b.saidUnprotected, `${b.vm} said ${JSON.stringify(b.said)}`).toBe(true);
      const lost = b.said.filter((s) => s.phase === 'degraded' || s.phase === 'unprotected');
      // the reason names the backup that went away
      expect(lost.some((s) => s.reason.includes('primary')), `${b.vm}'s reason: ${JSON.stringify(lost)}`).toBe(true);
    }

    // all four protected again, all on backup now, primary the backup of each
    for (const host of ['primary', 'backup'] as const) {
      const status = await controlClient(host).status();
      for (const spec of MULTI_VMS) {
        const vm = status.vms.find((v) => v.name === spec.name)!;
        expect(vm.role, `${spec.name}'s role on ${host}`).toBe(host === 'backup' ? 'primary' : 'backup');
        expect(vm.phase, `${spec.name} on ${host}: ${vm.reason}`).toBe('protected');
      }
    }
  }, 300_000);
});
