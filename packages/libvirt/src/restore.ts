import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { pipeline } from 'node:stream/promises';
import { QmpClient, type QmpEvent } from '@ftvm/qmp';
import type { LibvirtConnection } from './connection.js';
import { DomainExistsError, RestoreError } from './errors.js';
import { DEFAULT_QEMU_LOG_DIR, logOffset, qemuLogPath, qemuReasonFromLog } from './qemu-log.js';
import { setIncomingDefer } from './xml/ft-ready.js';
import { readProtection } from './xml/protection.js';
import { childElement, parseDomainXml, textOf } from './xml/dom.js';

export { RestoreError } from './errors.js';

/**
 * Writes the migration stream into QEMU's incoming socket. It may hold back or rewrite any part
 * (the clock code rewrites device state at the very end); it must end the socket, or resolve and
 * let restore end it. The socket may error or close at any time (QEMU refused the stream and
 * exited): restore listens for that itself, but a writer waiting for 'drain' must also stop
 * waiting on 'close' and 'error', or it waits until its own deadline. `qmp` is the incoming
 * QEMU's monitor (for what the writer must ask it first, e.g. the clocks its machine offers).
 */
export type StreamWriter = (socket: net.Socket, checkpoint: string, qmp: QmpClient) => Promise<void>;

/** Resumes a restored VM through its QMP; resolves with QEMU's RESUME stamp (ns, host realtime). */
export type ResumeFunction = (qmp: QmpClient) => Promise<bigint>;

export interface RestoreOptions {
  connection: LibvirtConnection;
  /** FT-ready domain XML for this host (ftvm metadata and QMP socket; makeFtReady). */
  xml: string;
  /** The checkpoint: a QEMU migration stream in a file this process can read. */
  checkpoint: string;
  /** Default: pipe the file in. */
  writeStream?: StreamWriter;
  /**
   * Maps a path as QEMU sees it on the libvirt host to one this process can open. Identity when
   * the caller runs on that host (the lab maps /run/ftvm/… to /var/lib/ftvm-lab/<host>/run/ftvm/…).
   */
  hostPath?: (pathOnHost: string) => string;
  /**
   * Where libvirt writes the per-domain QEMU logs (`<dir>/<name>.log`, QEMU's stderr), as this
   * process sees it (`hostPath` is not applied). A failed restore quotes QEMU's error lines from
   * it. Default /var/log/libvirt/qemu.
   */
  qemuLogDir?: string;
  /**
   * - `libvirt` (default): once loaded, resume through libvirt (virDomainResume);
   * - `autostart`: QMP `cont` before the stream goes in, so QEMU resumes the instant the load
   *   completes (the shortest gap; libvirt learns of it from QEMU's RESUME event);
   * - `paused`: leave it paused;
   * - a function: called with ftvm's QMP the moment the load completes (before libvirt's definition
   *   is tidied up); it resumes the VM itself (e.g. at a scheduled instant) and returns QEMU's
   *   RESUME stamp. If it throws, QEMU is asked whether the VM runs (see `load`).
   */
  resume?: 'libvirt' | 'autostart' | 'paused' | ResumeFunction;
  /** Destroy and undefine a domain of the same name first. Default false: DomainExistsError. */
  replace?: boolean;
  /** Whole restore, define to running. Default 120 s. */
  timeoutMs?: number;
  log?: (line: string) => void;
}

export interface RestoreTimings {
  /** virDomainDefineXML. */
  defineMs: number;
  /** virsh start --paused until QEMU is up (returns when libvirt has it paused, waiting). */
  startMs: number;
  /** Connect to ftvm's QMP socket, enable events, migrate-incoming. */
  qmpMs: number;
  /** First byte written to MIGRATION completed. */
  loadMs: number;
  /** Completed to running (libvirt's resume or QEMU's own autostart). */
  resumeMs: number;
  /** define → running. */
  totalMs: number;
  /** After running: the persistent definition rewritten without `-incoming defer`. */
  persistMs: number;
}

export interface RestoreResult {
  name: string;
  uuid: string;
  bytes: number;
  timings: RestoreTimings;
  /** QEMU's MIGRATION completed and RESUME event stamps (ns, host CLOCK_REALTIME). */
  completedNs: bigint;
  resumedNs?: bigint;
  /** ftvm's QMP connection to the restored VM; the caller owns it (close it when done). */
  qmp: QmpClient;
  /**
   * What went wrong after the load completed without costing the VM (past the point of no return
   * nothing is thrown and nothing destroyed): e.g. libvirt not reporting it running in time, a
   * resume function that threw although QEMU runs the VM, the persistent definition not rewritten
   * (it still has `-incoming defer`). Empty when all went well.
   */
  warnings: string[];
}

