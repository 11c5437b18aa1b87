import type { Logger } from 'pino';
import type { VmRole } from './control.js';

/** The agent's structured log (pino). */
export type Log = Pick<Logger, 'info' | 'warn' | 'error' | 'debug' | 'child'>;

/** What the agent reports to Prometheus (src/metrics' AgentMetrics implements it). */
export interface MetricsSink {
  checkpointCommitted(vm: string, checkpoint: { bytes: number; pauseMs: number; at: number }): void;
  checkpointFailed(vm: string): void;
  clockResidual(vm: string, ms: number): void;
  failover(vm: string, kind: 'failover' | 'switchover', seconds: number): void;
  role(vm: string, role: VmRole): void;
  leaseHealthy(healthy: boolean): void;
  peerAlive(peer: string, alive: boolean): void;
  /** A checkpoint applied to a mapped standby's RAM file: how long it took, and how long after its commit it was done. */
  standbyRamApplied(vm: string, applied: { epoch: number; applyMs: number; lagMs: number }): void;
}
