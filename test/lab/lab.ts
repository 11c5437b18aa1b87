/**
 * The lab: hosts `primary`, `backup` and `witness` on this one machine, for the integration tests
 * and the demo. Each is a network namespace on the bridge plus a mount and UTS namespace with its
 * own /run, /etc/libvirt, /var/lib/libvirt, /var/log, running its own virtlogd, libvirtd and sshd.
 * Up and down are idempotent; down leaves nothing behind but the SSH keys. Faults to inject:
 * kill, freeze, cut the link. Needs root.
 */
import fs from 'node:fs';
import path from 'node:path';
import { $, type ProcessPromise } from 'zx';
import { PERSISTENT_DIRS, layoutCurrent, resetRunDir, saveQemuCapabilities, seedQemuCapabilities, writeHostConfig } from './host-config.js';
import {
  daemonPids,
  holderPid,
  hostPids,
  isFrozen,
  killHostProcesses,
  libvirtAnswers,
  setFrozen,
  spawnDaemon,
  spawnedDaemons,
  sshAnswers,
  startHolder,
} from './host.js';
import { ensureLabEtcd, labEtcdMode, resumeLabEtcdMember, type LabEtcdMembers } from './etcd.js';
import { ensureKeys } from './keys.js';
import {
  bridgeHealthy,
  createHostNetwork,
  createServiceLink,
  deleteBridge,
  deleteHostNetwork,
  deleteServiceBridge,
  deleteServiceLink,
  ensureBridge,
  ensureServiceBridge,
  ensureSocketBufferLimit,
  hostNetworkPresent,
  labLinkUp,
  linkExists,
  linkUp,
  netnsExists,
  serviceBridgeHealthy,
  serviceLinkPresent,
  setLink,
} from './network.js';
import { allPids, mountsOf } from './procs.js';
import { sh } from './sh.js';
import { LAB_BRIDGE, LAB_HOSTS, LAB_RAM_ROOT, LAB_STATE_ROOT, SERVICE_BRIDGE, labHost, type LabHost, type LabHostName } from './topology.js';

export {
  ensureLabEtcd,
  ensureWitnessEtcd,
  etcdHealthy,
  labEtcdDataDir,
  labEtcdEndpoint,
  labEtcdEndpoints,
  labEtcdLog,
  labEtcdMembers,
  labEtcdMode,
  labEtcdPid,
  startLabEtcd,
  stopLabEtcd,
  type LabEtcdMembers,
} from './etcd.js';
export {
  LAB_HOSTS,
  SERVICE_BRIDGE,
  SERVICE_HOST_BRIDGE,
  SERVICE_SUBNET_PREFIX,
  SERVICE_WITNESS_IP,
  serviceGuestIp,
  labKnownHosts,
  labRemoteLibvirtUri,
  labSshConfig,
  labSshKey,
  type LabHost,
  type LabHostName,
} from './topology.js';

const DEFAULT_UP_TIMEOUT_MS = 60_000;

export interface LabHostInfo extends LabHost {
  /** The namespace holder's pid (`nsenter -t` target), when the host is running. */
  holderPid: number | undefined;
}

export function hostInfo(name: LabHostName): LabHostInfo {
  const host = labHost(name);
  return { ...host, holderPid: holderPid(host) };
}

export interface LabUpOptions {
  /** For bringing up all three hosts (libvirtd start-up dominates). Default 60 s. */
  timeoutMs?: number;
  /** Progress lines (the CLI prints them). */
  log?: (line: string) => void;
  /**
   * etcd's members: `'witness'` (one, the default) or `'all'` (one on each host). Each labUp sets
   * it, so a suite that ran three members leaves none to the next. A change wipes etcd (a fresh cluster).
   */
  etcdMembers?: LabEtcdMembers;
}

export interface LabUpResult {
  /** False when the lab was already healthy and left as it was. */
  built: boolean;
  durationMs: number;
}

/**
 * Brings the lab up. A healthy lab is left as it is (after a health check); one left frozen or
 * unplugged by an interrupted test is thawed and replugged; anything else (a crash, a killed host,
 * a half-built lab) is torn down and rebuilt. In every case etcd answers afterwards, in the mode
 * asked for or the current one (started if it is not running: `ensureLabEtcd`).
 */
