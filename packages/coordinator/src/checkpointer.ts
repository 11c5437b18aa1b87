import { stopInstantFromClock, type StopInstant, type VirtualClockReference } from '@ftvm/kvmclock';
import type { QmpClient, QmpEvent } from '@ftvm/qmp';
import { ReplicationError, testPausePoint, type DiskBase, type DiskSection, type ReplicationSender } from '@ftvm/transport';
import { MigrationSocket } from './migration-socket.js';

export interface CheckpointerOptions {
  vm: string;
  qmp: QmpClient;
  /** Path where ftvm listens for the migration stream, and the same socket as QEMU sees it. */
  socketPath: string;
  qemuSocketPath?: string;
  qemuVersion: string;
  domainXml?: string;
  /** Deadline for one whole checkpoint (migration + transfer + ack). */
  timeoutMs?: number;
  /**
   * Called while the VM is stopped at the end of a checkpoint, just before `cont`: the clock hook
   * arms its in-place correction here. Must be quick — it is guest-visible pause.
   */
  beforeResume?: () => Promise<void>;
  /**
   * Arms before each migration: with ftvm's patched QEMU the VM resumes by itself the moment the
   * migration completes (x-ftvm-resume-source), so anything that must happen "before the resume"
   * has to be prepared before the stop.
   */
  beforeMigrate?: () => Promise<void>;
  /**
   * Called when a checkpoint failed, once QEMU's migration is cancelled: undoes what
   * beforeMigrate armed for a stop that may never have come (the clock hook's disarm). An arming
   * made while the VM runs waits for the next stop, whatever its cause.
   */
  afterFailure?: () => Promise<void>;
  /**
   * False once the VM is being fenced: a `stop` that landed in a checkpoint's pause keeps the VM
   * stopped (ftvm's QEMU, patch 0011), and the checkpointer must not `cont` it back to life.
   */
  mayResume?: () => boolean;
  /**
   * QEMU's `downtime-limit` (ms): it stops the VM once the remaining dirty memory fits in this
   * much time at the measured bandwidth. Default 5 ms with ftvm's QEMU, 50 ms with stock QEMU:
   * stock 7.2 under TCG loses writes across precopy iterations (fixed by ftvm's patch 0010), and
   * with 1 ms 3 of 7 of its streams restored into a crashing guest, while 50 ms converged after
   * the bulk pass and restored 5 of 5 — see bench/results/HISTORY.md.
   */
  downtimeLimitMs?: number;
  /**
   * The instant the guest clock froze, given QEMU's STOP and RESUME stamps. QEMU stamps STOP only
   * after every vCPU has stopped (ms late on a busy host) while the clock froze before; ftvm's
   * QEMU measures the frozen interval itself, and RESUME is stamped as the clock restarts, so
   * RESUME − frozen is the better stop instant. The backup rewrites the clock from this value at
   * failover. Default: the STOP stamp.
   */
  stopInstant?: (stamps: { stopNs: bigint; resumeNs: bigint }) => Promise<bigint>;
  /**
   * Something moves the guest clock when the VM resumes after a checkpoint (ftvm's in-place
   * correction): the checkpoint's virtual clock is then not the one the VM resumed with, so it
   * cannot date the next freeze, and `frozeAt` stays QEMU's STOP stamp.
   */
  clockMovesAtResume?: boolean;
  /**
   * Incremental checkpoints (default: on when QEMU has ftvm's x-ftvm-incremental): after a
   * checkpoint the backup acknowledged, the next carries only the pages written since, applied
   * on top of it in the backup's store. Anything that fails makes the next one full again.
   */
  incremental?: boolean;
  /**
   * A full checkpoint at least every this many. Default: none after the first — the backup's
   * CheckpointStore compacts a long chain into a full checkpoint itself, without the primary
   * sending one (a full is ~RAM-sized: a stall of its transfer, and with output commit, held output).
   */
  fullEvery?: number;
}

