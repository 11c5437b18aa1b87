import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Etcd3 } from 'etcd3';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { $ } from 'zx';
import {
  cutLink,
  ensureLabEtcd,
  etcdHealthy,
  execIn,
  freezeHost,
  hostInfo,
  killHost,
  LAB_HOSTS,
  labDown,
  labEtcdDataDir,
  labEtcdEndpoint,
  labEtcdEndpoints,
  labEtcdMode,
  labEtcdPid,
  labKnownHosts,
  labLeftovers,
  labRemoteLibvirtUri,
  labSshKey,
  labStatus,
  labUp,
  restartHost,
  restoreLink,
  SERVICE_HOST_BRIDGE,
  spawnDaemonIn,
  startLabEtcd,
  stopLabEtcd,
  thawHost,
  type LabHostName,
} from './lab.js';

// Real namespaces, daemons and links: the whole lab life cycle, in order.
const run = $({ quiet: true, nothrow: true, timeout: 15_000 });
const sshOptions = (ip: string) => [
  '-F', '/dev/null', '-i', labSshKey(), '-o', `UserKnownHostsFile=${labKnownHosts()}`, '-o', 'StrictHostKeyChecking=yes',
  '-o', 'BatchMode=yes', '-o', 'ConnectTimeout=2', `root@${ip}`,
];
/** ssh from the root namespace (the test runner) with the lab key and the pinned host keys. */
const sshFromRoot = (to: LabHostName, timeoutMs = 8_000) => run({ timeout: timeoutMs })`ssh ${sshOptions(hostInfo(to).ip)} hostname`;
/** ssh from inside one lab host to another. */
const sshBetween = (from: LabHostName, to: LabHostName, timeoutMs = 8_000) =>
  execIn(from, ['ssh', ...sshOptions(hostInfo(to).ip), 'hostname'], { timeoutMs }).nothrow();
const virsh = (name: LabHostName, args: string[], timeoutMs = 5_000) =>
  run({ timeout: timeoutMs })`virsh -c ${hostInfo(name).libvirtUri} ${args}`;
const PING = fs.existsSync('/usr/bin/ping') || fs.existsSync('/bin/ping') ? ['ping'] : ['busybox', 'ping'];
const ping = (from: LabHostName, to: LabHostName) =>
  execIn(from, [...PING, '-c', '1', '-W', '1', hostInfo(to).ip], { timeoutMs: 5_000 }).nothrow();
