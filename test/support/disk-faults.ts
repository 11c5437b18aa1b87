/**
 * Faults at precise moments of a disk checkpoint (issue #15's "Byte equality" and "Guest view"),
 * for `pnpm bench:disk-faults` and test/failover/disk-faults.int.test.ts.
 *
 * The agents run with two test-only environment variables (set by `diskFaultEnv` before the
 * cluster starts, inherited by the agents and passed on to ftvm-receive):
 * - FTVM_TEST_DISK_AUDIT: the primary logs each checkpoint's fleece hash per disk, the backup its
 *   replica's hash and a raw copy of it when it fails over (packages/coordinator);
 * - FTVM_TEST_PAUSE_AT=@<file>: the pause points of packages/{transport,coordinator}/src/test-pause.ts, armed here one
 *   at a time by writing `<point> <ms>` into the file; a process that reaches the point logs it in
 *   `<file>.hits` and sleeps, and the fault is injected during that sleep.
 *
 * After each failover: the replica the backup resumed on hashes as the primary's fleece did at
 * that checkpoint's stop instant (both disks); the guest's own ring read-back after the resume
 * finds the disk neither older nor newer than its RAM, and it goes on writing; a copy of the
 * ring replica has no lost write; e2fsck finds the copy of the ext4 replica clean.
 */
import fs from 'node:fs';
import path from 'node:path';
import { cutLink, hostInfo, killHost, restoreLink } from '../lab/lab.js';
import { sleep } from '../lab/wait.js';
import { fsckCopy, readRing } from './disk-check.js';
import { readRecord } from './failover-runs.js';
import { agentLogEntries, CLUSTER_DIR, controlClient, other, probeOn, qemuPidOf, reviveHost, untilAgents, waitProtectedOn, type AgentHost, type Cluster } from './ft-cluster.js';
import { diskCounters } from './probe-client.js';

export const AUDIT_DIR = path.join(CLUSTER_DIR, 'disk-audit');
export const PAUSE_FILE = path.join(CLUSTER_DIR, 'pause-at');

export const KILL_MODES = ['kill', 'partition', 'freeze'] as const;
export type KillMode = (typeof KILL_MODES)[number];
/** Where the fault strikes: a pause point (packages/{transport,coordinator}/src/test-pause.ts), or `random` (0–1 s after a commit). */
export const KILL_POINTS = ['delta-read', 'before-disk-frames', 'before-meta-rename', 'after-meta-rename', 'mid-apply', 'random'] as const;
export type KillPoint = (typeof KILL_POINTS)[number];

/** The test environment the agents must inherit: call before startCluster. */
export function diskFaultEnv(): void {
  process.env['FTVM_TEST_DISK_AUDIT'] = AUDIT_DIR;
  process.env['FTVM_TEST_PAUSE_AT'] = `@${PAUSE_FILE}`;
}

export function clearDiskFaultEnv(): void {
  delete process.env['FTVM_TEST_DISK_AUDIT'];
  delete process.env['FTVM_TEST_PAUSE_AT'];
}

/** One pause a process logged (test-pause.ts): which point, which process, and its epoch where it knows one. */
export interface PauseHit {
  point: string;
  pid: number;
  at: number;
  ms: number;
  epoch?: number;
  target?: number;
}

/**
 * Arms `point` for `ms`, waits until a process reaches it (at most `timeoutMs`) and disarms it at
 * once, so the fault goes in while that process sleeps and nothing else pauses after. Every point
 * comes with each checkpoint but `mid-apply`: the backup's store brings its replica to the oldest
 * checkpoint it keeps, which with incremental checkpoints is the full one their chain starts from,
 * so it moves when a new chain replaces the old (a full every `fullEvery`, which the disk-fault
 * clusters set to 30, or the store's compaction of a long chain).
 */
export async function pauseAt(point: Exclude<KillPoint, 'random'>, ms: number, timeoutMs = point === 'mid-apply' ? 75_000 : 20_000): Promise<PauseHit> {
  const hits = `${PAUSE_FILE}.hits`;
  const offset = fs.existsSync(hits) ? fs.statSync(hits).size : 0;
  fs.writeFileSync(PAUSE_FILE, `${point} ${ms}\n`);
  try {
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      if (fs.existsSync(hits)) {
        const fresh = fs.readFileSync(hits).subarray(offset).toString('utf8');
        for (const line of fresh.split('\n')) {
          if (!line) continue;
          const hit = JSON.parse(line) as PauseHit;
          if (hit.point === point) return hit;
        }
      }
      if (performance.now() > deadline) throw new Error(`no process reached pause point ${point} within ${timeoutMs} ms`);
      await sleep(10);
    }
  } finally {
    fs.writeFileSync(PAUSE_FILE, '');
  }
}