export interface CheckpointResult {
  epoch: number;
  /** QEMU's STOP and RESUME stamps: the guest-visible pause. */
  stopNs: bigint;
  resumeNs: bigint;
  bytes: number;
  /** From `migrate` to the backup's ack. */
  durationMs: number;
  /** From `migrate` to the MIGRATION completed event (the stream left QEMU). */
  migrateMs: number;
  /**
   * Where the time went, from `migrate`'s preparation: `prepare` (capabilities, arming the stop
   * actions, the disks' fleecing points), `migrate` (to QEMU's completed event), `ack` (to the
   * backup's durable ack), `settle` (releasing held output, settling the disks).
   */
  phasesMs: { prepare: number; migrate: number; ack: number; settle: number };
  /** QEMU's own account of the stopped phase (query-migrate `downtime`): the rest of the pause is notification and `cont`. */
  qemuDowntimeMs: number | undefined;
  /** An incremental checkpoint: the epoch it applies on. Undefined for a full one. */
  base: number | undefined;
  /**
   * When the guest clock froze for this checkpoint, best known: with the virtual clock the backup
   * read from the stream and the previous checkpoint's RESUME (stopInstantFromClock) — QEMU's STOP
   * stamp comes 0.65–1.3 ms after the freeze (uprobes, TCG) — or the STOP stamp when no such
   * reference fits (the first checkpoint, one after a failure or an unannounced pause, or any
   * with `clockMovesAtResume`).
   */
  frozeAt: StopInstant;
}

/**
 * A checkpoint's disks (see DiskReplicator): armed before `migrate` so ftvm's QEMU captures them at
 * the stop instant, read after it, settled once the backup answered.
 */
export interface CheckpointDisks {
  /** Prepares the epoch's fleecing points; returns the header fields and the stop actions to arm. */
  arm(epoch: number): Promise<{ disks: { disk: string; sizeBytes: number }[]; diskBase: DiskBase; stopActions: object[] }>;
  sections(): AsyncIterable<DiskSection>;
  settle(committed: boolean): Promise<void>;
}

/**
 * A checkpoint's guest output (see OutputCommit): its epoch is closed by a stop action at the stop
 * instant and released once the backup acknowledged the checkpoint.
 */
export interface CheckpointOutput {
  stopActions(epoch: number): object[];
  release(epoch: number): Promise<unknown>;
}

const SELF_RESUME_CAPABILITY = 'x-ftvm-resume-source';
const SINGLE_PASS_CAPABILITY = 'x-ftvm-single-pass';
/** ftvm's QEMU runs these transaction actions, as one, right after the checkpoint's stop. */
const ARM_STOP_ACTIONS = 'x-ftvm-arm-stop-actions';
const INCREMENTAL_CAPABILITY = 'x-ftvm-incremental';

/** The acknowledged checkpoint the next one may build on, and the channel that acknowledged it. */
interface ChainTip {
  epoch: number;
  sha256: string;
  sender: ReplicationSender;
  length: number;
}

type MigrationStatus = 'setup' | 'active' | 'device' | 'completed' | 'failed' | 'cancelled' | string;

/**
 * Takes checkpoints of a running VM: a precopy `migrate` into a local unix socket whose bytes go
 * straight into the replication channel. The VM runs during the copy; QEMU stops it only for the
 * last dirty pages and device state, and the moment the MIGRATION event says `completed`, `cont`
 * is sent (or, with ftvm's QEMU, it resumes by itself). With ftvm's QEMU, a checkpoint after an
 * acknowledged one is incremental: only the pages written since. Whatever goes wrong, the VM is
 * left running and the next checkpoint is full.
 */
export class Checkpointer {
  private tip: ChainTip | undefined;
  /** The VM's last resume from a checkpoint, and the virtual clock it resumed with: dates the next freeze. */
  private lastResume: VirtualClockReference | undefined;
  /**
   * QEMU may be keeping a dirty log since a completed migration the backup never acknowledged —
   * or one an earlier user of this QEMU took: so the first checkpoint drops it too.
   */
  private qemuMayHoldBase: boolean;
  /** Whether x-ftvm-single-pass is on in QEMU now (undefined: not known, set it). */
  private singlePassOn: boolean | undefined;

  private constructor(
    private readonly options: CheckpointerOptions,
    private readonly socket: MigrationSocket,
    /** QEMU resumes the source itself after each checkpoint (ftvm's patch): no `cont` round trip. */
    readonly selfResuming: boolean,
    /** Checkpoints after the first carry only what changed (ftvm's patch). */
    readonly incremental: boolean,
    /** QEMU is ftvm's build (its migration capabilities are there), with the TCG dirty-tracking fix 0010. */
    readonly ftvmQemu: boolean,
    /** QEMU can send an increment in one pass and stop (x-ftvm-single-pass, patch 0016). */
    private readonly singlePassAvailable: boolean,
  ) {
    this.qemuMayHoldBase = incremental;
  }