export const defaultStreamWriter: StreamWriter = (socket, checkpoint) => pipeline(fs.createReadStream(checkpoint), socket);

/** Everything of a restore but the checkpoint: the domain, how to reach it, deadlines. */
export type PrepareOptions = Omit<RestoreOptions, 'checkpoint' | 'writeStream' | 'resume'>;

/** What `load` needs: the checkpoint and how to send it and resume. */
export type LoadOptions = Pick<RestoreOptions, 'checkpoint' | 'writeStream' | 'resume' | 'timeoutMs'>;

/**
 * After our side of the stream failed (the writer threw, the socket errored or closed), how long
 * QEMU's MIGRATION event may still take to say how the load ended: QEMU closes the socket once it
 * has read the end of the stream, a writer still flushing then sees EPIPE, and the load may still
 * have completed.
 */
const STREAM_GRACE_MS = 3_000;
/** QEMU writes its reason to stderr, virtlogd appends it to the log: how long to look for it. */
const LOG_WAIT_MS = 2_000;
/** query-status / query-migrate / libvirt state when deciding what became of a failed step. */
const PROBE_TIMEOUT_MS = 3_000;

interface Loaded {
  outcome: QmpEvent<{ status: string }>;
  bytes: number;
  tLoad: number;
  tLoaded: number;
  /** With autostart: QEMU's RESUME, subscribed to before the stream went in. */
  resumed: Promise<QmpEvent> | undefined;
}

/**
 * A domain ready to receive a checkpoint: defined with `-incoming defer`, started paused, ftvm's
 * QMP connected with migration events on, `migrate-incoming unix:<runDir>/<name>.incoming`
 * listening. Nothing has run in it. A backup keeps one prepared (a warm standby) so that a
 * failover only has to send the stream; `discard` destroys and undefines it.
 */
export class PreparedRestore {
  private used = false;

  private constructor(
    readonly name: string,
    readonly uuid: string,
    private readonly conn: LibvirtConnection,
    private readonly qmp: QmpClient,
    private readonly incomingPath: string,
    private readonly cleanupPaths: string[],
    private readonly prepareTimings: { defineMs: number; startMs: number; qmpMs: number },
    private readonly log: (line: string) => void,
    private readonly logFile: string,
    private readonly hostPath: (pathOnHost: string) => string,
  ) {}

