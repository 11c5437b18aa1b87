import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DEFAULT_HOOK_CONFIG, installedHook, installHook, makeFtReady, notify, parseEndpoint, runHook, uninstallHook, type HookConfig, type HookMessage } from '@ftvm/libvirt';
import { Recorder } from './recorder.js';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'lv-hook-unit-'));
const runDir = path.join(tmp, 'run');
const plain = "<domain type='kvm'><name>other</name><memory>1</memory><os><type>hvm</type></os></domain>";
const ftXml = (name: string, protectedFlag = true) =>
  makeFtReady(`<domain type='kvm'><name>${name}</name><uuid>11111111-2222-3333-4444-555555555555</uuid><memory>1</memory><os><type>hvm</type></os></domain>`, {
    protection: { peer: { host: 'backup' }, protected: protectedFlag },
    runDir,
  }).xml;

let unixRecorder: Recorder;
let httpRecorder: Recorder;
beforeAll(async () => {
  unixRecorder = await Recorder.unix(path.join(tmp, 'coordinator.sock'));
  httpRecorder = await Recorder.http();
});
afterAll(async () => {
  await unixRecorder.close();
  await httpRecorder.close();
  fs.rmSync(tmp, { recursive: true, force: true });
});

const config = (endpoint: string | undefined, extra: Partial<HookConfig> = {}): HookConfig => ({
  ...DEFAULT_HOOK_CONFIG,
  logFile: path.join(tmp, 'hook.log'),
  timeoutMs: 500,
  ...(endpoint ? { endpoint } : {}),
  ...extra,
});

describe('runHook', () => {
  it('leaves domains without ftvm metadata alone, whatever the operation', async () => {
    for (const op of [['started', 'begin'], ['stopped', 'end'], ['migrate', 'begin'], ['prepare', 'begin']]) {
      expect(await runHook({ args: ['other', ...op, '-'], stdin: plain }, config(unixRecorder.endpoint))).toEqual({});
    }
    expect(unixRecorder.received).toHaveLength(0);
  });

  it('started → protect, stopped → unprotect (unix socket)', async () => {
    const xml = ftXml('vm-a');
    const started = await runHook({ args: ['vm-a', 'started', 'begin', '-'], stdin: xml }, config(unixRecorder.endpoint));
    expect(started.notified).toMatchObject({ delivered: true, detail: 'ack: ok' });
    const msg = unixRecorder.received.at(-1)!.message;
    expect(msg).toMatchObject<Partial<HookMessage>>({ v: 1, op: 'protect', phase: 'started', domain: 'vm-a', uuid: '11111111-2222-3333-4444-555555555555', host: os.hostname() });
    expect(msg.protection).toMatchObject({ peer: { host: 'backup' }, qmpSocket: path.join(runDir, 'vm-a.qmp') });
    await runHook({ args: ['vm-a', 'stopped', 'end', '-'], stdin: xml }, config(unixRecorder.endpoint));
    expect(unixRecorder.received.at(-1)!.message).toMatchObject({ op: 'unprotect', phase: 'stopped', domain: 'vm-a' });
    expect(unixRecorder.received.at(-1)!.message.protection).toBeUndefined();
  });

  it('HTTP endpoint', async () => {
    const out = await runHook({ args: ['vm-h', 'started', 'begin', '-'], stdin: ftXml('vm-h') }, config(httpRecorder.endpoint));
    expect(out.notified).toMatchObject({ delivered: true, detail: 'HTTP 204' });
    expect(httpRecorder.received.at(-1)!.message).toMatchObject({ op: 'protect', domain: 'vm-h' });
  });

  it('a domain marked protected=no is not protected', async () => {
    const before = unixRecorder.received.length;
    const out = await runHook({ args: ['vm-n', 'started', 'begin', '-'], stdin: ftXml('vm-n', false) }, config(unixRecorder.endpoint));
    expect(out.action).toMatch(/not protected/);
    expect(unixRecorder.received).toHaveLength(before);
  });

  it('gives up at its deadline; release retries an unprotect that was not delivered', async () => {
    const xml = ftXml('vm-slow');
    unixRecorder.answerDelayMs = 2_000;
    const t0 = performance.now();
    const out = await runHook({ args: ['vm-slow', 'stopped', 'end', '-'], stdin: xml }, config(unixRecorder.endpoint, { timeoutMs: 200 }));
    expect(performance.now() - t0).toBeLessThan(400);
    expect(out.notified).toMatchObject({ delivered: false, detail: 'no answer within 200 ms' });
    expect(fs.existsSync(path.join(runDir, 'vm-slow.unprotect-pending'))).toBe(true);
    unixRecorder.answerDelayMs = 0;
    const release = await runHook({ args: ['vm-slow', 'release', 'end', '-'], stdin: xml }, config(unixRecorder.endpoint));
    expect(release.action).toMatch(/unprotect retried: delivered/);
    expect(fs.existsSync(path.join(runDir, 'vm-slow.unprotect-pending'))).toBe(false);
  });

  it('an unreachable coordinator fails fast and does not throw', async () => {
    const out = await runHook({ args: ['vm-x', 'started', 'begin', '-'], stdin: ftXml('vm-x') }, config(`unix:${path.join(tmp, 'nobody.sock')}`));
    expect(out.notified?.delivered).toBe(false);
    expect(out.notified?.detail).toMatch(/ENOENT/);
  });

  it('prepare creates the run directory; release removes stale sockets', async () => {
    const xml = ftXml('vm-p');
    fs.rmSync(runDir, { recursive: true, force: true });
    await runHook({ args: ['vm-p', 'prepare', 'begin', '-'], stdin: xml }, config(undefined));
    expect(fs.statSync(runDir).isDirectory()).toBe(true);
    fs.writeFileSync(path.join(runDir, 'vm-p.qmp'), '');
    const out = await runHook({ args: ['vm-p', 'release', 'end', '-'], stdin: xml }, config(undefined));
    expect(out.action).toBe('released (removed vm-p.qmp)');
  });

  it('migrate/restore print the XML with ftvm paths fixed, nothing when already right', async () => {
    const xml = ftXml('vm-m');
    expect((await runHook({ args: ['vm-m', 'restore', 'begin', '-'], stdin: xml }, config(undefined))).stdout).toBeUndefined();
    const renamed = xml.replace('<name>vm-m</name>', '<name>vm-m2</name>');
    const out = await runHook({ args: ['vm-m2', 'migrate', 'begin', '-'], stdin: renamed }, config(undefined));
    expect(out.stdout).toContain(`path=${runDir}/vm-m2.qmp`);
    expect(out.action).toMatch(/rewrote ftvm paths: qmp socket/);
  });
});