export async function labUp(options: LabUpOptions = {}): Promise<LabUpResult> {
  const started = performance.now();
  const log = options.log ?? (() => undefined);
  const elapsed = () => Math.round(performance.now() - started);
  assertRoot();
  const etcd = { members: options.etcdMembers ?? ('witness' as const) };
  await ensureSocketBufferLimit();
  const newKeys = await ensureKeys();
  let status: LabStatus | undefined;
  if (!newKeys && (status = await labHealthy())) {
    if (await ensureServiceNetwork(status)) log('service network (re)wired');
    await ensureLabEtcd(etcd);
    return { built: false, durationMs: elapsed() };
  }
  if (!newKeys && (await recoverInterrupted())) {
    log('thawed/replugged hosts left by an interrupted run');
    if ((status = await labHealthy())) {
      if (await ensureServiceNetwork(status)) log('service network (re)wired');
      await ensureLabEtcd(etcd);
      return { built: false, durationMs: elapsed() };
    }
  }

  log('tearing down what is left of a previous lab');
  await labDown();
  await ensureBridge();
  for (const name of LAB_HOSTS) {
    const host = labHost(name);
    writeHostConfig(host);
    await createHostNetwork(host); // one at a time: the first `ip netns add` sets up /run/netns
  }
  await ensureServiceNetwork();
  log(`bridge and namespaces ready after ${elapsed()} ms; starting virtlogd, libvirtd and sshd on each host`);
  const timeoutMs = options.timeoutMs ?? DEFAULT_UP_TIMEOUT_MS;
  const start = async (name: LabHostName) => {
    await startHolder(labHost(name), timeoutMs);
    log(`${name} up after ${elapsed()} ms`);
  };
  let pending: LabHostName[] = [...LAB_HOSTS];
  if (!seedQemuCapabilities(labHost('primary'))) {
    // No cached QEMU probe yet (~8 s): primary makes it once and hands it to the others, rather than
    // three daemons each probing the same binaries at once.
    log('no cached QEMU capabilities: primary probes QEMU first (once per machine)');
    await start('primary');
    saveQemuCapabilities(labHost('primary'));
    pending = pending.filter((name) => name !== 'primary');
  }
  for (const name of pending) seedQemuCapabilities(labHost(name));
  await Promise.all(pending.map(start));
  saveQemuCapabilities(labHost('primary')); // what libvirt kept or refreshed, for next time
  await ensureLabEtcd(etcd);
  log(`etcd (${etcd.members === 'all' ? 'three members' : "the witness's"}) answers after ${elapsed()} ms`);
  return { built: true, durationMs: elapsed() };
}

/**
 * The service network wired as topology.ts describes (the root bridge, each host's uplink and
 * bridge), each host's uplink up or down with its lab link (a cut host stays cut); what is there and
 * right is left alone. True if anything had to be (re)made. Running guests keep their taps: a
 * host's bridge is only made where there was none.
 */
async function ensureServiceNetwork(known?: LabStatus): Promise<boolean> {
  if (known?.serviceBridge && known.hosts.every((h) => h.service)) return false; // checked just now
  let changed = false;
  if (!(await serviceBridgeHealthy())) {
    await ensureServiceBridge();
    changed = true;
  }
  for (const name of LAB_HOSTS) {
    const host = labHost(name);
    if (await serviceLinkPresent(host)) continue;
    await deleteServiceLink(host);
    await createServiceLink(host, !(await linkExists(host.vethOutside)) || (await labLinkUp(host)));
    changed = true;
  }
  return changed;
}

/** Tears everything down: processes, namespaces, links, state; the SSH keys are kept. */
export async function labDown(): Promise<void> {
  assertRoot();
  await Promise.all(LAB_HOSTS.map((name) => killHostProcesses(labHost(name))));
  for (const name of LAB_HOSTS) await deleteHostNetwork(labHost(name));
  await deleteBridge();
  await deleteServiceBridge();
  // Nothing of the lab is mounted in the root namespace; this only mops up after a manual mistake.
  for (const mount of labMountsInRootNamespace().reverse()) await sh`umount --lazy ${mount}`.nothrow();
  fs.rmSync(LAB_STATE_ROOT, { recursive: true, force: true });
  fs.rmSync(LAB_RAM_ROOT, { recursive: true, force: true });
}

