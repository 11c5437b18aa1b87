import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import type { ZodType } from 'zod';
import { ControlError, type AgentControl, type Progress } from '../agent/control.js';
import type { Logger } from '../log/logger.js';
import {
  describeIssues,
  emptyBodySchema,
  JSON_TYPE,
  MAX_BODY_BYTES,
  NDJSON,
  protectBodySchema,
  reprotectBodySchema,
  STATUS_PATH,
  vmNameSchema,
  type StreamLine,
  type VmOperation,
  type WireError,
} from './protocol.js';

export interface ControlServerOptions {
  socketPath: string;
  control: AgentControl;
  log: Logger;
  /** A client must send its whole request within this (default 10 s); answers may take longer. */
  requestTimeoutMs?: number;
  /** close() waits this long for running operations' streams before cutting them (default 2 s). */
  closeGraceMs?: number;
}

export interface ControlServer {
  readonly socketPath: string;
  /** Stops accepting requests, waits up to closeGraceMs for open streams, removes the socket. */
  close(): Promise<void>;
}

/** Routes `POST /v1/vms/:vm/<operation>` and `GET /v1/vms/:vm/drift`. */
const VM_ROUTE = /^\/v1\/vms\/([^/]+)\/([a-z]+)$/;

/** Validates an operation's body (a RequestError 400 naming the field) and returns the call to start. */
type StartOperation = (control: AgentControl, vm: string, body: unknown) => (progress: Progress) => Promise<unknown>;
const OPERATIONS: Record<VmOperation, StartOperation> = {
  protect: (control, vm, body) => {
    const { backup, checkpointIntervalMs, outputCommit, fullEvery } = validate(protectBodySchema, body);
    const request = { vm, backup, ...(checkpointIntervalMs === undefined ? {} : { checkpointIntervalMs }), ...(outputCommit === undefined ? {} : { outputCommit }), ...(fullEvery === undefined ? {} : { fullEvery }) };
    return (progress) => control.protect(request, progress);
  },
  unprotect: (control, vm, body) => {
    validate(emptyBodySchema, body);
    return (progress) => control.unprotect(vm, progress);
  },
  switchover: (control, vm, body) => {
    validate(emptyBodySchema, body);
    return (progress) => control.switchover(vm, progress);
  },
  reprotect: (control, vm, body) => {
    const { backup } = validate(reprotectBodySchema, body);
    return (progress) => control.reprotect(vm, backup, progress);
  },
  checkpoint: (control, vm, body) => {
    validate(emptyBodySchema, body);
    return () => control.checkpointNow(vm);
  },
};

class RequestError extends Error {
  constructor(
    message: string,
    readonly status: number,
  ) {
    super(message);
  }
}

/**
 * Serves an AgentControl as the control API (see protocol.ts) on a unix socket that only its
 * owner may use (mode 0600). A stale socket left by a dead agent is replaced; a live one is not.
 */
