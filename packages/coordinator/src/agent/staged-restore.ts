import { createHash } from 'node:crypto';
import { once } from 'node:events';
import { createReadStream } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { advanceClockSections, firstStepNs, followUpAfterRestore, machineClocks, realtimeClock, resumeOnTime, splitAssembledCheckpoint, type ClockFollowUp, type HostClockOffset, type MachineClocks, type OnTimeResume } from '@ftvm/kvmclock';
import { PreparedRestore, replicatedDisks, standbyDomainXml, withSharedRamFile, type LibvirtConnection, type RestoreResult } from '@ftvm/libvirt';
import { CheckpointStore, IGNORE_SHARED_CAPABILITY, type AssembledCheckpoint, type CheckpointMetadata, type StandbyRam } from '@ftvm/transport';
import { peerInstantOnOurClock, type ClockOffsetEstimate } from '../heartbeat/index.js';
import { testIgnoreHostOffset, toHostRealtime, toKernelRealtime } from '../host-clock.js';
import type { Log } from './types.js';
import type { VmRecord } from './vm-records.js';

export interface StagedRestoreOptions {
  record: VmRecord;
  conn: LibvirtConnection;
  storeDir: string;
  log: Log;
  /** A warm standby (domain already started paused, waiting for the stream); prepared here otherwise. */
  standby?: Promise<PreparedRestore> | undefined;
  /** The VM's clock policy compensates this move (default): the clock sections are moved forward over the outage. */
  correctClock?: boolean;
  /** A committed checkpoint that does not verify (skipped; the caller never takes it for newer). */
  onCorrupt?: (epoch: number) => void;
  /**
   * The host that stopped the checkpoint (the old primary) and how its clock stands to this
   * host's, as the heartbeats measure it: asked at the clock rewrite, the latest moment.
   */
  peerClock?: () => { peer: string; estimate: ClockOffsetEstimate | undefined };
}

/** The VM's checkpoint store on this host. */
export function vmStoreDir(storeDir: string, record: VmRecord): string {
  return path.posix.join(storeDir, record.name);
}

/**
 * The domain XML a backup runs the VM with: its replicated disks on this host's replicas, and with
 * `mappedRam` its RAM on a shared file (see StandbyRam) when the domain allows it.
 */
export function standbyXml(record: VmRecord, storeDir: string, mappedRam = false): string {
  const xml = standbyDomainXml(record.xml, (target) => CheckpointStore.replicaImage(vmStoreDir(storeDir, record), target));
  return mappedRam ? withSharedRamFile(xml).xml : xml;
}

/** The VM has disks this backup keeps replicas of. */
export function hasReplicatedDisks(record: VmRecord): boolean {
  return replicatedDisks(record.xml).length > 0;
}

/** Defines and starts the VM's domain paused, waiting for a stream (see PreparedRestore). */
export function prepareStandby(record: VmRecord, conn: LibvirtConnection, log: Log, storeDir: string, mappedRam = false): Promise<PreparedRestore> {
  return PreparedRestore.prepare({ connection: conn, xml: standbyXml(record, storeDir, mappedRam), replace: true, timeoutMs: 120_000, log: (line) => log.debug(line) });
}

export interface CompletedRestore {
  epoch: number;
  restore: RestoreResult;
  resume: OnTimeResume;
  /** The outage the clock had to be moved over (0 when the policy leaves it uncorrected). */
  deltaNs: bigint;
  /** The part of it the clock sections carried: at most the machine's safe step (see clockSteps). */
  firstStepNs: bigint;
  /** The checkpoint's STOP stamp on the old primary (its host realtime, ns). */
  stopNs: bigint;
  /**
   * The same instant on this host's clock, in the frame of its QEMU's stamps (the resume's): the
   * old primary's stamp minus the measured offset between the hosts, when one was applied.
   */
  stopHereNs: bigint;
  /** How the old primary's clock stood to this host's, and whether the rewrite used it (see peerClock). */
  hostOffset?: HostClockOffset;
  /** What was given back in place after the resume (followUpAfterRestore). */
  clockSteps?: ClockFollowUp;
  /** Only device state was loaded: the standby's RAM file held the checkpoint (see StandbyRam). */
  mapped: boolean;
  /**
   * How long before the resume target QEMU had loaded the stream (negative: after it, a late
   * resume); what of the margin was spare.
   */
  loadSlackNs?: bigint;
}

