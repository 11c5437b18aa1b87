import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import pino from 'pino';
import { afterAll, afterEach, beforeEach, describe, expect, it } from 'vitest';
import { ControlError, type ProgressEvent } from '../src/agent/control.js';
import { AgentUnreachableError, ControlClient, ControlProtocolError, ControlTimeoutError } from '../src/api/client.js';
import { startControlServer, type ControlServer } from '../src/api/server.js';
import { agentStatus, FakeControl } from './fake-control.js';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'ftvm-api-'));
const log = pino({ level: 'silent' });
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

let n = 0;
const freshSocket = () => path.join(tmp, `run-${++n}`, 'agent.sock');

/** A raw HTTP exchange on the socket: status, content type and body text. */
function raw(socketPath: string, method: string, urlPath: string, body?: string): Promise<{ status: number; type: string; text: string }> {
  return new Promise((resolve, reject) => {
    const req = http.request({ socketPath, method, path: urlPath, agent: false, timeout: 5_000 }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (chunk: string) => (text += chunk));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, type: res.headers['content-type'] ?? '', text }));
    });
    req.on('timeout', () => req.destroy(new Error(`${method} ${urlPath}: no answer in 5 s`)));
    req.on('error', reject);
    req.end(body);
  });
}

describe('control API over a unix socket', () => {
  let fake: FakeControl;
  let server: ControlServer;
  let client: ControlClient;
  let socketPath: string;

  beforeEach(async () => {
    fake = new FakeControl();
    socketPath = freshSocket();
    server = await startControlServer({ socketPath, control: fake, log });
    client = new ControlClient({ socketPath, queryTimeoutMs: 5_000, operationTimeoutMs: 5_000, checkpointTimeoutMs: 5_000 });
  });
  afterEach(() => server.close());

  it('GET /v1/status', async () => {
    expect(await client.status()).toEqual(JSON.parse(JSON.stringify(agentStatus())));
    expect(fake.calls).toEqual([{ op: 'status' }]);
  });

  it('POST protect: progress in order, then the result; the request reaches the agent whole', async () => {
    const events: ProgressEvent[] = [];
    const result = await client.protect({ vm: 'vm1', backup: 'beta', checkpointIntervalMs: 250 }, (event) => events.push(event));
    expect(fake.calls).toEqual([{ op: 'protect', request: { vm: 'vm1', backup: 'beta', checkpointIntervalMs: 250 } }]);
    expect(events).toEqual([
      { step: 'connect to backup', state: 'start' },
      { step: 'connect to backup', state: 'done' },
      { step: 'first checkpoint', state: 'start' },
      { step: 'first checkpoint', state: 'done', detail: 'epoch 42' },
      { step: 'arm clock hook', state: 'start' },
      { step: 'arm clock hook', state: 'done' },
    ]);
    expect(result).toMatchObject({ name: 'vm1', backupHost: 'beta', phase: 'protected' });
  });

  it('POST protect without an interval leaves it to the agent', async () => {
    await client.protect({ vm: 'vm1', backup: 'beta' });
    expect(fake.calls).toEqual([{ op: 'protect', request: { vm: 'vm1', backup: 'beta' } }]);
  });

  it('POST unprotect, switchover, reprotect (with and without backup), checkpoint; GET drift', async () => {
    expect(await client.unprotect('vm1')).toMatchObject({ name: 'vm1', phase: 'unprotected' });
    expect(await client.switchover('vm1')).toEqual({ vm: 'vm1', from: 'alpha', to: 'beta', downtimeMs: 183, epoch: 43 });
    expect(await client.reprotect('vm1', 'gamma')).toMatchObject({ backupHost: 'gamma', primaryHost: 'beta' });
    expect(await client.reprotect('vm1', undefined)).toMatchObject({ backupHost: 'alpha' });
    expect(await client.checkpointNow('vm1')).toEqual({ vm: 'vm1', epoch: 44, bytes: 1_048_576, pauseMs: 9.25 });
    expect(await client.drift('vm.2_x')).toEqual({ vm: 'vm.2_x', ledger: { pauses: [{ epoch: 44, ms: 9.25 }], corrections: [] }, predictedLagMs: 0.4 });
    expect(fake.calls).toEqual([
      { op: 'unprotect', vm: 'vm1' },
      { op: 'switchover', vm: 'vm1' },
      { op: 'reprotect', vm: 'vm1', backup: 'gamma' },
      { op: 'reprotect', vm: 'vm1', backup: undefined },
      { op: 'checkpointNow', vm: 'vm1' },
      { op: 'drift', vm: 'vm.2_x' },
    ]);
  });

  it('streams progress while the operation runs (NDJSON lines, result last)', async () => {
    let release!: () => void;
    fake.gate = new Promise((resolve) => (release = resolve));
    const first = new Promise<ProgressEvent>((resolve) => {
      const events: ProgressEvent[] = [];
      void client.switchover('vm1', (event) => {
        events.push(event);
        if (events.length === 1) resolve(event);
      });
    });
    // The agent is held inside its first step: the client must already have that step's start.
    expect(await first).toEqual({ step: 'connect to backup', state: 'start' });
    release();

    fake.gate = undefined;
    const { status, type, text } = await raw(socketPath, 'POST', '/v1/vms/vm1/switchover');
    expect(status).toBe(200);
    expect(type).toBe('application/x-ndjson');
    const lines = text.trimEnd().split('\n').map((line) => JSON.parse(line) as Record<string, unknown>);
    expect(lines.slice(0, -1).every((line) => Object.keys(line).join() === 'progress')).toBe(true);
    expect(lines).toHaveLength(7);
    expect(lines.at(-1)).toEqual({ result: { vm: 'vm1', from: 'alpha', to: 'beta', downtimeMs: 183, epoch: 43 } });
  });

  it('a ControlError keeps its status: in the stream, and as the HTTP status of a query', async () => {
    fake.failStep = 'first checkpoint';
    const events: ProgressEvent[] = [];
    const failure = await client.protect({ vm: 'vm1', backup: 'beta' }, (event) => events.push(event)).catch((error: unknown) => error);
    expect(failure).toBeInstanceOf(ControlError);
    expect(failure).toMatchObject({ status: 409, message: 'protect: first checkpoint refused' });
    expect(events.at(-1)).toEqual({ step: 'first checkpoint', state: 'fail', detail: 'first checkpoint refused' });
    const { text } = await raw(socketPath, 'POST', '/v1/vms/vm1/protect', '{"backup":"beta"}');
    expect(JSON.parse(text.trimEnd().split('\n').at(-1)!)).toEqual({ error: { message: 'protect: first checkpoint refused', status: 409 } });

    fake.errors.drift = new ControlError("no VM 'nope' here", 404);
    await expect(client.drift('nope')).rejects.toMatchObject({ name: 'ControlError', status: 404, message: "no VM 'nope' here" });
    expect(await raw(socketPath, 'GET', '/v1/vms/nope/drift')).toMatchObject({ status: 404, text: `{"error":{"message":"no VM 'nope' here","status":404}}\n` });
  });

  it('any other error is a 500 with its message, thrown or rejected', async () => {
    fake.errors.switchover = new Error('libvirt: connection reset');
    await expect(client.switchover('vm1')).rejects.toMatchObject({ name: 'ControlError', status: 500, message: 'libvirt: connection reset' });
    fake.errors.status = new TypeError('cannot read properties of undefined');
    await expect(client.status()).rejects.toMatchObject({ status: 500, message: 'cannot read properties of undefined' });
    fake.checkpointNow = () => {
      throw new RangeError('thrown synchronously');
    };
    await expect(client.checkpointNow('vm1')).rejects.toMatchObject({ status: 500, message: 'thrown synchronously' });
  });

  it('400 naming the field for a bad body or VM name, before anything reaches the agent', async () => {
    const cases: [string, string, string | undefined, string][] = [
      ['POST', '/v1/vms/vm1/protect', '{}', 'invalid request body: backup: Required'],
      ['POST', '/v1/vms/vm1/protect', '{"backup":"beta","checkpointIntervalMs":10}', 'invalid request body: checkpointIntervalMs: Number must be greater than or equal to 50'],
      ['POST', '/v1/vms/vm1/protect', '{"backup":"beta","intervalMs":100}', "invalid request body: unknown field 'intervalMs'"],
      ['POST', '/v1/vms/vm1/protect', '{"backup":7}', 'invalid request body: backup: Expected string, received number'],
      ['POST', '/v1/vms/vm1/reprotect', '{"backup":"not a host!"}', 'invalid request body: backup: a host name: letters, digits, dots and dashes'],
      ['POST', '/v1/vms/vm1/switchover', '{"force":true}', "invalid request body: unknown field 'force'"],
      ['POST', '/v1/vms/vm1/protect', '{"backup":', 'invalid request body: not JSON'],
      ['POST', '/v1/vms/-vm/unprotect', undefined, "vm: '-vm' is not a libvirt domain name: letters, digits, _ . -"],
      ['GET', '/v1/vms/a%20b/drift', undefined, "vm: 'a b' is not a libvirt domain name"],
    ];
    for (const [method, url, body, message] of cases) {
      const { status, type, text } = await raw(socketPath, method, url, body);
      expect({ url, body, status, type }).toEqual({ url, body, status: 400, type: 'application/json; charset=utf-8' });
      const error = (JSON.parse(text) as { error: { message: string; status: number } }).error;
      expect(error.status).toBe(400);
      expect(error.message).toContain(message);
    }
    expect(fake.calls).toEqual([]);
  });

  it('404 for unknown routes, 405 for the wrong method, 413 for an oversized body', async () => {
    expect(await raw(socketPath, 'GET', '/v1/nothing')).toMatchObject({ status: 404, text: expect.stringContaining('no route GET /v1/nothing') });
    expect(await raw(socketPath, 'POST', '/v1/vms/vm1/explode')).toMatchObject({ status: 404 });
    expect(await raw(socketPath, 'POST', '/v1/status')).toMatchObject({ status: 405, text: expect.stringContaining('use GET') });
    expect(await raw(socketPath, 'GET', '/v1/vms/vm1/protect')).toMatchObject({ status: 405, text: expect.stringContaining('use POST') });
    expect(await raw(socketPath, 'POST', '/v1/vms/vm1/drift')).toMatchObject({ status: 405 });
    expect(await raw(socketPath, 'POST', '/v1/vms/vm1/protect', JSON.stringify({ backup: 'x'.repeat(70_000) }))).toMatchObject({ status: 413 });
    expect(fake.calls).toEqual([]);
  });

  it('the socket is 0600 and is removed on close', async () => {
    expect(fs.statSync(socketPath).mode & 0o777).toBe(0o600);
    await server.close();
    expect(fs.existsSync(socketPath)).toBe(false);
  });

  it('the client gives up when the agent does not answer in time', async () => {
    let release!: () => void;
    fake.gate = new Promise((resolve) => (release = resolve));
    // A query with no answer at all: the agent is as good as unreachable.
    await expect(client.status({ timeoutMs: 150 })).rejects.toThrow(new AgentUnreachableError(`the ftvm agent at ${socketPath} did not answer GET /v1/status within 150 ms`, socketPath, 'ETIMEDOUT'));
    // An operation that started (the stream is open) but has no result yet: it may still be running.
    const late = await client.switchover('vm1', undefined, { timeoutMs: 150 }).catch((error: unknown) => error);
    expect(late).toBeInstanceOf(ControlTimeoutError);
    expect((late as Error).message).toBe(`POST /v1/vms/vm1/switchover: no result from the ftvm agent at ${socketPath} within 150 ms (the operation may still be running there; see \`ftvm status\`)`);
    release();
  });

  it('the connection dropping mid-operation is reported as the agent going away', async () => {
    fake.gate = new Promise(() => undefined); // never released
    const quick = await startControlServer({ socketPath: freshSocket(), control: fake, log, closeGraceMs: 0 });
    const quickClient = new ControlClient({ socketPath: quick.socketPath });
    const events: ProgressEvent[] = [];
    const pending = quickClient.protect({ vm: 'vm1', backup: 'beta' }, (event) => events.push(event)).catch((error: unknown) => error);
    await expect.poll(() => events.length).toBe(1);
    await quick.close();
    const error = await pending;
    expect(error).toBeInstanceOf(AgentUnreachableError);
    expect((error as Error).message).toContain('closed the connection before answering');
  });
});

