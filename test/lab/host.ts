/**
 * One lab host's processes: starting its namespace holder (which starts virtlogd, libvirtd, sshd),
 * finding every process that belongs to it, probing its daemons, and signalling them.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { netnsFile } from './network.js';
import { allPids, isAlive, mountsOf, netnsFileId, nsOf, procStat, signalAll } from './procs.js';
import { shWithin } from './sh.js';
import { LAB_STATE_ROOT, labSshConfig, type LabHost } from './topology.js';
import { waitUntil } from './wait.js';

const HOLDER_SCRIPT = fileURLToPath(new URL('./holder.sh', import.meta.url));

const holderPidFile = (host: LabHost) => path.join(host.stateDir, 'holder.pid');
const holderLog = (host: LabHost) => path.join(host.stateDir, 'holder.log');
const daemonsFile = (host: LabHost) => path.join(host.stateDir, 'daemons.jsonl');

/**
 * Every live process of the host: those in its network namespace (`ip netns pids`: the holder,
 * its daemons, QEMU, whatever `execIn` started) and those in a mount namespace that has the
 * host's state dir as /run — which also finds them after a crash has lost the netns.
 */
export function hostPids(host: LabHost): number[] {
  const netns = netnsFileId(netnsFile(host));
  const rootMnt = nsOf('self', 'mnt');
  return allPids().filter((pid) => {
    if (pid === process.pid) return false;
    if (netns !== undefined && nsOf(pid, 'net') === netns) return isAlive(pid);
    const mnt = nsOf(pid, 'mnt');
    return mnt !== undefined && mnt !== rootMnt && hasHostRun(pid, host) && isAlive(pid);
  });
}

/** The namespace holder (`nsenter -t` target) if it is running, else undefined. */
export function holderPid(host: LabHost): number | undefined {
  let pid: number;
  try {
    pid = Number(fs.readFileSync(holderPidFile(host), 'utf8').trim());
  } catch {
    return undefined;
  }
  // A recycled pid is not ours: the holder has the host's state dir as its /run.
  return Number.isInteger(pid) && pid > 0 && isAlive(pid) && hasHostRun(pid, host) ? pid : undefined;
}

function hasHostRun(pid: number, host: LabHost): boolean {
  const suffix = `/${path.basename(LAB_STATE_ROOT)}/${host.name}/run`;
  return mountsOf(pid).some((m) => m.mountPoint === '/run' && m.root.endsWith(suffix));
}

/** Starts the holder in the host's (existing) netns and waits until its daemons answer. */
export async function startHolder(host: LabHost, timeoutMs: number): Promise<number> {
  fs.rmSync(holderPidFile(host), { force: true });
  const log = fs.openSync(holderLog(host), 'a');
  // nsenter rather than `ip netns exec`: no intermediate mount namespace (with copies of every
  // /run/netns mount) held by unshare's waiting parent; holder.sh mounts the netns's sysfs itself.
  const child = spawn(
    'nsenter',
    [`--net=${netnsFile(host)}`, '--', 'unshare', '--mount', '--uts', '--propagation', 'private', '--fork', '--',
      'bash', HOLDER_SCRIPT, host.name, host.stateDir, labSshConfig()],
    { detached: true, stdio: ['ignore', log, log] },
  );
  fs.closeSync(log);
  let exited: string | undefined;
  child.once('exit', (code, signal) => (exited = `holder exited (${signal ?? `code ${code}`})`));
  child.once('error', (error) => (exited = `could not start the holder: ${error.message}`));
  child.unref();

  const deadline = Date.now() + timeoutMs;
  const remaining = () => Math.max(1, deadline - Date.now());
  const diagnostics = () => hostDiagnostics(host);
  await waitUntil(
    () => {
      if (exited) throw new Error(`lab: ${host.name}: ${exited}\n${diagnostics()}`);
      return holderPid(host) !== undefined;
    },
    { timeoutMs: remaining(), what: `${host.name}'s namespace holder`, diagnostics },
  );
  await waitUntil(() => libvirtAnswers(host), { timeoutMs: remaining(), what: `${host.name}'s libvirtd`, diagnostics });
  await waitUntil(() => sshListening(host), { timeoutMs: remaining(), what: `${host.name}'s sshd`, diagnostics });
  return holderPid(host)!;
}

/** SIGKILLs every process of the host and waits until none is left. */
export async function killHostProcesses(host: LabHost, timeoutMs = 15_000): Promise<void> {
  await waitUntil(() => signalAll(hostPids(host), 'SIGKILL').length === 0, {
    timeoutMs,
    intervalMs: 50,
    what: `${host.name}'s processes to die`,
    diagnostics: () => `still there: ${describePids(hostPids(host))}`,
  });
  fs.rmSync(holderPidFile(host), { force: true });
}

/** SIGSTOP (or SIGCONT) every process of the host, until all are stopped (running). */
export async function setFrozen(host: LabHost, frozen: boolean, timeoutMs = 5_000): Promise<void> {
  const signal = frozen ? 'SIGSTOP' : 'SIGCONT';
  await waitUntil(
    () => {
      const pids = hostPids(host);
      signalAll(pids, signal);
      return pids.every((pid) => (procStat(pid)?.state === 'T') === frozen);
    },
    { timeoutMs, intervalMs: 20, what: `${host.name} to be ${frozen ? 'frozen' : 'thawed'}` },
  );
}

