import path from 'node:path';
import { ClockHook, DriftLedger, InPlaceActuator, realtimeClock } from '@ftvm/kvmclock';
import { readProtection, replicatedDisks } from '@ftvm/libvirt';
import { GuestAgentClient, QmpClient } from '@ftvm/qmp';
import { openRemoteReceiver, ReplicationError, type ReplicationSender, type SshConnection } from '@ftvm/transport';
import { Checkpointer, type CheckpointResult } from '../checkpointer.js';
import { DiskReplicator, type DiskAudit } from '../disk/disk-replicator.js';
import { OutputCommit, OutputCommitError } from '../output/output-commit.js';
import type { CheckpointSummary } from './control.js';
import type { Log, MetricsSink } from './types.js';
import type { VmRecord } from './vm-records.js';

export interface PrimaryVmOptions {
  record: VmRecord;
  storeDir: string;
  /** An SSH connection to a host (the agent's pool; reconnects as needed). */
  ssh: (host: string) => Promise<SshConnection>;
  log: Log;
  metrics: MetricsSink;
  health: { intervalMs: number; timeoutMs: number };
  /** A checkpoint not committed within this long is given up (default 30 s). */
  checkpointTimeoutMs?: number;
  /** The VM stopped answering or died: the agent fences it and gives up ownership. */
  onFailure: (reason: string) => void;
  /** The user stopped the VM (guest poweroff, `virsh shutdown`, `virsh destroy`): it stays down. */
  onStopped: (reason: string) => void;
  /** A failover's restore hands over its QMP connection and ledger. */
  qmp?: QmpClient;
  ledger?: DriftLedger;
}

const nsToMs = (ns: bigint) => Number(ns) / 1e6;

/**
 * With output commit on, the VM's output waits for each checkpoint: one that is not acknowledged
 * within 10 s plus its RAM at 100 MB/s (a full checkpoint ran at 170–240 MB/s here) is given up
 * and the next one tried, instead of holding the output for the default 30 s.
 */
export const outputCommitDeadlineMs = (ramBytes: number) => 10_000 + Math.ceil(ramBytes / 100_000);

const roundPhases = (phases: Record<string, number>) => Object.fromEntries(Object.entries(phases).map(([k, v]) => [k, Math.round(v * 10) / 10]));

/**
 * The checkpoint certainly did not commit on the backup: it refused it (a nack), or it failed
 * before its trailer could be sent. A channel closed or an ack that never came may hide a commit.
 */
function notCommitted(error: unknown): boolean {
  return error instanceof ReplicationError && !['closed', 'timeout', 'protocol'].includes(error.code);
}

/**
 * QEMU's SHUTDOWN reasons that are someone's decision: the guest powered itself off (also what
 * `virsh shutdown` leads to), or the host asked QEMU to quit (`virsh destroy` sends SIGTERM).
 * A crash or SIGKILL sends no SHUTDOWN at all (only the QMP socket closes), and a panic or a
 * watchdog are failures: those fail over.
 */
export const USER_STOP_REASONS: ReadonlySet<string> = new Set(['guest-shutdown', 'host-signal', 'host-qmp-quit', 'host-ui']);

/**
 * This host runs the VM: keeps an eye on its QEMU (QMP must answer within the health timeout)
 * and, while the VM is protected, checkpoints it into the backup's store every interval, with the
 * clock hook correcting each checkpoint's pause in place (ftvm's QEMU).
 */
export class PrimaryVm {
  readonly ledger: DriftLedger;
  lastCheckpoint: (CheckpointSummary & { at: number }) | undefined;
  private record: VmRecord;
  private stopped = false;
  private loop: Promise<void> | undefined;
  private wake: (() => void) | undefined;
  /** One checkpoint at a time (the loop, checkpoint-now, the switchover's last one). */
  private busy: Promise<unknown> = Promise.resolve();
  private receiver: { sender: ReplicationSender; host: string } | undefined;
  private healthTimer: NodeJS.Timeout | undefined;
  private failed = false;
  /** pauseNow ran: the fence stopped the VM, and nothing here may resume it. */
  private fencing = false;
  /** Checkpoints that failed in a row (reset by a committed one). */
  consecutiveFailures = 0;
  /** A disk seed is copying (it can take minutes for large disks; protect waits for it). */
  seeding = false;
  /**
   * Why this VM cannot be protected as its record asks (output commit on a QEMU without it): no
   * checkpoint is taken until the record changes.
   */
  refusal: string | undefined;
  /** Output commit, while the record asks for it. */
  private output: OutputCommit | undefined;