  static async create(options: CheckpointerOptions): Promise<Checkpointer> {
    const { qmp } = options;
    const capabilities = await qmp.execute<{ capability: string }[]>('query-migrate-capabilities');
    const selfResuming = capabilities.some((c) => c.capability === SELF_RESUME_CAPABILITY);
    const incremental = (options.incremental ?? true) && capabilities.some((c) => c.capability === INCREMENTAL_CAPABILITY);
    await qmp.execute('migrate-set-capabilities', {
      capabilities: [
        { capability: 'events', state: true },
        // a VM resumed from a mapped standby loaded with x-ignore-shared, which stays on: its
        // checkpoints must carry its (shared) RAM
        { capability: 'x-ignore-shared', state: false },
        ...(selfResuming ? [{ capability: SELF_RESUME_CAPABILITY, state: true }] : []),
        ...(incremental ? [{ capability: INCREMENTAL_CAPABILITY, state: true }] : []),
      ],
    });
    // QEMU caps migration at 32 MiB/s by default; a checkpoint wants the copy as fast as the link
    // takes it, with the stop decided by downtimeLimitMs.
    const ftvmQemu = selfResuming || capabilities.some((c) => c.capability === INCREMENTAL_CAPABILITY);
    await qmp.execute('migrate-set-parameters', {
      'max-bandwidth': 8 * 1024 * 1024 * 1024,
      'downtime-limit': options.downtimeLimitMs ?? (ftvmQemu ? 5 : 50),
    });
    const singlePass = capabilities.some((c) => c.capability === SINGLE_PASS_CAPABILITY);
    return new Checkpointer(options, await MigrationSocket.listen(options.socketPath), selfResuming, incremental, ftvmQemu, singlePass);
  }