interface Audit {
  role: 'fleece' | 'replica';
  epoch: number;
  disk: string;
  sha256: string;
  copy?: string;
}

const audits = (host: AgentHost, role: Audit['role']) => (agentLogEntries(host, 'disk audit') as unknown as Audit[]).filter((a) => a.role === role);

/** What the checks found after one failover. */
export interface DiskCheck {
  /** The checkpoint the backup resumed. */
  epoch: number;
  /** Every disk's replica hashes as the primary's fleece did at that checkpoint. */
  equal: boolean;
  disks: { disk: string; fleece: string | null; replica: string }[];
  /** How often the backup prepared its replicas for this checkpoint (a staged restore aborted and staged again: 2); every one counts for `equal`. */
  stagings: number;
  fsckClean: boolean;
  fsckOutput: string;
  /** The guest ran a ring read-back after the resume. */
  guestChecked: boolean;
  /** Read-backs that found the disk older or newer than the guest's RAM (the guest's own count, cumulative). */
  guestViolations: number;
  /** The ring and the file-system workload went on after the resume. */
  guestWrites: boolean;
  /** The ring replica as resumed: no lost write, at most one torn slot, and not newer than the guest's issued counter. */
  ring: { newest: string; issuedAfter: string; missing: number; corrupt: number; ok: boolean };
  /** guestViolations plus one if the ring replica is not ok. */
  counterViolations: number;
}

/**
 * The checks after `to` resumed checkpoint `epoch` of a VM that ran on `from` (`before`: the
 * guest's counters sampled just before the fault). Throws only when something never comes
 * (the replica audit, the guest's answers); a failed check is a field of the result.
 */
export async function checkAfterFailover(from: AgentHost, to: AgentHost, epoch: number, before: { bootId: bigint; ring: { checks: number } }, options: { keepCopies?: boolean } = {}): Promise<DiskCheck> {
  const replicas = await untilAgents(`${to} audits its replicas of epoch ${epoch}`, async () => {
    const found = audits(to, 'replica').filter((a) => a.epoch === epoch);
    return found.length >= 2 ? found : undefined;
  });
  const fleeces = audits(from, 'fleece').filter((a) => a.epoch === epoch);
  const fleeceOf = (disk: string) => fleeces.find((f) => f.disk === disk)?.sha256 ?? null;
  // a restore staged, aborted (the old primary still answered) and staged again audits twice: the last is what the VM resumed on
  const last = [...new Map(replicas.map((r) => [r.disk, r])).values()];
  const disks = last.map((r) => ({ disk: r.disk, fleece: fleeceOf(r.disk), replica: r.sha256 }));
  const equal = disks.length === 2 && replicas.every((r) => r.sha256 === fleeceOf(r.disk));

  // the guest's own view: a read-back after the resume, no disk/RAM mismatch, and it writes on
  const after = await untilAgents(`the guest on ${to} checks its ring after the resume`, async () => {
    const d = await diskCounters(probeOn(to));
    return d.bootId === before.bootId && d.ring.checks > before.ring.checks ? d : undefined;
  });
  const later = await untilAgents(`the ring and the fs workload advance on ${to}`, async () => {
    const d = await diskCounters(probeOn(to));
    return d.ring.completed > after.ring.completed && d.fs.cycles > after.fs.cycles ? d : undefined;
  }, 30_000).catch(() => undefined);
  const guestViolations = (later ?? after).ring.violations;
  const guestWrites = later !== undefined && later.ring.state === 'running' && later.fs.state === 'running' && later.ring.violations === after.ring.violations;

  const copyOf = (disk: string) => path.join(AUDIT_DIR, path.basename(last.find((r) => r.disk === disk)!.copy!));
  const ringState = await readRing(copyOf('vda'), 'raw', { bootId: before.bootId });
  const ringOk = ringState.missing === 0 && ringState.corrupt <= 1 && ringState.newest > 0n && ringState.newest <= after.ring.issued;
  const fsck = await fsckCopy(copyOf('vdb'), 'raw');
  if (!options.keepCopies) for (const r of replicas) fs.rmSync(path.join(AUDIT_DIR, path.basename(r.copy!)), { force: true });
  return {
    epoch,
    equal,
    disks,
    stagings: replicas.length / 2,
    fsckClean: fsck.clean,
    fsckOutput: fsck.clean ? '' : fsck.output.slice(-2000),
    guestChecked: true,
    guestViolations,
    guestWrites,
    ring: { newest: String(ringState.newest), issuedAfter: String(after.ring.issued), missing: ringState.missing, corrupt: ringState.corrupt, ok: ringOk },
    counterViolations: guestViolations + (ringOk ? 0 : 1),
  };
}

