/**
 * pnpm bench:kvm-incremental → bench/results/kvm-incremental.json
 *
 * Does x-ftvm-incremental (patch 0013) give correct checkpoint chains under KVM, where the dirty
 * log lives in the kernel and stays on between checkpoints? Needs /dev/kvm, so it is a
 * measurement, not a CI test. ftvm's QEMU (plain, no libvirt) boots the probe guest with its
 * memory workload under KVM; one full and several incremental migrations are taken; before the
 * last one the guest is stopped, and the assembled chain's pc.ram must be byte for byte what
 * `pmemsave` then dumps. The same run under TCG is the control.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { QmpClient } from '@ftvm/qmp';
import { assembleCheckpointChain, createStreamVerifier, parseMigrationStream, type CheckpointLayout } from '@ftvm/transport';
import { patchedQemu } from '../test/support/patched-qemu.js';
import { describeEnvironment } from './environment.js';

const INCREMENTS = Number(process.env.FTVM_BENCH_INCREMENTS ?? 5);
const GUEST = '/var/cache/ftvm/guest/current';
const manifest = JSON.parse(fs.readFileSync(path.join(GUEST, 'manifest.json'), 'utf8')) as { cmdline: string; readyLine: string };
const emulator = patchedQemu();
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

interface Capture {
  bytes: Buffer;
  layout: CheckpointLayout;
  fullRam: boolean;
}

async function run(accel: 'kvm' | 'tcg') {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `ftvm-${accel}-`));
  const qmpPath = path.join(dir, 'qmp');
  const serial = path.join(dir, 'serial.log');
  const qemu = spawn(emulator, [
    '-accel', accel, '-m', '256', '-smp', '1', '-nodefaults', '-display', 'none', '-no-user-config',
    '-kernel', path.join(GUEST, 'vmlinuz'), '-initrd', path.join(GUEST, 'initrd.img'),
    '-append', `${manifest.cmdline} ftvm.workload=4`,
    '-serial', `file:${serial}`,
    '-qmp', `unix:${qmpPath},server=on,wait=off`,
  ], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  qemu.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  try {
    const deadline = Date.now() + 15_000;
    while (!fs.existsSync(qmpPath)) {
      if (qemu.exitCode !== null || Date.now() > deadline) throw new Error(`QEMU (${accel}) did not start: ${stderr}`);
      await sleep(20);
    }
    const qmp = await QmpClient.connect({ path: qmpPath }, { connectTimeoutMs: 5_000 });
    for (let waited = 0; !fs.readFileSync(serial, 'utf8').includes(manifest.readyLine); waited += 100) {
      if (waited > 60_000) throw new Error(`guest (${accel}) not ready within 60 s`);
      await sleep(100);
    }
    await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }, { capability: 'x-ftvm-incremental', state: true }] });
    await qmp.execute('migrate-set-parameters', { 'max-bandwidth': 8 * 1024 * 1024 * 1024, 'downtime-limit': 5 });
    const captures: Capture[] = [];
    const migrate = async (): Promise<Capture> => {
      const sock = path.join(dir, `m${captures.length}.sock`);
      const server = net.createServer();
      const received = new Promise<Buffer>((resolve, reject) => {
        server.once('connection', (s) => {
          const chunks: Buffer[] = [];
          s.on('data', (c: Buffer) => chunks.push(c)).on('end', () => resolve(Buffer.concat(chunks))).on('error', reject);
        });
      });
      await new Promise<void>((r) => server.listen(sock, r));
      const completed = qmp.waitForEvent<{ status: string }>('MIGRATION', { timeoutMs: 60_000, predicate: (e) => e.data.status === 'completed' });
      await qmp.execute('migrate', { uri: `unix:${sock}` });
      await completed;
      const bytes = await Promise.race([received, sleep(30_000).then(() => Promise.reject(new Error('the migration stream did not end within 30 s')))]);
      server.close();
      const verifier = createStreamVerifier();
      verifier.update(bytes);
      const summary = verifier.end();
      if (!summary.layout) throw new Error('a stream without a layout');
      return { bytes, layout: summary.layout, fullRam: summary.fullRam };
    };
    captures.push(await migrate());
    await qmp.execute('cont'); // no x-ftvm-resume-source here: the plain QEMU way
    for (let i = 0; i < INCREMENTS; i++) {
      await sleep(1000);
      if (i === INCREMENTS - 1) await qmp.execute('stop');
      captures.push(await migrate());
      if (i < INCREMENTS - 1) await qmp.execute('cont');
    }
    // stopped since the last migration: QEMU's memory is what the chain must hold
    const dump = path.join(dir, 'mem');
    await qmp.execute('pmemsave', { val: 0, size: 256 * 1024 * 1024, filename: dump });
    const memory = fs.readFileSync(dump);
    const assembled = assembleCheckpointChain(captures.map((c) => c.bytes), captures.map((c) => c.layout));
    const ram = Buffer.alloc(256 * 1024 * 1024);
    for (const r of parseMigrationStream(Buffer.concat([...assembled.ram, assembled.deviceState]))) {
      if (r.type === 'ram-page' && r.block === 'pc.ram') r.data.copy(ram, r.addr);
      else if (r.type === 'ram-zero' && r.block === 'pc.ram') ram.fill(r.fill, r.addr, r.addr + 4096);
    }
    let differingPages = 0;
    for (let page = 0; page < ram.length; page += 4096) {
      if (page >= 0xa0000 && page < 0x100000) continue; // VGA and ROM in the physical address space
      if (!ram.subarray(page, page + 4096).equals(memory.subarray(page, page + 4096))) differingPages++;
    }
    await qmp.close();
    return {
      accel,
      full_bytes: captures[0]!.bytes.length,
      full_is_full: captures[0]!.fullRam,
      increment_bytes: captures.slice(1).map((c) => c.bytes.length),
      increments_are_partial: captures.slice(1).every((c) => !c.fullRam),
      pc_ram_pages_differing_from_qemu: differingPages,
      chain_equals_memory: differingPages === 0,
    };
  } finally {
    qemu.kill('SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

const runs = [];
for (const accel of ['kvm', 'tcg'] as const) {
  try {
    runs.push(await run(accel));
  } catch (error) {
    runs.push({ accel, error: (error as Error).message });
  }
  console.error(JSON.stringify(runs.at(-1)));
}
const result = { ...describeEnvironment(), accelerator: 'per run (kvm, then tcg as the control)', emulator, guest: GUEST, increments: INCREMENTS, runs };
fs.mkdirSync(new URL('./results/', import.meta.url), { recursive: true });
fs.writeFileSync(new URL('./results/kvm-incremental.json', import.meta.url), `${JSON.stringify(result, null, 2)}\n`);
console.log(JSON.stringify(result, null, 2));