  private constructor(
    private readonly options: PrimaryVmOptions,
    readonly qmp: QmpClient,
    private readonly hook: ClockHook,
    private readonly checkpointer: Checkpointer,
    /** The VM's writable local disks, replicated with each checkpoint (none: shared storage or no disk). */
    private readonly disks: DiskReplicator | undefined,
    /** The guest's RAM (QEMU's base memory): bounds how long a checkpoint may hold output. */
    private readonly ramBytes: number,
  ) {
    this.record = options.record;
    this.ledger = options.ledger ?? new DriftLedger(options.record.name);
  }

  static async start(options: PrimaryVmOptions): Promise<PrimaryVm> {
    const protection = readProtection(options.record.xml);
    if (!protection) throw new Error(`VM '${options.record.name}': its domain XML has no ftvm metadata`);
    const qmp = options.qmp ?? (await QmpClient.connectWhenReady({ path: protection.qmpSocket }, { timeoutMs: 30_000, connectTimeoutMs: 2_000 }));
    const ledger = options.ledger ?? new DriftLedger(options.record.name);
    const log = options.log;
    // the VM's own clock policy (compensate, maxStepMs, onImpossible) from its ftvm metadata;
    // the hook connects to the guest agent only if the policy falls back to it
    const agentSocket = protection.agentSocket;
    const hook = await ClockHook.create({
      qmp,
      ledger,
      policy: protection.clock,
      agent: agentSocket ? () => GuestAgentClient.connect({ path: agentSocket }, { connectTimeoutMs: 2_000, commandTimeoutMs: 2_000 }) : undefined,
      log: (message) => log.info({ clock: true }, message),
      warn: (message) => log.warn({ clock: true }, message),
    }).catch(async (error: Error) => {
      if (!options.qmp) await qmp.close().catch(() => undefined); // ours to close; a handed-over one is the caller's
      throw new Error(`VM '${options.record.name}': ${error.message}`);
    });
    const version = await qmp.execute<{ qemu: { major: number; minor: number; micro: number } }>('query-version');
    const inPlace = await InPlaceActuator.detect(qmp);
    let previousFrozenNs: bigint | undefined;
    let vm!: PrimaryVm;
    const checkpointer = await Checkpointer.create({
      vm: options.record.name,
      qmp,
      socketPath: path.posix.join(protection.runDir, `${options.record.name}.mig`),
      qemuVersion: `${version.qemu.major}.${version.qemu.minor}.${version.qemu.micro}`,
      domainXml: options.record.xml,
      // none by default: the backup's store compacts the chain (CheckpointStore)
      ...(options.record.fullEvery === undefined ? {} : { fullEvery: options.record.fullEvery }),
      clockMovesAtResume: hook.correctsInPlace('checkpoint'),
      // ftvm's QEMU resumes by itself after a checkpoint: arm the correction before the stop.
      beforeMigrate: async () => {
        if (checkpointer.selfResuming) await hook.arm('checkpoint');
      },
      beforeResume: async () => hook.arm('checkpoint'),
      // a checkpoint that failed before its stop: its arming must not compensate a later pause
      afterFailure: async () => hook.disarm(),
      mayResume: () => !(vm as PrimaryVm | undefined)?.fencing,
      // ftvm's QEMU measured the frozen interval it gave back: the clock froze that long before RESUME
      ...(inPlace
        ? {
            stopInstant: async ({ stopNs, resumeNs }: { stopNs: bigint; resumeNs: bigint }) => {
              const applied = await inPlace.lastApplied();
              // the same ns value twice: no compensation was applied at this resume (not armed)
              const stale = applied === undefined || applied.stoppedNs === previousFrozenNs;
              previousFrozenNs = applied?.stoppedNs;
              if (stale || applied.stoppedNs <= 0n || applied.stoppedNs > resumeNs - stopNs + 50_000_000n) return stopNs;
              return resumeNs - applied.stoppedNs;
            },
          }
        : {}),
      timeoutMs: options.checkpointTimeoutMs ?? 30_000,
    });
    const toReplicate = replicatedDisks(options.record.xml);
    const disks =
      toReplicate.length === 0
        ? undefined
        : await DiskReplicator.create({
            qmp,
            vm: options.record.name,
            disks: toReplicate,
            runDir: protection.runDir,
            log: (message, fields) => log.info(fields ?? {}, message),
            ...(process.env['FTVM_TEST_DISK_AUDIT'] && process.env['FTVM_TEST_DISK_AUDIT_FLEECE'] !== '0' ? { audit: (entry: DiskAudit) => log.info({ role: 'fleece', ...entry }, 'disk audit') } : {}),
          }).catch(async (error: Error) => {
            await checkpointer.close().catch(() => undefined);
            hook.close();
            if (!options.qmp) await qmp.close().catch(() => undefined);
            throw error;
          });
    const memory = await qmp.execute<{ 'base-memory': number }>('query-memory-size-summary').catch(() => ({ 'base-memory': 1024 ** 3 }));
    vm = new PrimaryVm({ ...options, ledger }, qmp, hook, checkpointer, disks, memory['base-memory']);
    qmp.onEvent((event) => {
      if (event.event !== 'SHUTDOWN') return;
      const reason = String((event.data as { reason?: unknown }).reason ?? 'unknown');
      if (USER_STOP_REASONS.has(reason)) vm.userStopped(reason);
      else vm.fail(`QEMU shut down: ${reason}`);
    });
    qmp.onClose((reason) => vm.fail(`QMP connection closed: ${reason}`));
    vm.startHealthChecks();
    vm.update(options.record);
    log.info({ selfResuming: checkpointer.selfResuming, inPlaceClock: hook.canCorrectInPlace }, 'running as primary');
    const kvm = await qmp.execute<{ enabled: boolean }>('query-kvm').catch(() => undefined);
    if (!checkpointer.ftvmQemu && kvm?.enabled === false) {
      // Measured: a failover from stock QEMU's checkpoints restored a crashing guest in 1 of 3 kills.
      log.warn('stock QEMU under TCG: its dirty tracking can lose guest writes between precopy passes (fixed by ftvm patch 0010), so a checkpoint may restore a corrupt guest; use ftvm\'s QEMU for protected VMs');
    }
    return vm;
  }

