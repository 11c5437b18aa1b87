/**
 * A cluster whose backup agent's realtime clock runs SKEW_MS ahead (FTVM_TEST_REALTIME_SKEW_MS,
 * test only, host-clock.ts). The lab's hosts share one kernel clock, so the skew is injected into
 * one agent; QEMU's own stamps cannot be skewed, so the skewed host is the one failed over *to*.
 * Used by test/failover/host-clock-skew.int.test.ts and the skew section of `pnpm bench:drift`.
 */
import { agentLogEntries, controlClient, startCluster, stopCluster, untilAgents, type AgentHost, type Cluster } from './ft-cluster.js';
import { runFault, type FaultRun } from './failover-runs.js';
import { patchedQemu } from './patched-qemu.js';

export const SKEW_MS = 2_000;

/** One agent's view of its peer's clock, as `ftvm status` shows it (peer − this host). */
export interface PeerClock {
  offsetMs: number;
  errorMs: number;
  ageMs: number;
  samples: number;
}

export interface SkewedCluster {
  cluster: Cluster;
  /** The backup's measure of the primary's clock (≈ −SKEW_MS). */
  fromBackup: PeerClock;
  /** The primary's measure of the backup's clock (≈ +SKEW_MS). */
  fromPrimary: PeerClock;
}

/**
 * Starts the cluster with the backup's clock SKEW_MS ahead (plus `extraEnv` in the backup agent's
 * environment) and waits until each host's status shows the other's clock from ≥ 5 rounds. If
 * that wait fails the cluster is stopped before the error is thrown.
 */
export async function skewedCluster(extraEnv: Record<string, string> = {}): Promise<SkewedCluster> {
  const cluster = await startCluster({
    emulator: patchedQemu(),
    workloadMiBps: 4,
    checkpointIntervalMs: 1000,
    agentEnv: { backup: { FTVM_TEST_REALTIME_SKEW_MS: String(SKEW_MS), ...extraEnv } },
  });
  try {
    const seen = async (host: AgentHost, peer: AgentHost) =>
      untilAgents(`${host} measures ${peer}'s clock`, async () => (await controlClient(host).status()).peers.find((p) => p.name === peer && (p.clockOffset?.samples ?? 0) >= 5)?.clockOffset, 30_000);
    const fromBackup = await seen('backup', 'primary');
    const fromPrimary = await seen('primary', 'backup');
    return { cluster, fromBackup, fromPrimary };
  } catch (error) {
    await stopCluster(cluster).catch(() => undefined);
    throw error;
  }
}

/** What the take-over logged about the two hosts' clocks (the drift ledger's entry, in ms). */
export function takeOverClock(): Record<string, unknown> | undefined {
  const resumed = agentLogEntries('backup', 'VM resumed from its last committed checkpoint').at(-1);
  return resumed?.['hostOffset'] as Record<string, unknown> | undefined;
}

export interface SkewFailover {
  /** The measure was applied (false: FTVM_TEST_IGNORE_HOST_OFFSET=1 on the backup). */
  measure: boolean;
  fromBackup: PeerClock;
  fromPrimary: PeerClock;
  run: FaultRun;
  hostOffset: Record<string, unknown> | undefined;
}

/** A skewed cluster, one kill of its primary (runFault), the take-over's clock entry; then stopped. */
export async function skewFailover(measure: boolean, log: (line: string) => void = () => undefined): Promise<SkewFailover> {
  const { cluster, fromBackup, fromPrimary } = await skewedCluster(measure ? {} : { FTVM_TEST_IGNORE_HOST_OFFSET: '1' });
  try {
    const run = await runFault(cluster, 'kill', log);
    return { measure, fromBackup, fromPrimary, run, hostOffset: takeOverClock() };
  } finally {
    await stopCluster(cluster).catch(() => undefined);
  }
}
