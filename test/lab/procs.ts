/** Reading and signalling processes through /proc. */
import fs from 'node:fs';

export interface ProcStat {
  pid: number;
  comm: string;
  /** R, S, D, T (stopped), Z (zombie), … */
  state: string;
  /** Clock ticks since boot: with the pid, identifies a process across pid reuse. */
  startTicks: number;
}

export function procStat(pid: number): ProcStat | undefined {
  let text: string;
  try {
    text = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return undefined;
  }
  // comm may hold spaces and parentheses: the fields after it start past the last ')'.
  const close = text.lastIndexOf(')');
  const rest = text.slice(close + 2).split(' ');
  return { pid, comm: text.slice(text.indexOf('(') + 1, close), state: rest[0] ?? '?', startTicks: Number(rest[19]) };
}

/**
 * Exists and is not a zombie. This machine's pid 1 reaps orphans only about once a second, so a
 * killed daemon lingers as a zombie for a while; it holds no namespaces, sockets or mounts.
 */
export function isAlive(pid: number): boolean {
  const stat = procStat(pid);
  return stat !== undefined && stat.state !== 'Z' && stat.state !== 'X';
}

export function allPids(): number[] {
  return fs
    .readdirSync('/proc')
    .filter((name) => /^\d+$/.test(name))
    .map(Number);
}

/** A namespace's identity as /proc shows it, e.g. `net:[4026532178]`; undefined when gone. */
export function nsOf(pid: number | 'self', kind: 'net' | 'mnt'): string | undefined {
  try {
    return fs.readlinkSync(`/proc/${pid}/ns/${kind}`);
  } catch {
    return undefined;
  }
}

/** The network namespace a bind-mounted ns file (/run/netns/<name>) stands for, in `nsOf` form. */
export function netnsFileId(file: string): string | undefined {
  try {
    return `net:[${fs.statSync(file).ino}]`;
  } catch {
    return undefined;
  }
}

export interface MountEntry {
  /** The mounted directory's path inside its filesystem (for a bind mount: the source). */
  root: string;
  mountPoint: string;
}

export function mountsOf(pid: number | 'self'): MountEntry[] {
  let text: string;
  try {
    text = fs.readFileSync(`/proc/${pid}/mountinfo`, 'utf8');
  } catch {
    return [];
  }
  return text
    .split('\n')
    .filter(Boolean)
    .map((line) => {
      const fields = line.split(' ');
      return { root: unescapeMount(fields[3] ?? ''), mountPoint: unescapeMount(fields[4] ?? '') };
    });
}

/** Sends `signal` to each pid that is still there; returns those it reached. */
export function signalAll(pids: readonly number[], signal: NodeJS.Signals): number[] {
  const reached: number[] = [];
  for (const pid of pids) {
    if (pid === process.pid) continue; // never the caller, even if it was started inside a host
    try {
      process.kill(pid, signal);
      reached.push(pid);
    } catch {
      // already gone
    }
  }
  return reached;
}

const unescapeMount = (s: string) => s.replace(/\\([0-7]{3})/g, (_, oct: string) => String.fromCharCode(parseInt(oct, 8)));
