/**
 * The witness's etcd: a single-member etcd (Debian's etcd-server) inside `witness`, listening on
 * the witness's lab address. The agents' leases and VM records live there. `labUp` starts it;
 * `ensureWitnessEtcd` is idempotent and can be called again after a test killed or restarted the
 * witness.
 */
import fs from 'node:fs';
import path from 'node:path';
import { spawnDaemon, spawnedDaemons, holderPid } from './host.js';
import { signalAll } from './procs.js';
import { hostIp, labHost } from './topology.js';
import { waitUntil } from './wait.js';

export const ETCD_CLIENT_PORT = 2379;
export const ETCD_PEER_PORT = 2380;
const ETCD_BINARY = '/usr/bin/etcd';

/** Where the lab's etcd answers: `http://10.213.0.13:2379` (the witness's address; instance-aware). */
export const labEtcdEndpoint = () => `http://${hostIp('witness')}:${ETCD_CLIENT_PORT}`;

/** etcd's data dir and log, root-namespace paths (inside the witness: the same dir, and /var/log/etcd.log). */
export const labEtcdDataDir = () => path.join(labHost('witness').stateDir, 'etcd');
export const labEtcdLog = () => path.join(labHost('witness').logDir, 'etcd.log');

export interface EnsureEtcdOptions {
  /** For etcd to answer its health endpoint after it was started. Default 20 s. */
  timeoutMs?: number;
}

/**
 * Makes sure the witness runs an etcd that answers. One that answers is left alone; one of ours
 * that runs but does not answer yet (starting) is waited for; otherwise a fresh one is started on
 * an empty data dir (no stale leases or keys from an earlier run). Throws with etcd's log tail
 * when it does not become healthy in time.
 */
export async function ensureWitnessEtcd(options: EnsureEtcdOptions = {}): Promise<{ endpoint: string }> {
  const endpoint = labEtcdEndpoint();
  const witness = labHost('witness');
  if (holderPid(witness) === undefined) throw new Error('lab: the witness is not running (no namespace holder): labUp() first');
  if (await etcdHealthy(endpoint)) return { endpoint };

  const timeoutMs = options.timeoutMs ?? 20_000;
  const running = etcdDaemons();
  if (running.length === 0) {
    fs.rmSync(labEtcdDataDir(), { recursive: true, force: true });
    fs.mkdirSync(labEtcdDataDir(), { recursive: true, mode: 0o700 });
    fs.appendFileSync(labEtcdLog(), `--- ftvm lab: starting etcd at ${new Date().toISOString()}\n`);
    spawnDaemon(witness, etcdArgv(), labEtcdLog());
  }
  try {
    await waitUntil(
      async () => {
        if (etcdDaemons().length === 0) throw new Error(`lab: the witness's etcd exited\n${etcdLogTail()}`);
        return etcdHealthy(endpoint);
      },
      { timeoutMs, intervalMs: 50, what: `the witness's etcd at ${endpoint}/health`, diagnostics: etcdLogTail },
    );
  } catch (error) {
    // Leave nothing half-started behind: the next call starts afresh.
    signalAll(etcdDaemons().map((d) => d.pid), 'SIGKILL');
    throw error;
  }
  return { endpoint };
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

/** The pid of the witness's etcd, if it runs (for tests that freeze or kill it). */
export function labEtcdPid(): number | undefined {
  return etcdDaemons()[0]?.pid;
}

function etcdDaemons() {
  return spawnedDaemons(labHost('witness')).filter((d) => d.argv[0] === ETCD_BINARY);
}

function etcdArgv(): string[] {
  const ip = hostIp('witness');
  const peer = `http://${ip}:${ETCD_PEER_PORT}`;
  return [
    ETCD_BINARY,
    '--name', 'witness',
    '--data-dir', labEtcdDataDir(),
    // The lab address for the hosts and the root namespace; the loopback for etcdctl inside the witness.
    '--listen-client-urls', `http://${ip}:${ETCD_CLIENT_PORT},http://127.0.0.1:${ETCD_CLIENT_PORT}`,
    '--advertise-client-urls', `http://${ip}:${ETCD_CLIENT_PORT}`,
    '--listen-peer-urls', peer,
    '--initial-advertise-peer-urls', peer,
    '--initial-cluster', `witness=${peer}`,
    '--initial-cluster-state', 'new',
    // Fast raft ticks: etcd's lease floor is 1.5 × election timeout rounded up to whole seconds, so
    // 200 ms lets a 1 s lease TTL stand (the default 1 s election timeout would raise it to 2 s).
    '--heartbeat-interval', '20',
    '--election-timeout', '200',
    '--logger', 'zap',
    '--log-outputs', 'stderr',
  ];
}

function etcdLogTail(bytes = 1500): string {
  try {
    const text = fs.readFileSync(labEtcdLog(), 'utf8');
    return `--- ${labEtcdLog()}\n${text.length > bytes ? `…${text.slice(-bytes)}` : text}`;
  } catch {
    return `--- ${labEtcdLog()}: (none)`;
  }
}