/** One fault and what followed. */
export interface DiskFaultRun extends DiskCheck {
  mode: KillMode;
  point: KillPoint;
  from: AgentHost;
  to: AgentHost;
  /** The pause the fault struck in (none for `random`). */
  hit?: PauseHit;
  /** Backup's last heartbeat from the old primary → RESUME on the backup (s). */
  failoverS: number | undefined;
  /** The old primary, made the backup again by `ftvm reprotect`, was reseeded. */
  reseeded: boolean;
  /** From the fault to the VM protected again. */
  cycleS: number;
}

/** Waits until `to` hears `from` (the fault must find a healthy pair). */
async function untilHears(to: AgentHost, from: AgentHost): Promise<void> {
  await untilAgents(`${to} hears ${from}`, async () => ((await controlClient(to).status()).peers.find((p) => p.name === from)?.alive ? true : undefined), 30_000);
}

/**
 * Injects `mode` on the host running the VM at `point` (paused there for `pauseMs`), waits for
 * the take-over, checks, and makes the old primary the backup again (reprotect, a reseed).
 */
export async function runDiskFault(cluster: Cluster, mode: KillMode, point: KillPoint, options: { pauseMs: number; log?: (line: string) => void }): Promise<DiskFaultRun> {
  const { vm } = cluster;
  const log = options.log ?? (() => undefined);
  const from = cluster.primary;
  const to = other(from);
  await waitProtectedOn(from, vm, { timeoutMs: 90_000 });
  await untilHears(to, from);
  await waitProtectedOn(from, vm, { timeoutMs: 60_000, committedAfter: Date.now() });
  const previousMove = (await readRecord(vm)).lastMove?.at;

  let hit: PauseHit | undefined;
  if (point === 'random') await sleep(Math.floor(Math.random() * 1000));
  else hit = await pauseAt(point, options.pauseMs);
  // sampled after the pause began: the checkpoint resumed stopped before this
  const before = await diskCounters(probeOn(from), { timeoutMs: 1_000 });

  let frozenPid: number | undefined;
  const faultAt = performance.now();
  if (mode === 'kill') await killHost(from);
  else if (mode === 'partition') await cutLink(from);
  else {
    frozenPid = await qemuPidOf(from, vm);
    if (!frozenPid) throw new Error(`no QEMU of ${vm} on ${from}`);
    process.kill(frozenPid, 'SIGSTOP');
  }
  log(`${mode} at ${point}${hit ? ` (pid ${hit.pid}, epoch ${hit.epoch ?? '?'})` : ''}: ${from} → ${to}`);

  const record = await untilAgents(`${to} takes ${vm} over after ${mode} of ${from} at ${point}`, async () => {
    const r = await readRecord(vm);
    return r.lastMove && r.lastMove.at !== previousMove && r.lastMove.to === to ? r : undefined;
  }, 90_000);
  const move = record.lastMove!;
  const failoverS = move.lastBeatNs ? Math.round(Number(BigInt(move.resumeNs) - BigInt(move.lastBeatNs)) / 1e6) / 1e3 : undefined;
  const check = await checkAfterFailover(from, to, move.epoch, before);

  // the old primary comes back and becomes the backup (reseeded)
  if (mode === 'kill') await reviveHost(from, cluster);
  else if (mode === 'partition') await restoreLink(from);
  else {
    try {
      process.kill(frozenPid!, 'SIGCONT');
    } catch {
      // gone: its agent's fence killed it
    }
  }
  cluster.primary = to;
  const reprotectAt = Date.now();
  await untilHears(to, from);
  await controlClient(to).reprotect(vm, from, () => undefined);
  await waitProtectedOn(to, vm, { timeoutMs: 120_000, committedAfter: reprotectAt });
  const reseeded = agentLogEntries(to, 'disks seeded').some((e) => Date.parse(String(e['time'])) >= reprotectAt);
  const fromStatus = (await controlClient(from).status()).vms.find((v) => v.name === vm);
  if (fromStatus?.role === 'primary' || fromStatus?.domainState === 'running') throw new Error(`${from} runs ${vm} again after the fault: ${JSON.stringify(fromStatus)}`);
  return { mode, point, from, to, ...(hit ? { hit } : {}), failoverS, reseeded, cycleS: Math.round(performance.now() - faultAt) / 1e3, ...check };
}

/** The VM's checkpoint store on `host` (in its persistent /var/lib/libvirt), as this process sees it. */
export function storeDirHere(host: AgentHost, vm: string): string {
  return path.join(hostInfo(host).libvirtLibDir, 'ftvm', 'checkpoints', vm);
}

/** The committed epochs of a store, oldest first. */
export function committedEpochs(dir: string): number[] {
  return fs
    .readdirSync(dir)
    .filter((n) => /^\d+\.json$/.test(n))
    .map((n) => Number(n.slice(0, -5)))
    .sort((a, b) => a - b);
}
