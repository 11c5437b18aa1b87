import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { QmpClient, QmpCommandError, QmpConnectionClosedError } from '../src/index.js';

// Real QEMU (TCG, no guest kernel needed: the firmware alone gives a VM to stop and resume).
let dir: string;
let qemu: ChildProcess;
let qmpPath: string;

beforeAll(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ftvm-qmp-int-'));
  qmpPath = path.join(dir, 'qmp.sock');
  qemu = spawn(
    'qemu-system-x86_64',
    ['-accel', 'tcg', '-m', '64', '-nodefaults', '-display', 'none', '-qmp', `unix:${qmpPath},server=on,wait=off`],
    { stdio: 'ignore' },
  );
  const deadline = Date.now() + 10_000;
  while (!fs.existsSync(qmpPath)) {
    if (Date.now() > deadline) throw new Error('QEMU did not create its QMP socket within 10 s');
    await new Promise((r) => setTimeout(r, 20));
  }
});

afterAll(() => {
  qemu?.kill('SIGKILL');
  fs.rmSync(dir, { recursive: true, force: true });
});

describe('QmpClient against real QEMU', () => {
  let client: QmpClient;

  it('connects, negotiates oob and reports the version', async () => {
    client = await QmpClient.connect({ path: qmpPath });
    expect(client.greeting?.QMP.version.qemu.major).toBeGreaterThanOrEqual(7);
    expect(client.oobEnabled).toBe(true);
    await expect(client.execute('query-status')).resolves.toMatchObject({ status: 'running' });
  });

  it('delivers STOP and RESUME with QEMU timestamps that bracket the pause', async () => {
    const stop = client.waitForEvent('STOP', { timeoutMs: 5000 });
    const before = BigInt(Date.now()) * 1_000_000n;
    await client.execute('stop');
    const stopEvent = await stop;
    await new Promise((r) => setTimeout(r, 100));
    const resume = client.waitForEvent('RESUME', { timeoutMs: 5000 });
    await client.execute('cont');
    const resumeEvent = await resume;
    const after = BigInt(Date.now()) * 1_000_000n;
    const pausedNs = resumeEvent.timestampNs - stopEvent.timestampNs;
    expect(stopEvent.timestampNs).toBeGreaterThanOrEqual(before - 2_000_000n);
    expect(resumeEvent.timestampNs).toBeLessThanOrEqual(after + 2_000_000n);
    expect(pausedNs).toBeGreaterThanOrEqual(100_000_000n);
    expect(pausedNs).toBeLessThan(1_000_000_000n);
  });

  it('reports QEMU errors with class and command', async () => {
    const error = await client.execute('no-such-command').catch((e: unknown) => e);
    expect(error).toBeInstanceOf(QmpCommandError);
    expect(error).toMatchObject({ command: 'no-such-command', errorClass: 'CommandNotFound' });
  });

  it('runs an out-of-band command', async () => {
    // migrate-pause is allowed oob; with no migration running QEMU answers with an error, out of band.
    await expect(client.execute('migrate-pause', undefined, { oob: true })).rejects.toBeInstanceOf(QmpCommandError);
  });

  it('fails an outstanding command at once when QEMU dies', async () => {
    const pending = client.execute('query-status', undefined, { timeoutMs: 10_000 });
    const quit = client.execute('quit').catch((e: unknown) => e);
    const results = await Promise.allSettled([pending, quit]);
    expect(results[0]!.status).toBe('fulfilled'); // answered before the quit
    await expect(client.execute('query-status', undefined, { timeoutMs: 10_000 })).rejects.toBeInstanceOf(
      QmpConnectionClosedError,
    );
  });
});