/**
 * The part of the outage beyond the machine's safe step (a guest on acpi_pm would lose it whole
 * if the rewrite carried it) and a late resume's lateness (measured up to 36 ms on the busy 2-core
 * lab) are given back in place after the resume (followUpAfterRestore); said here.
 */
function logFollowUp(followUp: ClockFollowUp | undefined, clocks: MachineClocks, log: Log): void {
  if (!followUp) return;
  const ms = (ns: bigint) => Number(ns) / 1e6;
  const fields = { restMs: ms(followUp.restNs), lateMs: ms(followUp.lateNs), steps: followUp.steps.length, limitedBy: clocks.limitedBy };
  if (followUp.uncorrectedNs > 0n) log.warn({ ...fields, uncorrectedMs: ms(followUp.uncorrectedNs), detail: followUp.detail }, 'the restored VM runs behind: not all of the outage could be given back in place');
  else log.info(fields, 'rest of the outage given back in place');
}

/**
 * Test harnesses only (FTVM_TEST_DISK_AUDIT=<dir>): the replicas as the VM will resume on them —
 * hashed, to compare with the primary's fleece at the same stop instant, and copied into <dir> for
 * the harness's own checks (its file system, its counter ring).
 */
async function auditReplicas(images: Map<string, string>, epoch: number, vm: string, log: Log): Promise<void> {
  const dir = process.env['FTVM_TEST_DISK_AUDIT'];
  if (!dir) return;
  await fs.mkdir(dir, { recursive: true });
  for (const [disk, image] of images) {
    const hash = createHash('sha256');
    for await (const chunk of createReadStream(image, { highWaterMark: 4 * 1024 * 1024 })) hash.update(chunk as Buffer);
    const copy = path.posix.join(dir, `${vm}-${epoch}-${disk}.img`);
    await fs.copyFile(image, copy);
    log.info({ role: 'replica', epoch, disk, sha256: hash.digest('hex'), copy }, 'disk audit');
  }
}

function setIgnoreShared(prepared: PreparedRestore, on: boolean): Promise<unknown> {
  return prepared.monitor.execute('migrate-set-capabilities', { capabilities: [{ capability: IGNORE_SHARED_CAPABILITY, state: on }] }, { timeoutMs: 5_000 });
}

export class NoCheckpointError extends Error {
  override name = 'NoCheckpointError';
}

/**
 * A failover restore in two steps. `begin` defines the domain paused, waiting for a migration
 * stream, and sends it the newest committed checkpoint's RAM while the cluster still waits for
 * the old primary's lease to expire; `complete` (once this host holds the lease) rewrites the
 * clock sections for a resume `marginMs` ahead, sends the device state and resumes the VM at that
 * instant. Until `complete`, nothing runs: the domain is paused in `inmigrate`; `abort` removes it.
 */
export class StagedRestore {
  readonly ready: Promise<void>;
  /** Only device state is loaded: the standby's RAM file holds the checkpoint (beginMapped). */
  readonly mapped: boolean;
  private restoring: Promise<RestoreResult> | undefined;
  private readonly startLoad: () => Promise<RestoreResult>;
  private go!: (marginNs: bigint) => void;
  private cancel!: (error: Error) => void;
  private targetNs: bigint | undefined;
  private loadedNs: bigint | undefined;
  private deltaNs: bigint | undefined;
  private stopHereNs: bigint | undefined;
  private hostOffset: HostClockOffset | undefined;
  private resume: OnTimeResume | undefined;
  private clockSteps: ClockFollowUp | undefined;
  private firstStepNs: bigint | undefined;
  private clocks: MachineClocks | undefined;

