/**
 * A protected VM in the lab, the way a user runs one: an `ftvm agent` on `primary` and on `backup`
 * (each a real process inside its host, started from the built CLI), etcd on `witness`, the
 * probe guest defined FT-ready on `primary` and protected through the control socket. Used by the
 * failover test and `pnpm bench:failover`.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { ControlClient, type AgentStatus, type VmStatus } from '@ftvm/coordinator';
import { ftReadyFromSpec } from '@ftvm/libvirt';
import { Etcd3 } from 'etcd3';
import { stringify as toYaml } from 'yaml';
import { probeGuestYaml, type ProbeService } from '../guest/probe-spec.js';
import { createProbeDisks, type DiskFormat, type ProbeDisks } from './disk-check.js';
import type { ProbeClocksource } from './probe-domain.js';
import {
  hostInfo,
  labEtcdEndpoints,
  labKnownHosts,
  labSshKey,
  labUp,
  restartHost,
  SERVICE_HOST_BRIDGE,
  SERVICE_SUBNET_PREFIX,
  SERVICE_WITNESS_IP,
  serviceGuestIp,
  spawnDaemonIn,
  type LabEtcdMembers,
  type LabHostName,
} from '../lab/lab.js';
import { SERVICE_UDP_PORT } from './service-wire.js';
import { allPids, isAlive } from '../lab/procs.js';
import { sleep } from '../lab/wait.js';
import { clockOffset, syncGuestClock, waitForProbe, type ProbeTarget } from './probe-client.js';

const run = promisify(execFile);
export const AGENT_HOSTS = ['primary', 'backup'] as const;
export type AgentHost = (typeof AGENT_HOSTS)[number];
export const other = (host: AgentHost): AgentHost => (host === 'primary' ? 'backup' : 'primary');

const REPO = path.resolve(new URL('../..', import.meta.url).pathname);
const CLI = path.join(REPO, 'packages/coordinator/dist/bin/ftvm.js');
export const CLUSTER_DIR = '/tmp/ftvm-cluster';
const PROBE_PORT = 5555;
/**
 * The test cluster keeps to its own etcd prefix, ports and control socket, so it never mixes with
 * agents that provisioning (ansible/) installs on the same lab hosts.
 */
export const ETCD_PREFIX = '/ftvm-test';
const SOCKET_NAME = 'test-agent.sock';
/** Where the test agents hear the libvirt hook (inside each host's /run). */
export const HOOK_SOCKET_NAME = 'test-hook.sock';

export interface ClusterOptions {
  vm?: string;
  /** etcd's members in the lab: one on the witness (default) or one on each host. */
  etcdMembers?: LabEtcdMembers;
  emulator?: string;
  workloadMiBps?: number;
  checkpointIntervalMs?: number;
  /** A full checkpoint every this many (default: the agent's, none after the first). */
  fullEvery?: number;
  memoryMiB?: number;
  /** the guest's qemu-ga channel (`virsh shutdown` through the agent) */
  agent?: boolean;
  /** Host UDP port the probe is forwarded from (default 5555); each VM of a host needs its own. */
  probePort?: number;
  /** The peer named in the domain's ftvm metadata (default `backup`). */
  peer?: AgentHost;
  /**
   * Give the probe its two disks (counter ring, ext4), local to the host the VM starts on and
   * replicated by ftvm (created afresh under that host's /var/lib/libvirt/images/<vm>/).
   */
  disks?: { format: DiskFormat; ringMiB?: number; fsMiB?: number; fillRing?: boolean };
  /**
   * Give the guest its service NIC on the lab's service network (`probeService(vm)`): the counter
   * in a datagram to the witness every ms, the TCP service on port 7002 (service-client.ts).
   */
  service?: boolean;
  /** Protect with output commit: the guest's service output is held until its checkpoint is committed. */
  outputCommit?: boolean;
  /** The guest kernel's clocksource (default: the image's, tsc). */
  clocksource?: ProbeClocksource;
  /** vCPUs (default 1). */
  vcpus?: number;
  /** Extra environment of a host's agent (test-only knobs such as FTVM_TEST_REALTIME_SKEW_MS), kept for its restarts. */
  agentEnv?: AgentEnv;
  /** The agents' failover.standbyRam (default: the agent's, `mapped`), kept for their restarts. */
  standbyRam?: 'mapped' | 'loaded';
}

/** The cluster's failover.standbyRam, written into every agent config of it. */
let clusterStandbyRam: ClusterOptions['standbyRam'];

