import { execFile, spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { QmpClient, QmpCommandError } from '@ftvm/qmp';
import { bootGuest, buildGuest, type BootedGuest } from '../../../test/guest/boot-qemu.js';
import { clockOffset, startWorkload, syncGuestClock, type ClockOffset } from '../../../test/support/probe-client.js';
import { ensureSocketBufferLimit } from '../../../test/lab/network.js';
import { InPlaceActuator } from '../src/index.js';

// ftvm's QEMU patch (packages/kvmclock/qemu) under TCG, with the real test guest (clocksource=tsc,
// so both the guest TSC and QEMU_CLOCK_VIRTUAL must move). build.sh is a cache hit in well under a
// second; a miss builds QEMU (~10+ minutes on 2 cores). FTVM_QEMU_BINARY overrides the binary
// (e.g. a development build tree's copy), skipping build.sh.
const BUILD_SCRIPT = fileURLToPath(new URL('../qemu/build.sh', import.meta.url));
const STOCK_QEMU = '/usr/bin/qemu-system-x86_64';
const COMPENSATE = 'x-ftvm-clock-compensate';
const QUERY = 'x-ftvm-query-clock-compensation';
const MS = 1_000_000n;

interface ResumeInfo {
  compensated: boolean;
  'include-stopped-time': boolean;
  'stopped-ns': number;
  'offset-ns': number;
  'applied-ns': number;
  'applied-ticks': number;
}
interface CompensationInfo {
  armed: boolean;
  'last-resume'?: ResumeInfo;
}

let binary: string;
let guest: BootedGuest | undefined;
let qmp: QmpClient | undefined;

function buildPatchedQemu(): Promise<string> {
  const override = process.env['FTVM_QEMU_BINARY'];
  if (override) return Promise.resolve(override);
  return new Promise((resolve, reject) => {
    execFile('bash', [BUILD_SCRIPT], { timeout: 60 * 60_000, maxBuffer: 16 << 20 }, (error, stdout, stderr) => {
      if (error) return reject(new Error(`build.sh failed: ${error.message}\n${stderr.slice(-3000)}`));
      const last = stdout.trim().split('\n').pop() ?? '';
      if (!fs.existsSync(last)) return reject(new Error(`build.sh printed ${JSON.stringify(last)}, which is not a file`));
      resolve(last);
    });
  });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const ms = (ns: bigint | number) => (Number(ns) / 1e6).toFixed(3);
const abs = (n: bigint) => (n < 0n ? -n : n);
const offset = (g: BootedGuest): Promise<ClockOffset> => clockOffset(g.probe, { samples: 32, timeoutMs: 10_000 });

/** stop → wait → (arm) → cont, with every QMP wait bounded; returns what QEMU says it applied. */
async function pause(client: QmpClient, stoppedMs: number, arm?: object): Promise<ResumeInfo> {
  const stopped = client.waitForEvent('STOP', { timeoutMs: 10_000 });
  await client.execute('stop', undefined, { timeoutMs: 10_000 });
  await stopped;
  await sleep(stoppedMs);
  if (arm) await client.execute(COMPENSATE, arm, { timeoutMs: 10_000 });
  const resumed = client.waitForEvent('RESUME', { timeoutMs: 10_000 });
  await client.execute('cont', undefined, { timeoutMs: 10_000 });
  await resumed;
  const info = await client.execute<CompensationInfo>(QUERY, undefined, { timeoutMs: 10_000 });
  expect(info.armed).toBe(false); // one-shot: the resume consumed it
  expect(info['last-resume']).toBeDefined();
  return info['last-resume']!;
}

beforeAll(async () => {
  const [image, built] = await Promise.all([buildGuest(), buildPatchedQemu()]);
  binary = built;
  guest = await bootGuest({ image, qemuBinary: binary, timeoutMs: 120_000 });
  qmp = await QmpClient.connect({ path: guest.qmpSocket }, { connectTimeoutMs: 10_000 });
}, 60 * 60_000);

afterAll(async () => {
  await qmp?.close();
  await guest?.kill();
});

describe('x-ftvm-clock-compensate (patched QEMU, TCG)', () => {
  it('keeps the guest on real time over 5 × 1 s pauses when armed in each', async () => {
    const g = guest!;
    const client = qmp!;
    await syncGuestClock(g.probe, { samples: 16, timeoutMs: 10_000 });
    const o0 = await offset(g);
    const applied: ResumeInfo[] = [];
    for (let i = 0; i < 5; i++) applied.push(await pause(client, 1000, { 'include-stopped-time': true, 'offset-ns': 0 }));
    const o1 = await offset(g);
    const residual = o1.offsetNs - o0.offsetNs;
    console.log(
      `armed 5 × 1 s: O0 ${ms(o0.offsetNs)} ms (±${ms(o0.errorNs)}), after ${ms(o1.offsetNs)} ms (±${ms(o1.errorNs)}), ` +
        `residual ${ms(residual)} ms; QEMU applied ${applied.map((a) => ms(a['applied-ns'])).join(', ')} ms`,
    );
    for (const a of applied) {
      expect(a.compensated).toBe(true);
      expect(a['include-stopped-time']).toBe(true);
      expect(a['offset-ns']).toBe(0);
      expect(a['stopped-ns']).toBeGreaterThanOrEqual(1_000_000_000);
      expect(a['stopped-ns']).toBeLessThan(3_000_000_000);
      expect(a['applied-ns']).toBe(a['stopped-ns']);
      expect(a['applied-ticks']).toBeGreaterThan(0);
    }
    expect(abs(residual)).toBeLessThanOrEqual(2n * MS + o0.errorNs + o1.errorNs);
  });

  it('leaves stock behaviour when not armed: 5 × 1 s pauses put the guest ≈5 s behind', async () => {
    const g = guest!;
    const client = qmp!;
    await syncGuestClock(g.probe, { samples: 16, timeoutMs: 10_000 });
    const o0 = await offset(g);
    const resumes: ResumeInfo[] = [];
    for (let i = 0; i < 5; i++) resumes.push(await pause(client, 1000));
    const o1 = await offset(g);
    const lost = o0.offsetNs - o1.offsetNs;
    const stopped = resumes.reduce((sum, r) => sum + BigInt(r['stopped-ns']), 0n);
    console.log(`unarmed 5 × 1 s: guest lost ${ms(lost)} ms; QEMU measured ${ms(stopped)} ms stopped`);
    for (const r of resumes) {
      expect(r.compensated).toBe(false);
      expect(r['applied-ns']).toBe(0);
    }
    expect(abs(lost - stopped)).toBeLessThanOrEqual(5n * MS + o0.errorNs + o1.errorNs);
    expect(abs(lost - 5_000n * MS)).toBeLessThanOrEqual(500n * MS);
  });

  it('applies offset-ns on top of the stopped time: +250 ms moves the guest 250 ms ahead', async () => {
    const g = guest!;
    const client = qmp!;
    await syncGuestClock(g.probe, { samples: 16, timeoutMs: 10_000 });
    const o0 = await offset(g);
    const r = await pause(client, 1000, { 'include-stopped-time': true, 'offset-ns': 250_000_000 });
    const o1 = await offset(g);
    const jump = o1.offsetNs - o0.offsetNs;
    console.log(
      `offset +250 ms: guest jumped ${ms(jump)} ms (±${ms(o0.errorNs + o1.errorNs)}); ` +
        `QEMU: stopped ${ms(r['stopped-ns'])} ms, applied ${ms(r['applied-ns'])} ms, ${r['applied-ticks']} ticks`,
    );
    expect(r['offset-ns']).toBe(250_000_000);
    expect(r['applied-ns']).toBe(r['stopped-ns'] + 250_000_000);
    expect(abs(jump - 250n * MS)).toBeLessThanOrEqual(1n * MS + o0.errorNs + o1.errorNs);
  });

  it('gives back a checkpoint pause: VM stopped by a completed migrate, armed, cont', async () => {
    const g = guest!;
    const client = qmp!;
    await syncGuestClock(g.probe, { samples: 16, timeoutMs: 10_000 });
    const o0 = await offset(g);
    const stopped = client.waitForEvent('STOP', { timeoutMs: 60_000 });
    await client.execute('migrate', { uri: 'exec:cat > /dev/null' });
    await stopped;
    const deadline = Date.now() + 60_000;
    for (;;) {
      const { status } = await client.execute<{ status?: string }>('query-migrate');
      if (status === 'completed') break;
      if (status === 'failed' || status === 'cancelled' || Date.now() > deadline) throw new Error(`migrate ${status ?? 'no status'}`);
      await sleep(20);
    }
    await client.execute(COMPENSATE, {});
    await client.execute('cont');
    const r = (await client.execute<CompensationInfo>(QUERY))['last-resume']!;
    const o1 = await offset(g);
    const residual = o1.offsetNs - o0.offsetNs;
    console.log(`checkpoint (migrate + cont): stopped ${ms(r['stopped-ns'])} ms, applied ${ms(r['applied-ns'])} ms, residual ${ms(residual)} ms`);
    expect(r.compensated).toBe(true);
    expect(r['applied-ns']).toBe(r['stopped-ns']);
    expect(abs(residual)).toBeLessThanOrEqual(2n * MS + o0.errorNs + o1.errorNs);
  });

  it('is what InPlaceActuator drives: detect, arm (bigint offset), exact applied values', async () => {
    const client = qmp!;
    const actuator = await InPlaceActuator.detect(client);
    expect(actuator).toBeDefined();
    await client.execute('stop');
    await sleep(100);
    await actuator!.arm({ offsetNs: 5_000_000n });
    expect((await client.execute<CompensationInfo>(QUERY)).armed).toBe(true);
    await client.execute('cont');
    const applied = await actuator!.lastApplied();
    expect(applied).toBeDefined();
    expect(applied!.offsetNs).toBe(5_000_000n);
    expect(applied!.stoppedNs).toBeGreaterThanOrEqual(100_000_000n);
    expect(applied!.appliedNs).toBe(applied!.stoppedNs + 5_000_000n);
  });

  it('arms while running too (0012): the resume after the next stop is compensated, once', async () => {
    const client = qmp!;
    expect((await client.execute<{ running: boolean }>('query-status')).running).toBe(true);
    await client.execute(COMPENSATE, { 'offset-ns': 0 });
    expect((await client.execute<CompensationInfo>(QUERY)).armed).toBe(true);
    const first = await pause(client, 200);
    expect(first.compensated).toBe(true);
    expect(first['stopped-ns']).toBeGreaterThanOrEqual(200_000_000);
    expect(first['applied-ns']).toBe(first['stopped-ns']);
    const second = await pause(client, 200);
    expect(second.compensated).toBe(false);
    expect(second['applied-ns']).toBe(0);
  });

  it('refuses arguments that can only move the clock backwards, and offsets beyond a year', async () => {
    const client = qmp!;
    const failure = (args: object) =>
      client.execute(COMPENSATE, args).then(
        () => undefined,
        (e: unknown) => e,
      );
    const backwards = await failure({ 'include-stopped-time': false, 'offset-ns': -1 });
    expect(backwards).toBeInstanceOf(QmpCommandError);
    expect((backwards as QmpCommandError).errorClass).toBe('GenericError');
    expect((backwards as QmpCommandError).desc).toMatch(/backwards/);
    const tooFar = await failure({ 'offset-ns': 400 * 24 * 3600 * 1e9 });
    expect((tooFar as QmpCommandError).desc).toMatch(/offset-ns/);
    expect((await client.execute<CompensationInfo>(QUERY)).armed).toBe(false);
  });

  it('keeps a self-resuming checkpoint (x-ftvm-resume-source, 0011) on time when armed before it', async () => {
    const g = guest!;
    const client = qmp!;
    await syncGuestClock(g.probe, { samples: 16, timeoutMs: 10_000 });
    const o0 = await offset(g);
    await client.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ftvm-resume-source', state: true }] });
    try {
      await client.execute(COMPENSATE, {});
      const resumed = client.waitForEvent('RESUME', { timeoutMs: 60_000 });
      await client.execute('migrate', { uri: 'exec:cat > /dev/null' });
      await resumed; // QEMU resumed by itself: no `cont`
      const deadline = Date.now() + 60_000;
      while ((await client.execute<{ status?: string }>('query-migrate')).status !== 'completed') {
        if (Date.now() > deadline) throw new Error('migrate did not complete');
        await sleep(20);
      }
      expect((await client.execute<{ running: boolean }>('query-status')).running).toBe(true);
      const info = await client.execute<CompensationInfo>(QUERY);
      const r = info['last-resume']!;
      const o1 = await offset(g);
      const residual = o1.offsetNs - o0.offsetNs;
      console.log(`self-resuming checkpoint: stopped ${ms(r['stopped-ns'])} ms, applied ${ms(r['applied-ns'])} ms, residual ${ms(residual)} ms`);
      expect(info.armed).toBe(false);
      expect(r.compensated).toBe(true);
      expect(r['applied-ns']).toBe(r['stopped-ns']);
      expect(abs(residual)).toBeLessThanOrEqual(2n * MS + o0.errorNs + o1.errorNs);
    } finally {
      await client.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ftvm-resume-source', state: false }] });
    }
  });
});

describe('checkpoint socket send buffer (patched QEMU, 0014)', () => {
  /**
   * The send buffer of QEMU's migration socket during the stopped phase: the reader stops reading
   * at STOP, and a high downtime-limit leaves the rest of the bulk pass (with the guest's workload
   * dirtying 64 MiB, far more than 8 MiB) for that phase, so QEMU stays blocked in it
   * (holding the BQL: no QMP command is answered meanwhile) while `ss` looks. Then the reader
   * drains the rest, the migration completes and the VM is resumed.
   */
  async function sendBufferWhileStopped(client: QmpClient, qemuPid: number, incremental: boolean): Promise<number> {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ftvm-sndbuf-'));
    const socketPath = path.join(dir, 'migration.sock');
    const accepted: net.Socket[] = [];
    const server = net.createServer((socket) => {
      accepted.push(socket);
      socket.on('data', () => undefined);
    });
    await new Promise<void>((resolve) => server.listen(socketPath, resolve));
    const off = client.onEvent((event) => {
      if (event.event === 'STOP') for (const socket of accepted) socket.pause();
    });
    await client.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ftvm-incremental', state: incremental }] });
    await client.execute('migrate-set-parameters', { 'downtime-limit': 2000, 'max-bandwidth': 8 * 1024 * 1024 * 1024 });
    try {
      const stopped = client.waitForEvent('STOP', { timeoutMs: 60_000 });
      await client.execute('migrate', { uri: `unix:${socketPath}` });
      await stopped;
      await sleep(300);
      const out = await new Promise<string>((resolve, reject) =>
        execFile('ss', ['-xmpH'], { timeout: 10_000 }, (error, stdout) => (error ? reject(error) : resolve(stdout))),
      );
      const sizes = out
        .split('\n')
        .filter((line) => line.includes(`pid=${qemuPid},`))
        .map((line) => Number(/skmem:\(r\d+,rb\d+,t\d+,tb(\d+)/.exec(line)?.[1] ?? 0));
      return Math.max(...sizes);
    } finally {
      off();
      for (const socket of accepted) socket.resume(); // let the stopped phase finish
      const deadline = Date.now() + 120_000;
      while ((await client.execute<{ status?: string }>('query-migrate', undefined, { timeoutMs: 60_000 })).status !== 'completed') {
        if (Date.now() > deadline) throw new Error('the migration did not complete once the reader read again');
        await sleep(20);
      }
      await client.execute('cont');
      await client.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ftvm-incremental', state: false }] });
      await client.execute('migrate-set-parameters', { 'downtime-limit': 300 });
      for (const socket of accepted) socket.destroy();
      server.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  }

  it('gives an x-ftvm-incremental migration socket a 4 MiB send buffer once the VM is stopped, a plain one keeps 208 KiB', async () => {
    await ensureSocketBufferLimit(); // the kernel caps SO_SNDBUF at net.core.wmem_max (what ansible raises)
    const client = qmp!;
    // The stopped phase must outgrow 8 MiB whatever ran before: dirty 64 MiB and keep dirtying
    await startWorkload(guest!.probe, 64, { timeoutMs: 10_000 });
    let plain: number, checkpoint: number;
    try {
      await sleep(1500);
      plain = await sendBufferWhileStopped(client, guest!.pid, false);
      checkpoint = await sendBufferWhileStopped(client, guest!.pid, true);
    } finally {
      await startWorkload(guest!.probe, 0, { timeoutMs: 10_000 });
    }
    console.log(`migration socket send buffer in the stopped phase: plain ${plain} bytes, x-ftvm-incremental ${checkpoint} bytes`);
    expect(plain).toBeLessThan(1024 * 1024);
    expect(checkpoint).toBeGreaterThanOrEqual(8 * 1024 * 1024); // Linux doubles what it grants
    expect((await client.execute<{ running: boolean }>('query-status')).running).toBe(true);
  });
});

describe('stock Debian QEMU', () => {
  it('has no x-ftvm-clock-compensate (CommandNotFound)', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ftvm-stock-qemu-'));
    const socket = path.join(dir, 'qmp.sock');
    const child = spawn(STOCK_QEMU, ['-machine', 'none', '-nodefaults', '-display', 'none', '-qmp', `unix:${socket},server=on,wait=off`], {
      stdio: 'ignore',
    });
    const exited = new Promise((r) => child.once('exit', r));
    try {
      const deadline = Date.now() + 20_000;
      while (!fs.existsSync(socket)) {
        if (Date.now() > deadline || child.exitCode !== null) throw new Error(`${STOCK_QEMU} did not open its QMP socket`);
        await sleep(50);
      }
      const client = await QmpClient.connect({ path: socket }, { connectTimeoutMs: 10_000 });
      try {
        const commands = await client.execute<{ name: string }[]>('query-commands');
        expect(commands.some((c) => c.name === 'cont')).toBe(true);
        expect(commands.some((c) => c.name === COMPENSATE || c.name === QUERY)).toBe(false);
        const error = await client.execute(COMPENSATE, {}).then(
          () => undefined,
          (e: unknown) => e,
        );
        expect(error).toBeInstanceOf(QmpCommandError);
        expect((error as QmpCommandError).errorClass).toBe('CommandNotFound');
      } finally {
        await client.close();
      }
    } finally {
      child.kill('SIGKILL');
      await Promise.race([exited, sleep(5_000)]);
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('and the patched binary lists both commands', async () => {
    const commands = await qmp!.execute<{ name: string }[]>('query-commands');
    expect(commands.map((c) => c.name)).toEqual(expect.arrayContaining([COMPENSATE, QUERY]));
  });
});