  static async prepare(options: PrepareOptions): Promise<PreparedRestore> {
    const t0 = performance.now();
    const timeoutMs = options.timeoutMs ?? 120_000;
    const deadline = t0 + timeoutMs;
    const remaining = () => Math.max(1, Math.round(deadline - performance.now()));
    const hostPath = options.hostPath ?? ((p: string) => p);
    const conn = options.connection;

    const protection = readProtection(options.xml);
    const name = textOf(childElement(parseDomainXml(options.xml).documentElement!, 'name')) ?? '';
    if (!protection) throw new RestoreError(name, 'prepare', 'the domain XML carries no ftvm metadata (run it through makeFtReady)');
    const incomingOnHost = path.posix.join(protection.runDir, `${name}.incoming`);
    if (Buffer.byteLength(hostPath(incomingOnHost)) > 107) throw new RestoreError(name, 'prepare', `socket path ${hostPath(incomingOnHost)} is too long for a unix socket`);
    const logFile = qemuLogPath(options.qemuLogDir ?? DEFAULT_QEMU_LOG_DIR, name);

    if (await conn.exists(name, { timeoutMs: remaining() })) {
      if (!options.replace) throw new DomainExistsError('restore', name, conn.uri, 'a domain of that name already exists (pass replace to take its place)');
      await conn.remove(name, { timeoutMs: remaining() });
    }
    const cleanupPaths = [protection.qmpSocket, incomingOnHost].map(hostPath);
    fs.mkdirSync(hostPath(protection.runDir), { recursive: true });
    for (const p of cleanupPaths) fs.rmSync(p, { force: true });

    let stage = 'define';
    let qmp: QmpClient | undefined;
    let defined = false;
    const logStart = logOffset(logFile); // QEMU's lines of this start come after it
    const mark = () => performance.now();
    try {
      const tDefine = mark();
      const { uuid } = await conn.define(setIncomingDefer(options.xml, true), { timeoutMs: remaining() });
      defined = true;
      stage = 'start paused';
      const tStart = mark();
      await conn.start(name, { paused: true, timeoutMs: remaining() });
      stage = 'QMP';
      const tQmp = mark();
      qmp = await QmpClient.connectWhenReady({ path: hostPath(protection.qmpSocket) }, { timeoutMs: remaining(), retryMs: 20 });
      await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] }, { timeoutMs: remaining() });
      await qmp.execute('migrate-incoming', { uri: `unix:${incomingOnHost}` }, { timeoutMs: remaining() });
      const tReady = mark();
      return new PreparedRestore(
        name,
        uuid,
        conn,
        qmp,
        hostPath(incomingOnHost),
        cleanupPaths,
        { defineMs: round(tStart - tDefine), startMs: round(tQmp - tStart), qmpMs: round(tReady - tQmp) },
        options.log ?? (() => undefined),
        logFile,
        hostPath,
      );
    } catch (error) {
      // only a QEMU that was started can have said something
      const qemuReason = stage === 'define' ? undefined : await reasonFromLog(logFile, logStart);
      await qmp?.close().catch(() => undefined);
      if (defined) await conn.remove(name, { timeoutMs: 15_000 }).catch(() => undefined);
      for (const p of cleanupPaths) fs.rmSync(p, { force: true });
      throw new RestoreError(name, stage, (error as Error).message, { cause: error, qemuReason });
    }
  }

  /**
   * The file QEMU maps the RAM block `block` from, shared (memory-backend-file with share=on, as
   * `withSharedRamFile` asks libvirt for), as this process sees it; undefined when the block is
   * not on a shared file. Writes into it are the waiting VM's memory.
   */
  async sharedRamFile(block = 'pc.ram', timeoutMs = 5_000): Promise<string | undefined> {
    const path = `/objects/${block}`;
    const type = await this.qmp.execute<string>('qom-get', { path, property: 'type' }, { timeoutMs }).catch(() => undefined);
    if (type !== 'memory-backend-file') return undefined;
    const shared = await this.qmp.execute<boolean>('qom-get', { path, property: 'share' }, { timeoutMs });
    if (!shared) return undefined;
    return this.hostPath(await this.qmp.execute<string>('qom-get', { path, property: 'mem-path' }, { timeoutMs }));
  }

  /**
   * The waiting QEMU's QMP, for what must be asked or set before the stream (its machine's clocks,
   * a migration capability). Never `cont` or `migrate-incoming` through it: `load` does.
   */
  get monitor(): QmpClient {
    return this.qmp;
  }

  /** The standby QEMU still waits (its QMP is open). */
  get usable(): boolean {
    return !this.used && this.qmp.isOpen;
  }

  /**
   * Streams the checkpoint in and resumes as asked. Once only.
   *
   * Until QEMU has loaded the whole checkpoint, a failure (the writer's, the socket's, QEMU refusing
   * the stream) removes the domain — nothing ran in it — and rejects with a RestoreError (stage
   * `stream`) carrying QEMU's reason. Once the load completed, the domain is never destroyed by a
   * failure that leaves the VM running: a resume step that throws is checked against QEMU
   * (`query-status`, bounded); if the VM runs, `load` resolves with the failure in `warnings`; only
   * a VM that does not run is removed (stage `resume`). The persistent definition's rewrite (stage
   * `persist`) only ever warns.
   */
  async load(options: LoadOptions): Promise<RestoreResult> {
    if (this.used) throw new RestoreError(this.name, 'stream', 'this prepared domain was already used');
    this.used = true;
    const { conn, qmp, name } = this;
    const t0 = performance.now();
    const timeoutMs = options.timeoutMs ?? 120_000;
    const deadline = t0 + timeoutMs;
    const remaining = () => Math.max(1, Math.round(deadline - performance.now()));
    const mark = () => performance.now();
    const logStart = logOffset(this.logFile);

    // every RESUME QEMU reports from here on: the stamp survives a resume function that throws
    let resumeSeenNs: bigint | undefined;
    const unsubscribe = qmp.onEvent((event) => {
      if (event.event === 'RESUME') resumeSeenNs ??= event.timestampNs;
    });
    try {
      let loaded: Loaded;
      try {
        loaded = await this.streamIn(options, remaining, timeoutMs);
      } catch (error) {
        throw await this.removeAndExplain('stream', error, logStart);
      }
      this.log(`${name}: ${loaded.bytes} bytes loaded in ${Math.round(loaded.tLoaded - loaded.tLoad)} ms`);

      // The point of no return: from here on the VM may run, and this may be its only copy.
      const warnings: string[] = [];
      let resumedNs: bigint | undefined;
      try {
        resumedNs = await this.resume(options.resume, loaded.resumed, remaining, warnings);
      } catch (error) {
        const running = await this.runs();
        if (running === false) throw await this.removeAndExplain('resume', error, logStart);
        if (running === undefined) {
          throw new RestoreError(name, 'resume', `${(error as Error).message}; whether the VM runs cannot be told (QMP and libvirt do not answer), so the domain was left as it is`, {
            cause: error,
          });
        }
        warnings.push(`resume: ${(error as Error).message} (QEMU runs the VM nevertheless)`);
        this.log(`${name}: ${warnings.at(-1)!}`);
        resumedNs = resumeSeenNs;
      }
      const tEnd = mark();

      // the persistent definition must not keep the one-off -incoming defer (a later plain start would
      // wait for a stream forever); redefining a running domain changes only its inactive config
      // (past the point of no return, a spent deadline still leaves these a few seconds)
      const persistMs = () => Math.max(remaining(), 10_000);
      try {
        const inactive = await conn.xml(name, { inactive: true, timeoutMs: persistMs() });
        await conn.define(setIncomingDefer(inactive, false), { timeoutMs: persistMs() });
      } catch (error) {
        warnings.push(`persist: the persistent definition still has -incoming defer (a plain start would wait for a stream): ${(error as Error).message}`);
        this.log(`${name}: ${warnings.at(-1)!}`);
      }
      const tPersist = mark();
      const prepared = this.prepareTimings;
      return {
        name,
        uuid: this.uuid,
        bytes: loaded.bytes,
        completedNs: loaded.outcome.timestampNs,
        ...(resumedNs !== undefined ? { resumedNs } : {}),
        timings: {
          ...prepared,
          loadMs: round(loaded.tLoaded - loaded.tLoad),
          resumeMs: round(tEnd - loaded.tLoaded),
          totalMs: round(prepared.defineMs + prepared.startMs + prepared.qmpMs + (tEnd - loaded.tLoad)),
          persistMs: round(tPersist - tEnd),
        },
        qmp,
        warnings,
      };
    } finally {
      unsubscribe();
    }
  }

  /** Destroys and undefines the domain (nothing ran in it unless load resumed it). */
  async discard(): Promise<void> {
    this.used = true;
    await this.qmp.close().catch(() => undefined);
    await this.conn.remove(this.name, { timeoutMs: 15_000 }).catch(() => undefined);
    for (const p of this.cleanupPaths) fs.rmSync(p, { force: true });
  }

  /** Sends the stream until QEMU's MIGRATION event says completed; throws on anything else. */
  private async streamIn(options: LoadOptions, remaining: () => number, timeoutMs: number): Promise<Loaded> {
    const { qmp } = this;
    if (!fs.existsSync(options.checkpoint)) throw new Error(`checkpoint ${options.checkpoint} does not exist`);
    const completed = qmp
      .waitForEvent<{ status: string }>('MIGRATION', {
        timeoutMs: remaining(),
        predicate: (e) => e.data.status === 'completed' || e.data.status === 'failed' || e.data.status === 'cancelled',
      })
      .catch((error: Error) => {
        throw new Error(`no end of the incoming migration from QEMU: ${error.message}`, { cause: error });
      });
    completed.catch(() => undefined);
    let resumed: Promise<QmpEvent> | undefined;
    if (options.resume === 'autostart') {
      resumed = qmp.waitForEvent('RESUME', { timeoutMs: remaining() });
      resumed.catch(() => undefined);
      await qmp.execute('cont', undefined, { timeoutMs: remaining() }); // while in migration: autostart when loaded
    }

    const tLoad = performance.now();
    const incoming = await connectSocket(this.incomingPath, remaining());
    const { socket } = incoming;
    let timer: NodeJS.Timeout | undefined;
    try {
      const writer = options.writeStream ?? defaultStreamWriter;
      const writing = Promise.resolve()
        .then(() => writer(socket, options.checkpoint, qmp))
        .then(() => {
          if (!socket.writableEnded && !socket.destroyed) socket.end();
        });
      // Our side of the stream in trouble. The socket erroring or closing (QEMU read the end of the
      // stream, or refused it and exited) only bounds the wait for QEMU's word on how the load
      // ended; a writer failing on its own (the socket intact, the stream not ended) is the cause.
      const trouble = new Promise<{ error: Error; ours: boolean }>((resolve) => {
        writing.catch((error: unknown) => {
          // the socket's listeners ran before the writer heard of a socket error: `failure` is set then
          resolve({ error: error instanceof Error ? error : new Error(String(error)), ours: !incoming.failure && !socket.writableEnded });
        });
        void incoming.gone.then((error) => resolve({ error, ours: false }));
      });
      const outcome = await Promise.race([
        completed,
        trouble.then(async ({ error, ours }) => {
          const verdict = ours ? undefined : await within(completed, STREAM_GRACE_MS).catch(() => undefined);
          if (verdict) return verdict;
          if (ours) throw new WriterFailed(`the stream writer failed: ${error.message}`, { cause: error });
          throw new Error(`the stream into QEMU broke off: ${error.message}`, { cause: error });
        }),
        new Promise<never>((_, reject) => {
          timer = setTimeout(() => reject(new Error(`no MIGRATION completed within ${timeoutMs} ms`)), remaining());
        }),
      ]);
      const bytes = socket.bytesWritten;
      if (outcome.data.status !== 'completed') throw new Error(`incoming migration ${outcome.data.status}`);
      // QEMU has all it needs; a writer still flushing may see EPIPE
      socket.destroy(new Error('QEMU has loaded the checkpoint'));
      await within(writing, STREAM_GRACE_MS).catch(() => undefined);
      return { outcome, bytes, tLoad, tLoaded: performance.now(), resumed };
    } finally {
      clearTimeout(timer);
      // with an error: a writer still waiting for 'drain' (events.once rejects on 'error', not on
      // 'close') stops waiting too; the socket's own listener keeps the error from being unhandled
      if (!socket.destroyed) socket.destroy(new Error('the restore no longer reads from this stream'));
    }
  }

  /** Resumes as asked; resolves with QEMU's RESUME stamp. libvirt lagging behind only warns. */
  private async resume(resume: LoadOptions['resume'], autostarted: Promise<QmpEvent> | undefined, remaining: () => number, warnings: string[]): Promise<bigint | undefined> {
    const { conn, qmp, name } = this;
    const libvirtSeesRunning = async () => {
      try {
        await conn.waitForState(name, 'running', { timeoutMs: remaining() });
      } catch (error) {
        warnings.push(`resume: libvirt did not report the domain running: ${(error as Error).message}`);
        this.log(`${name}: ${warnings.at(-1)!}`);
      }
    };
    if (typeof resume === 'function') {
      const resumedNs = await resume(qmp);
      await libvirtSeesRunning();
      return resumedNs;
    }
    if (resume === 'autostart') {
      const resumedNs = (await autostarted!).timestampNs;
      await libvirtSeesRunning();
      return resumedNs;
    }
    if (resume === 'paused') return undefined;
    const resumeEvent = qmp.waitForEvent('RESUME', { timeoutMs: remaining() });
    resumeEvent.catch(() => undefined);
    await conn.resume(name, { timeoutMs: remaining() });
    return (await resumeEvent).timestampNs;
  }

  /** Whether the VM runs: QEMU's query-status, else libvirt's state; undefined when neither answers. */
  private async runs(): Promise<boolean | undefined> {
    try {
      const status = await this.qmp.execute<{ running: boolean }>('query-status', undefined, { timeoutMs: PROBE_TIMEOUT_MS });
      return status.running;
    } catch {
      // QMP gone (QEMU died?) or stuck: ask libvirt
    }
    try {
      const exists = await this.conn.exists(this.name, { timeoutMs: PROBE_TIMEOUT_MS });
      return exists ? (await this.conn.state(this.name, { timeoutMs: PROBE_TIMEOUT_MS })) === 'running' : false;
    } catch {
      return undefined;
    }
  }

  /** A failure before the VM ran: gathers QEMU's reason, removes the domain, names the stage. */
  private async removeAndExplain(stage: string, error: unknown, logStart: number): Promise<RestoreError> {
    const reasons: string[] = [];
    let qemuFailed = !this.qmp.isOpen;
    // a writer's own failure is the reason; what QEMU says of the cut-off stream is only its echo
    if (error instanceof WriterFailed) {
      await this.discard();
      return new RestoreError(this.name, stage, error.message, { cause: error });
    }
    if (!qemuFailed) {
      const info = await this.qmp.execute<{ status?: string; 'error-desc'?: string }>('query-migrate', undefined, { timeoutMs: PROBE_TIMEOUT_MS }).catch(() => undefined);
      if (info?.['error-desc']) reasons.push(info['error-desc']);
      qemuFailed = info?.status === 'failed' || !this.qmp.isOpen;
    }
    // a QEMU that failed (or died) is writing its reason right now; one that still waits has none
    const fromLog = qemuFailed ? await reasonFromLog(this.logFile, logStart) : qemuReasonFromLog(this.logFile, logStart);
    if (fromLog) reasons.push(fromLog);
    await this.discard();
    const qemuReason = reasons.length ? reasons.join('; ') : undefined;
    return new RestoreError(this.name, stage, (error as Error).message, { cause: error, qemuReason });
  }
}