export type AgentEnv = Partial<Record<AgentHost, Record<string, string>>>;

/**
 * A probe VM's fixed place on the service network: `ft-probe` (the cluster's default VM) is guest
 * 0 (10.214.0.100), any other name gets 1..99 from a hash of it. The MAC is the address's last
 * octet under QEMU's 52:54:00 prefix, so the guest finds its service NIC by it.
 */
export function probeService(vm: string): ProbeService & { guestIp: string } {
  let hash = 0x811c9dc5; // FNV-1a
  for (const byte of Buffer.from(vm)) hash = Math.imul(hash ^ byte, 0x01000193) >>> 0;
  const index = vm === 'ft-probe' ? 0 : 1 + (hash % 99);
  const guestIp = serviceGuestIp(index);
  const mac = `52:54:00:5e:00:${(100 + index).toString(16).padStart(2, '0')}`;
  return { ip: `${guestIp}/${SERVICE_SUBNET_PREFIX}`, guestIp, peer: `${SERVICE_WITNESS_IP}:${SERVICE_UDP_PORT}`, mac, bridge: SERVICE_HOST_BRIDGE };
}

/** Where a host keeps a VM's disk images, as the host sees it and as this process does. */
export function vmImageDir(host: AgentHost, vm: string): { inHost: string; here: string } {
  const inHost = path.posix.join('/var/lib/libvirt/images', vm);
  return { inHost, here: path.join(hostInfo(host).libvirtLibDir, 'images', vm) };
}

/** The probe's disks, made afresh on `host`; paths as the host (and its libvirt) sees them. */
export async function makeProbeDisks(host: AgentHost, vm: string, options: NonNullable<ClusterOptions['disks']>): Promise<Required<ProbeDisks>> {
  const { inHost, here } = vmImageDir(host, vm);
  fs.rmSync(here, { recursive: true, force: true });
  const made = await createProbeDisks(here, { format: options.format, ...(options.ringMiB ? { ringMiB: options.ringMiB } : {}), ...(options.fsMiB ? { fsMiB: options.fsMiB } : {}), ...(options.fillRing ? { fillRing: true } : {}) });
  const inside = (p: string) => path.posix.join(inHost, path.basename(p));
  return { ring: { ...made.ring, path: inside(made.ring.path) }, fs: { ...made.fs, path: inside(made.fs.path) } };
}

export function agentLog(host: AgentHost): string {
  return path.join(CLUSTER_DIR, `${host}.agent.log`);
}

export function agentConfigPath(host: AgentHost): string {
  return path.join(CLUSTER_DIR, `${host}.agent.yaml`);
}

/** The agent config of a lab host (the same cluster section on both). */
export function writeAgentConfig(host: AgentHost): string {
  const hosts = Object.fromEntries(
    (['primary', 'backup'] as const).map((h) => [h, { address: hostInfo(h).ip, libvirtUri: 'qemu:///system' }]),
  );
  const config = {
    host,
    hosts,
    ssh: { privateKey: labSshKey(), knownHosts: labKnownHosts(), connectTimeoutMs: 500 },
    etcd: { endpoints: labEtcdEndpoints(), prefix: ETCD_PREFIX, leaseTtlSeconds: 1, keepaliveIntervalMs: 100, requestTimeoutMs: 400 },
    heartbeat: { port: 7420, intervalMs: 50, timeoutMs: 300 },
    control: { socket: `/run/ftvm/${SOCKET_NAME}`, hookSocket: `/run/ftvm/${HOOK_SOCKET_NAME}`, metrics: { address: hostInfo(host).ip, port: 9470 } },
    storeDir: '/var/lib/libvirt/ftvm/checkpoints',
    runDir: '/run/ftvm',
    ...(clusterStandbyRam ? { failover: { standbyRam: clusterStandbyRam } } : {}),
    // benches read per-checkpoint figures from debug lines
    log: { level: process.env['FTVM_TEST_AGENT_LOG_LEVEL'] ?? 'info', file: agentLog(host) },
  };
  fs.mkdirSync(CLUSTER_DIR, { recursive: true });
  fs.writeFileSync(agentConfigPath(host), toYaml(config));
  return agentConfigPath(host);
}

