import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { VmRole } from '../agent/control.js';

const ROLES: readonly VmRole[] = ['primary', 'backup', 'none'];
const OUTCOMES = ['ok', 'failed'] as const;
const FAILOVER_KINDS = ['failover', 'switchover'] as const;
export type FailoverKind = (typeof FAILOVER_KINDS)[number];

/** Guest-visible checkpoint pauses: 1 ms (patched QEMU, small guest) to 500 ms (stock QEMU, busy guest). */
const PAUSE_BUCKETS = [0.001, 0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1];
/** Applying a checkpoint to a standby's RAM file: up to a whole guest RAM when the file is rebuilt. */
const APPLY_BUCKETS = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5, 10];
/** Failure detected → VM running on the new primary. */
const FAILOVER_BUCKETS = [0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60];

export interface CommittedCheckpoint {
  /** Bytes of the checkpoint stream. */
  bytes: number;
  /** Guest-visible pause (STOP → RESUME). */
  pauseMs: number;
  /** When the backup acknowledged it (ms since the epoch, Date.now()'s clock); default now. */
  at?: number;
}

export interface AgentMetricsOptions {
  /** Wall clock (ms since the epoch) for checkpoint ages; tests inject one. */
  now?: () => number;
  /** Node.js process metrics (`process_*`, `nodejs_*`); default on. */
  defaultMetrics?: boolean;
}

/**
 * The agent's Prometheus metrics, on a registry of its own (never prom-client's global one).
 * Every method is cheap and never throws, so callers can record from any code path.
 */
export class AgentMetrics {
  readonly registry = new Registry();
  private readonly now: () => number;
  private readonly lastCheckpointAt = new Map<string, number>();

  private readonly pause: Histogram<'vm'>;
  private readonly bytes: Gauge<'vm'>;
  private readonly age: Gauge<'vm'>;
  private readonly checkpoints: Counter<'vm' | 'outcome'>;
  private readonly residual: Gauge<'vm'>;
  private readonly failovers: Counter<'vm' | 'kind'>;
  private readonly failoverDuration: Histogram<'vm'>;
  private readonly roleGauge: Gauge<'vm' | 'role'>;
  private readonly lease: Gauge;
  private readonly peer: Gauge<'peer'>;
  private readonly ramApply: Histogram<'vm'>;
  private readonly ramLag: Histogram<'vm'>;
  private readonly ramEpoch: Gauge<'vm'>;