export async function startControlServer(options: ControlServerOptions): Promise<ControlServer> {
  const { socketPath, control } = options;
  const log = options.log.child({ component: 'control-api' });
  const requestTimeoutMs = options.requestTimeoutMs ?? 10_000;
  await removeStaleSocket(socketPath);
  fs.mkdirSync(path.dirname(socketPath), { recursive: true, mode: 0o755 });

  const server = http.createServer({ requestTimeout: requestTimeoutMs, headersTimeout: requestTimeoutMs }, (req, res) => {
    const started = Date.now();
    res.on('finish', () => log.debug({ method: req.method, url: req.url, status: res.statusCode, ms: Date.now() - started }, 'control request'));
    handle(req, res).catch((error: unknown) => {
      // Only a bug in this module gets here: answer if the response has not started.
      log.error({ err: error, method: req.method, url: req.url }, 'control request handler failed');
      if (!res.headersSent) sendJson(res, 500, { error: { message: (error as Error).message, status: 500 } });
      else res.destroy();
    });
  });

  async function handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://agent');
    try {
      if (url.pathname === STATUS_PATH) {
        allow(req, 'GET');
        return await answerJson(res, () => control.status());
      }
      const match = VM_ROUTE.exec(url.pathname);
      if (!match) throw new RequestError(`no route ${req.method} ${url.pathname}`, 404);
      const [, rawVm = '', action = ''] = match;
      if (action === 'drift') {
        allow(req, 'GET');
        const vm = parseVm(rawVm);
        return await answerJson(res, () => control.drift(vm));
      }
      if (!Object.hasOwn(OPERATIONS, action)) throw new RequestError(`no route ${req.method} ${url.pathname}`, 404);
      allow(req, 'POST');
      const vm = parseVm(rawVm);
      const start = OPERATIONS[action as VmOperation](control, vm, await readJsonBody(req));
      return await answerStream(res, vm, action, start);
    } catch (error) {
      if (error instanceof RequestError) {
        req.resume();
        return sendJson(res, error.status, { error: { message: error.message, status: error.status } });
      }
      throw error;
    }
  }

  async function answerJson(res: http.ServerResponse, query: () => Promise<unknown>): Promise<void> {
    try {
      sendJson(res, 200, await invoke(query));
    } catch (error) {
      const wire = toWireError(error);
      sendJson(res, wire.status, { error: wire });
    }
  }

  /** 200 and the NDJSON stream at once, so the client knows the agent took the operation. */
  async function answerStream(res: http.ServerResponse, vm: string, action: string, start: (progress: Progress) => Promise<unknown>): Promise<void> {
    res.writeHead(200, { 'Content-Type': NDJSON, 'Cache-Control': 'no-store', 'X-Content-Type-Options': 'nosniff' });
    res.flushHeaders();
    let ended = false;
    const write = (line: StreamLine<unknown>) => {
      if (ended || res.destroyed) return;
      res.write(`${JSON.stringify(line)}\n`);
    };
    res.on('close', () => {
      if (!ended) log.info({ vm, action }, 'control client went away; the operation goes on');
    });
    log.info({ vm, action }, 'operation requested');
    try {
      const result = await invoke(() => start((event) => write({ progress: event })));
      write({ result });
      log.info({ vm, action }, 'operation done');
    } catch (error) {
      const wire = toWireError(error);
      write({ error: wire });
      log.warn({ vm, action, status: wire.status, err: error }, 'operation failed');
    }
    ended = true;
    res.end();
  }

  function toWireError(error: unknown): WireError {
    if (error instanceof ControlError) return { message: error.message, status: error.status };
    log.error({ err: error }, 'control operation threw an unexpected error');
    return { message: error instanceof Error ? error.message : String(error), status: 500 };
  }

  await listenPrivately(server, socketPath);
  log.info({ socketPath }, 'control API listening');

  let closing: Promise<void> | undefined;
  return {
    socketPath,
    close: () =>
      (closing ??= new Promise<void>((resolve) => {
        const grace = setTimeout(() => server.closeAllConnections(), options.closeGraceMs ?? 2_000);
        server.close(() => {
          clearTimeout(grace);
          fs.rmSync(socketPath, { force: true });
          resolve();
        });
        server.closeIdleConnections();
      })),
  };
}

/** Calls synchronously-throwing implementations the same way as rejecting ones. */
function invoke<T>(fn: () => Promise<T>): Promise<T> {
  return Promise.resolve().then(fn);
}

function allow(req: http.IncomingMessage, method: 'GET' | 'POST'): void {
  if (req.method !== method) throw new RequestError(`${req.method} not allowed on ${req.url} (use ${method})`, 405);
}