/** Starts `ftvm agent` inside a lab host (a daemon of that host: kill/freeze/cut reach it), with `env` added to its environment. */
export async function startAgent(host: AgentHost, env: Record<string, string> = {}): Promise<number> {
  const config = writeAgentConfig(host);
  const withEnv = Object.entries(env).map(([name, value]) => `${name}=${value}`);
  const argv = [...(withEnv.length ? ['env', ...withEnv] : []), process.execPath, CLI, 'agent', '--config', config];
  const pid = spawnDaemonIn(host, argv, path.join(CLUSTER_DIR, `${host}.agent.out`));
  const client = controlClient(host);
  const deadline = performance.now() + 30_000;
  for (;;) {
    try {
      await client.status();
      return pid;
    } catch (error) {
      if (!isAlive(pid)) throw new Error(`ftvm agent on ${host} exited:\n${tail(path.join(CLUSTER_DIR, `${host}.agent.out`))}\n${tail(agentLog(host))}`);
      if (performance.now() > deadline) throw new Error(`ftvm agent on ${host} does not answer: ${(error as Error).message}`);
      await sleep(100);
    }
  }
}

export function controlClient(host: AgentHost): ControlClient {
  return new ControlClient({ socketPath: path.join(hostInfo(host).runDir, 'ftvm', SOCKET_NAME) });
}

export function tail(file: string, bytes = 3000): string {
  try {
    const text = fs.readFileSync(file, 'utf8');
    return text.slice(-bytes);
  } catch {
    return `(no ${file})`;
  }
}

export const probeOn = (host: AgentHost, port = PROBE_PORT): ProbeTarget => ({ host: hostInfo(host).ip, port });

export const virsh = (host: LabHostName, ...args: string[]) => run('virsh', ['-c', hostInfo(host).libvirtUri, ...args], { timeout: 60_000 }).then((r) => r.stdout);

/** FT-ready XML of the probe guest (probe port forwarded on every address, so it follows the VM). */
export async function probeVmXml(options: ClusterOptions & { host?: AgentHost } = {}): Promise<{ name: string; xml: string }> {
  const name = options.vm ?? 'ft-probe';
  const disks = options.disks ? await makeProbeDisks(options.host ?? 'primary', name, options.disks) : undefined;
  const yaml = await probeGuestYaml({
    name,
    peer: { host: options.peer ?? 'backup' },
    checkpointIntervalMs: options.checkpointIntervalMs ?? 1000,
    probeListen: { address: '0.0.0.0', port: options.probePort ?? PROBE_PORT },
    ...(options.workloadMiBps ? { workloadMiBps: options.workloadMiBps } : {}),
    ...(options.memoryMiB ? { memoryMiB: options.memoryMiB } : {}),
    ...(options.vcpus ? { vcpus: options.vcpus } : {}),
    ...(options.clocksource ? { clocksource: options.clocksource } : {}),
    ...(options.agent ? { agent: true } : {}),
    ...(disks ? { disks } : {}),
    ...(options.service ? { service: probeService(name) } : {}),
  });
  const ready = ftReadyFromSpec(yaml, options.emulator ? { emulator: { path: options.emulator, require: true } } : {});
  return { name, xml: ready.xml };
}

export interface Cluster {
  vm: string;
  /** Where the VM runs now. */
  primary: AgentHost;
  agentPids: Record<AgentHost, number>;
  agentEnv?: AgentEnv;
}

/**
 * Lab up, the two agents, the probe guest booted on `primary` and protected with `backup` as its
 * backup (waits for the first committed checkpoint).
 */
export async function startCluster(options: ClusterOptions = {}): Promise<Cluster> {
  await labUp({ etcdMembers: options.etcdMembers ?? 'witness' });
  await killStrayAgents();
  clusterStandbyRam = options.standbyRam;
  fs.rmSync(CLUSTER_DIR, { recursive: true, force: true });
  fs.mkdirSync(CLUSTER_DIR, { recursive: true });
  const { name, xml } = await probeVmXml(options);
  for (const host of AGENT_HOSTS) {
    await virsh(host, 'destroy', name).catch(() => undefined);
    await virsh(host, 'undefine', name).catch(() => undefined);
    fs.rmSync(path.join(hostInfo(host).libvirtLibDir, 'ftvm', 'checkpoints', name), { recursive: true, force: true });
    fs.mkdirSync(path.join(hostInfo(host).runDir, 'ftvm'), { recursive: true });
  }
  const xmlFile = path.join(CLUSTER_DIR, `${name}.xml`);
  fs.writeFileSync(xmlFile, xml);
  await virsh('primary', 'define', xmlFile);
  await virsh('primary', 'start', name);
  await waitForProbe(probeOn('primary', options.probePort), 60_000);
  await syncGuestClock(probeOn('primary', options.probePort));
  // a fresh cluster: no record or owner key left from an earlier run — of any VM: the new agents
  // would take over what other test clusters left (a standby of another probe VM on the backup
  // then holds the probe port this VM's restore needs)
  const etcd = new Etcd3({ hosts: labEtcdEndpoints() });
  try {
    await etcd.delete().prefix(`${ETCD_PREFIX}/vms/`);
  } finally {
    etcd.close();
  }
  const agentPids = { primary: await startAgent('primary', options.agentEnv?.primary), backup: await startAgent('backup', options.agentEnv?.backup) };
  await controlClient('primary').protect({ vm: name, backup: 'backup', checkpointIntervalMs: options.checkpointIntervalMs ?? 1000, ...(options.outputCommit ? { outputCommit: true } : {}), ...(options.fullEvery ? { fullEvery: options.fullEvery } : {}) }, () => undefined);
  return { vm: name, primary: 'primary', agentPids, ...(options.agentEnv ? { agentEnv: options.agentEnv } : {}) };
}

