/**
 * Stopping and starting one lab host's libvirtd alone (its VMs, virtlogd and sshd keep running), as
 * `systemctl restart libvirtd` does on a real host: for testing that clients survive a daemon restart.
 */
import { execIn } from './lab.js';
import { daemonPids, hostDiagnostics, libvirtAnswers } from './host.js';
import { isAlive } from './procs.js';
import { labHost, type LabHostName } from './topology.js';
import { waitUntil } from './wait.js';

/** SIGTERM the host's libvirtd and wait until it is gone (SIGKILL after `timeoutMs`/2). Returns its pid. */
export async function stopLibvirtd(name: LabHostName, options: { timeoutMs?: number } = {}): Promise<number> {
  const host = labHost(name);
  const timeoutMs = options.timeoutMs ?? 20_000;
  const pid = daemonPids(host).libvirtd;
  if (pid === undefined) throw new Error(`lab: ${name} has no running libvirtd to stop`);
  process.kill(pid, 'SIGTERM');
  try {
    await waitUntil(() => !isAlive(pid), { timeoutMs: timeoutMs / 2, what: `${name}'s libvirtd (pid ${pid}) to exit on SIGTERM` });
  } catch {
    process.kill(pid, 'SIGKILL');
    await waitUntil(() => !isAlive(pid), { timeoutMs: timeoutMs / 2, what: `${name}'s libvirtd (pid ${pid}) to die of SIGKILL` });
  }
  return pid;
}

/** Starts the host's libvirtd (inside the host, daemonized as holder.sh does) and waits until it answers. */
export async function startLibvirtd(name: LabHostName, options: { timeoutMs?: number } = {}): Promise<number> {
  const host = labHost(name);
  const timeoutMs = options.timeoutMs ?? 30_000;
  if (daemonPids(host).libvirtd !== undefined) throw new Error(`lab: ${name}'s libvirtd is already running`);
  await execIn(name, ['libvirtd', '-d'], { timeoutMs });
  await waitUntil(() => libvirtAnswers(host), { timeoutMs, what: `${name}'s restarted libvirtd to answer`, diagnostics: () => hostDiagnostics(host) });
  const pid = daemonPids(host).libvirtd;
  if (pid === undefined) throw new Error(`lab: ${name}'s libvirtd answers but wrote no pid file`);
  return pid;
}

/** Stop + start: a new libvirtd process (running VMs are reconnected by it, as after a package upgrade). */
export async function restartLibvirtd(name: LabHostName, options: { timeoutMs?: number } = {}): Promise<{ oldPid: number; newPid: number }> {
  const oldPid = await stopLibvirtd(name, options);
  const newPid = await startLibvirtd(name, options);
  return { oldPid, newPid };
}