function parseVm(raw: string): string {
  let vm: string;
  try {
    vm = decodeURIComponent(raw);
  } catch {
    throw new RequestError(`vm: not a valid URL-encoded name`, 400);
  }
  const checked = vmNameSchema.safeParse(vm);
  if (!checked.success) throw new RequestError(`vm: '${vm}' is not ${checked.error.issues[0]?.message ?? 'a valid name'}`, 400);
  return vm;
}

function validate<T>(schema: ZodType<T>, body: unknown): T {
  const checked = schema.safeParse(body);
  if (!checked.success) throw new RequestError(`invalid request body: ${describeIssues(checked.error)}`, 400);
  return checked.data;
}

/** The body as JSON; an empty body is `{}`. An oversized body is drained (not read) and refused with 413. */
function readJsonBody(req: http.IncomingMessage): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    req.on('data', (chunk: Buffer) => {
      size += chunk.length;
      if (size <= MAX_BODY_BYTES) chunks.push(chunk);
    });
    req.once('error', (error) => reject(new RequestError(`reading the request body failed: ${error.message}`, 400)));
    req.once('end', () => {
      if (size > MAX_BODY_BYTES) return reject(new RequestError(`request body over ${MAX_BODY_BYTES} bytes`, 413));
      const text = Buffer.concat(chunks).toString('utf8').trim();
      if (!text) return resolve({});
      try {
        resolve(JSON.parse(text));
      } catch (error) {
        reject(new RequestError(`invalid request body: not JSON (${(error as Error).message})`, 400));
      }
    });
  });
}

function sendJson(res: http.ServerResponse, status: number, value: unknown): void {
  const body = `${JSON.stringify(value)}\n`;
  res.writeHead(status, { 'Content-Type': JSON_TYPE, 'Content-Length': Buffer.byteLength(body), 'Cache-Control': 'no-store' });
  res.end(body);
}

/**
 * A socket file left by an agent that died is removed; one that still accepts connections means
 * another agent is running, and anything that is not a socket is not ours to delete.
 */
/** Removes a socket a dead process left at `socketPath`; refuses a live one or a non-socket. */
export async function removeStaleSocket(socketPath: string): Promise<void> {
  let stat: fs.Stats;
  try {
    stat = fs.lstatSync(socketPath);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw error;
  }
  if (!stat.isSocket()) throw new Error(`${socketPath} exists and is not a socket; refusing to replace it`);
  const probe = await new Promise<'live' | 'stale' | NodeJS.ErrnoException>((resolve) => {
    const socket = net.connect(socketPath);
    const timer = setTimeout(() => {
      socket.destroy();
      resolve('live'); // something holds it and does not answer: leave it alone
    }, 1_000);
    socket.once('connect', () => {
      clearTimeout(timer);
      socket.destroy();
      resolve('live');
    });
    socket.once('error', (error: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      resolve(error.code === 'ECONNREFUSED' || error.code === 'ENOENT' ? 'stale' : error);
    });
  });
  if (probe === 'live') throw new Error(`another process is serving ${socketPath} (is an ftvm agent already running?)`);
  if (probe !== 'stale') throw new Error(`cannot tell whether ${socketPath} is in use: ${probe.code ?? probe.message}`, { cause: probe });
  fs.rmSync(socketPath, { force: true });
}

/** Listens with umask 0177 where the process allows it, so the socket is never group/world-usable, then chmods to be sure. */
async function listenPrivately(server: http.Server, socketPath: string): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    const onError = (error: NodeJS.ErrnoException) => reject(new Error(`control API cannot listen on ${socketPath}: ${error.code ?? error.message}`, { cause: error }));
    server.once('error', onError);
    let previousUmask: number | undefined;
    try {
      previousUmask = process.umask(0o177);
    } catch {
      // worker threads cannot change the umask; the chmod below still applies
    }
    try {
      server.listen(socketPath, () => {
        server.off('error', onError);
        resolve();
      });
    } finally {
      if (previousUmask !== undefined) process.umask(previousUmask);
    }
  });
  fs.chmodSync(socketPath, 0o600);
}