  get name(): string {
    return this.record.name;
  }

  /** A new record (protected or not, backup host): starts or stops the checkpoint loop. */
  update(record: VmRecord): void {
    if (record.outputCommit !== this.record.outputCommit || record.protected !== this.record.protected || record.generation !== this.record.generation) this.refusal = undefined;
    this.record = record;
    if (record.protected && !this.loop && !this.stopped) this.loop = this.runLoop();
    this.wake?.();
  }

  async checkpointNow(): Promise<CheckpointResult> {
    return this.exclusive(() => this.takeCheckpoint(false));
  }

  /** The switchover's last checkpoint: the VM stays stopped once the backup has committed it. */
  async finalCheckpoint(): Promise<CheckpointResult> {
    this.stopHealthChecks();
    const result = await this.exclusive(() => this.takeCheckpoint(true));
    this.stopped = true;
    this.wake?.();
    return result;
  }

  /**
   * Pauses the vCPUs through QMP (bounded: a hung QEMU does not answer) and returns QEMU's STOP
   * stamp — the fence's proof of when this copy stopped running. The caller kills QEMU after.
   */
  async pauseNow(timeoutMs: number): Promise<bigint | undefined> {
    this.fencing = true; // no checkpoint may `cont` it from here on (see CheckpointerOptions.mayResume)
    const stopped = this.qmp.waitForEvent('STOP', { timeoutMs });
    stopped.catch(() => undefined);
    try {
      await this.qmp.execute('stop', undefined, { timeoutMs });
      // A `stop` inside a checkpoint's stopped phase is recorded (patch 0011) and emits no STOP:
      // the VM was already stopped. Then the instant we see it stopped bounds when it last ran.
      const seenStopped = this.qmp
        .execute<{ running: boolean }>('query-status', undefined, { timeoutMs })
        .then((status) => (status.running ? new Promise<never>(() => undefined) : realtimeClock()()));
      return await Promise.race([stopped.then((event) => event.timestampNs), seenStopped]);
    } catch {
      return undefined;
    }
  }

