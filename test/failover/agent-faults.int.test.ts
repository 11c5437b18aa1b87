/**
 * What the agents do when parts of a host misbehave, on real processes: libvirtd restarting under
 * a checkpointing primary, a backup that refuses every checkpoint, a corrupt newest checkpoint, a
 * device hot-plugged on the primary, a checkpoint QEMU refuses to load, and a new primary that
 * must not checkpoint into its own store.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { watchCopies } from '../support/copies-watch.js';
import { killQemuAndFailOver as killQemuAndFailOverOn, readRecord, reprotectToOther, updateRecord } from '../support/failover-runs.js';
import { installHook, uninstallHook } from '@ftvm/libvirt';
import { Etcd3 } from 'etcd3';
import {
  ETCD_PREFIX,
  HOOK_SOCKET_NAME,
  agentLogEntries,
  other,
  probeOn,
  probeVmXml,
  qemuPidOf,
  ramApplyGate,
  removeVm,
  startCluster,
  stopCluster,
  storeDir,
  storeEpochs as epochsIn,
  untilAgents,
  virsh,
  vmStatus,
  waitProtectedOn,
  type AgentHost,
  type Cluster,
} from '../support/ft-cluster.js';
import { patchedQemu } from '../support/patched-qemu.js';
import { clockOffset, waitForProbe } from '../support/probe-client.js';
import { restartLibvirtd } from '../lab/libvirtd.js';
import { hostInfo, labEtcdEndpoint } from '../lab/lab.js';
import { sleep } from '../lab/wait.js';

let cluster: Cluster | undefined;
const hosts = { primary: probeOn('primary'), backup: probeOn('backup') };

const until = untilAgents;

const killQemuAndFailOver = async () => {
  const { record, doubles } = await killQemuAndFailOverOn(cluster!);
  expect(doubles).toBe(0);
  return { epoch: record.lastMove!.epoch, to: cluster!.primary };
};
const reprotect = () => reprotectToOther(cluster!);

describe('agent faults in the lab', () => {
  beforeAll(async () => {
    cluster = await startCluster({ emulator: patchedQemu(), workloadMiBps: 2, checkpointIntervalMs: 500, agentEnv: ramApplyGate.env });
  }, 240_000);
  afterAll(async () => {
    await stopCluster(cluster);
  }, 60_000);

  it('libvirtd restarting under the primary: checkpoints go on, no failover', async () => {
    const { vm } = cluster!;
    const from = cluster!.primary;
    await waitProtectedOn(from, vm, { committedAfter: Date.now() });
    const moveBefore = (await readRecord(vm)).lastMove?.at;
    const watch = watchCopies(hosts);
    await restartLibvirtd(from);
    const after = Date.now();
    const status = await waitProtectedOn(from, vm, { committedAfter: after });
    expect(status.domainState).toBe('running');
    // the agent's libvirt connection is back: a later look says running, not absent
    await sleep(1_500);
    expect((await vmStatus(from, vm))?.domainState).toBe('running');
    const report = await watch.stop();
    expect(report.doubles).toEqual([]);
    expect(report.answeredFrom).toEqual([from]);
    expect((await readRecord(vm)).lastMove?.at).toBe(moveBefore);
  }, 120_000);

  it('a backup that refuses every checkpoint makes the primary say degraded, and why', async () => {
    const { vm } = cluster!;
    const from = cluster!.primary;
    const to = other(from);
    await waitProtectedOn(from, vm, { committedAfter: Date.now() });
    const dir = storeDir(to, vm);
    const aside = `${dir}.aside-${process.pid}`;
    fs.renameSync(dir, aside);
    fs.writeFileSync(dir, 'not a directory\n'); // every commit on the backup fails now
    try {
      const degraded = await until(`${from} says degraded`, async () => {
        const s = await vmStatus(from, vm);
        return s?.phase === 'degraded' ? s : undefined;
      });
      expect(degraded.reason).toMatch(/checkpoints to .* failed/);
    } finally {
      fs.rmSync(dir, { force: true });
      fs.renameSync(aside, dir);
    }
    await waitProtectedOn(from, vm, { committedAfter: Date.now() });
  }, 120_000);

  it('a corrupt newest checkpoint is skipped at failover, not taken for newer', async () => {
    const { vm } = cluster!;
    const from = cluster!.primary;
    const to = other(from);
    await waitProtectedOn(from, vm, { committedAfter: Date.now() });
    // the backup applies nothing to its standby's RAM until the newest checkpoint is corrupt
    const held = await ramApplyGate.close(to, vm);
    await until('a checkpoint committed behind the gate', async () => ((epochsIn(to, vm).at(-1) ?? 0) > held ? true : undefined));
    // freeze the primary's QEMU: no checkpoint after this; its agent fences it once QMP stops answering
    const pid = (await qemuPidOf(from, vm))!;
    const before = (await readRecord(vm)).lastMove?.at;
    process.kill(pid, 'SIGSTOP');
    await sleep(150);
    const newest = epochsIn(to, vm).at(-1)!;
    // a checkpoint the store compacted lives in the file its metadata names
    const meta = JSON.parse(fs.readFileSync(path.join(storeDir(to, vm), `${newest}.json`), 'utf8')) as { dataFile?: string };
    const data = path.join(storeDir(to, vm), meta.dataFile ?? `${newest}.ckpt`);
    const fd = fs.openSync(data, 'r+');
    const byte = Buffer.alloc(1);
    fs.readSync(fd, byte, 0, 1, 4096);
    byte[0] = byte[0]! ^ 0xff;
    fs.writeSync(fd, byte, 0, 1, 4096);
    fs.closeSync(fd);
    ramApplyGate.open();
    const record = await until(`${to} takes ${vm} over`, async () => {
      const r = await readRecord(vm);
      return r.lastMove && r.lastMove.at !== before && r.lastMove.to === to ? r : undefined;
    });
    try {
      process.kill(pid, 'SIGCONT');
    } catch {
      // fenced already
    }
    // the standby's RAM file stayed at the checkpoint before the corrupt one, and only device state was loaded onto it
    const previous = epochsIn(to, vm).filter((e) => e < newest).at(-1);
    expect(record.lastMove!.epoch).toBe(previous);
    expect(agentLogEntries(to, 'restaging').filter((e) => String(e['time']) > new Date(Date.now() - 60_000).toISOString())).toEqual([]);
    expect(agentLogEntries(to, 'a checkpoint does not verify: the standby RAM stays at the one before').some((e) => String(e['err']).includes(`checkpoint ${newest}`))).toBe(true);
    expect(agentLogEntries(to, 'staging restore onto the mapped standby: device state only').at(-1)?.['epoch']).toBe(previous);
    await waitForProbe(probeOn(to), 30_000);
    cluster!.primary = to;
    // the new primary does not checkpoint into its own store before it has a backup again
    const ownBefore = epochsIn(to, vm).at(-1) ?? 0;
    await sleep(2_000);
    expect(epochsIn(to, vm).filter((e) => e > ownBefore)).toEqual([]);
    const status = await vmStatus(to, vm);
    expect(status?.phase).toBe('unprotected');
    expect(status?.lastCheckpoint).toBeUndefined();
    await reprotect();
  }, 180_000);

  it('a device hot-plugged on the primary reaches the standby; the VM still fails over', async () => {
    const { vm } = cluster!;
    const from = cluster!.primary;
    const to = other(from);
    await waitProtectedOn(from, vm, { committedAfter: Date.now() });
    const xmlBefore = (await readRecord(vm)).xml!;
    const nic = path.join(os.tmpdir(), `ftvm-nic-${process.pid}.xml`);
    fs.writeFileSync(nic, "<interface type='user'><mac address='52:54:00:f7:00:42'/><model type='virtio'/></interface>\n");
    await virsh(from, 'attach-device', vm, nic, '--live');
    const record = await until('the record takes the new device', async () => {
      const r = await readRecord(vm);
      return r.xml && r.xml !== xmlBefore && r.xml.includes('52:54:00:f7:00:42') ? r : undefined;
    });
    expect(record.reason).toBe('devices changed');
    // the backup rebuilt its standby from the new XML
    await until(`${to} rebuilds its standby`, async () => {
      const s = await vmStatus(to, vm);
      const xml = s?.domainState === 'paused' ? await virsh(to, 'dumpxml', vm) : '';
      return xml.includes('52:54:00:f7:00:42') ? true : undefined;
    });
    await waitProtectedOn(from, vm, { committedAfter: Date.now() });
    const { to: now } = await killQemuAndFailOver();
    expect(await virsh(now, 'dumpxml', vm)).toContain('52:54:00:f7:00:42');
    await reprotect();
  }, 240_000);

  it('a checkpoint QEMU refuses to load is an error the backup acts on, then a fixed domain fails over', async () => {
    const { vm } = cluster!;
    const from = cluster!.primary;
    const to = other(from);
    await waitProtectedOn(from, vm, { committedAfter: Date.now() });
    const good = (await readRecord(vm)).xml!;
    const machine = /machine=(['"])([^'"]+)\1/.exec(good);
    expect(machine?.[2]).toMatch(/^pc/);
    // an operator's mistake: the record now names another machine type than the running VM's
    await updateRecord(vm, { xml: good.replace(machine![0], "machine='pc-i440fx-6.2'") });
    await until(`${to} rebuilds its standby on the new XML`, async () => {
      const xml = await virsh(to, 'dumpxml', vm).catch(() => '');
      return xml.includes("machine='pc-i440fx-6.2'") ? true : undefined;
    });
    const agentPid = cluster!.agentPids[to];
    const pid = (await qemuPidOf(from, vm))!;
    process.kill(pid, 'SIGKILL');
    const standing = await until(`${to} stands down and says why`, async () => {
      const s = await vmStatus(to, vm);
      return s?.reason.includes('standing down') ? s : undefined;
    }, 120_000);
    expect(standing.reason).toMatch(/Machine type received is/);
    expect(standing.phase).toBe('waiting');
    expect(() => process.kill(agentPid, 0)).not.toThrow(); // the agent did not crash
    // the operator puts the right XML back: the take-over goes through
    await updateRecord(vm, { xml: good });
    const record = await until(`${to} takes ${vm} over`, async () => {
      const r = await readRecord(vm);
      return r.lastMove?.to === to && r.primary === to ? r : undefined;
    }, 120_000);
    expect(record.lastMove!.kind).toBe('failover');
    await waitForProbe(probeOn(to), 30_000);
    cluster!.primary = to;
    await reprotect();
  }, 300_000);

  it('past the point of no return a failure is retried, never a kill of the resumed VM', async () => {
    const { vm } = cluster!;
    const from = cluster!.primary;
    const to = other(from);
    await waitProtectedOn(from, vm, { committedAfter: Date.now() });
    const key = `${ETCD_PREFIX}/vms/${vm}/spec`;
    const etcd = new Etcd3({ hosts: [labEtcdEndpoint()] });
    try {
      const good = await etcd.get(key).string();
      expect(good).toBeTruthy();
      const before = JSON.parse(good!).lastMove?.at;
      const pid = (await qemuPidOf(from, vm))!;
      process.kill(pid, 'SIGKILL');
      // the record becomes unreadable right after the fault: the backup still resumes the VM from
      // what it knew, and then cannot write the move
      await etcd.put(key).value('{ not a record');
      const stuck = await until(`${to} runs ${vm} but cannot record the move`, async () => {
        const s = await vmStatus(to, vm);
        return s?.domainState === 'running' && s.phase === 'degraded' && /record must say so/.test(s.reason) ? s : undefined;
      });
      expect(stuck.leaseHolder).toBe(to);
      // it keeps running while the write keeps failing
      const watch = watchCopies(hosts);
      await sleep(3_000);
      const report = await watch.stop();
      expect(report.answeredFrom).toEqual([to]);
      expect(report.longestSilenceMs).toBeLessThan(1_000);
      expect(report.doubles).toEqual([]);
      // etcd readable again: the move is recorded, nothing was restarted
      const bootId = (await waitForProbe(probeOn(to), 5_000)).bootId;
      await etcd.put(key).value(good!);
      const record = await until('the move is recorded', async () => {
        const r = await readRecord(vm);
        return r.lastMove && r.lastMove.at !== before && r.lastMove.to === to && r.primary === to ? r : undefined;
      });
      expect(record.protected).toBe(false);
      expect((await waitForProbe(probeOn(to), 5_000)).bootId).toBe(bootId);
      cluster!.primary = to;
    } finally {
      etcd.close();
    }
    await reprotect();
  }, 180_000);

  it('a clock policy that leaves failovers uncorrected resumes the guest behind by the outage', async () => {
    const { vm } = cluster!;
    const from = cluster!.primary;
    const to = other(from);
    await waitProtectedOn(from, vm, { committedAfter: Date.now() });
    const good = (await readRecord(vm)).xml!;
    const policy = /compensate=(['"])checkpoint migration failover\1/.exec(good);
    expect(policy).not.toBeNull();
    await updateRecord(vm, { xml: good.replace(policy![0], "compensate='checkpoint migration'") });
    await until(`${to} rebuilds its standby on the new policy`, async () => {
      const xml = await virsh(to, 'dumpxml', vm).catch(() => '');
      return /compensate=(['"])checkpoint migration\1/.test(xml) ? true : undefined;
    });
    await waitProtectedOn(from, vm, { committedAfter: Date.now() });
    const before = await clockOffset(probeOn(from), { samples: 16 });
    await killQemuAndFailOver();
    const after = await clockOffset(probeOn(cluster!.primary), { samples: 16 });
    const move = (await readRecord(vm)).lastMove!;
    const outageMs = Number(BigInt(move.resumeNs) - BigInt(move.stopNs)) / 1e6;
    const lostMs = Number(before.offsetNs - after.offsetNs) / 1e6;
    // nothing moved the guest clock over the outage (with the default policy it is within a few ms)
    expect(outageMs).toBeGreaterThan(300);
    expect(lostMs).toBeGreaterThan(outageMs - 50);
    expect(lostMs).toBeLessThan(outageMs + 50);
    await updateRecord(vm, { xml: (await readRecord(vm)).xml!.replace(/compensate=(['"])checkpoint migration\1/, "compensate='checkpoint migration failover'") });
    await reprotect();
  }, 240_000);

  it('the libvirt hook has the agent protect a started ftvm domain, and its stop stays a stop', async () => {
    const from = cluster!.primary;
    const to = other(from);
    const hooksDir = path.join(hostInfo(from).libvirtEtcDir, 'hooks');
    installHook({ hooksDir, endpoint: `unix:/run/ftvm/${HOOK_SOCKET_NAME}` });
    await reloadLibvirtdHooks(from);
    const { name, xml } = await probeVmXml({ vm: 'ft-hooked', probePort: 5557, memoryMiB: 128, peer: to });
    try {
      await removeVm(name);
      const file = path.join(os.tmpdir(), `${name}-${process.pid}.xml`);
      fs.writeFileSync(file, xml);
      await virsh(from, 'define', file);
      await virsh(from, 'start', name); // nothing else: the hook tells the agent
      const record = await until(`the agent on ${from} protects ${name}`, async () => {
        const r = await readRecord(name);
        return r.protected && r.primary === from && r.backup === to ? r : undefined;
      }, 120_000);
      expect(record.reason).toBe('protect');
      await waitProtectedOn(from, name, { committedAfter: 0, timeoutMs: 60_000 });
      await virsh(from, 'destroy', name);
      const stopped = await until(`${name} is recorded as stopped`, async () => {
        const r = await readRecord(name);
        return r.stopped ? r : undefined;
      });
      expect(stopped.stopped!.reason).toBe('host-signal');
      await sleep(3_000);
      expect((await virsh(to, 'domstate', name).catch(() => 'absent')).trim()).not.toBe('running');
    } finally {
      uninstallHook({ hooksDir });
      await reloadLibvirtdHooks(from).catch(() => undefined);
      await removeVm(name);
    }
  }, 240_000);
});

/** SIGHUP the host's libvirtd and wait until its reload has rescanned the hooks (a `daemon` hook marks it). */
async function reloadLibvirtdHooks(host: AgentHost): Promise<void> {
  const info = hostInfo(host);
  const hooksDir = path.join(info.libvirtEtcDir, 'hooks');
  const mark = path.join(os.tmpdir(), `ftvm-reload-${process.pid}`);
  fs.rmSync(mark, { force: true });
  fs.mkdirSync(hooksDir, { recursive: true });
  fs.writeFileSync(path.join(hooksDir, 'daemon'), `#!/bin/sh\n[ "$2" = reload ] && echo "$@" > ${mark}\nexit 0\n`, { mode: 0o755 });
  process.kill(Number(fs.readFileSync(path.join(info.runDir, 'libvirtd.pid'), 'utf8').trim()), 'SIGHUP');
  await until('libvirtd reloads its hooks', async () => (fs.existsSync(mark) ? true : undefined), 10_000, 20);
  fs.rmSync(path.join(hooksDir, 'daemon'), { force: true });
  fs.rmSync(mark, { force: true });
}
