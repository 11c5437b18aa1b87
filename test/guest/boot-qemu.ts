/**
 * Boots the ftvm test guest (test/guest/build.sh) in plain QEMU under TCG, with the clock probe's
 * UDP port forwarded to 127.0.0.1, the guest agent on a unix socket and QMP on another, and
 * optionally the probe's disks (test/support/disk-check.ts).
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import dgram from 'node:dgram';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { ProbeDisk, ProbeDisks } from '../support/disk-check.js';
import { waitForProbe, type ProbeTarget } from '../support/probe-client.js';

const BUILD_SCRIPT = fileURLToPath(new URL('./build.sh', import.meta.url));
const READY_LINE = 'FTVM-PROBE-READY';

export interface GuestImage {
  dir: string;
  kernel: string;
  initrd: string;
  /** The command line the image was built and measured with (see README.md). */
  cmdline: string;
}

/** Runs build.sh (a cache hit takes well under a second) and returns the image it printed. */
export function buildGuest(options: { timeoutMs?: number } = {}): Promise<GuestImage> {
  return new Promise((resolve, reject) => {
    execFile(
      'bash',
      [BUILD_SCRIPT],
      { timeout: options.timeoutMs ?? 600_000, maxBuffer: 16 << 20 },
      (error, stdout, stderr) => {
        if (error) return reject(new Error(`build.sh failed: ${error.message}\n${stderr.slice(-2000)}`));
        const dir = stdout.trim().split('\n').pop() ?? '';
        try {
          const manifest = JSON.parse(fs.readFileSync(path.join(dir, 'manifest.json'), 'utf8')) as { cmdline: string };
          resolve({
            dir,
            kernel: path.join(dir, 'vmlinuz'),
            initrd: path.join(dir, 'initrd.img'),
            cmdline: manifest.cmdline,
          });
        } catch (e) {
          reject(new Error(`build.sh printed ${JSON.stringify(dir)}, which is not a guest directory: ${String(e)}`));
        }
      },
    );
  });
}

export interface BootOptions {
  image: GuestImage;
  /** Start the probe's workload at boot (ftvm.workload=). */
  workloadMiBps?: number;
  memoryMiB?: number;
  /**
   * Guest clocksource. Default: the image's (tsc). 'hpet' runs at exactly host rate but drops any
   * counter jump over 21.47 s; see README.md ("Guest clock").
   */
  clocksource?: 'tsc' | 'hpet' | 'acpi_pm';
  /** Replaces the image's command line (experiments); extraCmdline is appended either way. */
  cmdline?: string;
  extraCmdline?: string;
  /** Appended to the QEMU command line, e.g. ['-incoming', 'defer']. */
  qemuArgs?: string[];
  qemuBinary?: string;
  /** Spawn to probe answering. Default 60 s (a TCG boot takes a few seconds). */
  timeoutMs?: number;
  /** Keep the run directory (serial log, QEMU stderr) after kill(). */
  keepDir?: boolean;
  /**
   * The probe's disks (createProbeDisks()), attached as virtio-blk with serials ftvm-ring /
   * ftvm-fs: block nodes `ftvm-ring` / `ftvm-fs` (format) over `ftvm-ring-file` / `ftvm-fs-file`,
   * devices `ftvm-ring-blk` / `ftvm-fs-blk`.
   */
  disks?: ProbeDisks;
  /** Host cache mode of the disks. Default 'none' (O_DIRECT, flushes reach the host disk), aio native. */
  diskCache?: DiskCache;
}

/** aio 'native' needs cache 'none' (O_DIRECT); QEMU refuses it otherwise. */
export interface DiskCache {
  cache: 'none' | 'writeback' | 'unsafe';
  aio?: 'native' | 'threads';
}

/**
 * QEMU arguments for the probe's disks. -blockdev (not -drive) as libvirt does: named nodes for
 * QMP (dirty bitmaps, fleecing) and JSON, so paths need no comma escaping.
 */
export function probeDiskArgs(disks: ProbeDisks, cache: DiskCache = { cache: 'none', aio: 'native' }): string[] {
  const attached = [disks.ring, disks.fs].filter((d): d is ProbeDisk => d !== undefined);
  return attached.flatMap((disk) => {
    const node = disk.serial; // ftvm-ring, ftvm-fs: valid node names
    const file = {
      driver: 'file',
      'node-name': `${node}-file`,
      filename: disk.path,
      cache: { direct: cache.cache === 'none', 'no-flush': cache.cache === 'unsafe' },
      aio: cache.aio ?? (cache.cache === 'none' ? 'native' : 'threads'),
    };
    return [
      '-blockdev', JSON.stringify({ driver: disk.format, 'node-name': node, file }),
      '-device', `virtio-blk-pci,drive=${node},id=${node}-blk,serial=${disk.serial}`,
    ];
  });
}

export interface BootedGuest {
  probe: ProbeTarget;
  probePort: number;
  serialLog: string;
  gaSocket: string;
  qmpSocket: string;
  dir: string;
  pid: number;
  /** Spawn of QEMU to the first probe answer, host wall time. */
  bootMs: number;
  /** Resolves when QEMU exits (also after kill()). */
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  kill(): Promise<void>;
}

const live = new Set<ChildProcess>();
// A test runner that dies mid-test must not leave QEMU processes behind.
process.once('exit', () => {
  for (const child of live) child.kill('SIGKILL');
});