  /**
   * Takes one checkpoint and streams it to `sender`. With `leaveStopped` (a planned switchover's
   * last checkpoint) the VM stays stopped once the stream is out: nothing runs after the state the
   * backup receives, so the move loses nothing. `full` starts a new chain whatever the last one.
   */
  async checkpoint(
    epoch: number,
    sender: ReplicationSender,
    options: { leaveStopped?: boolean; full?: boolean; disks?: CheckpointDisks; output?: CheckpointOutput; timeoutMs?: number } = {},
  ): Promise<CheckpointResult> {
    const { qmp, vm } = this.options;
    const { disks, output } = options;
    const leaveStopped = options.leaveStopped ?? false;
    const timeoutMs = options.timeoutMs ?? this.options.timeoutMs ?? 60_000;
    const started = performance.now();
    let stopNs: bigint | undefined;
    let resumeNs: bigint | undefined;
    let migrateMs = 0;
    let settle!: (outcome: { ok: true } | { ok: false; reason: string }) => void;
    const migration = new Promise<{ ok: true } | { ok: false; reason: string }>((resolve) => (settle = resolve));
    let resumed!: () => void;
    const resumedPromise = new Promise<void>((resolve) => (resumed = resolve));
    let stopped!: () => void;
    const stoppedPromise = new Promise<void>((resolve) => (stopped = resolve));
    const base = options.full ? undefined : this.baseFor(sender);
    this.tip = undefined; // until this one is acknowledged, nothing may build on anything
    const reference = this.lastResume;
    this.lastResume = undefined; // until this one's resume is known

    const unsubscribe = qmp.onEvent((event: QmpEvent) => {
      if (event.event === 'STOP') {
        stopNs = event.timestampNs;
        stopped();
      }
      else if (event.event === 'RESUME' && stopNs !== undefined) {
        resumeNs = event.timestampNs;
        resumed();
      } else if (event.event === 'MIGRATION') {
        const status = (event.data as { status?: MigrationStatus }).status;
        if (status === 'completed') {
          migrateMs = performance.now() - started;
          if (leaveStopped) {
            resumed();
            settle({ ok: true });
            return;
          }
          void this.resume().then(() => settle({ ok: true }), (error: Error) => settle({ ok: false, reason: error.message }));
        } else if (status === 'failed' || status === 'cancelled') {
          void qmp
            .execute<{ 'error-desc'?: string }>('query-migrate')
            .catch(() => ({}) as { 'error-desc'?: string })
            .then((info) => settle({ ok: false, reason: `migration ${status}${info['error-desc'] ? `: ${info['error-desc']}` : ''}` }));
        }
      }
    });

    // QEMU gone (killed, crashed): no MIGRATION event will ever come
    const unwatchClose = qmp.onClose((reason) => settle({ ok: false, reason: `QMP closed: ${reason}` }));
    const connection = this.socket.nextConnection(10_000);
    connection.catch(() => undefined);
    const deadline = setTimeout(() => {
      // say where it stood: a precopy that never converged, or a stream nobody read
      void qmp
        .execute<{ status?: string; ram?: { transferred?: number; remaining?: number; 'dirty-sync-count'?: number } }>('query-migrate', undefined, { timeoutMs: 1_000 })
        .then(
          (info) => `migration ${info.status ?? 'unknown'}, ${Math.round((info.ram?.transferred ?? 0) / 1e6)} MB sent, ${Math.round((info.ram?.remaining ?? 0) / 1e6)} MB remaining, ${info.ram?.['dirty-sync-count'] ?? '?'} passes`,
          (error: Error) => `query-migrate: ${error.message}`,
        )
        .then((where) => {
          settle({ ok: false, reason: `checkpoint took longer than ${timeoutMs} ms (${where})` });
          return qmp.execute('migrate_cancel');
        })
        .catch(() => undefined);
    }, timeoutMs);
    try {
      if (leaveStopped && this.selfResuming) {
        await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: SELF_RESUME_CAPABILITY, state: false }] });
      } else {
        await this.options.beforeMigrate?.();
      }
      if (!base && this.qemuMayHoldBase) await this.dropQemuBase();
      this.qemuMayHoldBase = this.incremental;
      await this.setSinglePass(base !== undefined);
      const armed = await disks?.arm(epoch);
      const stopActions = [...(armed?.stopActions ?? []), ...(output?.stopActions(epoch) ?? [])];
      if (stopActions.length > 0) await qmp.execute(ARM_STOP_ACTIONS, { actions: stopActions }, { timeoutMs: 5_000 });
      const diskHeader = armed ? { disks: armed.disks, diskBase: armed.diskBase } : undefined;
      const preparedAt = performance.now();
      await qmp.execute('migrate', { uri: `unix:${this.options.qemuSocketPath ?? this.socket.path}` });
      const stream = await connection;
      const sending = sender.send({
        header: {
          vm,
          epoch,
          qemuVersion: this.options.qemuVersion,
          ...(this.options.domainXml ? { domainXml: this.options.domainXml } : {}),
          ...(base ? { base: { epoch: base.epoch, sha256: base.sha256 } } : {}),
          ...(diskHeader ?? {}),
        },
        data: stream,
        // the disks are read through their fleecing points once the stop instant is behind
        ...(disks
          ? {
              disks: async function* () {
                const outcome = await migration;
                if (!outcome.ok) throw new Error(outcome.reason);
                await resumedPromise;
                await testPausePoint('before-disk-frames', { epoch });
                yield* disks.sections();
              },
            }
          : {}),
        trailer: async () => {
          const outcome = await migration;
          if (!outcome.ok) throw new Error(outcome.reason);
          await resumedPromise;
          // a checkpoint left stopped has no resume: its "resume" is the stop itself
          if (resumeNs === undefined) return { stopNs: String(stopNs), resumeNs: String(stopNs) };
          const frozeAt = this.options.stopInstant ? await this.options.stopInstant({ stopNs: stopNs!, resumeNs }).catch(() => stopNs!) : stopNs!;
          return { stopNs: String(frozeAt), resumeNs: String(resumeNs) };
        },
        ackTimeoutMs: timeoutMs,
        // QEMU's final phase: what it still writes is pause, so the link no longer paces it
        unthrottle: stoppedPromise,
      });
      sending.catch(() => undefined); // observed below; may settle before we get there
      const outcome = await migration;
      if (!outcome.ok) {
        stream.destroy();
        await sending.catch(() => undefined);
        throw new ReplicationError(outcome.reason, epoch, 'migration');
      }
      const migratedAt = performance.now();
      const info = await qmp.execute<{ downtime?: number }>('query-migrate').catch(() => ({}) as { downtime?: number });
      const ack = await sending;
      const ackedAt = performance.now();
      // durable on the backup: the epoch's output may leave (and any a failed checkpoint held)
      await output?.release(epoch);
      await disks?.settle(true);
      const settledAt = performance.now();
      if (this.incremental) this.tip = { epoch, sha256: ack.sha256, sender, length: (base?.length ?? 0) + 1 };
      const guestClockNs = ack.guestClockNs === undefined ? undefined : BigInt(ack.guestClockNs);
      const frozeAt = this.frozeAt(stopNs!, guestClockNs, reference);
      // The VM resumed from exactly this state: its clock went on from guestClockNs at RESUME.
      if (guestClockNs !== undefined && resumeNs !== undefined && !this.options.clockMovesAtResume) {
        this.lastResume = { resumeNs, virtualClockNs: guestClockNs };
      }
      return {
        epoch,
        stopNs: stopNs!,
        resumeNs: resumeNs ?? stopNs!,
        bytes: ack.bytes,
        durationMs: settledAt - started,
        migrateMs,
        phasesMs: {
          prepare: preparedAt - started,
          migrate: migratedAt - preparedAt,
          ack: ackedAt - migratedAt,
          settle: settledAt - ackedAt,
        },
        qemuDowntimeMs: info.downtime,
        base: base?.epoch,
        frozeAt,
      };
    } catch (error) {
      // The primary VM must keep running whatever happened to the backup or the link.
      await qmp.execute('migrate_cancel').catch(() => undefined);
      // nor may a clock compensation armed for this checkpoint's resume apply to a later pause
      await this.options.afterFailure?.().catch(() => undefined);
      // armed actions that never ran must not run at some later stop
      if (disks || output) await qmp.execute(ARM_STOP_ACTIONS, { actions: [] }).catch(() => undefined);
      await disks?.settle(false).catch(() => undefined);
      if (leaveStopped && this.selfResuming) {
        await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: SELF_RESUME_CAPABILITY, state: true }] }).catch(() => undefined);
      }
      await this.ensureRunning();
      throw error;
    } finally {
      clearTimeout(deadline);
      unsubscribe();
      unwatchClose();
    }
  }

  async close(): Promise<void> {
    await this.socket.close();
  }

  /** When this checkpoint's clock froze (see CheckpointResult.frozeAt). */
  private frozeAt(stopEventNs: bigint, guestClockNs: bigint | undefined, reference: VirtualClockReference | undefined): StopInstant {
    if (this.options.clockMovesAtResume) return { stopNs: stopEventNs, source: 'stop-event', rejected: 'the clock is moved at resume (in-place correction)' };
    if (guestClockNs === undefined) return { stopNs: stopEventNs, source: 'stop-event', rejected: 'the backup found no timer section in the stream' };
    return stopInstantFromClock(guestClockNs, { stopEventNs, ...(reference ? { reference } : {}) });
  }

  /** The checkpoint this one may build on: the last one acknowledged, over the same channel. */
  private baseFor(sender: ReplicationSender): ChainTip | undefined {
    const tip = this.tip;
    if (!this.incremental || !tip || tip.sender !== sender || !sender.isOpen) return undefined;
    return tip.length < (this.options.fullEvery ?? Infinity) ? tip : undefined;
  }

  /**
   * An increment goes in one pass and then stops (x-ftvm-single-pass): under heavy dirtying,
   * precopy rounds would resend pages and outgrow both the interval and the guest's RAM; the pause
   * then carries what the pass left dirty. A full checkpoint iterates as usual, so its pause stays
   * short.
   */
  private async setSinglePass(on: boolean): Promise<void> {
    if (!this.singlePassAvailable || this.singlePassOn === on) return;
    await this.options.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: SINGLE_PASS_CAPABILITY, state: on }] });
    this.singlePassOn = on;
  }

  /** Makes QEMU's next migration send every page (turning the capability off drops its dirty log). */
  private async dropQemuBase(): Promise<void> {
    const { qmp } = this.options;
    await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: INCREMENTAL_CAPABILITY, state: false }] });
    await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: INCREMENTAL_CAPABILITY, state: true }] });
    this.qemuMayHoldBase = false;
  }

  private async resume(): Promise<void> {
    if (this.options.mayResume?.() === false) return;
    if (!this.selfResuming) {
      await this.options.beforeResume?.();
      // QEMU emits `completed` a moment before it finalizes; a `cont` in between is refused
      // ("Migration is not finalized yet") and ensureRunning retries it.
      await this.options.qmp.execute('cont').catch((error: Error) => {
        if (!/not finalized/i.test(error.message)) throw error;
      });
    }
    await this.ensureRunning();
  }

  /**
   * `cont` can land between QEMU's completed event and its switch to `postmigrate`, which then
   * overwrites `running`; a second `cont` repairs that. Also the safety net after a failure.
   */
  private async ensureRunning(): Promise<void> {
    for (let attempt = 0; attempt < 5; attempt++) {
      if (this.options.mayResume?.() === false) return; // fenced: stopped is where it belongs
      const { status } = await this.options.qmp.execute<{ status: string }>('query-status');
      if (status === 'running') return;
      if (status === 'postmigrate' || status === 'paused' || status === 'finish-migrate') {
        if (status !== 'finish-migrate') await this.options.qmp.execute('cont').catch(() => undefined);
      }
      await new Promise((r) => setTimeout(r, 5 * (attempt + 1)));
    }
    throw new Error(`VM ${this.options.vm} is not running after the checkpoint`);
  }
}