/**
 * Another probe guest in a running cluster: booted on `options.primary` and protected through that
 * host's agent with the other host as its backup (returns once its first checkpoint is committed).
 * Give each VM its own `probePort`: every copy of a VM on a host (running or standby) holds it.
 */
export async function addProtectedVm(cluster: Cluster, options: ClusterOptions & { vm: string; primary: AgentHost }): Promise<void> {
  const backup = other(options.primary);
  const { name, xml } = await probeVmXml({ ...options, peer: backup, host: options.primary });
  if (name === cluster.vm) throw new Error(`${name} is the cluster's first VM already`);
  await removeVm(name);
  const xmlFile = path.join(CLUSTER_DIR, `${name}.xml`);
  fs.writeFileSync(xmlFile, xml);
  await virsh(options.primary, 'define', xmlFile);
  await virsh(options.primary, 'start', name);
  await waitForProbe(probeOn(options.primary, options.probePort), 60_000);
  await syncGuestClock(probeOn(options.primary, options.probePort));
  await controlClient(options.primary).protect({ vm: name, backup, checkpointIntervalMs: options.checkpointIntervalMs ?? 1000, ...(options.outputCommit ? { outputCommit: true } : {}), ...(options.fullEvery ? { fullEvery: options.fullEvery } : {}) }, () => undefined);
}

/** A VM gone from the lab: its domain on both hosts, their checkpoint stores, its etcd keys. */
export async function removeVm(name: string): Promise<void> {
  for (const host of AGENT_HOSTS) {
    await virsh(host, 'destroy', name).catch(() => undefined);
    await virsh(host, 'undefine', name).catch(() => undefined);
    fs.rmSync(path.join(hostInfo(host).libvirtLibDir, 'ftvm', 'checkpoints', name), { recursive: true, force: true });
  }
  const etcd = new Etcd3({ hosts: labEtcdEndpoints() });
  try {
    await etcd.delete().prefix(`${ETCD_PREFIX}/vms/${name}/`);
  } finally {
    etcd.close();
  }
}

export async function vmStatus(host: AgentHost, vm: string): Promise<VmStatus | undefined> {
  const status: AgentStatus = await controlClient(host).status();
  return status.vms.find((v) => v.name === vm);
}

/** Waits until `host`'s agent runs the VM as primary, protected, with a checkpoint newer than `after`. */
export async function waitProtectedOn(host: AgentHost, vm: string, options: { timeoutMs?: number; committedAfter?: number } = {}): Promise<VmStatus> {
  const deadline = performance.now() + (options.timeoutMs ?? 60_000);
  let last: VmStatus | undefined;
  for (;;) {
    last = await vmStatus(host, vm).catch(() => undefined);
    if (last?.role === 'primary' && last.phase === 'protected' && last.lastCheckpoint && last.lastCheckpoint.epoch > (options.committedAfter ?? 0)) return last;
    if (performance.now() > deadline) throw new Error(`${vm} is not protected on ${host} in time; last status ${JSON.stringify(last)}\n${tail(agentLog(host))}`);
    await sleep(100);
  }
}

/**
 * Polls `probe` until it gives a value (errors count as "not yet"); past `timeoutMs` the error
 * names what was awaited and ends with both agents' logs.
 */