const alive = (pid: number) => {
  try {
    return !/^\d+ \(.*\) Z/.test(fs.readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return false;
  }
};
const daemonPidsOf = async (name: LabHostName) => {
  const { hosts } = await labStatus();
  const host = hosts.find((h) => h.name === name)!;
  return [host.holderPid, host.daemons.virtlogd, host.daemons.libvirtd, host.daemons.sshd, ...host.spawned];
};

const since = (started: number) => Math.round(performance.now() - started);
/** An etcd client on just these endpoints (closed by the caller). */
const etcdOn = (hosts: string[]) => new Etcd3({ hosts, dialTimeout: 2_000 });
async function etcdGet(hosts: string[], key: string): Promise<string | null> {
  const client = etcdOn(hosts);
  try {
    return await client.get(key).string();
  } finally {
    client.close();
  }
}
async function etcdPut(hosts: string[], key: string, value: string): Promise<void> {
  const client = etcdOn(hosts);
  try {
    await client.put(key).value(value);
  } finally {
    client.close();
  }
}

let tmp: string;
beforeAll(async () => {
  tmp = fs.mkdtempSync('/tmp/ftvm-lab-test-');
  await labDown(); // measure a real start; also proves down copes with whatever was there
});
afterAll(async () => {
  await labDown();
  fs.rmSync(tmp, { recursive: true, force: true });
});

describe('lab', () => {
  it('comes up from nothing with three healthy hosts', async () => {
    const result = await labUp();
    console.log(`lab up from nothing: ${result.durationMs} ms`);
    expect(result.built).toBe(true);
    const { bridge, serviceBridge, hosts } = await labStatus();
    expect(bridge).toBe(true);
    expect(serviceBridge).toBe(true);
    for (const host of hosts) {
      expect(host, host.name).toMatchObject({ network: true, service: true, linkUp: true, frozen: false, libvirt: true, ssh: true });
      expect(Object.values(host.daemons).every((pid) => pid !== undefined), `${host.name} daemons`).toBe(true);
    }
  });

  it("reaches each host's own libvirtd through its socket", async () => {
    const libvirtdPids = new Set<number | undefined>();
    for (const name of LAB_HOSTS) {
      expect((await virsh(name, ['list', '--all'])).exitCode, name).toBe(0);
      // Its own UTS namespace, its own daemon:
      expect((await virsh(name, ['hostname'])).stdout.trim()).toBe(name);
      libvirtdPids.add((await labStatus()).hosts.find((h) => h.name === name)?.daemons.libvirtd);
    }
    expect(libvirtdPids.size).toBe(3);
  });

  it("logs into each host's sshd with the lab key, checking the pinned host key", async () => {
    for (const name of LAB_HOSTS) expect((await sshFromRoot(name)).stdout.trim(), name).toBe(name);
    // Pinning is real: with an empty known_hosts and strict checking, ssh refuses.
    const empty = path.join(tmp, 'known_hosts');
    fs.writeFileSync(empty, '');
    const unpinned = await run`ssh ${sshOptions(hostInfo('backup').ip).map((o) => o.replace(labKnownHosts(), empty))} true`;
    expect(unpinned.exitCode).not.toBe(0);
    expect(unpinned.stderr).toMatch(/Host key verification failed/);
  });

  it('connects the hosts to each other: ping, ssh, libvirt over ssh', async () => {
    for (const from of LAB_HOSTS) for (const to of LAB_HOSTS) if (from !== to) expect((await ping(from, to)).exitCode, `${from}→${to}`).toBe(0);
    expect((await sshBetween('primary', 'backup')).stdout.trim()).toBe('backup');
    const ip = hostInfo('backup').ip;
    const viaKeyfile = `qemu+ssh://root@${ip}/system?keyfile=${labSshKey()}&no_verify=1`;
    expect((await execIn('primary', ['virsh', '-c', viaKeyfile, 'hostname'])).stdout.trim()).toBe('backup');
    // Inside a host, /etc/ssh/ssh_config is the lab's: names, key and pinned host keys need no URI parameters.
    expect((await execIn('primary', ['virsh', '-c', 'qemu+ssh://backup/system', 'list'])).exitCode).toBe(0);
    expect((await execIn('witness', ['virsh', '-c', labRemoteLibvirtUri('primary'), 'hostname'])).stdout.trim()).toBe('primary');
  });

  it('is a no-op to bring up again', async () => {
    const holders = LAB_HOSTS.map((name) => hostInfo(name).holderPid);
    const result = await labUp();
    console.log(`lab up when up: ${result.durationMs} ms`);
    // no-op: nothing built, the same host holders (its time is logged, not asserted: a loaded CI
    // host took 2.9–6.7 s for what takes 0.3 s alone)
    expect(result.built).toBe(false);
    expect(LAB_HOSTS.map((name) => hostInfo(name).holderPid)).toEqual(holders);
  });

  it("plugs a guest's tap into a host's service bridge (libvirt inside the host)", async () => {
    const dir = fs.mkdtempSync(path.join(tmp, 'svc-'));
    const xml = path.join(dir, 'svc.xml');
    // no kernel to boot: started paused, the tap exists as soon as QEMU does
    fs.writeFileSync(xml, `<domain type='qemu'><name>lab-svc</name><memory unit='MiB'>32</memory><os><type arch='x86_64' machine='pc'>hvm</type></os>
      <devices><interface type='bridge'><mac address='52:54:00:5e:01:01'/><source bridge='${SERVICE_HOST_BRIDGE}'/><model type='virtio'/></interface><memballoon model='none'/></devices></domain>`);
    for (const name of ['primary', 'backup'] as const) {
      expect((await virsh(name, ['define', xml])).exitCode, name).toBe(0);
      try {
        const started = await virsh(name, ['start', '--paused', 'lab-svc'], 30_000);
        expect(started.exitCode, `${name}: ${started.stderr}`).toBe(0);
        const tap = (await execIn(name, ['ip', '-o', 'link', 'show', 'master', SERVICE_HOST_BRIDGE])).stdout;
        expect(tap, name).toMatch(/vnet\d+.*fe:54:00:5e:01:01/s);
      } finally {
        await virsh(name, ['destroy', 'lab-svc']);
        await virsh(name, ['undefine', 'lab-svc']);
      }
    }
  });

  it("stops the witness's etcd and starts it again on its data (single member)", async () => {
    expect(labEtcdMode()).toBe('witness');
    expect(labEtcdEndpoints()).toEqual([labEtcdEndpoint()]);
    await etcdPut(labEtcdEndpoints(), 'lab/kept', 'yes');
    await expect(stopLabEtcd('primary')).rejects.toThrow(/primary runs no etcd member/);

    let started = performance.now();
    const killed = await stopLabEtcd('witness');
    console.log(`single: stopLabEtcd (SIGKILL) ${since(started)} ms`);
    expect(killed !== undefined && alive(killed)).toBe(false);
    expect(labEtcdPid()).toBeUndefined();
    expect(await etcdHealthy()).toBe(false);
    started = performance.now();
    const { pid } = await startLabEtcd('witness');
    console.log(`single: startLabEtcd on its data dir ${since(started)} ms`);
    expect(pid).not.toBe(killed);
    expect(await etcdGet(labEtcdEndpoints(), 'lab/kept')).toBe('yes');

    // a graceful stop too; and labUp leaves a member that answers alone
    await stopLabEtcd('witness', 'SIGTERM');
    const again = (await startLabEtcd()).pid;
    expect((await labUp()).built).toBe(false);
    expect(labEtcdPid(), 'labUp left the running member alone').toBe(again);
    expect(await etcdGet(labEtcdEndpoints(), 'lab/kept')).toBe('yes');
  });

  it('runs etcd as three members, one per host; two keep a quorum while the witness is down', async () => {
    let started = performance.now();
    const { members, endpoints } = await ensureLabEtcd({ members: 'all' });
    console.log(`etcd single → three members: ${since(started)} ms`);
    const witnessEndpoint = labEtcdEndpoint('witness');
    try {
      expect(members).toBe('all');
      expect(labEtcdMode()).toBe('all');
      expect(endpoints).toEqual(LAB_HOSTS.map((name) => `http://${hostInfo(name).ip}:2379`));
      expect(labEtcdEndpoints()).toEqual(endpoints);
      expect(await etcdGet(endpoints, 'lab/kept'), 'a fresh cluster').toBeNull();
      for (const name of LAB_HOSTS) {
        expect(await etcdHealthy(labEtcdEndpoint(name)), name).toBe(true);
        const pid = labEtcdPid(name);
        expect(pid, name).toBeDefined();
        expect(fs.readlinkSync(`/proc/${pid}/ns/net`), `${name}'s member in its netns`).toBe(fs.readlinkSync(`/proc/${hostInfo(name).holderPid}/ns/net`));
      }
      const client = etcdOn(endpoints);
      try {
        expect((await client.cluster.memberList({})).members.map((m) => m.name).sort()).toEqual([...LAB_HOSTS].sort());
        await client.put('lab/before').value('1');
      } finally {
        client.close();
      }

      started = performance.now();
      const killed = await stopLabEtcd('witness');
      console.log(`three: stopLabEtcd(witness) (SIGKILL) ${since(started)} ms`);
      expect(killed !== undefined && alive(killed)).toBe(false);
      expect(await etcdHealthy(witnessEndpoint)).toBe(false);
      const remaining = endpoints.filter((e) => e !== witnessEndpoint);
      // If the witness led, the other two elect a leader first (election timeout 200 ms).
      for (const endpoint of remaining) await expect.poll(() => etcdHealthy(endpoint), { timeout: 5_000, interval: 20, message: endpoint }).toBe(true);
      console.log(`three: primary and backup healthy ${since(started)} ms after the kill`);
      started = performance.now();
      expect(await etcdGet(remaining, 'lab/before')).toBe('1');
      await etcdPut(remaining, 'lab/while-down', '2');
      expect(await etcdGet(remaining, 'lab/while-down')).toBe('2');
      console.log(`three: get, put, get on primary+backup without the witness ${since(started)} ms`);

      started = performance.now();
      const { pid } = await startLabEtcd('witness');
      console.log(`three: startLabEtcd(witness) on its data dir ${since(started)} ms`);
      expect(pid).not.toBe(killed);
      // through the witness alone (a quorum read): it rejoined and caught up
      expect(await etcdGet([witnessEndpoint], 'lab/before')).toBe('1');
      expect(await etcdGet([witnessEndpoint], 'lab/while-down')).toBe('2');

      // restartHost kills the host's member with the rest of it, and starts it again on its data dir
      const backupPid = labEtcdPid('backup');
      started = performance.now();
      await restartHost('backup');
      console.log(`three: restartHost(backup) with its member ${since(started)} ms`);
      expect(labEtcdPid('backup')).toBeDefined();
      expect(labEtcdPid('backup')).not.toBe(backupPid);
      expect(await etcdGet([labEtcdEndpoint('backup')], 'lab/while-down')).toBe('2');

      // labUp in that mode starts a member missing beside running ones again on its data dir
      await stopLabEtcd('primary');
      started = performance.now();
      expect((await labUp({ etcdMembers: 'all' })).built).toBe(false);
      console.log(`three: labUp with primary's member down ${since(started)} ms`);
      expect(labEtcdMode()).toBe('all');
      expect(labEtcdPid('primary')).toBeDefined();
      expect(await etcdGet([labEtcdEndpoint('primary')], 'lab/while-down')).toBe('2');
    } finally {
      started = performance.now();
      await ensureLabEtcd({ members: 'witness' });
      console.log(`etcd three members → single: ${since(started)} ms`);
    }
    expect(labEtcdMode()).toBe('witness');
    expect(labEtcdEndpoints()).toEqual([witnessEndpoint]);
    expect([labEtcdPid('primary'), labEtcdPid('backup')]).toEqual([undefined, undefined]);
    expect(fs.existsSync(labEtcdDataDir('primary')) || fs.existsSync(labEtcdDataDir('backup'))).toBe(false);
    expect(await etcdGet(labEtcdEndpoints(), 'lab/before'), 'a fresh cluster').toBeNull();
  });

  it('kills a host, whose daemons then answer nothing, and restarts it', async () => {
    const before = await daemonPidsOf('backup');
    await killHost('backup');
    expect(before.filter((pid) => pid !== undefined && alive(pid))).toEqual([]);
    expect(hostInfo('backup').holderPid).toBeUndefined();
    expect((await virsh('backup', ['list'])).exitCode).not.toBe(0);
    expect((await sshBetween('primary', 'backup')).exitCode).not.toBe(0);
    // Only processes die: the netns and its kernel stay, so ping is still answered and TCP is
    // refused at once. A host that answers nothing at all is killHost + cutLink.
    expect((await ping('primary', 'backup')).exitCode).toBe(0);

    const started = performance.now();
    await restartHost('backup');
    console.log(`restartHost: ${Math.round(performance.now() - started)} ms`);
    expect((await virsh('backup', ['list'])).exitCode).toBe(0);
    expect((await sshBetween('primary', 'backup')).stdout.trim()).toBe('backup');
    expect(hostInfo('backup').holderPid).not.toBe(before[0]);
  });

  it('cuts a host off the lab network and restores it', async () => {
    const serviceUp = async () => /[<,]UP[,>]/.test((await run`ip -o link show dev ${hostInfo('primary').service.vethOutside}`).stdout);
    await cutLink('primary');
    expect(await serviceUp(), 'one cable: the service uplink goes down too').toBe(false);
    expect((await ping('backup', 'primary')).exitCode).not.toBe(0);
    expect((await sshBetween('backup', 'primary', 5_000)).exitCode).not.toBe(0);
    expect((await virsh('primary', ['list'])).exitCode).toBe(0); // alive, just unreachable
    await restoreLink('primary');
    expect(await serviceUp()).toBe(true);
    expect((await ping('backup', 'primary')).exitCode).toBe(0);
    expect((await sshBetween('backup', 'primary')).stdout.trim()).toBe('primary');
  });

  it('freezes a host, whose daemons then answer nothing, and thaws it', async () => {
    await freezeHost('primary');
    expect((await labStatus()).hosts.find((h) => h.name === 'primary')?.frozen).toBe(true);
    expect((await virsh('primary', ['list'], 2_000)).exitCode).not.toBe(0);
    expect((await sshBetween('backup', 'primary', 3_000)).exitCode).not.toBe(0);
    await thawHost('primary');
    expect((await virsh('primary', ['list'])).exitCode).toBe(0);
    expect((await sshBetween('backup', 'primary')).stdout.trim()).toBe('primary');
  });

  it('runs an extra daemon inside a host and reaps it with the host', async () => {
    const log = path.join(tmp, 'daemon.log');
    const pid = spawnDaemonIn('witness', ['sh', '-c', 'hostname; exec sleep 1000'], log);
    await expect.poll(() => fs.existsSync(log) && fs.readFileSync(log, 'utf8').trim(), { timeout: 5_000 }).toBe('witness');
    expect(fs.readlinkSync(`/proc/${pid}/ns/net`)).toBe(fs.readlinkSync(`/proc/${hostInfo('witness').holderPid}/ns/net`));
    // beside the witness's etcd, which labUp starts
    expect((await labStatus()).hosts.find((h) => h.name === 'witness')?.spawned).toContain(pid);
    await killHost('witness');
    expect(alive(pid)).toBe(false);
  });

  it('rebuilds after a crash: a dead host, a cut link', async () => {
    // witness is dead (previous test) and its netns, veth and stale holder.pid are still there.
    await cutLink('backup');
    const result = await labUp();
    console.log(`lab up after a crash: ${result.durationMs} ms`);
    expect(result.built).toBe(true);
    const { hosts } = await labStatus();
    for (const host of hosts) expect(host, host.name).toMatchObject({ linkUp: true, frozen: false, libvirt: true, ssh: true });
  });

  it('runs the CLI', async () => {
    const cli = fileURLToPath(new URL('./cli.ts', import.meta.url));
    const out = await run({ timeout: 30_000 })`npx tsx ${cli} exec backup -- hostname`;
    expect(out.stdout.trim()).toBe('backup');
    expect((await run({ timeout: 30_000 })`npx tsx ${cli} status`).stdout).toMatch(/witness/);
  });

  it('leaves nothing behind when brought down, and down is idempotent', async () => {
    const pids = (await Promise.all(LAB_HOSTS.map(daemonPidsOf))).flat().filter((pid): pid is number => pid !== undefined);
    expect(pids.length).toBeGreaterThanOrEqual(12);
    const started = performance.now();
    await labDown();
    console.log(`lab down: ${Math.round(performance.now() - started)} ms`);
    expect(await labLeftovers()).toEqual([]);
    expect(pids.filter(alive)).toEqual([]);
    const netns = (await run`ip netns list`).stdout;
    expect(netns).not.toMatch(new RegExp(`^${hostInfo('primary').netns.split('-')[0]}-`, 'm'));
    expect(fs.readFileSync('/proc/self/mountinfo', 'utf8')).not.toContain('ftvm-lab');
    expect(fs.existsSync(labSshKey()) && fs.existsSync(labKnownHosts())).toBe(true); // kept for the next up
    await labDown();
    expect(await labLeftovers()).toEqual([]);
  });
});
