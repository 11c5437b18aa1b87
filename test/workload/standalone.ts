/**
 * The workload guest in plain QEMU under TCG (no libvirt, no lab): for the standalone check and for
 * booting a copy of a replica after a failover. Also the check of such a copy.
 */
import { execFile, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { workloadCmdline, type WorkloadImage, type WorkloadParams } from './image.js';
import { SerialLog, WorkloadSerialError, type StampedLine } from './serial.js';

const run = promisify(execFile);

export interface WorkloadBootOptions {
  image: WorkloadImage;
  /** The root disk to boot (default: a fresh qcow2 overlay on the image's, in `dir`). */
  disk?: { path: string; format: 'qcow2' | 'raw' };
  params: WorkloadParams;
  /** Guest memory (default 1024 MiB). */
  memoryMiB?: number;
  qemuBinary?: string;
  /** Where the serial log (and the overlay) go; default a new temporary directory. */
  dir?: string;
}

export interface WorkloadBoot {
  dir: string;
  disk: { path: string; format: 'qcow2' | 'raw' };
  pid: number;
  serial: SerialLog;
  /** Host realtime (ns) at spawn. */
  spawnedNs: bigint;
  /** Resolves with QEMU's exit code (or signal name) once it has exited. */
  exited: Promise<number | string>;
  /** undefined while QEMU runs; else how it ended (for SerialLog.waitFor's `gone`). */
  gone(): string | undefined;
  /** SIGKILL (a crash, as a failed host would see it) or SIGTERM, then waits for the exit. */
  kill(signal?: 'SIGKILL' | 'SIGTERM'): Promise<void>;
}

/** Boots the workload guest; the serial log is being followed when this returns. */
export async function bootWorkload(options: WorkloadBootOptions): Promise<WorkloadBoot> {
  const dir = options.dir ?? fs.mkdtempSync(path.join(os.tmpdir(), 'ftvm-workload-'));
  fs.mkdirSync(dir, { recursive: true });
  let disk = options.disk;
  if (!disk) {
    const overlay = path.join(dir, 'root-overlay.qcow2');
    fs.rmSync(overlay, { force: true });
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', options.image.disk, '-F', 'qcow2', overlay]);
    disk = { path: overlay, format: 'qcow2' };
  }
  const serialFile = path.join(dir, `serial-${Date.now()}.log`);
  const args = [
    '-accel', 'tcg', '-machine', 'pc', '-m', String(options.memoryMiB ?? 1024), '-smp', '1',
    '-nodefaults', '-display', 'none', '-no-reboot',
    '-kernel', options.image.kernel, '-initrd', options.image.initrd, '-append', workloadCmdline(options.image, options.params),
    '-serial', `file:${serialFile}`,
    // cache=none as the lab's domain has it: the image file, not the host's page cache, holds what
    // the guest flushed
    '-drive', `file=${disk.path},format=${disk.format},if=virtio,cache=none,aio=native`,
  ];
  const serial = new SerialLog(serialFile).start();
  const stderr: Buffer[] = [];
  const spawnedNs = BigInt(Date.now()) * 1_000_000n;
  const child = spawn(options.qemuBinary ?? 'qemu-system-x86_64', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  child.stderr.on('data', (chunk: Buffer) => stderr.push(chunk));
  let ended: string | undefined;
  const exited = new Promise<number | string>((resolve) => {
    child.on('exit', (code, signal) => {
      ended = `QEMU exited (${signal ?? `code ${code}`})${stderr.length ? `: ${Buffer.concat(stderr).toString().trim().slice(-1000)}` : ''}`;
      serial.stop();
      resolve(signal ?? code ?? -1);
    });
    child.on('error', (error) => {
      ended = `QEMU did not start: ${error.message}`;
      serial.stop();
      resolve(-1);
    });
  });
  const killOnExit = () => child.kill('SIGKILL');
  process.once('exit', killOnExit);
  void exited.then(() => process.off('exit', killOnExit));
  if (child.pid === undefined) {
    await exited;
    throw new Error(ended);
  }
  return {
    dir,
    disk,
    pid: child.pid,
    serial,
    spawnedNs,
    exited,
    gone: () => ended,
    async kill(signal = 'SIGTERM') {
      if (ended) return;
      child.kill(signal);
      const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
      await exited;
      clearTimeout(timer);
    },
  };
}

/** What booting a copy of a crashed disk in check mode found (guest/ftvm-workload-init, "check"). */
export interface DiskCheck {
  /** PostgreSQL came up (pg_ctl start exit 0). */
  started: boolean;
  /** It had to replay WAL (the disk was taken from a running server, as after a crash). */
  recovery: boolean;
  startS: number;
  seq: { count: number; min: number; max: number };
  /** Every n up to `highestAcked` is there, and the rows are exactly 1..max (no hole). */
  ackedPresent: boolean;
  highestAcked: number;
  /** pgbench's invariant: the four sums (accounts, tellers, branches, history deltas) are equal. */
  balancesEqual: boolean;
  balances: Record<string, string>;
  /** pg_amcheck --heapallindexed found nothing (exit 0). */
  amcheckClean: boolean;
  /** A new commit after the recovery worked. */
  writable: boolean;
  /** Clean shutdown afterwards. */
  stoppedCleanly: boolean;
  /** All of the above. */
  ok: boolean;
  bootS: number;
  problems: string[];
}

/**
 * Boots `disk` (a copy: the check writes to it) in check mode and judges it: PostgreSQL recovers,
 * the seq table holds every n ≤ `highestAcked` (the acknowledgements that count), its rows have no
 * hole, pgbench's balances agree, amcheck is clean, and it takes a new write.
 */
export async function checkDisk(image: WorkloadImage, disk: { path: string; format: 'qcow2' | 'raw' }, highestAcked: number, options: { qemuBinary?: string; dir?: string; timeoutMs?: number } = {}): Promise<DiskCheck> {
  const boot = await bootWorkload({ image, disk, params: { mode: 'check' }, ...(options.qemuBinary ? { qemuBinary: options.qemuBinary } : {}), ...(options.dir ? { dir: options.dir } : {}) });
  const timeoutMs = options.timeoutMs ?? 900_000;
  const wait = (what: string, event: string) => boot.serial.waitFor(what, (l) => l.line.kind === 'event' && l.line.event === event, { timeoutMs, gone: boot.gone });
  const fields = (l: StampedLine) => (l.line.kind === 'event' ? l.line.fields : {});
  const problems: string[] = [];
  try {
    const ready = fields(await wait('PostgreSQL started on the copy', 'pg-ready'));
    if (ready['rc'] !== '0') {
      const log = boot.serial.events('pg-log').map((l) => l.line.text).join('\n');
      throw new WorkloadSerialError('GUEST_ERROR', -1, `PostgreSQL did not start on the copy (pg_ctl ${ready['rc']}):\n${log}`);
    }
    const seqF = fields(await wait('the seq table summary', 'seq'));
    const bal = fields(await wait('the balances', 'balances'));
    const am = fields(await wait('amcheck', 'amcheck'));
    const write = fields(await wait('the write test', 'write'));
    const done = fields(await wait('the clean stop', 'done'));
    const doneAt = boot.serial.events('done')[0]!.hostNs;
    await boot.exited;
    const seq = { count: Number(seqF['count']), min: Number(seqF['min']), max: Number(seqF['max']) };
    const noHole = seq.count === 0 || (seq.min === 1 && seq.count === seq.max);
    const ackedPresent = noHole && seq.max >= highestAcked;
    if (!noHole) problems.push(`seq rows are not 1..max: ${JSON.stringify(seq)}`);
    if (seq.max < highestAcked) problems.push(`seq ends at ${seq.max}, but ${highestAcked} was acknowledged before the checkpoint`);
    const sums = ['accounts', 'tellers', 'branches', 'history'].map((k) => bal[k]);
    const balancesEqual = sums.every((s) => s !== undefined && s !== '' && s === sums[0]);
    if (!balancesEqual) problems.push(`pgbench balances differ: ${JSON.stringify(bal)}`);
    const amcheckClean = am['rc'] === '0';
    if (!amcheckClean) problems.push(`pg_amcheck exited ${am['rc']}`);
    const writable = /^[0-9]+$/.test(write['n'] ?? '');
    if (!writable) problems.push(`no new commit after recovery: ${JSON.stringify(write)}`);
    const stoppedCleanly = done['pg_stop_rc'] === '0';
    if (!stoppedCleanly) problems.push(`pg_ctl stop exited ${done['pg_stop_rc']}`);
    return {
      started: true,
      recovery: ready['recovery'] === 'yes',
      startS: Number(ready['s']),
      seq,
      ackedPresent,
      highestAcked,
      balancesEqual,
      balances: bal,
      amcheckClean,
      writable,
      stoppedCleanly,
      ok: problems.length === 0,
      bootS: Number(doneAt - boot.spawnedNs) / 1e9,
      problems,
    };
  } finally {
    await boot.kill('SIGKILL');
  }
}
