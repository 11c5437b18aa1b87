/**
 * What the agent offers its control API (and so the `ftvm` CLI). The agent implements it; the API
 * server (src/api) serves it over HTTP on a unix socket; the CLI is its client.
 */

import type { Phase } from './decide.js';

export type { Phase };
export type VmRole = 'primary' | 'backup' | 'none';

export interface CheckpointSummary {
  epoch: number;
  /** Age of the newest committed checkpoint (ms), as this agent knows it. */
  ageMs: number;
  bytes: number;
  /** Guest-visible pause of that checkpoint (QEMU STOP → RESUME). */
  pauseMs: number;
}

export interface VmStatus {
  name: string;
  /** This host's role for the VM. */
  role: VmRole;
  /** libvirt state of the domain on this host ('absent' when it is not defined here). */
  domainState: string;
  primaryHost: string | undefined;
  backupHost: string | undefined;
  /** Host whose lease holds the VM's owner key in etcd (the one allowed to run it). */
  leaseHolder: string | undefined;
  /** What this host makes of the VM now (see Phase in decide.ts). */
  phase: Phase;
  /** Why: the agent's last decision for this VM, in words. */
  reason: string;
  /** The user stopped the VM: it stays down on both hosts until started again on its primary. */
  stopped?: { by: string; reason: string; at: string };
  lastCheckpoint: CheckpointSummary | undefined;
  /** The VM's output is held until committed (its protection's policy). */
  outputCommit: boolean;
  /** The checkpoint interval of its protection (ms). */
  checkpointIntervalMs: number | undefined;
  /** Guest clock residual the drift ledger predicts (ms; 0 = right; negative = behind). */
  clockResidualMs: number | undefined;
  /**
   * Backup only: its standby. `domain`: being started or started; `ready`: started, waiting for
   * a stream (a failover before then waits for it). `ram`: what a failover
   * loads — `warm` (the RAM file holds the newest checkpoint `ramEpoch`: device state only),
   * `behind` (an older one: the rest is applied first), `cold` (none yet: the whole checkpoint),
   * `loaded` (the standby's RAM is not mapped from a file: the whole checkpoint).
   */
  standby?: { domain: boolean; ready: boolean; ram: 'warm' | 'behind' | 'cold' | 'loaded'; ramEpoch?: number };
}

export interface PeerStatus {
  name: string;
  alive: boolean;
  /** ms since the last heartbeat on each path (undefined: never heard on it). */
  lastBeatAgeMs: { udp: number | undefined; ssh: number | undefined };
  /**
   * The peer's realtime minus this host's, measured over the heartbeats (ms; the true offset is
   * within ±errorMs), from the best round of the last minute, `ageMs` old. Absent: no round yet
   * (or a peer that does not echo beats). A failover onto this host converts the old primary's
   * stop instant with it.
   */
  clockOffset?: { offsetMs: number; errorMs: number; ageMs: number; samples: number };
}

export interface AgentStatus {
  host: string;
  /** etcd lease of this agent and whether its keepalives are current. */
  lease: { id: string | undefined; healthy: boolean; lastRenewAgeMs: number | undefined };
  peers: PeerStatus[];
  vms: VmStatus[];
}

export interface DriftReport {
  vm: string;
  /** The drift ledger's summary (kvmclock's DriftLedger.summaryJson(): ns as decimal strings). */
  ledger: unknown;
  predictedLagMs: number;
}

/** Progress of a long operation, one step at a time (the CLI renders these with listr2). */
export type ProgressEvent =
  | { step: string; state: 'start' }
  | { step: string; state: 'done'; detail?: string }
  | { step: string; state: 'fail'; detail: string };
export type Progress = (event: ProgressEvent) => void;

export interface ProtectRequest {
  vm: string;
  /** The host that becomes its backup. */
  backup: string;
  checkpointIntervalMs?: number;
  /**
   * Hold the guest's network output until the checkpoint that produced it is committed on the
   * backup (adds up to one interval of latency; needs ftvm's QEMU). Default: as the VM had it
   * (off for a new VM).
   */
  outputCommit?: boolean;
  /**
   * A full checkpoint at least every this many. Default: as the VM had it, else none after the
   * first (the backup's store compacts the chain of increments itself).
   */
  fullEvery?: number;
}

export interface SwitchoverResult {
  vm: string;
  from: string;
  to: string;
  /** Guest-visible downtime: STOP on the old primary → RESUME on the new one. */
  downtimeMs: number;
  epoch: number;
}

export interface CheckpointNowResult {
  vm: string;
  epoch: number;
  bytes: number;
  pauseMs: number;
  /** An incremental checkpoint: the epoch it builds on. Absent for a full one. */
  base?: number;
}

/** A control request failed; `status` is the HTTP status the API answers with. */
export class ControlError extends Error {
  override name = 'ControlError';
  constructor(
    message: string,
    readonly status: 400 | 404 | 409 | 500 | 503 = 400,
  ) {
    super(message);
  }
}

export interface AgentControl {
  status(): Promise<AgentStatus>;
  protect(request: ProtectRequest, progress: Progress): Promise<VmStatus>;
  unprotect(vm: string, progress: Progress): Promise<VmStatus>;
  /** Planned move of the VM to its backup with no loss (the last checkpoint is taken stopped). */
  switchover(vm: string, progress: Progress): Promise<SwitchoverResult>;
  /** After a failover: make the old primary (or `backup`) the VM's new backup. */
  reprotect(vm: string, backup: string | undefined, progress: Progress): Promise<VmStatus>;
  checkpointNow(vm: string): Promise<CheckpointNowResult>;
  drift(vm: string): Promise<DriftReport>;
}
