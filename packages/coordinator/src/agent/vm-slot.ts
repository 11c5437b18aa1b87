import type { Phase } from './decide.js';
import type { PrimaryVm } from './primary-vm.js';
import type { PreparedRestore } from '@ftvm/libvirt';
import type { StagedRestore } from './staged-restore.js';
import type { StandbyRamFollower } from './standby-ram-follower.js';
import type { Log } from './types.js';
import type { VmRecord } from './vm-records.js';

/** What this agent holds for one VM it is a host of. */
export interface VmSlot {
  name: string;
  record: VmRecord | undefined;
  owner: string | undefined;
  primary: PrimaryVm | undefined;
  staged: StagedRestore | undefined;
  /** Backup only: the VM's domain started paused, waiting for a checkpoint stream (warm standby). */
  standby: Promise<PreparedRestore> | undefined;
  /** The standby once its domain waits for a stream (the same promise, settled). */
  standbyReady: Promise<PreparedRestore> | undefined;
  /** Backup with a mapped standby: keeps the standby's RAM file at the newest checkpoint. */
  standbyRam: StandbyRamFollower | undefined;
  /** Primary: the running domain's XML when its devices no longer match the record's. */
  changedXml: string | undefined;
  /** The record's domain XML the standby was defined from. */
  standbyXml: string | undefined;
  /** This host stopped its copy (failure, lease trouble): it never restarts it by itself. */
  fenced: boolean;
  /** The local copy failed (set by PrimaryVm), until it is fenced. */
  failed: string | undefined;
  /** The user stopped the local copy (QEMU's SHUTDOWN), until the record says so. */
  stoppedByUser: string | undefined;
  /** Does the domain run here (libvirt), as of the last look; undefined: not known yet. */
  running: boolean | undefined;
  /** Checkpoints in the local store that did not verify: never "newer" than a staged one. */
  badEpochs: Set<number>;
  /** A take-over resumed the VM but recording it failed: retried until it holds. */
  unfinishedMove: Partial<VmRecord> | undefined;
  /** Primary: the lease is gone and the VM runs on under its backup's confirmation (failsafe.ts). */
  failsafe: { since: number; reclaiming: boolean } | undefined;
  /** Take-overs that failed before the resume, in a row. */
  takeOverFailures: { count: number; last: string } | undefined;
  phase: Phase;
  reason: string;
  /** The last decision logged (a repeated one is not logged again). */
  lastLogged: string | undefined;
  /** Serializes every change of this VM's role. */
  queue: Promise<void>;
  cycleQueued: boolean;
  recheck: NodeJS.Timeout | undefined;
  unwatchOwner: (() => Promise<void>) | undefined;
  log: Log;
}


export function newSlot(name: string, record: VmRecord | undefined, log: Log): VmSlot {
  return {
    name,
    record,
    owner: undefined,
    primary: undefined,
    staged: undefined,
    standby: undefined,
    standbyReady: undefined,
    standbyRam: undefined,
    standbyXml: undefined,
    changedXml: undefined,
    fenced: false,
    failed: undefined,
    stoppedByUser: undefined,
    running: undefined,
    badEpochs: new Set(),
    unfinishedMove: undefined,
    takeOverFailures: undefined,
    failsafe: undefined,
    phase: 'starting',
    reason: 'agent starting',
    lastLogged: undefined,
    queue: Promise.resolve(),
    cycleQueued: false,
    recheck: undefined,
    unwatchOwner: undefined,
    log,
  };
}