export async function bootGuest(options: BootOptions): Promise<BootedGuest> {
  // The free port is picked, then bound by QEMU: another process can take it in between, which
  // QEMU reports as a failed hostfwd rule. Retry with a new port in that case.
  for (let attempt = 1; ; attempt++) {
    try {
      return await bootOnce(options, await freeUdpPort());
    } catch (error) {
      if (attempt >= 3 || !(error instanceof HostfwdError)) throw error;
    }
  }
}

class HostfwdError extends Error {}

async function bootOnce(options: BootOptions, probePort: number): Promise<BootedGuest> {
  const timeoutMs = options.timeoutMs ?? 60_000;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ftvm-guest-'));
  const serialLog = path.join(dir, 'serial.log');
  const gaSocket = path.join(dir, 'qga.sock');
  const qmpSocket = path.join(dir, 'qmp.sock');
  const stderrLog = path.join(dir, 'qemu.stderr');
  let cmdline = options.cmdline ?? options.image.cmdline;
  if (options.clocksource) {
    const chosen = options.clocksource === 'tsc' ? 'clocksource=tsc tsc=reliable' : `clocksource=${options.clocksource}`;
    cmdline = `${cmdline.replace(/(^|\s)(clocksource|tsc)=\S+/g, '')} ${chosen}`;
  }
  if (options.workloadMiBps) cmdline += ` ftvm.workload=${options.workloadMiBps}`;
  if (options.extraCmdline) cmdline += ` ${options.extraCmdline}`;

  // -no-reboot + panic=-1: a guest panic ends QEMU, which fails the boot at once instead of looping.
  // romfile= drops the iPXE option ROM, which only costs boot time with direct kernel boot.
  const args = [
    '-accel', 'tcg', '-m', String(options.memoryMiB ?? 256), '-smp', '1',
    '-nodefaults', '-nographic', '-no-reboot',
    '-kernel', options.image.kernel, '-initrd', options.image.initrd, '-append', cmdline,
    '-serial', `file:${serialLog}`,
    '-netdev', `user,id=n0,hostfwd=udp:127.0.0.1:${probePort}-:5555`,
    '-device', 'virtio-net-pci,netdev=n0,romfile=',
    '-chardev', `socket,id=qga0,path=${gaSocket},server=on,wait=off`,
    '-device', 'virtio-serial', '-device', 'virtserialport,chardev=qga0,name=org.qemu.guest_agent.0',
    '-qmp', `unix:${qmpSocket},server=on,wait=off`,
    ...(options.disks ? probeDiskArgs(options.disks, options.diskCache) : []),
    ...(options.qemuArgs ?? []),
  ];
  const stderrFd = fs.openSync(stderrLog, 'w');
  const started = performance.now();
  const child = spawn(options.qemuBinary ?? 'qemu-system-x86_64', args, { stdio: ['ignore', 'ignore', stderrFd] });
  fs.closeSync(stderrFd); // the child has its own copy
  live.add(child);
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    child.once('exit', (code, signal) => {
      live.delete(child);
      resolve({ code, signal });
    });
    child.once('error', () => resolve({ code: null, signal: null }));
  });

  let killed: Promise<void> | undefined;
  const kill = (): Promise<void> =>
    (killed ??= (async () => {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill('SIGTERM');
        if (!(await within(exited, 5_000))) {
          child.kill('SIGKILL');
          await within(exited, 5_000);
        }
      }
      if (!options.keepDir) fs.rmSync(dir, { recursive: true, force: true });
    })());

  const describe = (): string => `serial log:\n${tail(serialLog)}\nQEMU stderr:\n${tail(stderrLog)}`;
  // QEMU's early death (bad option, port taken, guest panic) wins the race against the waits.
  const died = exited.then(({ code, signal }) => {
    const message = `QEMU exited (code ${code}, signal ${signal}) before the guest was ready`;
    throw tail(stderrLog).includes('host forwarding rule') ? new HostfwdError(message) : new Error(message);
  });
  const ready = (async () => {
    const deadline = started + timeoutMs;
    await waitForLine(serialLog, READY_LINE, deadline);
    await waitForProbe({ host: '127.0.0.1', port: probePort }, Math.max(1, deadline - performance.now()));
  })();
  try {
    await Promise.race([ready, died]);
  } catch (error) {
    ready.catch(() => {});
    const detail = describe(); // before kill(), which removes the run directory
    await kill();
    if (error instanceof HostfwdError) throw error;
    throw new Error(`guest boot failed: ${(error as Error).message}\n${detail}`);
  }
  died.catch(() => {}); // a later exit is the caller's business (see exited)
  return {
    probe: { host: '127.0.0.1', port: probePort },
    probePort,
    serialLog,
    gaSocket,
    qmpSocket,
    dir,
    pid: child.pid ?? -1,
    bootMs: performance.now() - started,
    exited,
    kill,
  };
}

async function waitForLine(file: string, needle: string, deadline: number): Promise<void> {
  while (!readOr(file, '').includes(needle)) {
    if (performance.now() > deadline) throw new Error(`no ${needle} on the serial console in time`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

function freeUdpPort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const socket = dgram.createSocket('udp4');
    socket.once('error', reject);
    socket.bind(0, '127.0.0.1', () => {
      const { port } = socket.address();
      socket.close(() => resolve(port));
    });
  });
}

async function within(promise: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<false>((resolve) => (timer = setTimeout(() => resolve(false), ms)));
  try {
    return await Promise.race([promise.then(() => true), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

function readOr(file: string, fallback: string): string {
  try {
    return fs.readFileSync(file, 'utf8');
  } catch {
    return fallback;
  }
}

function tail(file: string, lines = 30): string {
  return readOr(file, '(none)').split('\n').slice(-lines).join('\n');
}
