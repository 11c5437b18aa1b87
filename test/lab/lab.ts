/**
 * The lab: hosts `primary`, `backup` and `witness` on this one machine. Each is a network
 * namespace on the bridge ftvmbr0 plus a mount and UTS namespace (its own /run, /etc/libvirt,
 * /var/lib/libvirt, /var/log) running its own virtlogd, libvirtd and sshd. Up and down are
 * idempotent; down leaves nothing behind. Failures to inject: kill, freeze, cut.
 */
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { $ } from 'zx';
import {
  LAB_BRIDGE,
  LAB_GATEWAY_IP,
  LAB_HOSTS,
  LAB_KEYS_ROOT,
  LAB_STATE_ROOT,
  LAB_SUBNET_PREFIX,
  labHost,
  labKnownHosts,
  labRemoteLibvirtUri,
  labSshKey,
  type LabHost,
  type LabHostName,
} from './topology.js';

export { LAB_HOSTS, labKnownHosts, labRemoteLibvirtUri, labSshKey, type LabHost, type LabHostName };

$.verbose = false;
$.quiet = true;

const HOST_INIT = fileURLToPath(new URL('./host-init.sh', import.meta.url));
const READY_TIMEOUT_MS = 30_000;

export interface LabHostInfo extends LabHost {
  /** The namespace holder's pid (`nsenter -t` target), when the host is running. */
  holderPid: number | undefined;
}

export function hostInfo(name: LabHostName): LabHostInfo {
  const host = labHost(name);
  return { ...host, holderPid: readHolderPid(host) };
}

/** Brings the lab up; a healthy lab is left as it is, a broken or half-built one is rebuilt. */
export async function labUp(): Promise<void> {
  if (await labHealthy()) return;
  await labDown();
  await ensureKeys();
  await $`ip link add ${LAB_BRIDGE} type bridge`;
  await $`ip addr add ${LAB_GATEWAY_IP}/${LAB_SUBNET_PREFIX} dev ${LAB_BRIDGE}`;
  await $`ip link set ${LAB_BRIDGE} up`;
  for (const name of LAB_HOSTS) await createHost(labHost(name));
  await Promise.all(LAB_HOSTS.map((name) => waitHostReady(labHost(name))));
}

/** Tears everything down: processes, namespaces, links, state (keys are kept). */
export async function labDown(): Promise<void> {
  for (const name of LAB_HOSTS) {
    const host = labHost(name);
    await killPids(await hostPids(host), 'SIGKILL');
    await waitUntil(async () => (await hostPids(host)).length === 0, 10_000, `${name}'s processes to exit`);
    if (await netnsExists(host.netns)) await $`ip netns del ${host.netns}`;
    await $`ip link del ${host.vethOutside}`.nothrow();
  }
  await $`ip link del ${LAB_BRIDGE}`.nothrow();
  fs.rmSync(LAB_STATE_ROOT, { recursive: true, force: true });
}

export interface LabHostStatus {
  name: LabHostName;
  ip: string;
  netns: boolean;
  processes: number;
  frozen: boolean;
  linkUp: boolean;
  libvirt: boolean;
  ssh: boolean;
}

export async function labStatus(): Promise<LabHostStatus[]> {
  return Promise.all(
    LAB_HOSTS.map(async (name) => {
      const host = labHost(name);
      const pids = await hostPids(host);
      return {
        name,
        ip: host.ip,
        netns: await netnsExists(host.netns),
        processes: pids.length,
        frozen: pids.length > 0 && pids.every((pid) => processState(pid) === 'T'),
        linkUp: (await $`ip -o link show ${host.vethOutside}`.nothrow()).stdout.includes('state UP'),
        libvirt: await libvirtAnswers(host),
        ssh: await tcpOpen(host.ip, 22, 500),
      };
    }),
  );
}

/** Runs a command inside a host (its network, mount and UTS namespaces). */
export function execIn(name: LabHostName, argv: string[], options: { timeoutMs?: number } = {}) {
  const pid = requireHolder(name);
  return $({ timeout: options.timeoutMs ?? 60_000 })`nsenter -t ${pid} -m -n -u -- ${argv}`;
}

/** Starts a long-running process inside a host, detached, output to `logFile`; returns its pid. */
export function spawnDaemonIn(name: LabHostName, argv: string[], logFile: string): number {
  const pid = requireHolder(name);
  const log = fs.openSync(logFile, 'a');
  const child = spawn('nsenter', ['-t', String(pid), '-m', '-n', '-u', '--', ...argv], {
    detached: true,
    stdio: ['ignore', log, log],
  });
  fs.closeSync(log);
  child.unref();
  if (child.pid === undefined) throw new Error(`could not start ${argv[0]} in ${name}`);
  return child.pid;
}

/** SIGKILL every process of a host: its daemons, its VMs, its namespace holder. */
export async function killHost(name: LabHostName): Promise<void> {
  const host = labHost(name);
  await killPids(await hostPids(host), 'SIGKILL');
  await waitUntil(async () => (await hostPids(host)).length === 0, 10_000, `${name}'s processes to die`);
}