  private constructor(
    readonly metadata: CheckpointMetadata,
    checkpoint: AssembledCheckpoint,
    private readonly options: StagedRestoreOptions,
    /** The replicas brought to this checkpoint's disk state (applied and fsync'd), when it has disks. */
    disksReady: Promise<unknown>,
    /** A mapped standby: nothing is sent before `complete`, and `abort` before it gives the standby back. */
    private readonly mappedStandby?: { standby: Promise<PreparedRestore>; giveBack: () => void; clocks: MachineClocks },
  ) {
    this.mapped = mappedStandby !== undefined;
    this.clocks = mappedStandby?.clocks;
    const clock = realtimeClock();
    const stopNs = BigInt(metadata.stopNs);
    const split = splitAssembledCheckpoint(checkpoint);
    const released = new Promise<bigint>((resolve, reject) => {
      this.go = resolve;
      this.cancel = reject;
    });
    released.catch(() => undefined);
    let headSent!: () => void;
    let headFailed!: (error: Error) => void;
    this.ready = new Promise<void>((resolve, reject) => {
      headSent = resolve;
      headFailed = reject;
    });
    this.ready.catch(() => undefined);

    const standby = mappedStandby
      ? mappedStandby.standby.then((prepared) => {
          if (!prepared.usable) throw new Error('the mapped standby no longer waits for a stream');
          return prepared;
        })
      : (options.standby ?? prepareStandby(options.record, options.conn, options.log, options.storeDir)).then(async (prepared) => {
          if (prepared.usable) return prepared;
          await prepared.discard();
          return prepareStandby(options.record, options.conn, options.log, options.storeDir);
        });
    standby.catch(() => undefined); // a mapped one is awaited only by `complete`
    this.startLoad = () => standby.then((prepared) => prepared.load({
      checkpoint: '/dev/null', // the writer sends the stream from memory
      timeoutMs: 600_000,
      writeStream: async (socket, _checkpoint, qmp) => {
        // QEMU may refuse the stream and exit at any point: the socket then errors and closes
        // (restore's own listener keeps the error from crashing us), and every wait here must end
        // with it rather than at its deadline
        const gone = new Promise<never>((_, reject) => {
          const fail = () => reject(new Error('QEMU closed the incoming socket'));
          if (socket.destroyed) fail();
          else socket.once('close', fail);
        });
        gone.catch(() => undefined);
        // a failure here fails the load, and `ready` fails with the load's error (restoring, below):
        // it carries QEMU's reason for refusing the stream, which this socket's error does not
        const signal = AbortSignal.timeout(120_000);
        // what the machine lets the guest keep time with decides the largest step it can take (a
        // mapped standby was asked at staging, and has x-ignore-shared on since)
        this.clocks ??= await machineClocks(qmp);
        for (const part of split.head) if (!socket.write(part)) await Promise.race([once(socket, 'drain', { signal }), gone]);
        // the disks must hold the checkpoint's state before the device state loads and QEMU
        // activates them
        await Promise.race([disksReady, gone]);
        headSent();
        const marginNs = await Promise.race([released, gone]);
        this.targetNs = clock() + marginNs;
        // The stop was stamped by the old primary's clock, the resume target by this host's: bring
        // the stop onto this host's clock with the heartbeats' measure of the two (a 2 ms skew
        // would otherwise be a 2 ms error in the guest). `clock` and QEMU's stamps read the
        // kernel's CLOCK_REALTIME; toHostRealtime adds a test's injected skew (host-clock.ts).
        const peer = options.peerClock?.();
        const stopHere = peer ? peerInstantOnOurClock(stopNs, peer.peer, peer.estimate, testIgnoreHostOffset()) : { ns: stopNs, record: undefined };
        this.hostOffset = stopHere.record;
        this.stopHereNs = toKernelRealtime(stopHere.ns);
        if (options.correctClock === false) {
          this.deltaNs = 0n; // the policy leaves this outage uncorrected: the guest resumes behind
        } else {
          this.deltaNs = toHostRealtime(this.targetNs) - stopHere.ns;
          if (this.deltaNs <= 0n) {
            throw new Error(`checkpoint ${metadata.epoch} stopped at ${stopNs} (${peer?.peer ?? 'its host'}'s clock), after the resume target ${toHostRealtime(this.targetNs)}: host clocks disagree by more than the outage${stopHere.record?.applied ? ` even with the measured offset ${stopHere.record.offsetNs} ns` : ''}`);
          }
          const stepNs = this.clocks.stepNs;
          this.firstStepNs = firstStepNs(this.deltaNs, stepNs);
          advanceClockSections(split.deviceState, this.firstStepNs);
        }
        socket.end(split.encodeTail());
      },
      resume: async (qmp) => {
        this.loadedNs = clock();
        const status = await qmp.execute<{ running: boolean }>('query-status');
        if (status.running) throw new Error('the restored VM was running before its scheduled resume');
        this.resume = await resumeOnTime(qmp, this.targetNs!, { clock });
        if (options.correctClock !== false) {
          const restNs = (this.deltaNs ?? 0n) - (this.firstStepNs ?? this.deltaNs ?? 0n);
          this.clockSteps = await followUpAfterRestore(qmp, { restNs, lateNs: this.resume.lateNs, stepNs: this.clocks!.stepNs });
          logFollowUp(this.clockSteps, this.clocks!, options.log);
        }
        return this.resume.resumeNs;
      },
    }));
    if (this.mapped) {
      // nothing goes to the standby before `complete`: ready once the disks are
      disksReady.then(headSent, headFailed);
    } else {
      this.restoring = this.startLoad();
      this.restoring.catch((error: Error) => headFailed(error));
    }
  }