export interface LabHostStatus {
  name: LabHostName;
  ip: string;
  /** The network namespace exists and is wired to the bridge with the host's address. */
  network: boolean;
  /** Its service uplink (and, on primary and backup, its service bridge) is wired. */
  service: boolean;
  holderPid: number | undefined;
  processes: number;
  frozen: boolean;
  linkUp: boolean;
  /** libvirtd answers through its socket; sshd sends its banner over the lab link. */
  libvirt: boolean;
  ssh: boolean;
  daemons: ReturnType<typeof daemonPids>;
  /** Processes started with spawnDaemonIn that still run. */
  spawned: number[];
}

export interface LabStatus {
  bridge: boolean;
  /** The root namespace's service bridge is up. */
  serviceBridge: boolean;
  hosts: LabHostStatus[];
}

export async function labStatus(): Promise<LabStatus> {
  const hosts = await Promise.all(LAB_HOSTS.map((name) => hostStatus(labHost(name))));
  return { bridge: await bridgeHealthy(), serviceBridge: await serviceBridgeHealthy(), hosts };
}

async function hostStatus(host: LabHost): Promise<LabHostStatus> {
  const frozen = isFrozen(host);
  const network = await hostNetworkPresent(host);
  const up = network && (await linkUp(host));
  return {
    name: host.name,
    ip: host.ip,
    network,
    service: await serviceLinkPresent(host),
    holderPid: holderPid(host),
    processes: hostPids(host).length,
    frozen,
    linkUp: up,
    // A frozen daemon would only make the probe wait for its timeout.
    libvirt: !frozen && (await libvirtAnswers(host, 3_000)),
    ssh: !frozen && up && (await sshAnswers(host)),
    daemons: daemonPids(host),
    spawned: spawnedDaemons(host).map((d) => d.pid),
  };
}

/** The status if the lab is healthy (the service network aside: ensureServiceNetwork mends it), else undefined. */
async function labHealthy(): Promise<LabStatus | undefined> {
  if (!(await bridgeHealthy())) return undefined;
  const status = await labStatus();
  // A lab laid out by an older version of this code is rebuilt rather than trusted.
  const current = LAB_HOSTS.every((name) => layoutCurrent(labHost(name)));
  return current && status.hosts.every((h) => h.network && h.holderPid !== undefined && !h.frozen && h.linkUp && h.libvirt && h.ssh) ? status : undefined;
}

/** Thaws frozen hosts and replugs cut links; true if there was anything to do. */
async function recoverInterrupted(): Promise<boolean> {
  let changed = false;
  for (const name of LAB_HOSTS) {
    const host = labHost(name);
    if (isFrozen(host)) {
      await setFrozen(host, false);
      changed = true;
    }
    // linkUp: the lab veth and the service uplink (either may be the one left down)
    if ((await linkExists(host.vethOutside)) && !(await linkUp(host))) {
      await setLink(host, true);
      changed = true;
    }
  }
  return changed;
}

export interface ExecOptions {
  /** Default 60 s. */
  timeoutMs?: number;
  input?: string;
}

/**
 * Runs `argv` inside a host: its network, mount and UTS namespaces (`nsenter -t <holder> -m -n -u`).
 * A zx ProcessPromise: `await` it for the output (throws on a non-zero exit), or `.nothrow()`.
 */
export function execIn(name: LabHostName, argv: string[], options: ExecOptions = {}): ProcessPromise {
  const run = $({
    quiet: true,
    timeout: options.timeoutMs ?? 60_000,
    ...(options.input !== undefined ? { input: options.input } : {}),
  });
  return run`${inHostArgv(name, argv)}`;
}

/** The command line that runs `argv` inside a host, for spawning it yourself (own stdio, streaming). */
export function inHostArgv(name: LabHostName, argv: string[]): string[] {
  return ['nsenter', '-t', String(requireHolder(name)), '-m', '-n', '-u', '--', ...argv];
}

/**
 * Starts a long-running process inside a host, detached, stdout and stderr appended to `logFile`
 * (a root-namespace path); returns its pid. It is recorded, shows in labStatus, and dies with the
 * host (killHost, labDown); restartHost does not start it again.
 */
export function spawnDaemonIn(name: LabHostName, argv: string[], logFile: string): number {
  requireHolder(name);
  return spawnDaemon(labHost(name), argv, logFile).pid;
}

/** SIGKILL every process of the host — daemons, VMs, its namespace holder — as a power cut would. */
export async function killHost(name: LabHostName): Promise<void> {
  await killHostProcesses(labHost(name));
}

/** SIGSTOP every process of the host: it keeps its sockets and address but answers nothing. */
export async function freezeHost(name: LabHostName): Promise<void> {
  await setFrozen(labHost(name), true);
}

