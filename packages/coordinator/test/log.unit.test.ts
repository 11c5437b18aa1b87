import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { createLogger, flushLogger, reopenLogFile } from '../src/log/logger.js';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'ftvm-log-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

const lines = (file: string) =>
  fs
    .readFileSync(file, 'utf8')
    .trimEnd()
    .split('\n')
    .map((line) => JSON.parse(line) as Record<string, unknown>);

describe('createLogger', () => {
  it('appends JSON lines to a file (creating its directory), per-VM children carry the VM, below-level lines are dropped', async () => {
    const file = path.join(tmp, 'nested', 'agent.log');
    fs.mkdirSync(path.dirname(file));
    fs.writeFileSync(file, `${JSON.stringify({ msg: 'from before' })}\n`);
    const log = createLogger({ level: 'info', file, name: 'ftvm-agent' });
    log.debug('too detailed');
    log.info({ peer: 'beta' }, 'peer up');
    log.child({ vm: 'vm1' }).warn({ epoch: 42 }, 'checkpoint failed');
    await flushLogger(log);
    const written = lines(file);
    expect(written).toHaveLength(3);
    expect(written[0]).toEqual({ msg: 'from before' });
    expect(written[1]).toMatchObject({ level: 30, name: 'ftvm-agent', peer: 'beta', msg: 'peer up' });
    expect(written[2]).toMatchObject({ level: 40, name: 'ftvm-agent', vm: 'vm1', epoch: 42, msg: 'checkpoint failed' });
    expect(written[2]!.time).toMatch(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
  });

  it('creates a missing log directory', async () => {
    const file = path.join(tmp, 'a', 'b', 'agent.log');
    const log = createLogger({ level: 'debug', file, name: 'ftvm-agent' });
    log.debug('hello');
    await flushLogger(log);
    expect(lines(file)).toMatchObject([{ level: 20, msg: 'hello' }]);
  });

  it('lines reach the file without waiting for a flush', async () => {
    const file = path.join(tmp, 'live.log');
    const log = createLogger({ level: 'info', file, name: 'ftvm-agent' });
    log.info('one');
    await expect.poll(() => (fs.existsSync(file) ? fs.readFileSync(file, 'utf8') : ''), { timeout: 2_000 }).toContain('"msg":"one"');
  });

  it('reopenLogFile starts a new file after logrotate moved the old one; stdout loggers have none', async () => {
    const file = path.join(tmp, 'rotated.log');
    const log = createLogger({ level: 'info', file, name: 'ftvm-agent' });
    log.info('before');
    await flushLogger(log);
    fs.renameSync(file, `${file}.1`);
    expect(reopenLogFile(log)).toBe(true);
    log.info('after');
    await flushLogger(log);
    expect(lines(`${file}.1`)).toMatchObject([{ msg: 'before' }]);
    expect(lines(file)).toMatchObject([{ msg: 'after' }]);
    expect(reopenLogFile(createLogger({ level: 'silent', name: 'x' }))).toBe(false);
  });
});