  /** Picks the newest committed checkpoint that verifies and starts loading it. */
  static async begin(options: StagedRestoreOptions): Promise<StagedRestore> {
    const store = await new CheckpointStore(vmStoreDir(options.storeDir, options.record), options.record.keep).open();
    const latest = await store.latestVerified((error) => {
      options.log.warn({ err: error.message }, 'skipping a checkpoint that does not verify');
      if (error.epoch !== undefined) options.onCorrupt?.(error.epoch);
    });
    if (!latest) throw new NoCheckpointError(`no committed checkpoint of '${options.record.name}' in ${store.dir}`);
    const since = options.record.checkpointsSince ?? 0;
    if (latest.metadata.epoch <= since) {
      // the newer ones failed to verify: what is left is the VM's past, never resumed
      throw new NoCheckpointError(`no checkpoint of '${options.record.name}' in ${store.dir} from its current protection (since ${since}): the newest that verifies is ${latest.metadata.epoch}`);
    }
    const data = store.assemble(latest);
    const bytes = data.ram.reduce((n, part) => n + part.length, data.deviceState.length);
    options.log.info({ epoch: latest.metadata.epoch, chain: latest.chain.length, bytes, disks: latest.metadata.disks?.length ?? 0 }, 'staging restore');
    if (hasReplicatedDisks(options.record) && !latest.metadata.disks) {
      throw new NoCheckpointError(`checkpoint ${latest.metadata.epoch} of '${options.record.name}' carries no disk state, but the VM has replicated disks`);
    }
    // applied while the RAM streams into the standby
    const disksReady = latest.metadata.disks ? store.prepareDisks(latest).then((images) => auditReplicas(images, latest.metadata.epoch, options.record.name, options.log)) : Promise.resolve();
    disksReady.catch(() => undefined);
    return new StagedRestore(latest.metadata, data, options, disksReady);
  }

