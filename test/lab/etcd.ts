/**
 * The lab's etcd (Debian's etcd-server), in one of two modes:
 * - `'witness'` (the default): a single member inside `witness`, on the witness's lab address. The
 *   agents' leases and VM records live there.
 * - `'all'`: three members, one in each of `primary`, `backup` and `witness`, each on its own
 *   host's lab address (ports 2379/2380), data dir under that host's stateDir, log under its logDir.
 *   Any two of them are a quorum.
 *
 * `labUp` starts it (in the current mode, or the one it is given); `ensureLabEtcd` is idempotent and
 * can be called again after a test killed or restarted a host; `ensureWitnessEtcd` is
 * `ensureLabEtcd({ members: 'witness' })`. `stopLabEtcd` / `startLabEtcd` stop and start one member
 * keeping its data.
 */
import fs from 'node:fs';
import path from 'node:path';
import { spawnDaemon, spawnedDaemons, holderPid } from './host.js';
import { labLinkUp } from './network.js';
import { isAlive, signalAll } from './procs.js';
import { hostIp, labHost, LAB_HOSTS, LAB_STATE_ROOT, type LabHostName } from './topology.js';
import { waitUntil } from './wait.js';

export const ETCD_CLIENT_PORT = 2379;
export const ETCD_PEER_PORT = 2380;
const ETCD_BINARY = '/usr/bin/etcd';
const DEFAULT_TIMEOUT_MS = 20_000;

/** `'witness'`: one member, on the witness (the default). `'all'`: a member on each of the three hosts. */
export type LabEtcdMembers = 'witness' | 'all';

/** Where a member answers: `http://10.213.0.13:2379` for the witness (instance-aware). */
export const labEtcdEndpoint = (host: LabHostName = 'witness') => `http://${hostIp(host)}:${ETCD_CLIENT_PORT}`;

/** A member's data dir and log, root-namespace paths (inside its host: the same dir, and /var/log/etcd.log). */
export const labEtcdDataDir = (host: LabHostName = 'witness') => path.join(labHost(host).stateDir, 'etcd');
export const labEtcdLog = (host: LabHostName = 'witness') => path.join(labHost(host).logDir, 'etcd.log');

/** Remembers the mode across processes (tests, the CLI, the agents' configs); wiped by labDown. Absent: 'witness'. */
const modeFile = () => path.join(LAB_STATE_ROOT, 'etcd-members');

/** The current mode: `'all'` once `ensureLabEtcd({ members: 'all' })` made it so, else `'witness'`. */
export function labEtcdMode(): LabEtcdMembers {
  try {
    return fs.readFileSync(modeFile(), 'utf8').trim() === 'all' ? 'all' : 'witness';
  } catch {
    return 'witness';
  }
}

/** The hosts that run a member in `mode` (default: the current one). */
export function labEtcdMembers(mode: LabEtcdMembers = labEtcdMode()): LabHostName[] {
  return mode === 'all' ? [...LAB_HOSTS] : ['witness'];
}

/** The client URLs of the members in the current mode (one in single mode): what the agents and tests dial. */
export function labEtcdEndpoints(): string[] {
  return labEtcdMembers().map((host) => labEtcdEndpoint(host));
}

export interface EnsureEtcdOptions {
  /** For etcd to answer its health endpoint after it was started. Default 20 s. */
  timeoutMs?: number;
}

export interface EnsureLabEtcdOptions extends EnsureEtcdOptions {
  /** The mode to run in; default: the current one (`labEtcdMode()`). Switching wipes and starts a fresh cluster. */
  members?: LabEtcdMembers;
}

/**
 * Makes sure etcd runs in `members` mode and every member answers `/health`. A cluster in that mode
 * that answers is left alone; members of ours that run but do not answer yet (starting) are waited
 * for. With no member running — or when the mode changes, or an etcd runs where the mode has none —
 * every lab etcd is killed and a fresh cluster is started on empty data dirs (no stale leases or
 * keys from an earlier run). In three-member mode, a member missing beside running ones (a test or
 * restartHost killed it) is started again on its own data dir, so it rejoins with the cluster's
 * data. Throws with the members' log tails when they do not become healthy in time.
 */
