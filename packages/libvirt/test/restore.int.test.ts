/**
 * A checkpoint of a running libvirt domain on `primary` (QMP migrate into a unix socket, collected
 * into a file) is brought up as a libvirt domain on `backup` by restoreFromCheckpoint, and the
 * clock probe in the guest answers there.
 */
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { QmpClient } from '@ftvm/qmp';
import { LibvirtConnection, restoreFromCheckpoint, type RestoreError, type RestoreResult, type StreamWriter } from '@ftvm/libvirt';
import { encodeRecords, parseMigrationStream, type MigrationRecord } from '@ftvm/transport';
import { hostInfo, labUp } from '../../../test/lab/lab.js';
import { once } from 'node:events';
import { waitForProbe } from '../../../test/support/probe-client.js';
import { labProbeGuest } from './lab-guest.js';

const NAME = 'lv-ckpt';
const PORT = 5731;
const checkpointFile = `/tmp/lv-ckpt-${process.pid}.mig`;
let primary: LibvirtConnection;
let backup: LibvirtConnection;

beforeAll(async () => {
  await labUp();
  primary = await LibvirtConnection.connect(hostInfo('primary').libvirtUri);
  backup = await LibvirtConnection.connect(hostInfo('backup').libvirtUri);
  await primary.remove(NAME);
  await backup.remove(NAME);
});

afterAll(async () => {
  await primary?.remove(NAME).catch(() => undefined);
  await backup?.remove(NAME).catch(() => undefined);
  await primary?.close();
  await backup?.close();
  fs.rmSync(checkpointFile, { force: true });
});

/** QMP `migrate` into a unix socket we listen on (QEMU sees it under /run/ftvm), into a file. */
async function checkpoint(qmp: QmpClient, insidePath: string, outsidePath: string, file: string): Promise<{ bytes: number; ms: number; pauseMs: number }> {
  fs.rmSync(outsidePath, { force: true });
  const out = fs.createWriteStream(file);
  let closed!: () => void;
  const done = new Promise<void>((r) => (closed = r));
  const server = net.createServer((s) => {
    s.pipe(out);
    out.on('close', () => closed());
  });
  await new Promise<void>((r) => server.listen(outsidePath, r));
  try {
    await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
    await qmp.execute('migrate-set-parameters', { 'max-bandwidth': 8 * 1024 ** 3 });
    const stop = qmp.waitForEvent('STOP', { timeoutMs: 60_000 });
    const completed = qmp.waitForEvent<{ status: string }>('MIGRATION', { timeoutMs: 60_000, predicate: (e) => e.data.status === 'completed' || e.data.status === 'failed' });
    const t0 = performance.now();
    await qmp.execute('migrate', { uri: `unix:${insidePath}` });
    const stopNs = (await stop).timestampNs;
    const outcome = await completed;
    expect(outcome.data.status).toBe('completed');
    await Promise.race([done, new Promise((_, reject) => setTimeout(() => reject(new Error('checkpoint file not closed within 10 s')), 10_000))]);
    return { bytes: fs.statSync(file).size, ms: Math.round(performance.now() - t0), pauseMs: Math.round(Number(outcome.timestampNs - stopNs) / 1e6) };
  } finally {
    server.close();
  }
}

const report = (label: string, r: RestoreResult, probeMs: number) =>
  console.log(`${label}: ${(r.bytes / 1e6).toFixed(1)} MB; ${JSON.stringify(r.timings)}; probe answered ${probeMs} ms after running (total ${Math.round(r.timings.totalMs + probeMs)} ms)`);