  /**
   * A restore onto a mapped standby whose RAM file holds `ram`'s checkpoint (StandbyRam, stopped):
   * only device state will be loaded. Its disk state is verified and prepared now; nothing is sent
   * before `complete`, so `abort` before it hands the standby back through `giveBack`. Throws
   * (nothing changed) when the checkpoint's disk state is not loadable.
   */
  static async beginMapped(options: StagedRestoreOptions & { standby: Promise<PreparedRestore>; ram: StandbyRam; giveBack: () => void }): Promise<StagedRestore> {
    const metadata = options.ram.metadata;
    if (!metadata) throw new NoCheckpointError(`the standby RAM file of '${options.record.name}' holds no checkpoint`);
    const checkpoint = options.ram.deviceOnly();
    const store = new CheckpointStore(vmStoreDir(options.storeDir, options.record), options.record.keep);
    if (hasReplicatedDisks(options.record) && !metadata.disks) {
      throw new NoCheckpointError(`checkpoint ${metadata.epoch} of '${options.record.name}' carries no disk state, but the VM has replicated disks`);
    }
    await store.verifiedDiskEpochs(metadata);
    // asked now rather than after the owner key is ours: the take-over waits for nothing but the load
    const prepared = await options.standby;
    const clocks = await machineClocks(prepared.monitor);
    // the RAM file is the checkpoint's RAM: QEMU must not expect it in the stream (the stream's
    // configuration says so too: QEMU refuses one that disagrees with its own capability)
    await setIgnoreShared(prepared, true);
    options.log.info({ epoch: metadata.epoch, bytes: checkpoint.ram.reduce((n, part) => n + part.length, checkpoint.deviceState.length), disks: metadata.disks?.length ?? 0 }, 'staging restore onto the mapped standby: device state only');
    const disksReady = metadata.disks ? store.prepareDisks({ metadata }).then((images) => auditReplicas(images, metadata.epoch, options.record.name, options.log)) : Promise.resolve();
    disksReady.catch(() => undefined);
    const giveBack = () =>
      // a standby given back loads whole checkpoints again until its next mapped staging
      void setIgnoreShared(prepared, false).then(options.giveBack, async (error: Error) => {
        options.log.warn({ err: error.message }, 'cannot reset the standby after a staging given up: it is rebuilt');
        await prepared.discard();
      });
    return new StagedRestore(metadata, checkpoint, options, disksReady, { standby: options.standby, giveBack, clocks });
  }

  get epoch(): number {
    return this.metadata.epoch;
  }

  /** Sends the rest and resumes the VM `marginMs` after the clock rewrite. */
  async complete(marginMs: number): Promise<CompletedRestore> {
    this.go(BigInt(Math.round(marginMs * 1e6)));
    this.restoring ??= this.startLoad();
    const restore = await this.restoring;
    // the VM runs even when the on-time resume failed after its `cont` (restore.warnings says so):
    // date the resume by QEMU's stamp as load saw it
    const resumeNs = this.resume?.resumeNs ?? restore.resumedNs ?? realtimeClock()();
    const resume: OnTimeResume = this.resume ?? { qmpRoundTripNs: 0n, contSentNs: resumeNs, resumeNs, contAnsweredNs: resumeNs, lateNs: resumeNs - (this.targetNs ?? resumeNs), overrun: false };
    const stopNs = BigInt(this.metadata.stopNs);
    return {
      epoch: this.epoch,
      restore,
      resume,
      deltaNs: this.deltaNs ?? 0n,
      firstStepNs: this.firstStepNs ?? 0n,
      stopNs,
      stopHereNs: this.stopHereNs ?? stopNs,
      ...(this.hostOffset ? { hostOffset: this.hostOffset } : {}),
      ...(this.clockSteps ? { clockSteps: this.clockSteps } : {}),
      mapped: this.mapped,
      ...(this.loadedNs !== undefined && this.targetNs !== undefined ? { loadSlackNs: this.targetNs - this.loadedNs } : {}),
    };
  }

  /** Gives up: the paused domain is destroyed and undefined (restore's own cleanup); a mapped standby nothing was sent to is given back. */
  async abort(reason: string): Promise<void> {
    this.cancel(new Error(`restore aborted: ${reason}`));
    if (!this.restoring) {
      // a mapped standby nothing was sent to: it stays, warm
      this.mappedStandby?.giveBack();
      return;
    }
    await this.restoring.then(
      async (result) => {
        // it completed after all: this host may not run it
        await result.qmp.close().catch(() => undefined);
        await this.options.conn.remove(result.name, { timeoutMs: 15_000 }).catch(() => undefined);
      },
      () => undefined,
    );
  }
}