/**
 * Brings a VM up as a normal libvirt domain from a checkpoint: define the domain with
 * `-incoming defer`, start it paused, `migrate-incoming unix:<runDir>/<name>.incoming` on ftvm's
 * QMP socket, stream the checkpoint into that socket from Node, wait for MIGRATION completed,
 * resume. (libvirt runs QEMU with `-sandbox …,spawn=deny`, so an `exec:` URI is not an option.)
 */
export async function restoreFromCheckpoint(options: RestoreOptions): Promise<RestoreResult> {
  const name = textOf(childElement(parseDomainXml(options.xml).documentElement!, 'name')) ?? '';
  if (!fs.existsSync(options.checkpoint)) throw new RestoreError(name, 'prepare', `checkpoint ${options.checkpoint} does not exist`);
  const started = performance.now();
  const prepared = await PreparedRestore.prepare(options);
  const timeoutMs = options.timeoutMs ?? 120_000;
  return prepared.load({ ...options, timeoutMs: Math.max(1, Math.round(timeoutMs - (performance.now() - started))) });
}

const round = (ms: number) => Math.round(ms * 10) / 10;

/** The stream writer failed by itself (the socket intact, the stream not ended). */
class WriterFailed extends Error {
  override name = 'WriterFailed';
}

/** Resolves with `promise`, or undefined after `ms`. */
async function within<T>(promise: Promise<T>, ms: number): Promise<T | undefined> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([promise, new Promise<undefined>((resolve) => (timer = setTimeout(() => resolve(undefined), ms)))]);
  } finally {
    clearTimeout(timer);
  }
}

