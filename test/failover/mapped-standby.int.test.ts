/**
 * The mapped standby on real processes (issue 18): the backup's standby maps its RAM from a file
 * on the host's tmpfs that the backup agent keeps at the newest committed checkpoint, so a failover
 * loads only device state. Checked here: what `ftvm status` and the file's stamp say; a kill of
 * the primary before the backup has applied its newest checkpoints (the failover finishes the
 * apply first, and resumes that checkpoint); a restart of the backup's agent (the standby and its
 * file are rebuilt from the store, then a failover loads only device state). The corrupt-newest
 * case is in agent-faults; speed is pnpm bench:failover's (its `sweep`).
 */
import fs from 'node:fs';
import { readRamFileStamp } from '@ftvm/transport';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runFault } from '../support/failover-runs.js';
import { agentLogEntries, other, ramApplyGate, startAgent, startCluster, stopCluster, storeEpochs, untilAgents, vmStatus, type Cluster } from '../support/ft-cluster.js';
import { patchedQemu } from '../support/patched-qemu.js';
import { isAlive } from '../lab/procs.js';

const MEMORY_MIB = 256;
// the per-checkpoint apply lines are debug
process.env['FTVM_TEST_AGENT_LOG_LEVEL'] ??= 'debug';
let cluster: Cluster | undefined;

const mappedStagings = (host: 'primary' | 'backup', since: number) =>
  agentLogEntries(host, 'staging restore onto the mapped standby: device state only').filter((e) => Date.parse(String(e['time'])) >= since);

describe('mapped standby in the lab', () => {
  beforeAll(async () => {
    cluster = await startCluster({ emulator: patchedQemu(), workloadMiBps: 4, checkpointIntervalMs: 1000, memoryMiB: MEMORY_MIB, agentEnv: ramApplyGate.env });
  }, 240_000);
  afterAll(async () => {
    await stopCluster(cluster);
  }, 60_000);

  it('the backup keeps its standby warm: status, the RAM file on tmpfs and its stamp', async () => {
    const { vm } = cluster!;
    const backup = other(cluster!.primary);
    const status = await untilAgents('a warm standby', async () => {
      const s = await vmStatus(backup, vm);
      return s?.standby?.ram === 'warm' ? s : undefined;
    });
    expect(status.standby!.domain).toBe(true);
    const file = String(agentLogEntries(backup, 'standby RAM warm: a failover loads only device state').at(-1)?.['file']);
    expect(file.startsWith('/dev/shm/')).toBe(true);
    expect(fs.statSync(file).size).toBe(MEMORY_MIB * 1024 * 1024);
    const stamp = await readRamFileStamp(file);
    expect(stamp?.state).toBe('applied');
    // it follows the store: within a few checkpoints of the newest committed
    expect(stamp!.epoch).toBeGreaterThanOrEqual(status.standby!.ramEpoch!);
    await untilAgents('the file at a newer checkpoint', async () => ((await readRamFileStamp(file))!.epoch > stamp!.epoch ? true : undefined), 10_000);
  }, 60_000);

  it('a kill before the backup applied its newest checkpoints: the apply is finished, then only device state loads', async () => {
    const { vm } = cluster!;
    const to = other(cluster!.primary);
    const atGate = await ramApplyGate.close(to, vm);
    await untilAgents('two checkpoints committed behind the gate', async () => (storeEpochs(to, vm).filter((e) => e > atGate).length >= 2 ? true : undefined), 20_000);
    const since = Date.now();
    let openedAt = 0;
    let newest: number | undefined;
    const run = await runFault(cluster!, 'kill', (line) => console.log(line), {
      // the backup is held from applying until well after the kill: its take-over must wait for the apply
      onFault: () =>
        void setTimeout(() => {
          newest = storeEpochs(to, vm).at(-1);
          openedAt = Date.now();
          ramApplyGate.open();
        }, 400),
    });
    console.log(JSON.stringify(run));
    expect(openedAt).toBeGreaterThan(0);
    expect(run.continuityOk).toBe(true);
    expect(run.doubleActive).toBe(false);
    // the newest committed checkpoint, not the one the file held at the kill
    expect(run.epoch).toBe(newest);
    expect(run.epoch).toBeGreaterThan(atGate);
    const applied = agentLogEntries(to, 'standby RAM at checkpoint').find((e) => e['epoch'] === run.epoch);
    expect(Date.parse(String(applied?.['time']))).toBeGreaterThanOrEqual(openedAt);
    expect(mappedStagings(to, since).map((e) => e['epoch'])).toEqual([run.epoch]);
    expect(Math.abs(run.offsetMs)).toBeLessThan(5);
  }, 240_000);

  it("a restarted backup agent rebuilds the standby and its RAM file; the next failover loads only device state", async () => {
    const { vm } = cluster!;
    const backup = other(cluster!.primary);
    const pid = cluster!.agentPids[backup];
    process.kill(pid, 'SIGTERM');
    await untilAgents(`agent on ${backup} exits`, async () => (isAlive(pid) ? undefined : true), 40_000, 50);
    const restartedAt = Date.now();
    cluster!.agentPids[backup] = await startAgent(backup, cluster!.agentEnv?.[backup]);
    await untilAgents(`${backup}'s rebuilt standby warm`, async () => ((await vmStatus(backup, vm))?.standby?.ram === 'warm' ? true : undefined), 120_000);
    const rebuilt = agentLogEntries(backup, 'standby RAM at checkpoint').filter((e) => Date.parse(String(e['time'])) >= restartedAt);
    // a new standby's file is filled from the store's chain: its first apply starts with a full checkpoint
    expect(rebuilt[0]?.['full']).toBe(true);
    const run = await runFault(cluster!, 'kill', (line) => console.log(line));
    console.log(JSON.stringify(run));
    expect(run.to).toBe(backup);
    expect(run.continuityOk).toBe(true);
    expect(run.doubleActive).toBe(false);
    expect(mappedStagings(backup, restartedAt).map((e) => e['epoch'])).toEqual([run.epoch]);
    expect(Math.abs(run.offsetMs)).toBeLessThan(5);
  }, 300_000);
});