export async function untilAgents<T>(what: string, probe: () => Promise<T | undefined>, timeoutMs = 60_000, everyMs = 100): Promise<T> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    const value = await probe().catch(() => undefined);
    if (value !== undefined) return value;
    if (performance.now() > deadline) throw new Error(`${what} within ${timeoutMs} ms\n--- primary agent\n${tail(agentLog('primary'))}\n--- backup agent\n${tail(agentLog('backup'))}`);
    await sleep(everyMs);
  }
}

/** Brings a killed host back: its daemons, then its agent. */
export async function reviveHost(host: AgentHost, cluster: Cluster): Promise<void> {
  await restartHost(host);
  fs.mkdirSync(path.join(hostInfo(host).runDir, 'ftvm'), { recursive: true });
  cluster.agentPids[host] = await startAgent(host, cluster.agentEnv?.[host]);
}

/** A host's checkpoint store of `vm`, as seen from the root namespace. */
export const storeDir = (host: AgentHost, vm: string): string => path.join(hostInfo(host).libvirtLibDir, 'ftvm', 'checkpoints', vm);

/** The committed epochs in a host's store of `vm`, oldest first. */
export function storeEpochs(host: AgentHost, vm: string): number[] {
  const dir = storeDir(host, vm);
  if (!fs.existsSync(dir) || !fs.statSync(dir).isDirectory()) return [];
  return fs
    .readdirSync(dir)
    .filter((n) => /^\d+\.json$/.test(n))
    .map((n) => Number(n.slice(0, -5)))
    .sort((a, b) => a - b);
}

/**
 * The agents' FTVM_TEST_RAM_APPLY_GATE: while it is closed a backup applies no checkpoint to its
 * standby's RAM file. Give `env` to startCluster (both hosts: the roles swap).
 */
export const ramApplyGate = {
  file: path.join(CLUSTER_DIR, '..', `ftvm-ram-apply-gate-${process.pid}`),
  get env(): AgentEnv {
    return { primary: { FTVM_TEST_RAM_APPLY_GATE: this.file }, backup: { FTVM_TEST_RAM_APPLY_GATE: this.file } };
  },
  /**
   * Closes it once `host`'s standby RAM is warm; resolves with the newest checkpoint in its store
   * then: every checkpoint committed after it waits for `open`.
   */
  async close(host: AgentHost, vm: string): Promise<number> {
    await untilAgents(`${host}'s standby RAM warm`, async () => ((await vmStatus(host, vm))?.standby?.ram === 'warm' ? true : undefined));
    fs.writeFileSync(this.file, '');
    return storeEpochs(host, vm).at(-1) ?? 0;
  },
  open(): void {
    fs.rmSync(this.file, { force: true });
  },
};

/** JSON lines of an agent's log with `msg` equal to `message`. */
export function agentLogEntries(host: AgentHost, message: string): Record<string, unknown>[] {
  if (!fs.existsSync(agentLog(host))) return [];
  return fs
    .readFileSync(agentLog(host), 'utf8')
    .split('\n')
    .filter((l) => l.includes(`"msg":"${message}"`))
    .map((l) => JSON.parse(l) as Record<string, unknown>);
}

export async function qemuPidOf(host: AgentHost, vm: string): Promise<number | undefined> {
  try {
    const pid = Number(fs.readFileSync(path.join(hostInfo(host).runDir, 'libvirt', 'qemu', `${vm}.pid`), 'utf8').trim());
    return Number.isInteger(pid) && pid > 1 && isAlive(pid) ? pid : undefined;
  } catch {
    return undefined;
  }
}

/** Agents of an earlier cluster run that was cut short (their config lives in CLUSTER_DIR). */
export async function killStrayAgents(): Promise<void> {
  const strays = allPids().filter((pid) => {
    try {
      return fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes(`${CLUSTER_DIR}/`);
    } catch {
      return false;
    }
  });
  for (const pid of strays) process.kill(pid, 'SIGKILL');
  if (strays.length) await sleep(200);
}

export async function stopCluster(cluster: Cluster | undefined): Promise<void> {
  ramApplyGate.open();
  if (!cluster) {
    await killStrayAgents();
    return;
  }
  for (const host of AGENT_HOSTS) {
    const pid = cluster.agentPids[host];
    if (pid && isAlive(pid)) process.kill(pid, 'SIGTERM');
  }
  await sleep(500);
  for (const host of AGENT_HOSTS) {
    await virsh(host, 'destroy', cluster.vm).catch(() => undefined);
    await virsh(host, 'undefine', cluster.vm).catch(() => undefined);
  }
}

export { clockOffset };