export function isFrozen(host: LabHost): boolean {
  const pids = hostPids(host);
  return pids.length > 0 && pids.some((pid) => procStat(pid)?.state === 'T');
}

/** The host's libvirtd answers through its socket (needs no link; fails when killed or frozen). */
export async function libvirtAnswers(host: LabHost, timeoutMs = 5_000): Promise<boolean> {
  if (!fs.existsSync(path.join(host.runDir, 'libvirt', 'libvirt-sock'))) return false;
  return (await shWithin(timeoutMs)`virsh -c ${host.libvirtUri} version`.nothrow()).ok;
}

/** A listening socket on the host's address, port 22, in its netns (needs no link, no answer). */
export function sshListening(host: LabHost): boolean {
  const holder = holderPid(host);
  if (holder === undefined) return false;
  const [a, b, c, d] = host.ip.split('.').map(Number) as [number, number, number, number];
  const hexIp = [d, c, b, a].map((n) => n.toString(16).padStart(2, '0')).join('').toUpperCase();
  try {
    // /proc/<pid>/net/tcp lists the sockets of that process's network namespace.
    return fs
      .readFileSync(`/proc/${holder}/net/tcp`, 'utf8')
      .split('\n')
      .some((line) => line.trim().split(/\s+/)[1] === `${hexIp}:0016` && line.trim().split(/\s+/)[3] === '0A');
  } catch {
    return false;
  }
}

/** sshd sends its banner to the root namespace over the lab link (fails when cut, killed or frozen). */
export function sshAnswers(host: LabHost, timeoutMs = 2_000): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect({ host: host.ip, port: 22 });
    const done = (ok: boolean) => {
      socket.destroy();
      resolve(ok);
    };
    socket.setTimeout(timeoutMs, () => done(false));
    socket.once('data', (data) => done(data.toString('latin1').startsWith('SSH-')));
    socket.once('error', () => done(false));
  });
}

/** The pids the host's own daemons wrote (in its /run). */
export function daemonPids(host: LabHost): Record<'virtlogd' | 'libvirtd' | 'sshd', number | undefined> {
  const read = (file: string) => {
    try {
      const pid = Number(fs.readFileSync(path.join(host.runDir, file), 'utf8').trim());
      return Number.isInteger(pid) && isAlive(pid) ? pid : undefined;
    } catch {
      return undefined;
    }
  };
  return { virtlogd: read('virtlogd.pid'), libvirtd: read('libvirtd.pid'), sshd: read('sshd.pid') };
}

export interface DaemonRecord {
  pid: number;
  startTicks: number;
  argv: string[];
  logFile: string;
}

/** Starts a long-running process inside the host, detached; it dies with the host (killHost, down). */
export function spawnDaemon(host: LabHost, argv: string[], logFile: string): DaemonRecord {
  const holder = holderPid(host);
  if (holder === undefined) throw new Error(`lab host ${host.name} is not running`);
  fs.mkdirSync(path.dirname(logFile), { recursive: true });
  const log = fs.openSync(logFile, 'a');
  const child = spawn('nsenter', ['-t', String(holder), '-m', '-n', '-u', '--', ...argv], {
    detached: true,
    stdio: ['ignore', log, log],
  });
  fs.closeSync(log);
  child.unref();
  if (child.pid === undefined) throw new Error(`lab: could not start ${argv[0]} in ${host.name}`);
  const record = { pid: child.pid, startTicks: procStat(child.pid)?.startTicks ?? 0, argv, logFile };
  fs.appendFileSync(daemonsFile(host), `${JSON.stringify(record)}\n`);
  return record;
}

/** Daemons started with spawnDaemon that are still running. */
export function spawnedDaemons(host: LabHost): DaemonRecord[] {
  let text: string;
  try {
    text = fs.readFileSync(daemonsFile(host), 'utf8');
  } catch {
    return [];
  }
  return text
    .split('\n')
    .filter(Boolean)
    .map((line) => JSON.parse(line) as DaemonRecord)
    .filter((d) => isAlive(d.pid) && procStat(d.pid)?.startTicks === d.startTicks);
}

export function hostDiagnostics(host: LabHost): string {
  const tail = (file: string, bytes = 1200) => {
    try {
      const text = fs.readFileSync(file, 'utf8');
      return text.length > bytes ? `…${text.slice(-bytes)}` : text;
    } catch {
      return '(none)';
    }
  };
  return [
    `--- ${holderLog(host)}`,
    tail(holderLog(host)),
    `--- libvirtd.log`,
    tail(path.join(host.logDir, 'libvirt', 'libvirtd.log')),
    `--- sshd.log`,
    tail(path.join(host.logDir, 'sshd.log'), 600),
    `--- processes: ${describePids(hostPids(host))}`,
  ].join('\n');
}

function describePids(pids: number[]): string {
  return pids.map((pid) => `${pid}(${procStat(pid)?.comm ?? '?'})`).join(' ') || 'none';
}