describe('the client without an agent', () => {
  it('no socket file: "no ftvm agent at …"', async () => {
    const socketPath = path.join(tmp, 'missing.sock');
    const error = await new ControlClient({ socketPath }).status().catch((e: unknown) => e);
    expect(error).toBeInstanceOf(AgentUnreachableError);
    expect(error).toMatchObject({ message: `no ftvm agent at ${socketPath} (is \`ftvm agent\` running?)`, code: 'ENOENT' });
  });

  it('a stale socket (nobody listening): the same', async () => {
    const socketPath = await staleSocket();
    const error = await new ControlClient({ socketPath }).switchover('vm1').catch((e: unknown) => e);
    expect(error).toMatchObject({ name: 'AgentUnreachableError', message: `no ftvm agent at ${socketPath} (is \`ftvm agent\` running?)`, code: 'ECONNREFUSED' });
  });
});

describe('the client against something that is not the control API', () => {
  it('a non-JSON answer or a malformed NDJSON line is a ControlProtocolError', async () => {
    const socketPath = path.join(tmp, 'not-an-agent.sock');
    const impostor = http.createServer((req, res) => {
      if (req.url === '/v1/status') res.writeHead(200, { 'Content-Type': 'text/html' }).end('<h1>hello</h1>');
      else res.writeHead(200, { 'Content-Type': 'application/x-ndjson' }).end('{"progress":{"step":"x","state":"start"}}\n{"surprise":1}\n');
    });
    await new Promise<void>((resolve) => impostor.listen(socketPath, resolve));
    try {
      const client = new ControlClient({ socketPath });
      await expect(client.status()).rejects.toThrow(new ControlProtocolError("GET /v1/status: HTTP 200 from the agent is not JSON (content type 'text/html'): <h1>hello</h1>"));
      const events: ProgressEvent[] = [];
      await expect(client.switchover('vm1', (event) => events.push(event))).rejects.toThrow(
        new ControlProtocolError('POST /v1/vms/vm1/switchover: the agent sent a line that is not part of the control API: {"surprise":1}'),
      );
      expect(events).toEqual([{ step: 'x', state: 'start' }]);
    } finally {
      await new Promise<void>((resolve) => impostor.close(() => resolve()));
    }
  });
});

