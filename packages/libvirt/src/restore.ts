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

/**
 * Brings a VM up as a normal libvirt domain from a checkpoint: define the domain with
 * `-incoming defer`, start it paused, `migrate-incoming unix:<runDir>/<name>.incoming` on ftvm's
 * QMP socket, stream the checkpoint into that socket from Node, wait for MIGRATION completed,
 * resume. (libvirt runs QEMU with `-sandbox …,spawn=deny`, so an `exec:` URI is not an option.)
 */
export async function restoreFromCheckpoint(options: RestoreOptions): Promise<RestoreResult> {
  const t0 = performance.now();
  const timeoutMs = options.timeoutMs ?? 120_000;
  const deadline = t0 + timeoutMs;
  const remaining = () => Math.max(1, Math.round(deadline - performance.now()));
  const hostPath = options.hostPath ?? ((p: string) => p);
  const log = options.log ?? (() => undefined);
  const conn = options.connection;

  const protection = readProtection(options.xml);
  const name = textOf(childElement(parseDomainXml(options.xml).documentElement!, 'name')) ?? '';
  if (!protection) throw new RestoreError(name, 'prepare', 'the domain XML carries no ftvm metadata (run it through makeFtReady)');
  if (!fs.existsSync(options.checkpoint)) throw new RestoreError(name, 'prepare', `checkpoint ${options.checkpoint} does not exist`);
  const incomingOnHost = path.posix.join(protection.runDir, `${name}.incoming`);
  if (Buffer.byteLength(hostPath(incomingOnHost)) > 107) throw new RestoreError(name, 'prepare', `socket path ${hostPath(incomingOnHost)} is too long for a unix socket`);

  if (await conn.exists(name, { timeoutMs: remaining() })) {
    if (!options.replace) throw new DomainExistsError('restore', name, conn.uri, 'a domain of that name already exists (pass replace to take its place)');
    await conn.remove(name, { timeoutMs: remaining() });
  }
  fs.mkdirSync(hostPath(protection.runDir), { recursive: true });
  for (const p of [protection.qmpSocket, incomingOnHost]) fs.rmSync(hostPath(p), { force: true });

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
    qmp = await connectQmp(hostPath(protection.qmpSocket), remaining());
    await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] }, { timeoutMs: remaining() });
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
    await qmp.execute('migrate-incoming', { uri: `unix:${incomingOnHost}` }, { timeoutMs: remaining() });

    stage = 'stream';
    const tLoad = mark();
    const socket = await connectSocket(hostPath(incomingOnHost), remaining());
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
    log(`${name}: ${bytes} bytes loaded in ${Math.round(tLoaded - tLoad)} ms`);

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
    return {
      name,
      uuid,
      bytes,
      completedNs: outcome.timestampNs,
      ...(resumedNs !== undefined ? { resumedNs } : {}),
      timings: {
        defineMs: round(tStart - tDefine),
        startMs: round(tQmp - tStart),
        qmpMs: round(tLoad - tQmp),
        loadMs: round(tLoaded - tLoad),
        resumeMs: round(tEnd - tLoaded),
        totalMs: round(tEnd - tDefine),
        persistMs: round(tPersist - tEnd),
      },
      qmp,
    };
  } catch (error) {
    await qmp?.close().catch(() => undefined);
    if (defined) await conn.remove(name, { timeoutMs: 15_000 }).catch(() => undefined);
    for (const p of [protection.qmpSocket, incomingOnHost]) fs.rmSync(hostPath(p), { force: true });
    throw new RestoreError(name, stage, (error as Error).message, { cause: error });
  }
}

const round = (ms: number) => Math.round(ms * 10) / 10;

async function connectQmp(socketPath: string, timeoutMs: number): Promise<QmpClient> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    try {
      return await QmpClient.connect({ path: socketPath }, { connectTimeoutMs: Math.min(5_000, Math.max(1, deadline - performance.now())) });
    } catch (error) {
      if (performance.now() > deadline) throw new Error(`no QMP on ${socketPath} within ${timeoutMs} ms: ${(error as Error).message}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  }
}

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
