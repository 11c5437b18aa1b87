import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { pipeline } from 'node:stream/promises';
import { QmpClient, type QmpEvent } from '@ftvm/qmp';
import type { LibvirtConnection } from './connection.js';
import { DomainExistsError } from './errors.js';
import { setIncomingDefer } from './xml/ft-ready.js';
import { readProtection } from './xml/protection.js';
import { childElement, parseDomainXml, textOf } from './xml/dom.js';

/**
 * Writes the migration stream into QEMU's incoming socket. It may hold back or rewrite any part
 * (the clock code rewrites device state at the very end); it must end the socket, or resolve and
 * let restore end it.
 */
export type StreamWriter = (socket: net.Socket, checkpoint: string) => Promise<void>;

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
   * - `libvirt` (default): once loaded, resume through libvirt (virDomainResume);
   * - `autostart`: QMP `cont` before the stream goes in, so QEMU resumes the instant the load
   *   completes (the shortest gap; libvirt learns of it from QEMU's RESUME event);
   * - `paused`: leave it paused;
   * - a function: called with ftvm's QMP the moment the load completes (before libvirt's definition
   *   is tidied up); it resumes the VM itself (e.g. at a scheduled instant) and returns QEMU's
   *   RESUME stamp.
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
}

/** A restore failed; `stage` says where. The domain was destroyed and undefined again. */
export class RestoreError extends Error {
  override name = 'RestoreError';
  constructor(
    readonly domain: string,
    readonly stage: string,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(`restore of '${domain}' failed at ${stage}: ${message}`, options);
  }
}

export const defaultStreamWriter: StreamWriter = (socket, checkpoint) => pipeline(fs.createReadStream(checkpoint), socket);

/** Everything of a restore but the checkpoint: the domain, how to reach it, deadlines. */
export type PrepareOptions = Omit<RestoreOptions, 'checkpoint' | 'writeStream' | 'resume'>;