  /** Stops the loops and closes the connections; the VM itself is left as it is. */
  async stop(): Promise<void> {
    this.stopped = true;
    this.stopHealthChecks();
    this.wake?.();
    await this.loop?.catch(() => undefined);
    await this.busy.catch(() => undefined);
    this.receiver?.sender.close();
    this.receiver = undefined;
    this.hook.close();
    await this.disks?.close();
    await this.checkpointer.close().catch(() => undefined);
    await this.qmp.close().catch(() => undefined);
  }

  /**
   * The VM runs on without protection (unprotect, an agent stop that suspended it): what output
   * commit holds leaves now, and nothing is held from here on. Never called on the way to a
   * failover: output of an uncommitted epoch must die with this copy.
   */
  async releaseOutput(): Promise<void> {
    const output = this.output;
    this.output = undefined;
    await output?.detach();
  }

  /**
   * Output commit as the record says. Output is held only while a failover could lose it: from
   * just before a checkpoint that can reach the backup (the buffers close its epoch at its stop).
   * Until one checkpoint of this run of protection is committed, no host can take the VM over
   * (see VmRecord.checkpointsSince), so an attempt that certainly did not commit lets what it held
   * go: a backup that is down or still coming up does not silence the VM's service.
   */
  private async attachOutput(): Promise<void> {
    if (!this.record.outputCommit || this.output) return;
    this.output = await OutputCommit.attach(this.qmp, this.name, this.record.xml);
    this.options.log.info({ buffers: this.output.buffers.map((b) => b.netdev) }, 'output commit: guest output held until its checkpoint is committed');
  }

  /** A checkpoint of the current run of protection is on the backup: a take-over is possible. */
  private committedThisRun(): boolean {
    return this.lastCheckpoint !== undefined && this.lastCheckpoint.epoch > (this.record.checkpointsSince ?? 0);
  }

  private async runLoop(): Promise<void> {
    let backoffMs = 0;
    while (!this.stopped && this.record.protected) {
      const began = performance.now();
      if (this.refusal) {
        // nothing to do until the record changes (update() clears the refusal and wakes us)
        await new Promise<void>((resolve) => (this.wake = resolve));
        this.wake = undefined;
        continue;
      }
      try {
        if (!this.record.outputCommit) await this.releaseOutput();
        await this.exclusive(() => this.takeCheckpoint(false));
        backoffMs = 0;
        this.consecutiveFailures = 0;
      } catch (error) {
        if (this.stopped) break;
        if (error instanceof OutputCommitError) {
          this.refusal = error.message;
          this.options.log.error({ err: error.message }, 'output commit refused: no checkpoints');
          continue;
        }
        this.consecutiveFailures++;
        this.options.metrics.checkpointFailed(this.name);
        this.options.log.warn({ err: (error as Error).message }, 'checkpoint failed');
        backoffMs = Math.min(2_000, Math.max(100, backoffMs * 2));
      }
      // A wake (the record changed: every lease renewal rewrites it) only re-reads the interval and
      // the loop's conditions: it must not cut the interval short.
      const backoffUntil = performance.now() + backoffMs;
      while (!this.stopped && this.record.protected && !this.refusal) {
        const waitMs = Math.max(backoffUntil, began + this.record.checkpointIntervalMs) - performance.now();
        if (waitMs <= 0) break;
        await new Promise<void>((resolve) => {
          const timer = setTimeout(resolve, waitMs);
          this.wake = () => {
            clearTimeout(timer);
            resolve();
          };
        });
        this.wake = undefined;
      }
    }
    // unprotected (not stopped by the agent or a failover): nothing left to hold output for
    if (!this.stopped && !this.record.protected) await this.releaseOutput().catch((error: Error) => this.options.log.warn({ err: error.message }, 'output commit: releasing the buffers'));
    this.loop = undefined;
  }