/** QEMU's error lines written to its log since `offset`, waiting a little for them to arrive. */
async function reasonFromLog(file: string, offset: number): Promise<string | undefined> {
  const until = performance.now() + LOG_WAIT_MS;
  for (;;) {
    const reason = qemuReasonFromLog(file, offset);
    if (reason || performance.now() >= until) return reason;
    await new Promise((r) => setTimeout(r, 100));
  }
}

/**
 * Connects to QEMU's incoming socket (retrying until it listens). The socket keeps an 'error'
 * listener for its whole life — QEMU refusing the stream resets it (ECONNRESET, EPIPE), and an
 * 'error' without a listener would kill the process. `failure` is the first error (or the close)
 * as soon as it happens; `gone` resolves with it.
 */
async function connectSocket(socketPath: string, timeoutMs: number): Promise<{ socket: net.Socket; gone: Promise<Error>; readonly failure: Error | undefined }> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    try {
      return await new Promise((resolve, reject) => {
        const socket = net.connect(socketPath);
        socket.on('error', reject); // a failed attempt may report more than once
        socket.once('connect', () => {
          socket.off('error', reject);
          let failure: Error | undefined;
          const gone = new Promise<Error>((settle) => {
            socket.on('error', (error) => settle((failure ??= error)));
            socket.once('close', () => settle((failure ??= new Error('QEMU closed the incoming socket'))));
          });
          resolve({
            socket,
            gone,
            get failure() {
              return failure;
            },
          });
        });
      });
    } catch (error) {
      if (performance.now() > deadline) throw new Error(`cannot connect to ${socketPath} within ${timeoutMs} ms: ${(error as Error).message}`);
      await new Promise((r) => setTimeout(r, 10));
    }
  }
}