export async function freezeHost(name: LabHostName): Promise<void> {
  await killPids(await hostPids(labHost(name)), 'SIGSTOP');
}

export async function thawHost(name: LabHostName): Promise<void> {
  await killPids(await hostPids(labHost(name)), 'SIGCONT');
}

export async function cutLink(name: LabHostName): Promise<void> {
  await $`ip link set ${labHost(name).vethOutside} down`;
}

export async function restoreLink(name: LabHostName): Promise<void> {
  await $`ip link set ${labHost(name).vethOutside} up`;
}

/** Boots a killed host again: like a reboot, /run starts empty; /etc and /var/lib persist. */
export async function restartHost(name: LabHostName): Promise<void> {
  const host = labHost(name);
  await killHost(name);
  fs.rmSync(host.runDir, { recursive: true, force: true });
  fs.mkdirSync(host.runDir, { recursive: true });
  await startHolder(host);
  await waitHostReady(host);
}

// ---------------------------------------------------------------------------------------------

async function createHost(host: LabHost): Promise<void> {
  for (const dir of ['run', 'lib-libvirt', 'cache-libvirt', 'log']) fs.mkdirSync(path.join(host.stateDir, dir), { recursive: true });
  prepareLibvirtConfig(host);
  fs.writeFileSync(path.join(host.stateDir, 'sshd_config'), sshdConfig(host));
  await $`ip netns add ${host.netns}`;
  await $`ip link add ${host.vethOutside} type veth peer name eth0 netns ${host.netns}`;
  await $`ip link set ${host.vethOutside} master ${LAB_BRIDGE} up`;
  await $`ip -n ${host.netns} addr add ${host.ip}/${LAB_SUBNET_PREFIX} dev eth0`;
  await $`ip -n ${host.netns} link set eth0 up`;
  await $`ip -n ${host.netns} link set lo up`;
  await startHolder(host);
}

async function startHolder(host: LabHost): Promise<void> {
  fs.rmSync(path.join(host.stateDir, 'holder.pid'), { force: true });
  const log = fs.openSync(path.join(host.stateDir, 'holder.log'), 'a');
  const child = spawn(
    'ip',
    ['netns', 'exec', host.netns, 'unshare', '--mount', '--uts', '--propagation', 'private', '--fork', '--',
      'bash', HOST_INIT, host.name, host.stateDir, LAB_KEYS_ROOT],
    { detached: true, stdio: ['ignore', log, log] },
  );
  fs.closeSync(log);
  child.unref();
  await waitUntil(async () => readHolderPid(host) !== undefined, READY_TIMEOUT_MS, `${host.name}'s namespace holder`, () =>
    fs.readFileSync(path.join(host.stateDir, 'holder.log'), 'utf8').slice(-1500),
  );
}

/** The machine's libvirt config, with what a lab host must not do: run as another user, autostart networks. */
function prepareLibvirtConfig(host: LabHost): void {
  fs.cpSync('/etc/libvirt', host.libvirtEtcDir, { recursive: true });
  fs.rmSync(path.join(host.libvirtEtcDir, 'qemu', 'networks', 'autostart'), { recursive: true, force: true });
  fs.appendFileSync(
    path.join(host.libvirtEtcDir, 'qemu.conf'),
    '\n# ftvm lab host\nsecurity_driver = "none"\nuser = "root"\ngroup = "root"\ndynamic_ownership = 0\nremember_owner = 0\n',
  );
}

function sshdConfig(host: LabHost): string {
  return [
    `ListenAddress ${host.ip}`,
    'Port 22',
    `HostKey ${path.join(host.hostKeyDir, 'ssh_host_ed25519_key')}`,
    `PidFile /run/sshd.pid`,
    'PermitRootLogin prohibit-password',
    'PubkeyAuthentication yes',
    'PasswordAuthentication no',
    'KbdInteractiveAuthentication no',
    `AuthorizedKeysFile ${path.join(LAB_KEYS_ROOT, 'authorized_keys')}`,
    'StrictModes no',
    'UsePAM no',
    'UseDNS no',
    'MaxStartups 50:30:100',
    'Subsystem sftp internal-sftp',
    '',
  ].join('\n');
}

