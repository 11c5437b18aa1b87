/**
 * The libvirt hook on the lab's real libvirtd (host `primary`): installed into the host's
 * /etc/libvirt/hooks, picked up through SIGHUP, reporting to a recorder standing in for the
 * coordinator over a unix socket in /tmp (the same path inside the host).
 */
import { execFile, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { QmpClient } from '@ftvm/qmp';
import { installHook, LibvirtConnection, readProtection, uninstallHook } from '@ftvm/libvirt';
import { hostInfo, inHostArgv, labUp } from '../../../test/lab/lab.js';
import { waitForProbe } from '../../../test/support/probe-client.js';
import { labProbeGuest } from './lab-guest.js';
import { Recorder } from './recorder.js';

const run = promisify(execFile);
const NAME = 'lv-hook';
const host = hostInfo('primary');
const hooksDir = path.join(host.libvirtEtcDir, 'hooks');
const logOutside = path.join(host.logDir, 'ftvm', 'libvirt-hook.log');
const reloadMark = `/tmp/lv-hook-reload-${process.pid}`;
const saveFile = `/tmp/lv-hook-${process.pid}.save`;
let recorder: Recorder;
let conn: LibvirtConnection;

/** SIGHUP libvirtd and wait until its reload has rescanned the hooks (signalled by a `daemon` hook). */
async function reloadLibvirtdHooks(): Promise<number> {
  fs.rmSync(reloadMark, { force: true });
  fs.writeFileSync(path.join(hooksDir, 'daemon'), `#!/bin/sh\n[ "$2" = reload ] && echo "$@" > ${reloadMark}\nexit 0\n`, { mode: 0o755 });
  const t0 = performance.now();
  process.kill(Number(fs.readFileSync(path.join(host.runDir, 'libvirtd.pid'), 'utf8').trim()), 'SIGHUP');
  while (!fs.existsSync(reloadMark)) {
    if (performance.now() - t0 > 10_000) throw new Error('libvirtd did not run its daemon reload hook within 10 s of SIGHUP');
    await new Promise((r) => setTimeout(r, 10));
  }
  fs.rmSync(path.join(hooksDir, 'daemon'), { force: true });
  fs.rmSync(reloadMark, { force: true });
  return Math.round(performance.now() - t0);
}

beforeAll(async () => {
  await labUp();
  // the installed hook runs the compiled module (dist/), as it would on a real host
  await run('npx', ['tsc', '-b', 'packages/libvirt'], { cwd: path.resolve(__dirname, '../../..'), timeout: 180_000 });
  recorder = await Recorder.unix(`/tmp/lv-hook-coordinator-${process.pid}.sock`);
  const installed = installHook({ hooksDir, endpoint: recorder.endpoint });
  const reloadMs = await reloadLibvirtdHooks();
  console.log(`hook installed at ${installed.script} (needsReload: ${installed.needsReload}); SIGHUP reload took ${reloadMs} ms`);
  conn = await LibvirtConnection.connect(host.libvirtUri);
  await conn.remove(NAME);
});

afterAll(async () => {
  await conn?.remove(NAME).catch(() => undefined);
  await conn?.close();
  uninstallHook({ hooksDir });
  await reloadLibvirtdHooks().catch(() => undefined);
  await recorder?.close();
  fs.rmSync(saveFile, { force: true });
});

describe('libvirt qemu hook on primary', () => {
  it('start → protect within 1 s; stop → unprotect', async () => {
    const guest = await labProbeGuest('primary', NAME, 5721);
    await conn.define(guest.xml);
    const events = await conn.events({ domain: NAME });
    const t0 = performance.now();
    await conn.start(NAME);
    const startMs = performance.now() - t0;
    const protect = await recorder.waitFor((m) => m.op === 'protect' && m.domain === NAME, 1_000, true);
    expect(protect.message).toMatchObject({ v: 1, phase: 'started', host: 'primary', protection: { protected: true, peer: { host: 'backup' }, qmpSocket: `/run/ftvm/${NAME}.qmp` } });
    // the started hook runs synchronously inside virDomainCreate: it is there before start returns
    const protectMs = protect.receivedAtMs - t0;
    const startedEvent = await events.waitForEvent(NAME, 'started', { timeoutMs: 5_000, includePast: true });
    await waitForProbe(guest.probe, 60_000);

    const t1 = performance.now();
    await conn.destroy(NAME);
    const destroyMs = performance.now() - t1;
    const unprotect = await recorder.waitFor((m) => m.op === 'unprotect' && m.domain === NAME, 1_000, true);
    expect(unprotect.message).toMatchObject({ phase: 'stopped', host: 'primary' });
    const unprotectMs = unprotect.receivedAtMs - t1;
    const stoppedEvent = await events.waitForEvent(NAME, 'stopped', { timeoutMs: 5_000, includePast: true });
    await events.close();
    console.log(
      `hook vs libvirt's lifecycle events: protect ${Math.round(protect.receivedAtMs - startedEvent.receivedAtMs)} ms after 'started' reached us, ` +
        `unprotect ${Math.round(unprotect.receivedAtMs - stoppedEvent.receivedAtMs)} ms after 'stopped'`,
    );
    console.log(
      `hook: start call ${Math.round(startMs)} ms, protect received ${Math.round(protectMs)} ms after the start call; ` +
        `destroy call ${Math.round(destroyMs)} ms, unprotect received ${Math.round(unprotectMs)} ms after the destroy call`,
    );
    expect(protectMs).toBeLessThan(startMs + 1_000);
    expect(protect.receivedAtMs - startedEvent.receivedAtMs).toBeLessThan(1_000);
    expect(unprotect.receivedAtMs - stoppedEvent.receivedAtMs).toBeLessThan(1_000);

    const log = fs.readFileSync(logOutside, 'utf8');
    expect(log).toMatch(new RegExp(`${NAME} prepare begin: ensured /run/ftvm`));
    expect(log).toMatch(new RegExp(`${NAME} started begin: protect: delivered \\(ack: ok, [\\d.]+ ms\\)`));
    expect(log).toMatch(new RegExp(`${NAME} stopped end: unprotect: delivered`));
    const timings = [...log.matchAll(new RegExp(`${NAME} (started begin|stopped end): .* \\[(\\d+) ms\\]`, 'g'))].map((m) => `${m[1]}: ${m[2]} ms`);
    console.log(`time inside the hook (after node start-up), from its log: ${timings.slice(-2).join(', ')}`);
  });

  it('the hook process as libvirt runs it: bounded even when the coordinator does not answer', async () => {
    const script = path.join(hooksDir, 'qemu');
    const xml = (await labProbeGuest('primary', 'lv-hook-direct', 5722)).xml;
    // run inside the host, as libvirtd would: env -i with libvirt's minimal PATH, the XML on stdin
    const runScript = (args: string[], stdin: string) =>
      new Promise<number>((resolve, reject) => {
        const argv = inHostArgv('primary', ['env', '-i', 'PATH=/usr/sbin:/usr/bin:/sbin:/bin', 'LC_ALL=C', '/etc/libvirt/hooks/qemu', ...args]);
        const t0 = performance.now();
        const child = spawn(argv[0]!, argv.slice(1), { stdio: ['pipe', 'ignore', 'inherit'] });
        child.on('error', reject);
        child.on('exit', (code) => (code === 0 ? resolve(Math.round(performance.now() - t0)) : reject(new Error(`hook exited ${code}`))));
        child.stdin.end(stdin);
      });
    const plain = "<domain type='qemu'><name>lv-not-ftvm</name></domain>";
    await runScript(['lv-not-ftvm', 'started', 'begin', '-'], plain);
    const other = await runScript(['lv-not-ftvm', 'started', 'begin', '-'], plain);
    const delivered = await runScript(['lv-hook-direct', 'started', 'begin', '-'], xml);
    await recorder.waitFor((m) => m.domain === 'lv-hook-direct', 1_000, true);
    recorder.answerDelayMs = 10_000; // a coordinator that hangs
    let stuck: number;
    try {
      stuck = await runScript(['lv-hook-direct', 'stopped', 'end', '-'], xml);
    } finally {
      recorder.answerDelayMs = 0;
    }
    console.log(`hook process wall time (nsenter + node start-up included): another domain ${other} ms; protect delivered: ${delivered} ms; coordinator silent: ${stuck} ms`);
    expect(delivered).toBeLessThan(1_000);
    expect(stuck).toBeLessThan(2_500); // 1.5 s deadline + node start-up
    expect(stuck).toBeGreaterThanOrEqual(1_500);
    fs.rmSync(path.join(host.runDir, 'ftvm', 'lv-hook-direct.unprotect-pending'), { force: true });
  });

  it('restore: the hook puts ftvm paths right and drops a stale -incoming defer', async () => {
    const guest = await labProbeGuest('primary', NAME, 5721);
    await conn.start(NAME);
    await waitForProbe(guest.probe, 60_000);
    // save with XML whose ftvm paths are stale (as after a rename) and that still says -incoming defer
    const live = await conn.xml(NAME, { migratable: true });
    const stale = live
      .replaceAll(`/run/ftvm/${NAME}.qmp`, '/run/ftvm/stale-name.qmp')
      .replace('</qemu:commandline>', "<qemu:arg value='-incoming'/><qemu:arg value='defer'/></qemu:commandline>");
    const staleFile = `/tmp/lv-hook-${process.pid}.xml`;
    fs.writeFileSync(staleFile, stale);
    try {
      await conn.virsh(['save', NAME, saveFile, '--xml', staleFile], { domain: NAME, timeoutMs: 120_000 });
    } finally {
      fs.rmSync(staleFile, { force: true });
    }
    expect(await conn.virsh(['save-image-dumpxml', saveFile])).toContain('stale-name.qmp');
    await conn.virsh(['restore', saveFile], { domain: NAME, timeoutMs: 120_000 });

    const restored = await conn.xml(NAME);
    expect(readProtection(restored)?.qmpSocket).toBe(`/run/ftvm/${NAME}.qmp`);
    expect(restored).toContain(`path=/run/ftvm/${NAME}.qmp,server=on`);
    expect(restored).not.toContain('stale-name');
    expect(restored).not.toMatch(/value='defer'/);
    const qmp = await QmpClient.connect({ path: guest.outside(`/run/ftvm/${NAME}.qmp`) });
    try {
      expect(await qmp.execute('query-status')).toMatchObject({ status: 'running' });
    } finally {
      await qmp.close();
    }
    await waitForProbe(guest.probe, 30_000);
    expect(fs.readFileSync(logOutside, 'utf8')).toMatch(
      new RegExp(`${NAME} restore begin: rewrote ftvm paths: qmp socket /run/ftvm/stale-name.qmp -> /run/ftvm/${NAME}.qmp, removed -incoming defer`),
    );
    await recorder.waitFor((m) => m.op === 'protect' && m.domain === NAME && m.phase === 'started', 1_000, false).catch(() => undefined);
    await conn.destroy(NAME);
  });
});
