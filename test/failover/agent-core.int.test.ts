/**
 * The agent's core decisions on real processes (two `ftvm agent`s, etcd on the witness, the probe
 * guest): a VM its user stops stays down on both hosts, a QEMU that dies fails over, and restarting
 * either agent neither fails the VM over nor lets two copies run — checked by asking the guest's
 * probe on both hosts every 50 ms.
 */
import fs from 'node:fs';
import path from 'node:path';
import { GuestAgentClient } from '@ftvm/qmp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { watchCopies } from '../support/copies-watch.js';
import { killQemuAndFailOver, readRecord, reprotectToOther } from '../support/failover-runs.js';
import {
  agentLog,
  other,
  probeOn,
  startAgent,
  startCluster,
  stopCluster,
  untilAgents,
  virsh,
  vmStatus,
  waitProtectedOn,
  type AgentHost,
  type Cluster,
} from '../support/ft-cluster.js';
import { patchedQemu } from '../support/patched-qemu.js';
import { daemonPids } from '../lab/host.js';
import { hostInfo } from '../lab/lab.js';
import { isAlive } from '../lab/procs.js';
import { sleep } from '../lab/wait.js';
import { waitForProbe } from '../support/probe-client.js';

let cluster: Cluster | undefined;
const hosts = { primary: probeOn('primary'), backup: probeOn('backup') };

const until = untilAgents;

const domState = (host: AgentHost, vm: string) => virsh(host, 'domstate', vm).then((s) => s.trim(), () => 'absent');

/** The user stops the VM with `stop`; it must stay down on both hosts, and come back protected when started again. */
async function stopsForGood(stop: (from: AgentHost, vm: string) => Promise<unknown>, reason: string): Promise<void> {
  const { vm } = cluster!;
  const from = cluster!.primary;
  const to = other(from);
  await waitProtectedOn(from, vm, { committedAfter: Date.now() });
  const watch = watchCopies(hosts);
  await stop(from, vm);
  const stopped = await until(`the record says ${vm} was stopped by the user`, async () => {
    const record = await readRecord(vm);
    return record.stopped ? record : undefined;
  });
  expect(stopped.stopped!.reason).toBe(reason);
  expect(stopped.stopped!.by).toBe(from);
  for (const host of [from, to]) {
    const status = await until(`${host} shows ${vm} stopped`, async () => {
      const s = await vmStatus(host, vm);
      return s?.phase === 'stopped' ? s : undefined;
    });
    expect(status.stopped?.reason).toBe(reason);
  }
  // well past a lease TTL and a take-over: nobody resurrects it
  await sleep(5_000);
  const report = await watch.stop();
  expect(report.doubles).toEqual([]);
  for (const host of [from, to]) expect(await domState(host, vm)).not.toBe('running');
  expect((await readRecord(vm)).lastMove?.to ?? from).toBe(from); // no failover
  expect(fs.readFileSync(agentLog(to), 'utf8')).not.toMatch(/"msg":"owner key acquired: taking over".*"kind":"failover"/);

  // started again on its primary: protected again
  await virsh(from, 'start', vm);
  await waitForProbe(probeOn(from), 60_000);
  await waitProtectedOn(from, vm, { committedAfter: Date.now() });
  const record = await readRecord(vm);
  expect(record.stopped).toBeUndefined();
  expect(record.protected).toBe(true);
  await until(`${to} keeps a standby again`, async () => ((await vmStatus(to, vm))?.phase === 'protected' ? true : undefined));
}

async function restartAgent(host: AgentHost): Promise<void> {
  const pid = cluster!.agentPids[host];
  process.kill(pid, 'SIGTERM');
  await until(`agent on ${host} exits after SIGTERM`, async () => (isAlive(pid) ? undefined : true), 40_000, 50);
  cluster!.agentPids[host] = await startAgent(host);
}