describe('the socket file at start', () => {
  it('a stale socket left by a dead agent is replaced', async () => {
    const socketPath = await staleSocket();
    const server = await startControlServer({ socketPath, control: new FakeControl(), log });
    expect((await new ControlClient({ socketPath }).status()).host).toBe('alpha');
    await server.close();
  });

  it('a live agent on the socket is left alone', async () => {
    const socketPath = freshSocket();
    const first = await startControlServer({ socketPath, control: new FakeControl(), log });
    await expect(startControlServer({ socketPath, control: new FakeControl(), log })).rejects.toThrow(`another process is serving ${socketPath} (is an ftvm agent already running?)`);
    expect((await new ControlClient({ socketPath }).status()).host).toBe('alpha');
    await first.close();
  });

  it('a file that is not a socket is not deleted', async () => {
    const socketPath = path.join(tmp, 'regular-file');
    fs.writeFileSync(socketPath, 'keep me');
    await expect(startControlServer({ socketPath, control: new FakeControl(), log })).rejects.toThrow(`${socketPath} exists and is not a socket; refusing to replace it`);
    expect(fs.readFileSync(socketPath, 'utf8')).toBe('keep me');
  });
});

/** A socket file nobody listens on: bound, renamed away from its server, server closed. */
async function staleSocket(): Promise<string> {
  const bound = path.join(tmp, `bound-${++n}.sock`);
  const stale = path.join(tmp, `stale-${n}.sock`);
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(bound, resolve));
  fs.renameSync(bound, stale);
  await new Promise<void>((resolve) => server.close(() => resolve()));
  expect(fs.lstatSync(stale).isSocket()).toBe(true);
  return stale;
}

