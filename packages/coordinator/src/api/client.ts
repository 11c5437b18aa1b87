import http from 'node:http';
import {
  ControlError,
  type AgentControl,
  type AgentStatus,
  type CheckpointNowResult,
  type DriftReport,
  type Progress,
  type ProtectRequest,
  type SwitchoverResult,
  type VmStatus,
} from '../agent/control.js';
import { JSON_TYPE, NDJSON, parseStreamLine, STATUS_PATH, vmPath, wireErrorSchema, type ProtectBody, type ReprotectBody } from './protocol.js';

/** No agent answers on the socket: not running, not ours to use, or hung. The CLI exits 3. */
export class AgentUnreachableError extends Error {
  override name = 'AgentUnreachableError';
  constructor(
    message: string,
    readonly socketPath: string,
    readonly code: string | undefined,
  ) {
    super(message);
  }
}

/** The agent took the request but its answer did not complete in time; the operation may still be running. */
export class ControlTimeoutError extends Error {
  override name = 'ControlTimeoutError';
}

/** The agent answered something that is not the control API (another version, or not an agent). */
export class ControlProtocolError extends Error {
  override name = 'ControlProtocolError';
}

export interface ControlClientOptions {
  socketPath: string;
  /** Deadline of queries: status, drift (default 10 s). */
  queryTimeoutMs?: number;
  /** Deadline of checkpoint-now (default 2 min: with stock QEMU a checkpoint copies all guest memory). */
  checkpointTimeoutMs?: number;
  /** Deadline of protect, unprotect, switchover, reprotect (default 15 min). */
  operationTimeoutMs?: number;
}

export interface CallOptions {
  /** This call's deadline, instead of the client's default for its kind. */
  timeoutMs?: number;
}

/** An answer (or one NDJSON line) longer than this is not the control API. */
const MAX_ANSWER_CHARS = 16 * 1024 * 1024;

const CONTROL_STATUSES = new Set([400, 404, 409, 500, 503] as const);
type ControlStatus = ControlError['status'];
const controlStatus = (status: number): ControlStatus =>
  CONTROL_STATUSES.has(status as ControlStatus) ? (status as ControlStatus) : status >= 500 ? 500 : 400;

/**
 * The control API's client: an AgentControl whose agent is behind the unix socket. Failures of the
 * operation come back as ControlError (with the agent's status); failing to reach the agent as
 * AgentUnreachableError; a deadline passing mid-answer as ControlTimeoutError.
 */
export class ControlClient implements AgentControl {
  readonly socketPath: string;
  private readonly queryTimeoutMs: number;
  private readonly checkpointTimeoutMs: number;
  private readonly operationTimeoutMs: number;

  constructor(options: ControlClientOptions) {
    this.socketPath = options.socketPath;
    this.queryTimeoutMs = options.queryTimeoutMs ?? 10_000;
    this.checkpointTimeoutMs = options.checkpointTimeoutMs ?? 120_000;
    this.operationTimeoutMs = options.operationTimeoutMs ?? 15 * 60_000;
  }

  status(options: CallOptions = {}): Promise<AgentStatus> {
    return this.request<AgentStatus>('GET', STATUS_PATH, undefined, undefined, options.timeoutMs ?? this.queryTimeoutMs);
  }

  protect(request: ProtectRequest, progress?: Progress, options: CallOptions = {}): Promise<VmStatus> {
    const body: ProtectBody = {
      backup: request.backup,
      ...(request.checkpointIntervalMs === undefined ? {} : { checkpointIntervalMs: request.checkpointIntervalMs }),
      ...(request.outputCommit === undefined ? {} : { outputCommit: request.outputCommit }),
      ...(request.fullEvery === undefined ? {} : { fullEvery: request.fullEvery }),
    };
    return this.request<VmStatus>('POST', vmPath(request.vm, 'protect'), body, progress, options.timeoutMs ?? this.operationTimeoutMs);
  }

  unprotect(vm: string, progress?: Progress, options: CallOptions = {}): Promise<VmStatus> {
    return this.request<VmStatus>('POST', vmPath(vm, 'unprotect'), {}, progress, options.timeoutMs ?? this.operationTimeoutMs);
  }

  switchover(vm: string, progress?: Progress, options: CallOptions = {}): Promise<SwitchoverResult> {
    return this.request<SwitchoverResult>('POST', vmPath(vm, 'switchover'), {}, progress, options.timeoutMs ?? this.operationTimeoutMs);
  }

  reprotect(vm: string, backup: string | undefined, progress?: Progress, options: CallOptions = {}): Promise<VmStatus> {
    const body: ReprotectBody = backup === undefined ? {} : { backup };
    return this.request<VmStatus>('POST', vmPath(vm, 'reprotect'), body, progress, options.timeoutMs ?? this.operationTimeoutMs);
  }

  checkpointNow(vm: string, options: CallOptions = {}): Promise<CheckpointNowResult> {
    return this.request<CheckpointNowResult>('POST', vmPath(vm, 'checkpoint'), {}, undefined, options.timeoutMs ?? this.checkpointTimeoutMs);
  }

  drift(vm: string, options: CallOptions = {}): Promise<DriftReport> {
    return this.request<DriftReport>('GET', vmPath(vm, 'drift'), undefined, undefined, options.timeoutMs ?? this.queryTimeoutMs);
  }