export async function ensureLabEtcd(options: EnsureLabEtcdOptions = {}): Promise<{ members: LabEtcdMembers; endpoints: string[] }> {
  const mode = options.members ?? labEtcdMode();
  const members = labEtcdMembers(mode);
  const endpoints = members.map((host) => labEtcdEndpoint(host));
  for (const host of members) {
    if (holderPid(labHost(host)) === undefined) throw new Error(`lab: the ${host} is not running (no namespace holder): labUp() first`);
  }
  const strays = LAB_HOSTS.filter((host) => !members.includes(host) && memberDaemon(host) !== undefined);
  const switching = mode !== labEtcdMode() || strays.length > 0;
  if (!switching && (await Promise.all(endpoints.map((endpoint) => etcdHealthy(endpoint)))).every(Boolean)) {
    return { members: mode, endpoints };
  }

  const timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  const running = members.filter((host) => memberDaemon(host) !== undefined);
  const missing = members.filter((host) => !running.includes(host));
  const fresh = switching || running.length === 0 || !missing.every(hasMemberData);
  if (fresh) {
    // A fresh cluster: every member at once (each waits for its peers).
    await killAllEtcd();
    wipeAndSetMode(mode);
    for (const host of members) startMember(host, mode, 'new');
  } else {
    for (const host of missing) startMember(host, mode, 'existing');
  }
  try {
    await waitHealthy(members, timeoutMs);
  } catch (error) {
    // Leave nothing half-started behind: after a fresh start the next call starts afresh; members
    // restarted on their data dirs are stopped again (the others, and all data, are kept).
    if (fresh) await killAllEtcd();
    else signalAll(missing.flatMap((host) => memberDaemon(host)?.pid ?? []), 'SIGKILL');
    throw error;
  }
  return { members: mode, endpoints };
}

/**
 * The witness's etcd answers, as a single member: `ensureLabEtcd({ members: 'witness' })` (so in
 * three-member mode it switches back to a fresh single member).
 */
export async function ensureWitnessEtcd(options: EnsureEtcdOptions = {}): Promise<{ endpoint: string }> {
  await ensureLabEtcd({ ...options, members: 'witness' });
  return { endpoint: labEtcdEndpoint() };
}

/**
 * Stops `host`'s member (SIGKILL by default: a crash) and waits until it is gone; its data dir is
 * kept, for `startLabEtcd`. Returns the pid it stopped, undefined if the member was not running.
 * Throws if `host` has no member in the current mode.
 */
export async function stopLabEtcd(
  host: LabHostName = 'witness',
  signal: 'SIGKILL' | 'SIGTERM' | 'SIGINT' = 'SIGKILL',
  options: { timeoutMs?: number } = {},
): Promise<number | undefined> {
  requireMember(host);
  const daemon = memberDaemon(host);
  if (daemon === undefined) return undefined;
  signalAll([daemon.pid], signal);
  await waitUntil(() => !isAlive(daemon.pid), {
    timeoutMs: options.timeoutMs ?? 10_000,
    intervalMs: 10,
    what: `${host}'s etcd (pid ${daemon.pid}) to exit after ${signal}`,
  });
  return daemon.pid;
}

/**
 * Starts `host`'s member again on its existing data dir (nothing is wiped: its keys and leases, and
 * in three-member mode its membership, are kept; it rejoins the others and catches up) and waits
 * until it answers `/health` — which needs a leader and a quorum read, i.e. the cluster answers
 * through it. A member that runs already is only waited for. Throws with its log tail on timeout
 * (and stops it again), or when there is no data dir to start from (`ensureLabEtcd` makes a fresh
 * cluster).
 */