export async function thawHost(name: LabHostName): Promise<void> {
  await setFrozen(labHost(name), false);
}

/**
 * Unplugs the host: the bridge side of its veth goes down, and of its service uplink (one cable);
 * its processes (and guests) run on, unreachable.
 */
export async function cutLink(name: LabHostName): Promise<void> {
  await setLink(labHost(name), false);
}

export async function restoreLink(name: LabHostName): Promise<void> {
  await setLink(labHost(name), true);
}

/**
 * Boots a host again (killing what is left of it first), like a reboot: /run starts empty,
 * /etc/libvirt, /var/lib/libvirt, /var/log persist; the link stays as it was (cut or not). In
 * three-member etcd mode its etcd member starts again on its data dir (waited for, up to 10 s, when
 * another member runs and the link is up); in single mode the witness's etcd stays down (`labUp` /
 * `ensureLabEtcd` start a fresh one, `startLabEtcd` the same one).
 */
export async function restartHost(name: LabHostName, options: { timeoutMs?: number } = {}): Promise<void> {
  assertRoot();
  const host = labHost(name);
  await killHostProcesses(host);
  if (!PERSISTENT_DIRS.every((dir) => fs.existsSync(path.join(host.stateDir, dir)))) writeHostConfig(host);
  resetRunDir(host);
  if (!(await hostNetworkPresent(host))) {
    const wasUp = !(await linkExists(host.vethOutside)) || (await linkUp(host));
    await deleteHostNetwork(host);
    await ensureBridge();
    await createHostNetwork(host);
    if (!wasUp) await setLink(host, false);
  }
  if (!(await serviceLinkPresent(host))) {
    await deleteServiceLink(host);
    await ensureServiceBridge();
    await createServiceLink(host, await labLinkUp(host));
  }
  await startHolder(host, options.timeoutMs ?? DEFAULT_UP_TIMEOUT_MS);
  await resumeLabEtcdMember(name);
}

/** What of the lab is visible in the root namespace; [] after labDown. For tests and `status`. */
export async function labLeftovers(): Promise<string[]> {
  const leftovers: string[] = [];
  for (const name of LAB_HOSTS) {
    const host = labHost(name);
    if (await netnsExists(host)) leftovers.push(`netns ${host.netns}`);
    if (await linkExists(host.vethOutside)) leftovers.push(`veth ${host.vethOutside}`);
    if (await linkExists(host.service.vethOutside)) leftovers.push(`veth ${host.service.vethOutside}`);
    const pids = hostPids(host);
    if (pids.length > 0) leftovers.push(`${name} processes ${pids.join(' ')}`);
  }
  if (await linkExists(LAB_BRIDGE)) leftovers.push(`bridge ${LAB_BRIDGE}`);
  if (await linkExists(SERVICE_BRIDGE)) leftovers.push(`bridge ${SERVICE_BRIDGE}`);
  for (const mount of labMountsInRootNamespace()) leftovers.push(`mount ${mount}`);
  const strays = labProcesses();
  if (strays.length > 0) leftovers.push(`processes with lab mounts ${strays.join(' ')}`);
  if (fs.existsSync(LAB_STATE_ROOT)) leftovers.push(`dir ${LAB_STATE_ROOT}`);
  return leftovers;
}

function labMountsInRootNamespace(): string[] {
  const netnsPrefix = `/run/netns/${labHost('primary').netns.split('-')[0]}-`;
  return mountsOf('self')
    .map((m) => m.mountPoint)
    .filter((p) => p === LAB_STATE_ROOT || p.startsWith(`${LAB_STATE_ROOT}/`) || p.startsWith(netnsPrefix));
}

/** Any process, in any namespace, that has something of the lab's state dir mounted. */
function labProcesses(): number[] {
  const marker = `/${path.basename(LAB_STATE_ROOT)}/`;
  return allPids().filter((pid) => pid !== process.pid && mountsOf(pid).some((m) => m.root.includes(marker)));
}

function requireHolder(name: LabHostName): number {
  const pid = holderPid(labHost(name));
  if (pid === undefined) throw new Error(`lab host ${name} is not running (no namespace holder): labUp() or restartHost('${name}')`);
  return pid;
}

function assertRoot(): void {
  if (process.getuid?.() !== 0) throw new Error('the lab needs root (network namespaces, bind mounts, libvirtd)');
}