  private async takeCheckpoint(leaveStopped: boolean): Promise<CheckpointResult> {
    if (this.failed) throw new Error('the VM has failed');
    const sender = await this.openReceiver();
    let full = false;
    if (this.disks?.needsSeed) {
      // a new backup (or one that lost the disk state): its replica is filled before the first delta
      this.seeding = true;
      try {
        await this.disks.seed(sender);
      } finally {
        this.seeding = false;
      }
      full = true; // the seed dropped the backup's older checkpoints
    }
    await this.attachOutput();
    const epoch = Date.now();
    this.hook.expect('checkpoint');
    try {
      const result = await this.checkpointer.checkpoint(epoch, sender, {
        leaveStopped,
        full,
        ...(this.disks ? { disks: this.disks } : {}),
        ...(this.output ? { output: this.output, timeoutMs: outputCommitDeadlineMs(this.ramBytes) } : {}),
      });
      // The ledger counted the pause from QEMU's STOP stamp, which comes ~1 ms after the freeze.
      if (result.frozeAt.source === 'stream') this.ledger.redateStop(result.stopNs, result.frozeAt.stopNs);
      const pauseMs = nsToMs(result.resumeNs - result.stopNs);
      this.lastCheckpoint = { epoch, bytes: result.bytes, pauseMs, ageMs: 0, at: Date.now() };
      this.options.metrics.checkpointCommitted(this.name, { bytes: result.bytes, pauseMs, at: Date.now() });
      this.options.log.debug({ epoch, bytes: result.bytes, pauseMs, durationMs: Math.round(result.durationMs * 10) / 10, phasesMs: roundPhases(result.phasesMs), base: result.base, outputCommit: this.output !== undefined }, 'checkpoint committed');
      this.options.metrics.clockResidual(this.name, -nsToMs(this.ledger.predictedLagNs));
      return result;
    } catch (error) {
      if (!sender.isOpen) this.receiver = undefined;
      if (error instanceof ReplicationError && error.code === 'no-disk-base') this.disks?.forgetBase();
      if (this.output && !this.committedThisRun() && notCommitted(error)) {
        await this.releaseOutput().catch((e: Error) => this.options.log.warn({ err: e.message }, 'output commit: releasing the buffers'));
        this.options.log.info('output commit: no checkpoint of this protection on the backup yet, nothing to hold output for');
      }
      throw error;
    }
  }

  private async openReceiver(): Promise<ReplicationSender> {
    const backup = this.record.backup;
    if (this.receiver && this.receiver.host === backup && this.receiver.sender.isOpen) return this.receiver.sender;
    // another backup: its replica must be seeded (the same one, reconnected, keeps its store; one
    // that lost it refuses the next delta with no-disk-base)
    if (this.receiver && this.receiver.host !== backup) this.disks?.forgetBase();
    this.receiver?.sender.close();
    const ssh = await this.options.ssh(backup);
    const { sender } = await openRemoteReceiver(ssh, { storeDir: path.posix.join(this.options.storeDir, this.name), keep: this.record.keep });
    this.receiver = { sender, host: backup };
    return sender;
  }

  private exclusive<T>(work: () => Promise<T>): Promise<T> {
    const run = this.busy.catch(() => undefined).then(work);
    this.busy = run.catch(() => undefined);
    return run;
  }

  private startHealthChecks(): void {
    const { intervalMs, timeoutMs } = this.options.health;
    let inFlight = false;
    this.healthTimer = setInterval(() => {
      if (inFlight || this.failed) return;
      inFlight = true;
      const sent = performance.now();
      this.qmp
        .execute<{ status: string }>('query-status', undefined, { timeoutMs })
        .then((status) => {
          if (status.status === 'shutdown' || status.status === 'internal-error' || status.status === 'guest-panicked') this.fail(`VM status ${status.status}`);
        })
        .catch((error: Error) => this.fail(`QMP did not answer within ${timeoutMs} ms (${Math.round(performance.now() - sent)} ms): ${error.message}`))
        .finally(() => (inFlight = false));
    }, intervalMs);
  }

  private stopHealthChecks(): void {
    if (this.healthTimer) clearInterval(this.healthTimer);
    this.healthTimer = undefined;
  }

  /** QEMU said the user stopped it: no failure, no failover; the loops end. */
  private userStopped(reason: string): void {
    if (this.failed || this.stopped) return;
    this.failed = true; // what follows (QMP closing as QEMU exits) is not a failure
    this.stopHealthChecks();
    this.options.log.warn({ reason }, 'the user stopped the VM');
    this.options.onStopped(reason);
  }

  private fail(reason: string): void {
    if (this.failed || this.stopped) return;
    this.failed = true;
    this.stopHealthChecks();
    this.options.log.error({ reason }, 'VM failed');
    this.options.onFailure(reason);
  }
}