export async function startLabEtcd(host: LabHostName = 'witness', options: EnsureEtcdOptions = {}): Promise<{ endpoint: string; pid: number }> {
  const mode = requireMember(host);
  if (holderPid(labHost(host)) === undefined) throw new Error(`lab: the ${host} is not running (no namespace holder): restartHost('${host}') or labUp() first`);
  if (memberDaemon(host) === undefined) {
    if (!hasMemberData(host)) throw new Error(`lab: ${host}'s etcd has no data dir (${labEtcdDataDir(host)}) to start from: ensureLabEtcd() makes a fresh cluster`);
    startMember(host, mode, 'existing');
  }
  try {
    await waitHealthy([host], options.timeoutMs ?? DEFAULT_TIMEOUT_MS);
  } catch (error) {
    signalAll([memberDaemon(host)?.pid ?? []].flat(), 'SIGKILL');
    throw error;
  }
  return { endpoint: labEtcdEndpoint(host), pid: memberDaemon(host)!.pid };
}

/**
 * After `restartHost`: in three-member mode, the host's member (killed with the rest of the host)
 * starts again on its data dir. When another member runs and the host's link is up it is waited
 * for, up to 10 s; not answering by then is no error (the test may have the cluster partitioned or
 * frozen: it rejoins once a quorum reaches it), exiting is. True if it was started. Single mode:
 * nothing (the witness's etcd stays down until `ensureLabEtcd`/`labUp` start a fresh one or
 * `startLabEtcd` the same one).
 */
export async function resumeLabEtcdMember(host: LabHostName, options: EnsureEtcdOptions = {}): Promise<boolean> {
  if (labEtcdMode() !== 'all' || memberDaemon(host) !== undefined || !hasMemberData(host)) return false;
  startMember(host, 'all', 'existing');
  const othersRun = labEtcdMembers('all').some((h) => h !== host && memberDaemon(h) !== undefined);
  if (!othersRun || !(await labLinkUp(labHost(host)))) return true;
  try {
    await waitHealthy([host], options.timeoutMs ?? 10_000);
  } catch (error) {
    if (memberDaemon(host) === undefined) throw error;
  }
  return true;
}

/** etcd's own health endpoint says `"health":"true"` (it has a leader and serves). */
export async function etcdHealthy(endpoint = labEtcdEndpoint(), timeoutMs = 1_000): Promise<boolean> {
  try {
    const response = await fetch(`${endpoint}/health`, { signal: AbortSignal.timeout(timeoutMs) });
    if (!response.ok) return false;
    const body = (await response.json()) as { health?: string };
    return body.health === 'true';
  } catch {
    return false;
  }
}

/** The pid of `host`'s etcd member (default the witness's), if it runs (for tests that freeze or kill it). */
export function labEtcdPid(host: LabHostName = 'witness'): number | undefined {
  return memberDaemon(host)?.pid;
}

function memberDaemon(host: LabHostName) {
  return spawnedDaemons(labHost(host)).find((d) => d.argv[0] === ETCD_BINARY);
}

function requireMember(host: LabHostName): LabEtcdMembers {
  const mode = labEtcdMode();
  if (!labEtcdMembers(mode).includes(host)) throw new Error(`lab: ${host} runs no etcd member in mode '${mode}' (ensureLabEtcd({ members: 'all' }) for one on every host)`);
  return mode;
}

/** The data dir holds a member (etcd's `member/` with its WAL and snapshots). */
function hasMemberData(host: LabHostName): boolean {
  return fs.existsSync(path.join(labEtcdDataDir(host), 'member'));
}

/** SIGKILLs every etcd of the lab, on every host, and waits until they are gone. */
async function killAllEtcd(): Promise<void> {
  const pids = () => LAB_HOSTS.flatMap((host) => spawnedDaemons(labHost(host)).filter((d) => d.argv[0] === ETCD_BINARY).map((d) => d.pid));
  await waitUntil(() => signalAll(pids(), 'SIGKILL').length === 0, { timeoutMs: 10_000, intervalMs: 20, what: "the lab's etcd members to die" });
}