  constructor(options: AgentMetricsOptions = {}) {
    this.now = options.now ?? Date.now;
    if (options.defaultMetrics !== false) collectDefaultMetrics({ register: this.registry });
    const registers = [this.registry];
    this.pause = new Histogram({ name: 'ftvm_checkpoint_pause_seconds', help: 'Guest-visible pause of each committed checkpoint (QEMU STOP to RESUME).', labelNames: ['vm'], buckets: PAUSE_BUCKETS, registers });
    this.bytes = new Gauge({ name: 'ftvm_checkpoint_bytes', help: 'Size of the newest committed checkpoint stream.', labelNames: ['vm'], registers });
    const ages = this.lastCheckpointAt;
    const now = this.now;
    this.age = new Gauge({
      name: 'ftvm_checkpoint_age_seconds',
      help: 'Time since the newest committed checkpoint (what a failover now would lose).',
      labelNames: ['vm'],
      registers,
      collect(this: Gauge<'vm'>) {
        const t = now();
        for (const [vm, at] of ages) this.set({ vm }, Math.max(0, (t - at) / 1000));
      },
    });
    this.checkpoints = new Counter({ name: 'ftvm_checkpoints_total', help: 'Checkpoints attempted, by outcome.', labelNames: ['vm', 'outcome'], registers });
    this.residual = new Gauge({ name: 'ftvm_clock_residual_seconds', help: 'Guest clock error the drift ledger predicts (negative: behind real time).', labelNames: ['vm'], registers });
    this.failovers = new Counter({ name: 'ftvm_failovers_total', help: 'VM moves to another host: failover (unplanned) or switchover (planned).', labelNames: ['vm', 'kind'], registers });
    this.failoverDuration = new Histogram({ name: 'ftvm_failover_duration_seconds', help: 'Failover: failure detected to VM running on the new primary.', labelNames: ['vm'], buckets: FAILOVER_BUCKETS, registers });
    this.roleGauge = new Gauge({ name: 'ftvm_role', help: "This host's role for the VM (1 for the current role, 0 for the others).", labelNames: ['vm', 'role'], registers });
    this.lease = new Gauge({ name: 'ftvm_lease_healthy', help: "1 while this agent's etcd lease keepalives are current.", registers });
    this.ramApply = new Histogram({ name: 'ftvm_standby_ram_apply_seconds', help: "Backup: reading, verifying and writing one checkpoint into a mapped standby's RAM file.", labelNames: ['vm'], buckets: APPLY_BUCKETS, registers });
    this.ramLag = new Histogram({ name: 'ftvm_standby_ram_lag_seconds', help: "Backup: a checkpoint's commit to its pages in the mapped standby's RAM file.", labelNames: ['vm'], buckets: APPLY_BUCKETS, registers });
    this.ramEpoch = new Gauge({ name: 'ftvm_standby_ram_epoch', help: "Backup: the checkpoint the mapped standby's RAM file holds.", labelNames: ['vm'], registers });
    this.peer = new Gauge({ name: 'ftvm_peer_alive', help: '1 while the peer agent is heard on a heartbeat path.', labelNames: ['peer'], registers });
  }

  checkpointCommitted(vm: string, checkpoint: CommittedCheckpoint): void {
    this.pause.observe({ vm }, checkpoint.pauseMs / 1000);
    this.bytes.set({ vm }, checkpoint.bytes);
    this.lastCheckpointAt.set(vm, checkpoint.at ?? this.now());
    this.checkpoints.inc({ vm, outcome: 'ok' });
  }

  checkpointFailed(vm: string): void {
    this.checkpoints.inc({ vm, outcome: 'failed' });
  }

  clockResidual(vm: string, ms: number): void {
    this.residual.set({ vm }, ms / 1000);
  }

  failover(vm: string, kind: FailoverKind, seconds: number): void {
    this.failovers.inc({ vm, kind });
    this.failoverDuration.observe({ vm }, seconds);
  }

  role(vm: string, role: VmRole): void {
    for (const r of ROLES) this.roleGauge.set({ vm, role: r }, r === role ? 1 : 0);
  }

  leaseHealthy(healthy: boolean): void {
    this.lease.set(healthy ? 1 : 0);
  }

  peerAlive(peer: string, alive: boolean): void {
    this.peer.set({ peer }, alive ? 1 : 0);
  }

  standbyRamApplied(vm: string, applied: { epoch: number; applyMs: number; lagMs: number }): void {
    this.ramApply.observe({ vm }, applied.applyMs / 1000);
    this.ramLag.observe({ vm }, applied.lagMs / 1000);
    this.ramEpoch.set({ vm }, applied.epoch);
  }

  /** Drops every series of a VM (it is no longer protected by this host). */
  forgetVm(vm: string): void {
    this.lastCheckpointAt.delete(vm);
    for (const metric of [this.pause, this.bytes, this.age, this.residual, this.failoverDuration, this.ramApply, this.ramLag, this.ramEpoch]) metric.remove({ vm });
    for (const outcome of OUTCOMES) this.checkpoints.remove({ vm, outcome });
    for (const kind of FAILOVER_KINDS) this.failovers.remove({ vm, kind });
    for (const role of ROLES) this.roleGauge.remove({ vm, role });
  }

  /** The exposition text (Prometheus text format). */
  scrape(): Promise<string> {
    return this.registry.metrics();
  }

  get contentType(): string {
    return this.registry.contentType;
  }
}