describe('agent core in the lab', () => {
  beforeAll(async () => {
    cluster = await startCluster({ emulator: patchedQemu(), workloadMiBps: 2, checkpointIntervalMs: 500, agent: true });
  }, 240_000);
  afterAll(async () => {
    await stopCluster(cluster);
  }, 60_000);

  it('a guest poweroff stays down on both hosts', async () => {
    await stopsForGood(async (from, vm) => {
      // the guest runs `poweroff -f` itself (through its agent, on ftvm's agent socket)
      const agent = await GuestAgentClient.connect({ path: path.join(hostInfo(from).runDir, 'ftvm', `${vm}.qga`) }, { connectTimeoutMs: 5_000 });
      try {
        await agent.execute('guest-exec', { path: '/bin/busybox', arg: ['poweroff', '-f'] }, 5_000).catch(() => undefined); // it may power off before answering
      } finally {
        await agent.close();
      }
    }, 'guest-shutdown');
  }, 240_000);

  it('virsh shutdown stays down on both hosts', async () => {
    await stopsForGood((from, vm) => virsh(from, 'shutdown', '--mode', 'acpi', vm), 'guest-shutdown');
  }, 240_000);

  it('virsh destroy stays down on both hosts', async () => {
    await stopsForGood((from, vm) => virsh(from, 'destroy', vm), 'host-signal');
  }, 240_000);

  it('a QEMU killed with SIGKILL still fails over', async () => {
    await waitProtectedOn(cluster!.primary, cluster!.vm, { committedAfter: Date.now() });
    const { record, doubles } = await killQemuAndFailOver(cluster!);
    expect(record.lastMove!.kind).toBe('failover');
    expect(record.stopped).toBeUndefined();
    expect(doubles).toBe(0);
    await reprotectToOther(cluster!);
  }, 240_000);

  for (const sshdAnswers of [true, false]) {
    it(`restarting the primary's agent hands the VM over, never two copies${sshdAnswers ? '' : " (primary's sshd not answering)"}`, async () => {
      const { vm } = cluster!;
      const from = cluster!.primary;
      const to = other(from);
      await waitProtectedOn(from, vm, { committedAfter: Date.now() });
      const sshd = daemonPids(hostInfo(from)).sshd;
      if (!sshdAnswers) {
        expect(sshd).toBeDefined();
        process.kill(sshd!, 'SIGSTOP');
      }
      const watch = watchCopies(hosts);
      const bootId = (await waitForProbe(probeOn(from), 5_000)).bootId;
      try {
        await restartAgent(from);
      } finally {
        if (!sshdAnswers) process.kill(sshd!, 'SIGCONT');
      }
      cluster!.primary = to;
      const status = await waitProtectedOn(to, vm, { committedAfter: Date.now() });
      expect(status.role).toBe('primary');
      await sleep(1_000);
      const report = await watch.stop();
      expect(report.doubles, 'two copies answered at once').toEqual([]);
      expect(report.answeredFrom).toEqual([from, to]);
      const record = await readRecord(vm);
      expect(record.lastMove?.kind).toBe('switchover');
      expect(record.protected).toBe(true);
      // the same guest, not a restore of an older checkpoint: it kept its boot
      expect((await waitForProbe(probeOn(to), 5_000)).bootId).toBe(bootId);
      // the restarted agent is the backup with a warm standby
      await until(`${from} is the backup again`, async () => {
        const s = await vmStatus(from, vm);
        return s?.role === 'backup' && s.phase === 'protected' && s.domainState === 'paused' ? s : undefined;
      });
    }, 240_000);
  }

  it("restarting the backup's agent keeps the VM protected and rebuilds the standby", async () => {
    const { vm } = cluster!;
    const primary = cluster!.primary;
    const backup = other(primary);
    await waitProtectedOn(primary, vm, { committedAfter: Date.now() });
    const watch = watchCopies(hosts);
    const pid = cluster!.agentPids[backup];
    process.kill(pid, 'SIGTERM');
    await until(`agent on ${backup} exits`, async () => (isAlive(pid) ? undefined : true), 40_000, 50);
    // checkpoints go on into the backup's store while its agent is away (the primary says degraded:
    // no heartbeats from its backup)
    const during = Date.now();
    const away = await until(`${primary} commits a checkpoint while ${backup}'s agent is away`, async () => {
      const s = await vmStatus(primary, vm);
      return s?.role === 'primary' && (s.lastCheckpoint?.epoch ?? 0) > during ? s : undefined;
    });
    expect(['protected', 'degraded']).toContain(away.phase);
    cluster!.agentPids[backup] = await startAgent(backup);
    await until(`${backup} rebuilds its standby`, async () => {
      const s = await vmStatus(backup, vm);
      return s?.role === 'backup' && s.phase === 'protected' && s.domainState === 'paused' ? s : undefined;
    });
    const report = await watch.stop();
    expect(report.doubles).toEqual([]);
    expect(report.answeredFrom).toEqual([primary]);
    expect((await readRecord(vm)).primary).toBe(primary);
  }, 240_000);

  it('no agent logged an error for the normal start of protection (no checkpoint yet)', () => {
    for (const host of ['primary', 'backup'] as const) {
      const errors = fs.readFileSync(agentLog(host), 'utf8').split('\n').filter((l) => l.includes('"level":50'));
      expect(errors.filter((l) => l.includes('no committed checkpoint'))).toEqual([]);
    }
  });
});