describe('endpoints', () => {
  it('parses the forms the CLI takes', () => {
    expect(parseEndpoint('unix:/run/ftvm/coordinator.sock')).toEqual({ kind: 'unix', path: '/run/ftvm/coordinator.sock' });
    expect(parseEndpoint('/run/ftvm/coordinator.sock')).toEqual({ kind: 'unix', path: '/run/ftvm/coordinator.sock' });
    expect(parseEndpoint('http://127.0.0.1:7000/hook')).toMatchObject({ kind: 'http' });
    expect(() => parseEndpoint('coordinator.sock')).toThrow(/expected http/);
  });

  it('any 2xx answer is delivered', async () => {
    const result = await notify(parseEndpoint(`${httpRecorder.endpoint.replace(/\/v1\/hook$/, '')}/`), { v: 1, op: 'protect', phase: 'started', domain: 'd', uuid: undefined, host: 'h', at: '' }, 500);
    expect(result).toMatchObject({ delivered: true, detail: 'HTTP 204' });
  });
});

describe('install', () => {
  const hooksDir = path.join(tmp, 'hooks');
  const main = path.join(tmp, 'fake-run.js');
  fs.writeFileSync(main, "process.stdout.write('RAN ' + process.argv.slice(2).join(' ') + ' ' + process.env.FTVM_HOOK_CONFIG);\n");

  it('writes an executable script carrying its configuration, and removes only its own', () => {
    const result = installHook({ hooksDir, endpoint: unixRecorder.endpoint, logFile: '/tmp/x.log', mainModule: main });
    expect(result).toMatchObject({ script: path.join(hooksDir, 'qemu'), needsReload: true, config: { endpoint: unixRecorder.endpoint, logFile: '/tmp/x.log', timeoutMs: 1500 } });
    const text = fs.readFileSync(result.script, 'utf8');
    expect(text.startsWith('#!/bin/sh\n')).toBe(true);
    expect(text).toContain(`node='${process.execPath}'`);
    expect(fs.statSync(result.script).mode & 0o111).toBe(0o111);
    expect(installedHook({ hooksDir })?.config.endpoint).toBe(unixRecorder.endpoint);
    expect(installHook({ hooksDir, mainModule: main }).needsReload).toBe(false);
    expect(uninstallHook({ hooksDir })).toEqual([path.join(hooksDir, 'qemu')]);
  });

  it('the script skips other domains without starting node, and always exits 0', () => {
    const logFile = path.join(tmp, 'script.log');
    const { script } = installHook({ hooksDir, endpoint: "unix:/tmp/it's.sock", logFile, mainModule: main, timeoutMs: 500 });
    const runScript = (stdin: string) => spawnSync(script, ['vm', 'started', 'begin', '-'], { input: stdin, env: { PATH: '/usr/bin:/bin' }, encoding: 'utf8', timeout: 10_000 });
    const other = runScript(plain);
    expect(other).toMatchObject({ status: 0, stdout: '' });
    const ours = runScript(ftXml('vm'));
    expect(ours.status).toBe(0);
    expect(ours.stdout).toBe(`RAN vm started begin - {"logFile":"${logFile}","timeoutMs":500,"endpoint":"unix:/tmp/it's.sock"}`);
    expect(installedHook({ hooksDir })?.config.endpoint).toBe("unix:/tmp/it's.sock");
    fs.renameSync(main, `${main}.away`);
    try {
      expect(runScript(ftXml('vm'))).toMatchObject({ status: 0, stdout: '' });
      expect(fs.readFileSync(logFile, 'utf8')).toMatch(/ftvm hook: .*fake-run.js or .* missing; vm started begin not handled/);
    } finally {
      fs.renameSync(`${main}.away`, main);
    }
    uninstallHook({ hooksDir });
  });

  it('goes to qemu.d/ftvm next to somebody else\'s qemu hook', () => {
    fs.mkdirSync(hooksDir, { recursive: true });
    fs.writeFileSync(path.join(hooksDir, 'qemu'), '#!/bin/sh\nexit 0\n', { mode: 0o755 });
    expect(installHook({ hooksDir, mainModule: main }).script).toBe(path.join(hooksDir, 'qemu.d', 'ftvm'));
    expect(uninstallHook({ hooksDir })).toEqual([path.join(hooksDir, 'qemu.d', 'ftvm')]);
    expect(fs.existsSync(path.join(hooksDir, 'qemu'))).toBe(true);
  });

  it('refuses a missing hook module and an unbounded timeout', () => {
    expect(() => installHook({ hooksDir, mainModule: path.join(tmp, 'nope.js') })).toThrow(/build @ftvm\/libvirt first/);
    expect(() => installHook({ hooksDir, mainModule: main, timeoutMs: 60_000 })).toThrow(/libvirt waits for its hooks/);
  });
});
