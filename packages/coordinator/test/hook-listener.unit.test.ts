import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pino from 'pino';
import { afterEach, describe, expect, it } from 'vitest';
import { notify, type HookMessage } from '@ftvm/libvirt';
import { parseHookLine, startHookListener, type HookEvent } from '../src/api/hook-listener.js';

const message: HookMessage = { v: 1, op: 'protect', phase: 'started', domain: 'web1', uuid: 'u-1', host: 'alpha', at: '2026-12-06T00:00:00Z', protection: { peer: { host: 'beta' } } };
const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
});

describe('libvirt hook listener', () => {
  it('says what is wrong with a line that is not a hook message', () => {
    expect(parseHookLine('nope')).toEqual({ error: 'not JSON' });
    expect(parseHookLine(JSON.stringify({ ...message, op: 'explode' }))).toEqual({ error: expect.stringMatching(/^not a hook message: op:/) });
    expect(parseHookLine(JSON.stringify({ ...message, domain: '' }))).toEqual({ error: expect.stringMatching(/domain:/) });
    expect(parseHookLine(JSON.stringify(message))).toEqual({ event: message });
  });

  it("answers the hook's own client at once and hands the event on after", async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ftvm-hook-'));
    dirs.push(dir);
    const socketPath = path.join(dir, 'hook.sock');
    const events: HookEvent[] = [];
    const listener = await startHookListener({ socketPath, log: pino({ level: 'silent' }), onEvent: (e) => events.push(e) });
    try {
      expect(fs.statSync(socketPath).mode & 0o777).toBe(0o600);
      const result = await notify({ kind: 'unix', path: socketPath }, message, 1_000);
      expect(result).toMatchObject({ delivered: true, detail: 'ack: ok' });
      await new Promise((r) => setImmediate(r));
      expect(events).toEqual([message]);
      const bad = await notify({ kind: 'unix', path: socketPath }, { ...message, v: 2 as 1 }, 1_000);
      expect(bad.detail).toMatch(/^ack: error: not a hook message: v:/);
      expect(events).toHaveLength(1);
    } finally {
      await listener.close();
    }
    expect(fs.existsSync(socketPath)).toBe(false);
  });
});