/** Keys outlive the lab, so host keys pinned by clients stay valid across down/up. */
async function ensureKeys(): Promise<void> {
  fs.mkdirSync(LAB_KEYS_ROOT, { recursive: true, mode: 0o700 });
  if (!fs.existsSync(labSshKey())) await $`ssh-keygen -q -t ed25519 -N ${''} -C ftvm-lab -f ${labSshKey()}`;
  fs.copyFileSync(`${labSshKey()}.pub`, path.join(LAB_KEYS_ROOT, 'authorized_keys'));
  const knownHosts: string[] = [];
  for (const name of LAB_HOSTS) {
    const host = labHost(name);
    const key = path.join(host.hostKeyDir, 'ssh_host_ed25519_key');
    fs.mkdirSync(host.hostKeyDir, { recursive: true, mode: 0o700 });
    if (!fs.existsSync(key)) await $`ssh-keygen -q -t ed25519 -N ${''} -C ${`ftvm-lab-${name}`} -f ${key}`;
    const pub = fs.readFileSync(`${key}.pub`, 'utf8').trim().split(/\s+/).slice(0, 2).join(' ');
    knownHosts.push(`${host.ip} ${pub}`);
  }
  fs.writeFileSync(labKnownHosts(), `${knownHosts.join('\n')}\n`);
}

async function waitHostReady(host: LabHost): Promise<void> {
  const diagnostics = () => {
    const holder = path.join(host.stateDir, 'holder.log');
    return fs.existsSync(holder) ? fs.readFileSync(holder, 'utf8').slice(-1500) : '(no holder log)';
  };
  await waitUntil(() => libvirtAnswers(host), READY_TIMEOUT_MS, `${host.name}'s libvirtd`, diagnostics);
  await waitUntil(() => tcpOpen(host.ip, 22, 500), READY_TIMEOUT_MS, `${host.name}'s sshd`, diagnostics);
}

async function labHealthy(): Promise<boolean> {
  if (!(await $`ip link show ${LAB_BRIDGE}`.nothrow()).ok) return false;
  const status = await labStatus();
  return status.every((h) => h.netns && h.processes > 0 && !h.frozen && h.linkUp && h.libvirt && h.ssh);
}

async function libvirtAnswers(host: LabHost): Promise<boolean> {
  if (!fs.existsSync(path.join(host.runDir, 'libvirt', 'libvirt-sock'))) return false;
  return (await $({ timeout: 5_000 })`virsh -c ${host.libvirtUri} version`.nothrow()).ok;
}

async function netnsExists(netns: string): Promise<boolean> {
  return (await $`ip netns list`).stdout.split('\n').some((line) => line.split(' ')[0] === netns);
}

/** Every process whose network namespace is the host's (daemons, VMs, the holder). */
async function hostPids(host: LabHost): Promise<number[]> {
  if (!(await netnsExists(host.netns))) return [];
  const out = (await $`ip netns pids ${host.netns}`.nothrow()).stdout;
  return out.split('\n').filter(Boolean).map(Number).filter((pid) => pid !== process.pid);
}

async function killPids(pids: number[], signal: NodeJS.Signals): Promise<void> {
  for (const pid of pids) {
    try {
      process.kill(pid, signal);
    } catch {
      // already gone
    }
  }
}

function processState(pid: number): string | undefined {
  try {
    return /^State:\s+(\S)/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1];
  } catch {
    return undefined;
  }
}

function readHolderPid(host: LabHost): number | undefined {
  try {
    const pid = Number(fs.readFileSync(path.join(host.stateDir, 'holder.pid'), 'utf8').trim());
    return Number.isInteger(pid) && pid > 0 && fs.existsSync(`/proc/${pid}`) ? pid : undefined;
  } catch {
    return undefined;
  }
}

function requireHolder(name: LabHostName): number {
  const pid = readHolderPid(labHost(name));
  if (pid === undefined) throw new Error(`lab host ${name} is not running (no namespace holder); run the lab up or restart it`);
  return pid;
}

function tcpOpen(host: string, port: number, timeoutMs: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect({ host, port });
    const done = (ok: boolean) => (socket.destroy(), resolve(ok));
    socket.setTimeout(timeoutMs, () => done(false));
    socket.once('connect', () => done(true));
    socket.once('error', () => done(false));
  });
}

async function waitUntil(
  check: () => Promise<boolean> | boolean,
  timeoutMs: number,
  what: string,
  diagnostics?: () => string,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) {
      throw new Error(`lab: timed out after ${timeoutMs} ms waiting for ${what}${diagnostics ? `\n${diagnostics()}` : ''}`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** For tests: is any lab leftover visible in the root namespace? */
export function labLeftovers(): string[] {
  const leftovers: string[] = [];
  const netns = spawnSync('ip', ['netns', 'list'], { encoding: 'utf8' }).stdout;
  for (const line of netns.split('\n')) if (line.startsWith('ftvm-')) leftovers.push(`netns ${line.split(' ')[0]}`);
  if (spawnSync('ip', ['link', 'show', LAB_BRIDGE]).status === 0) leftovers.push(`bridge ${LAB_BRIDGE}`);
  const links = spawnSync('ip', ['-o', 'link'], { encoding: 'utf8' }).stdout;
  for (const name of LAB_HOSTS) if (links.includes(`${labHost(name).vethOutside}@`)) leftovers.push(`veth ${labHost(name).vethOutside}`);
  if (fs.existsSync(LAB_STATE_ROOT)) leftovers.push(`dir ${LAB_STATE_ROOT}`);
  return leftovers;
}