  private request<T>(method: 'GET' | 'POST', path: string, body: object | undefined, progress: Progress | undefined, timeoutMs: number): Promise<T> {
    const what = `${method} ${path}`;
    const payload = body === undefined ? undefined : JSON.stringify(body);
    return new Promise<T>((resolve, reject) => {
      let answered = false;
      let settled = false;
      const settle = (error: Error | undefined, value?: T) => {
        if (settled) return;
        settled = true;
        clearTimeout(deadline);
        req.destroy();
        if (error) reject(error);
        else resolve(value as T);
      };
      const deadline = setTimeout(() => {
        settle(
          answered
            ? new ControlTimeoutError(`${what}: no result from the ftvm agent at ${this.socketPath} within ${timeoutMs} ms (the operation may still be running there; see \`ftvm status\`)`)
            : new AgentUnreachableError(`the ftvm agent at ${this.socketPath} did not answer ${what} within ${timeoutMs} ms`, this.socketPath, 'ETIMEDOUT'),
        );
      }, timeoutMs);

      const req = http.request({
        socketPath: this.socketPath,
        method,
        path,
        agent: false,
        headers: { Accept: `${NDJSON}, ${JSON_TYPE}`, ...(payload === undefined ? {} : { 'Content-Type': JSON_TYPE, 'Content-Length': Buffer.byteLength(payload) }) },
      });
      req.on('error', (error: NodeJS.ErrnoException) => settle(this.connectionError(error, what, answered)));
      req.once('response', (res) => {
        answered = true;
        res.setEncoding('utf8');
        res.on('error', (error: NodeJS.ErrnoException) => settle(this.connectionError(error, what, true)));
        const type = res.headers['content-type'] ?? '';
        if (res.statusCode === 200 && type.startsWith(NDJSON)) return this.readStream<T>(res, what, progress, settle);
        let text = '';
        res.on('data', (chunk: string) => {
          text += chunk;
          if (text.length > MAX_ANSWER_CHARS) settle(new ControlProtocolError(`${what}: the agent's answer is over ${MAX_ANSWER_CHARS} characters`));
        });
        res.once('end', () => settle(...this.readDocument<T>(res.statusCode ?? 0, type, text, what)));
        res.once('close', () => {
          if (!res.complete) settle(this.droppedError(what));
        });
      });
      req.end(payload);
    });
  }

  /** NDJSON: progress lines to `progress`, then the result or error line. */
  private readStream<T>(res: http.IncomingMessage, what: string, progress: Progress | undefined, settle: (error: Error | undefined, value?: T) => void): void {
    let buffered = '';
    const onLine = (line: string) => {
      if (!line.trim()) return;
      const parsed = parseStreamLine(line);
      if (!parsed) return settle(new ControlProtocolError(`${what}: the agent sent a line that is not part of the control API: ${line.slice(0, 200)}`));
      if ('progress' in parsed) {
        try {
          progress?.(parsed.progress);
        } catch (error) {
          settle(error as Error);
        }
      } else if ('result' in parsed) settle(undefined, parsed.result as T);
      else settle(new ControlError(parsed.error.message, controlStatus(parsed.error.status)));
    };
    res.on('data', (chunk: string) => {
      buffered += chunk;
      let newline: number;
      while ((newline = buffered.indexOf('\n')) >= 0) {
        const line = buffered.slice(0, newline);
        buffered = buffered.slice(newline + 1);
        onLine(line);
      }
      if (buffered.length > MAX_ANSWER_CHARS) settle(new ControlProtocolError(`${what}: an NDJSON line from the agent is over ${MAX_ANSWER_CHARS} characters`));
    });
    res.once('end', () => {
      onLine(buffered);
      settle(new ControlProtocolError(`${what}: the agent ended the stream without a result`));
    });
    res.once('close', () => settle(this.droppedError(what)));
  }

  private readDocument<T>(status: number, type: string, text: string, what: string): [Error | undefined, T?] {
    let value: unknown;
    try {
      if (!type.startsWith('application/json')) throw new Error(`content type '${type}'`);
      value = JSON.parse(text);
    } catch (error) {
      return [new ControlProtocolError(`${what}: HTTP ${status} from the agent is not JSON (${(error as Error).message}): ${text.slice(0, 200)}`)];
    }
    if (status === 200) return [undefined, value as T];
    const wire = wireErrorSchema.safeParse((value as { error?: unknown } | null)?.error);
    if (!wire.success) return [new ControlProtocolError(`${what}: HTTP ${status} from the agent without an error message: ${text.slice(0, 200)}`)];
    return [new ControlError(wire.data.message, controlStatus(wire.data.status))];
  }

  private connectionError(error: NodeJS.ErrnoException, what: string, answered: boolean): Error {
    const socket = this.socketPath;
    switch (error.code) {
      case 'ENOENT':
      case 'ECONNREFUSED':
        return new AgentUnreachableError(`no ftvm agent at ${socket} (is \`ftvm agent\` running?)`, socket, error.code);
      case 'EACCES':
      case 'EPERM':
        return new AgentUnreachableError(`not allowed to use the ftvm agent's socket ${socket} (run as root, or as the agent's user)`, socket, error.code);
      case 'ENOTSOCK':
        return new AgentUnreachableError(`${socket} is not a socket (is it the ftvm agent's control socket?)`, socket, error.code);
      default:
        return answered ? this.droppedError(what, error) : new AgentUnreachableError(`cannot reach the ftvm agent at ${socket}: ${error.code ?? error.message}`, socket, error.code);
    }
  }

  /** The connection closed mid-answer: the agent stopped or crashed. */
  private droppedError(what: string, cause?: Error): AgentUnreachableError {
    return new AgentUnreachableError(
      `${what}: the ftvm agent at ${this.socketPath} closed the connection before answering${cause ? ` (${cause.message})` : ''}; it may have stopped, and the operation may or may not have completed`,
      this.socketPath,
      'ECONNRESET',
    );
  }
}