/** What `load` needs: the checkpoint and how to send it and resume. */
export type LoadOptions = Pick<RestoreOptions, 'checkpoint' | 'writeStream' | 'resume' | 'timeoutMs'>;

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
      );
    } catch (error) {
      await qmp?.close().catch(() => undefined);
      if (defined) await conn.remove(name, { timeoutMs: 15_000 }).catch(() => undefined);
      for (const p of cleanupPaths) fs.rmSync(p, { force: true });
      throw new RestoreError(name, stage, (error as Error).message, { cause: error });
    }
  }

  /** The standby QEMU still waits (its QMP is open). */
  get usable(): boolean {
    return !this.used && this.qmp.isOpen;
  }

  /** Streams the checkpoint in and resumes as asked. Once only; on failure the domain is removed. */
  async load(options: LoadOptions): Promise<RestoreResult> {
    if (this.used) throw new RestoreError(this.name, 'stream', 'this prepared domain was already used');
    this.used = true;
    const { conn, qmp, name } = this;
    const t0 = performance.now();
    const timeoutMs = options.timeoutMs ?? 120_000;
    const deadline = t0 + timeoutMs;
    const remaining = () => Math.max(1, Math.round(deadline - performance.now()));
    const mark = () => performance.now();
    let stage = 'stream';
    try {
      if (!fs.existsSync(options.checkpoint)) throw new Error(`checkpoint ${options.checkpoint} does not exist`);
      const completed = qmp.waitForEvent<{ status: string }>('MIGRATION', {
        timeoutMs: remaining(),
        predicate: (e) => e.data.status === 'completed' || e.data.status === 'failed' || e.data.status === 'cancelled',
      });
      completed.catch(() => undefined);
      let resumed: Promise<QmpEvent> | undefined;
      if (options.resume === 'autostart') {
        resumed = qmp.waitForEvent('RESUME', { timeoutMs: remaining() });
        resumed.catch(() => undefined);
        await qmp.execute('cont', undefined, { timeoutMs: remaining() }); // while in migration: autostart when loaded
      }

      const tLoad = mark();
      const socket = await connectSocket(this.incomingPath, remaining());
      const writer = options.writeStream ?? defaultStreamWriter;
      const writing = writer(socket, options.checkpoint).then(() => {
        if (!socket.writableEnded) socket.end();
      });
      const outcome = await Promise.race([
        completed,
        writing.then(() => completed),
        new Promise<never>((_, reject) => setTimeout(() => reject(new Error(`no MIGRATION completed within ${timeoutMs} ms`)), remaining()).unref()),
      ]);
      const bytes = socket.bytesWritten;
      if (outcome.data.status !== 'completed') {
        const info = (await qmp.execute<{ 'error-desc'?: string }>('query-migrate', undefined, { timeoutMs: 2_000 }).catch(() => ({}))) as { 'error-desc'?: string };
        throw new Error(`incoming migration ${outcome.data.status}${info['error-desc'] ? `: ${info['error-desc']}` : ''}`);
      }
      await writing.catch(() => undefined); // QEMU has all it needs; a writer still flushing may see EPIPE
      socket.destroy();
      const tLoaded = mark();
      this.log(`${name}: ${bytes} bytes loaded in ${Math.round(tLoaded - tLoad)} ms`);

      stage = 'resume';
      let resumedNs: bigint | undefined;
      if (typeof options.resume === 'function') {
        resumedNs = await options.resume(qmp);
        await conn.waitForState(name, 'running', { timeoutMs: remaining() });
      } else if (options.resume === 'autostart') {
        resumedNs = (await resumed!).timestampNs;
        await conn.waitForState(name, 'running', { timeoutMs: remaining() });
      } else if (options.resume !== 'paused') {
        const resumeEvent = qmp.waitForEvent('RESUME', { timeoutMs: remaining() });
        resumeEvent.catch(() => undefined);
        await conn.resume(name, { timeoutMs: remaining() });
        resumedNs = (await resumeEvent).timestampNs;
      }
      const tEnd = mark();

      // the persistent definition must not keep the one-off -incoming defer (a later plain start would
      // wait for a stream forever); redefining a running domain changes only its inactive config
      stage = 'persist';
      const inactive = await conn.xml(name, { inactive: true, timeoutMs: remaining() });
      await conn.define(setIncomingDefer(inactive, false), { timeoutMs: remaining() });
      const tPersist = mark();
      const prepared = this.prepareTimings;
      return {
        name,
        uuid: this.uuid,
        bytes,
        completedNs: outcome.timestampNs,
        ...(resumedNs !== undefined ? { resumedNs } : {}),
        timings: {
          ...prepared,
          loadMs: round(tLoaded - tLoad),
          resumeMs: round(tEnd - tLoaded),
          totalMs: round(prepared.defineMs + prepared.startMs + prepared.qmpMs + (tEnd - tLoad)),
          persistMs: round(tPersist - tEnd),
        },
        qmp,
      };
    } catch (error) {
      await this.discard();
      throw new RestoreError(name, stage, (error as Error).message, { cause: error });
    }
  }

  /** Destroys and undefines the domain (nothing ran in it unless load resumed it). */
  async discard(): Promise<void> {
    this.used = true;
    await this.qmp.close().catch(() => undefined);
    await this.conn.remove(this.name, { timeoutMs: 15_000 }).catch(() => undefined);
    for (const p of this.cleanupPaths) fs.rmSync(p, { force: true });
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

async function connectSocket(socketPath: string, timeoutMs: number): Promise<net.Socket> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    try {
      return await new Promise<net.Socket>((resolve, reject) => {
        const socket = net.connect(socketPath);
        socket.once('connect', () => {
          socket.off('error', reject);
          resolve(socket);
        });
        socket.once('error', reject);
      });
    } catch (error) {
      if (performance.now() > deadline) throw new Error(`cannot connect to ${socketPath} within ${timeoutMs} ms: ${(error as Error).message}`);
      await new Promise((r) => setTimeout(r, 10));
    }
  }
}