describe('restore through libvirt on backup', () => {
  it('a checkpoint of a libvirt domain on primary comes up on backup and the probe answers', async () => {
    // primary: the probe guest, running
    const source = await labProbeGuest('primary', NAME, PORT);
    await primary.define(source.xml);
    await primary.start(NAME);
    await waitForProbe(source.probe, 60_000);
    const qmp = await QmpClient.connect({ path: source.outside(`/run/ftvm/${NAME}.qmp`) });
    let ckpt;
    try {
      ckpt = await checkpoint(qmp, `/run/ftvm/${NAME}.ckpt`, source.outside(`/run/ftvm/${NAME}.ckpt`), checkpointFile);
    } finally {
      await qmp.close();
    }
    console.log(`checkpoint on primary: ${(ckpt.bytes / 1e6).toFixed(1)} MB in ${ckpt.ms} ms (stop→completed ${ckpt.pauseMs} ms)`);
    await primary.remove(NAME); // the primary is gone

    // backup: the same guest, probe forwarded from backup's address
    const target = await labProbeGuest('backup', NAME, PORT);
    const result = await restoreFromCheckpoint({ connection: backup, xml: target.xml, checkpoint: checkpointFile, hostPath: target.outside });
    try {
      expect(result.bytes).toBe(ckpt.bytes);
      expect(await backup.state(NAME)).toBe('running');
      expect(await backup.stateReason(NAME)).toEqual({ state: 'running', reason: 'unpaused' });
      expect(await result.qmp.execute('query-status')).toMatchObject({ status: 'running' });
      const t0 = performance.now();
      await waitForProbe(target.probe, 30_000);
      report('restore (resume through libvirt)', result, Math.round(performance.now() - t0));
      // libvirt knows it as a normal persistent domain; only the running QEMU had the one-off -incoming
      expect(await backup.xml(NAME)).toContain("<qemu:arg value='-incoming'/>");
      expect(await backup.xml(NAME, { inactive: true })).not.toContain("<qemu:arg value='-incoming'/>");
      expect(await backup.xml(NAME, { inactive: true })).toContain(`path=/run/ftvm/${NAME}.qmp`);
    } finally {
      await result.qmp.close();
    }
  });

  it('autostart, with a writer that holds back the tail of the stream', async () => {
    expect(fs.existsSync(checkpointFile)).toBe(true);
    const target = await labProbeGuest('backup', NAME, PORT);
    const HOLD_MS = 300;
    const TAIL = 256 * 1024;
    let heldAt = 0;
    const writer: StreamWriter = async (socket, file) => {
      const data = fs.readFileSync(file);
      const write = (chunk: Buffer) => new Promise<void>((resolve, reject) => socket.write(chunk, (e) => (e ? reject(e) : resolve())));
      await write(data.subarray(0, data.length - TAIL));
      heldAt = performance.now();
      await new Promise((r) => setTimeout(r, HOLD_MS)); // the clock code computes its rewrite here
      await write(data.subarray(data.length - TAIL));
      socket.end();
    };
    const result = await restoreFromCheckpoint({ connection: backup, xml: target.xml, checkpoint: checkpointFile, hostPath: target.outside, writeStream: writer, resume: 'autostart', replace: true });
    try {
      expect(heldAt).toBeGreaterThan(0);
      expect(result.timings.loadMs).toBeGreaterThanOrEqual(HOLD_MS);
      expect(result.resumedNs).toBeDefined();
      // QEMU resumed by itself the moment the load completed
      const gapMs = Number(result.resumedNs! - result.completedNs) / 1e6;
      expect(gapMs).toBeLessThan(50);
      expect(await backup.state(NAME)).toBe('running');
      const t0 = performance.now();
      await waitForProbe(target.probe, 30_000);
      report(`restore (autostart, tail held ${HOLD_MS} ms; completed→RESUME ${gapMs.toFixed(2)} ms)`, result, Math.round(performance.now() - t0));
    } finally {
      await result.qmp.close();
    }
  });

  it('a broken stream fails with the stage named and leaves no domain behind', async () => {
    const target = await labProbeGuest('backup', NAME, PORT);
    const bad = path.join('/tmp', `lv-ckpt-bad-${process.pid}.mig`);
    fs.writeFileSync(bad, Buffer.concat([fs.readFileSync(checkpointFile).subarray(0, 4096), Buffer.alloc(4096, 0x55)]));
    try {
      const error = await restoreFromCheckpoint({ connection: backup, xml: target.xml, checkpoint: bad, hostPath: target.outside, replace: true, timeoutMs: 60_000 }).catch((e: unknown) => e);
      expect((error as Error).name).toBe('RestoreError');
      expect((error as Error).message).toMatch(new RegExp(`^restore of '${NAME}' failed at stream: incoming migration failed`));
      expect(await backup.exists(NAME)).toBe(false);
    } finally {
      fs.rmSync(bad, { force: true });
    }
  });

  /** The checkpoint with one record changed, as a file. */
  function craft(label: string, change: (records: MigrationRecord[]) => void): string {
    const records = parseMigrationStream(fs.readFileSync(checkpointFile));
    change(records);
    const file = path.join('/tmp', `lv-ckpt-${label}-${process.pid}.mig`);
    fs.writeFileSync(file, encodeRecords(records));
    return file;
  }

  /**
   * Writes like the agent's staged restore: socket.write, waiting for 'drain' (or the socket's end),
   * then socket.end with the tail. Nothing listens for the socket's 'error' once it has returned.
   */
  const agentLikeWriter: StreamWriter = async (socket, file) => {
    const data = fs.readFileSync(file);
    const closed = new Promise<never>((_, reject) => {
      if (socket.destroyed) reject(new Error('closed'));
      else socket.once('close', () => reject(new Error('closed')));
    });
    closed.catch(() => undefined);
    const CHUNK = 1024 * 1024;
    let at = 0;
    for (; at + CHUNK < data.length; at += CHUNK) {
      if (!socket.write(data.subarray(at, at + CHUNK))) await Promise.race([once(socket, 'drain'), closed]);
    }
    socket.end(data.subarray(at));
  };

  /** Lets late socket errors land while the test still runs (vitest fails on an unhandled one). */
  const settle = () => new Promise((r) => setTimeout(r, 1500));

  const qemuLogDir = () => path.join(hostInfo('backup').logDir, 'libvirt', 'qemu');

  it("a section the target does not have (a device hot-plugged on the primary): rejected with QEMU's reason, the process survives", async () => {
    const target = await labProbeGuest('backup', NAME, PORT);
    const bad = craft('unknown-section', (records) => {
      const device = records.find((r) => r.type === 'device-section');
      if (device?.type !== 'device-section') throw new Error('the checkpoint has no device section');
      device.idstr = 'xyz';
      device.instanceId = 0;
    });
    try {
      const error = (await restoreFromCheckpoint({ connection: backup, xml: target.xml, checkpoint: bad, hostPath: target.outside, qemuLogDir: qemuLogDir(), writeStream: agentLikeWriter, replace: true, timeoutMs: 60_000 }).catch((e: unknown) => e)) as RestoreError;
      await settle();
      console.log(`refused (unknown section): ${error.message}`);
      expect(error.name).toBe('RestoreError');
      expect(error.stage).toBe('stream');
      expect(error.qemuReason).toMatch(/Unknown savevm section or instance 'xyz' 0/);
      expect(error.message).toMatch(new RegExp(`^restore of '${NAME}' failed at stream: .*Unknown savevm section or instance 'xyz' 0`));
      expect(await backup.exists(NAME)).toBe(false);
    } finally {
      fs.rmSync(bad, { force: true });
    }
  });

  it("another machine type, refused while the stream is still going in: QEMU's reason, with the agent-like writer and the default one", async () => {
    const target = await labProbeGuest('backup', NAME, PORT);
    let machine = '';
    const bad = craft('machine', (records) => {
      const config = records.find((r) => r.type === 'configuration');
      if (config?.type !== 'configuration') throw new Error('the checkpoint has no configuration section');
      machine = config.machineType;
      config.machineType = 'pc-ftvm-none';
    });
    try {
      for (const writeStream of [agentLikeWriter, undefined]) {
        const t0 = performance.now();
        const error = (await restoreFromCheckpoint({ connection: backup, xml: target.xml, checkpoint: bad, hostPath: target.outside, qemuLogDir: qemuLogDir(), ...(writeStream ? { writeStream } : {}), replace: true, timeoutMs: 60_000 }).catch((e: unknown) => e)) as RestoreError;
        const ms = Math.round(performance.now() - t0);
        await settle();
        console.log(`refused (machine type, ${writeStream ? 'agent-like' : 'default'} writer) in ${ms} ms: ${error.message}`);
        expect(error.name).toBe('RestoreError');
        expect(error.stage).toBe('stream');
        expect(error.qemuReason).toContain(`Machine type received is 'pc-ftvm-none' and local is '${machine}'`);
        expect(error.message).toContain(`Machine type received is 'pc-ftvm-none' and local is '${machine}'`);
        expect(ms).toBeLessThan(30_000); // not the restore's deadline: the refusal ends the wait
        expect(await backup.exists(NAME)).toBe(false);
      }
    } finally {
      fs.rmSync(bad, { force: true });
    }
  });

  it('a writer that fails on its own: its error is the reason, without waiting for QEMU', async () => {
    const target = await labProbeGuest('backup', NAME, PORT);
    const failing: StreamWriter = async (socket, file) => {
      const data = fs.readFileSync(file);
      await new Promise<void>((resolve, reject) => socket.write(data.subarray(0, 8 * 1024 * 1024), (e) => (e ? reject(e) : resolve())));
      throw new Error('the clock rewrite failed');
    };
    const t0 = performance.now();
    const error = (await restoreFromCheckpoint({ connection: backup, xml: target.xml, checkpoint: checkpointFile, hostPath: target.outside, qemuLogDir: qemuLogDir(), writeStream: failing, replace: true, timeoutMs: 60_000 }).catch((e: unknown) => e)) as RestoreError;
    const ms = Math.round(performance.now() - t0);
    await settle();
    console.log(`writer failed, restore rejected in ${ms} ms: ${error.message}`);
    expect(error.name).toBe('RestoreError');
    expect(error.stage).toBe('stream');
    expect(error.message).toBe(`restore of '${NAME}' failed at stream: the stream writer failed: the clock rewrite failed`);
    expect(error.qemuReason).toBeUndefined();
    expect(ms).toBeLessThan(30_000);
    expect(await backup.exists(NAME)).toBe(false);
  });

  it('the point of no return: a resume function that throws after QEMU ran cont leaves the VM running, with a warning', async () => {
    const target = await labProbeGuest('backup', NAME, PORT);
    const result = await restoreFromCheckpoint({
      connection: backup,
      xml: target.xml,
      checkpoint: checkpointFile,
      hostPath: target.outside,
      replace: true,
      resume: async (qmp) => {
        await qmp.execute('cont');
        throw new Error('the scheduler broke after cont');
      },
    });
    try {
      expect(result.warnings).toEqual([expect.stringContaining('the scheduler broke after cont')]);
      expect(result.resumedNs).toBeDefined(); // QEMU's RESUME, seen during the resume step
      expect(await backup.state(NAME)).toBe('running');
      expect(await result.qmp.execute('query-status')).toMatchObject({ status: 'running' });
      await waitForProbe(target.probe, 30_000);
      expect(await backup.xml(NAME, { inactive: true })).not.toContain("<qemu:arg value='-incoming'/>");
    } finally {
      await result.qmp.close();
    }
  });

  it('a resume function that throws before the VM ran: the domain is removed, stage resume', async () => {
    const target = await labProbeGuest('backup', NAME, PORT);
    const error = (await restoreFromCheckpoint({
      connection: backup,
      xml: target.xml,
      checkpoint: checkpointFile,
      hostPath: target.outside,
      replace: true,
      resume: async () => {
        throw new Error('no lease');
      },
    }).catch((e: unknown) => e)) as RestoreError;
    expect(error.name).toBe('RestoreError');
    expect(error.stage).toBe('resume');
    expect(error.message).toMatch(new RegExp(`^restore of '${NAME}' failed at resume: no lease`));
    expect(await backup.exists(NAME)).toBe(false);
  });
});