/** Empty data dirs on every host (a fresh cluster), and the mode remembered. */
function wipeAndSetMode(mode: LabEtcdMembers): void {
  for (const host of LAB_HOSTS) fs.rmSync(labEtcdDataDir(host), { recursive: true, force: true });
  for (const host of labEtcdMembers(mode)) fs.mkdirSync(labEtcdDataDir(host), { recursive: true, mode: 0o700 });
  if (mode === 'all') fs.writeFileSync(modeFile(), 'all\n');
  else fs.rmSync(modeFile(), { force: true });
}

function startMember(host: LabHostName, mode: LabEtcdMembers, state: 'new' | 'existing'): void {
  fs.mkdirSync(path.dirname(labEtcdLog(host)), { recursive: true });
  fs.appendFileSync(labEtcdLog(host), `--- ftvm lab: starting etcd (${mode === 'all' ? 'three members' : 'single member'}, ${state === 'new' ? 'fresh' : 'on its data dir'}) at ${new Date().toISOString()}\n`);
  spawnDaemon(labHost(host), etcdArgv(host, mode, state), labEtcdLog(host));
}

async function waitHealthy(hosts: LabHostName[], timeoutMs: number): Promise<void> {
  const who = hosts.length === 1 ? `${hosts[0]}'s etcd at ${labEtcdEndpoint(hosts[0])}/health` : `etcd members ${hosts.join(', ')} (/health)`;
  await waitUntil(
    async () => {
      const exited = hosts.filter((host) => memberDaemon(host) === undefined);
      if (exited.length > 0) throw new Error(`lab: etcd exited on ${exited.join(', ')}\n${etcdLogTails(exited)}`);
      return (await Promise.all(hosts.map((host) => etcdHealthy(labEtcdEndpoint(host))))).every(Boolean);
    },
    { timeoutMs, intervalMs: 50, what: who, diagnostics: () => etcdLogTails(hosts) },
  );
}

/**
 * A member's command line. The single member is exactly what the lab always ran. `state` only
 * matters for an empty data dir: etcd ignores the initial-cluster flags once its data dir has a
 * member (a restart).
 */
function etcdArgv(host: LabHostName, mode: LabEtcdMembers, state: 'new' | 'existing'): string[] {
  const ip = hostIp(host);
  const peer = (h: LabHostName) => `http://${hostIp(h)}:${ETCD_PEER_PORT}`;
  return [
    ETCD_BINARY,
    '--name', host,
    '--data-dir', labEtcdDataDir(host),
    // The lab address for the hosts and the root namespace; the loopback for etcdctl inside the host.
    '--listen-client-urls', `http://${ip}:${ETCD_CLIENT_PORT},http://127.0.0.1:${ETCD_CLIENT_PORT}`,
    '--advertise-client-urls', labEtcdEndpoint(host),
    '--listen-peer-urls', peer(host),
    '--initial-advertise-peer-urls', peer(host),
    '--initial-cluster', labEtcdMembers(mode).map((h) => `${h}=${peer(h)}`).join(','),
    '--initial-cluster-state', state,
    // Fast raft ticks: etcd's lease floor is 1.5 × election timeout rounded up to whole seconds, so
    // 200 ms lets a 1 s lease TTL stand (the default 1 s election timeout would raise it to 2 s).
    '--heartbeat-interval', '20',
    '--election-timeout', '200',
    '--logger', 'zap',
    '--log-outputs', 'stderr',
  ];
}

function etcdLogTails(hosts: LabHostName[], bytes = 1500): string {
  return hosts
    .map((host) => {
      const log = labEtcdLog(host);
      try {
        const text = fs.readFileSync(log, 'utf8');
        return `--- ${log}\n${text.length > bytes ? `…${text.slice(-bytes)}` : text}`;
      } catch {
        return `--- ${log}: (none)`;
      }
    })
    .join('\n');
}
