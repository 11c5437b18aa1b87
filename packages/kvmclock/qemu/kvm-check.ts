/**
 * The KVM test plan of @ftvm/kvmclock (README.md, "KVM test plan"), run where /dev/kvm exists.
 * Not in CI: CI and the development machines have no /dev/kvm, and there it exits 77.
 *
 *   flock /tmp/ftvm-lab.lock pnpm exec tsx --conditions=@ftvm/source packages/kvmclock/qemu/kvm-check.ts \
 *     [--qemu <binary>] [--only kvm-clock,tsc] [--pauses 5] [--pause-ms 1000]
 *
 * For each guest clocksource (kvm-clock, tsc) it boots the probe guest (test/guest) under KVM
 * with -smp 2 on ftvm's QEMU and:
 *  1. checks the guest runs the clocksource asked for, on 2 CPUs;
 *  2. uploads kvm-check.c (built here, static) through the guest agent and runs it on every vCPU
 *     for the whole case: CLOCK_MONOTONIC must never go backwards across vCPUs;
 *  3. notes KVM_CLOCK_TSC_STABLE (host ftrace, kvm:kvm_update_master_clock: KVM_GET_CLOCK reports
 *     the flag exactly when KVM uses its master clock) before the pauses;
 *  4. local pauses: stop, wait, arm x-ftvm-clock-compensate, cont; the guest's realtime offset to
 *     the host (guest-get-time) must not move by more than the tolerance over all of them;
 *  5. a restore: migrate to a file, quit, load it into a new QEMU (-incoming defer), arm
 *     offset-ns = the outage, cont — the offset must not move either (for tsc this needs 0002's
 *     TSC advance at a restore);
 *  6. KVM_CLOCK_TSC_STABLE after the last resume, the checker's verdict, and the guest's dmesg
 *     free of "clocksource ... unstable", "Marking clocksource", "soft lockup".
 * TAP lines `ok N - ...`; exit 0 all passed, 1 a check failed, 2 setup error, 77 no /dev/kvm.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { realtimeClock } from '@ftvm/kvmclock';
import { GuestAgentClient, QmpClient, type QmpEvent } from '@ftvm/qmp';
import { buildGuest, type GuestImage } from '../../../test/guest/boot-qemu.js';
import { patchedQemu } from '../../../test/support/patched-qemu.js';
import { check, CheckFailed, stringify } from '../../../test/qemu/checks.js';

const EXIT_NO_KVM = 77;
const EXIT_SETUP = 2;
const CHECKER_SOURCE = fileURLToPath(new URL('./kvm-check.c', import.meta.url));
const GUEST_CHECKER = '/run/kvm-check-mono';
const BOOT_DEADLINE_MS = 90_000;
/** How far the guest's realtime offset to the host may move over a case (guest-get-time is ~1 ms exact). */
const TOLERANCE_NS = 20_000_000n;
const DMESG_BAD = /clocksource.*unstable|Marking clocksource|soft lockup|watchdog: BUG/i;

type Clocksource = 'kvm-clock' | 'tsc';

class SetupError extends Error {
  override name = 'SetupError';
}

function parseArgs(argv: string[]): { qemu?: string; only: Clocksource[]; pauses: number; pauseMs: number } {
  const out = { only: ['kvm-clock', 'tsc'] as Clocksource[], pauses: 5, pauseMs: 1000 } as { qemu?: string; only: Clocksource[]; pauses: number; pauseMs: number };
  for (let i = 0; i < argv.length; i++) {
    const value = argv[i + 1];
    const need = () => {
      if (value === undefined) throw new SetupError(`${argv[i]} needs a value`);
      i++;
      return value;
    };
    switch (argv[i]) {
      case '--qemu': out.qemu = need(); break;
      case '--only': {
        const list = need().split(',');
        for (const c of list) if (c !== 'kvm-clock' && c !== 'tsc') throw new SetupError(`--only: ${JSON.stringify(c)} is not kvm-clock or tsc`);
        out.only = list as Clocksource[];
        break;
      }
      case '--pauses': out.pauses = Number(need()); break;
      case '--pause-ms': out.pauseMs = Number(need()); break;
      default: throw new SetupError(`unknown argument ${JSON.stringify(argv[i])}`);
    }
  }
  if (!Number.isInteger(out.pauses) || out.pauses < 1) throw new SetupError('--pauses must be a positive integer');
  if (!(out.pauseMs >= 10 && out.pauseMs <= 60_000)) throw new SetupError('--pause-ms must be within 10..60000');
  return out;
}

/**
 * Exits 77 unless this process can open /dev/kvm read-write and it is hardware KVM (kvm_intel or
 * kvm_amd). A /dev/kvm from kvm_pvm (PVM, KVM without VMX/SVM) runs only PVM-built guest kernels:
 * the probe guest's Debian kernel does not boot there (measured: no console output; `-cpu host`
 * aborts on MSR 0x10a).
 */
function requireKvm(): void {
  const noKvm = (why: string): never => {
    console.error(`kvm-check: ${why}: this machine cannot run the KVM checks, nothing was checked (exit ${EXIT_NO_KVM}). Run it on a KVM host (VMX/SVM).`);
    process.exit(EXIT_NO_KVM);
  };
  const device = process.env.FTVM_KVM_DEVICE ?? '/dev/kvm'; // another path only to try this exit
  try {
    fs.closeSync(fs.openSync(device, 'r+'));
  } catch (error) {
    noKvm((error as NodeJS.ErrnoException).code === 'ENOENT' ? `${device} is absent` : `${device} is not usable (${(error as Error).message})`);
  }
  const hardware = ['kvm_intel', 'kvm_amd'].some((m) => fs.existsSync(`/sys/module/${m}`));
  if (!hardware) {
    noKvm(fs.existsSync('/sys/module/kvm_pvm') ? '/dev/kvm is PVM (kvm_pvm, no kvm_intel/kvm_amd): it boots only PVM guest kernels, not the probe guest' : '/dev/kvm has neither kvm_intel nor kvm_amd behind it');
  }
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

// ---- host ftrace: KVM_CLOCK_TSC_STABLE ---------------------------------------------------------

/** A private trace instance with the KVM clock events on (root and tracefs needed). */
class KvmClockTrace {
  private constructor(readonly dir: string) {}

  static open(): KvmClockTrace {
    const roots = ['/sys/kernel/tracing', '/sys/kernel/debug/tracing'];
    const root = roots.find((r) => fs.existsSync(path.join(r, 'instances')));
    if (!root) throw new SetupError(`no tracefs (looked in ${roots.join(', ')}): mount it (mount -t tracefs nodev /sys/kernel/tracing) to check KVM_CLOCK_TSC_STABLE`);
    const dir = path.join(root, 'instances', `ftvm-kvm-check-${process.pid}`);
    fs.mkdirSync(dir);
    const trace = new KvmClockTrace(dir);
    for (const event of ['kvm_update_master_clock', 'kvm_track_tsc']) {
      const enable = path.join(dir, 'events', 'kvm', event, 'enable');
      if (!fs.existsSync(enable)) {
        trace.close();
        throw new SetupError(`the host kernel has no kvm:${event} trace event (kvm module loaded?)`);
      }
      fs.writeFileSync(enable, '1');
    }
    return trace;
  }

  /** The newest kvm_update_master_clock of one QEMU's threads: masterclock on ⇔ KVM_CLOCK_TSC_STABLE. */
  masterClock(pid: number): { line: string; stable: boolean } | undefined {
    const tids = new Set(fs.readdirSync(`/proc/${pid}/task`));
    const lines = fs.readFileSync(path.join(this.dir, 'trace'), 'utf8').split('\n');
    for (let i = lines.length - 1; i >= 0; i--) {
      const line = lines[i]!;
      const m = /-(\d+)\s+\[.*kvm_update_master_clock:\s+masterclock (\d)/.exec(line);
      if (m && tids.has(m[1]!)) return { line: line.trim(), stable: m[2] === '1' };
    }
    return undefined;
  }

  close(): void {
    try {
      fs.rmdirSync(this.dir);
    } catch {
      // busy for a moment after events were on; the instance is harmless if it stays
    }
  }
}

// ---- one guest ---------------------------------------------------------------------------------

interface Vm {
  child: ChildProcess;
  qmp: QmpClient;
  /** Connected once the guest runs (not for an incoming QEMU before its `cont`). */
  agent?: GuestAgentClient;
  dir: string;
  serialLog: string;
}

function qemuArgs(image: GuestImage, clocksource: Clocksource, dir: string, tag: string, incoming: boolean, watchdogOff: boolean): string[] {
  // No tsc=reliable by default: it turns off the clocksource watchdog whose complaint we grep for.
  const cmdline = `${image.cmdline.replace(/(^|\s)(clocksource|tsc)=\S+/g, '')} clocksource=${clocksource}${watchdogOff ? ' tsc=reliable' : ''}`;
  return [
    '-machine', 'pc', '-accel', 'kvm', '-cpu', 'host', '-smp', '2', '-m', '256',
    '-nodefaults', '-display', 'none', '-no-reboot',
    '-kernel', image.kernel, '-initrd', image.initrd, '-append', cmdline,
    '-serial', `file:${path.join(dir, `serial-${tag}.log`)}`,
    '-qmp', `unix:${path.join(dir, `qmp-${tag}.sock`)},server=on,wait=off`,
    '-chardev', `socket,id=qga0,path=${path.join(dir, `qga-${tag}.sock`)},server=on,wait=off`,
    '-device', 'virtio-serial', '-device', 'virtserialport,chardev=qga0,name=org.qemu.guest_agent.0',
    '-netdev', 'user,id=n0', '-device', 'virtio-net-pci,netdev=n0,romfile=',
    ...(incoming ? ['-incoming', 'defer', '-S'] : []),
  ];
}

async function startVm(qemu: string, args: string[], dir: string, tag: string, waitReady: boolean): Promise<Vm> {
  const child = spawn(qemu, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  const stderr: string[] = [];
  child.stderr!.on('data', (chunk: Buffer) => stderr.push(chunk.toString()));
  const serialLog = path.join(dir, `serial-${tag}.log`);
  const fail = (what: string) => {
    child.kill('SIGKILL');
    const serial = fs.existsSync(serialLog) ? fs.readFileSync(serialLog, 'utf8').slice(-2000) : '';
    return new CheckFailed(`${what}; QEMU stderr: ${stderr.join('').trim() || '(none)'}; serial: ${serial || '(none)'}`);
  };
  const qmp = await QmpClient.connectWhenReady({ path: path.join(dir, `qmp-${tag}.sock`) }, { timeoutMs: 15_000, commandTimeoutMs: 30_000 }).catch((e: Error) => {
    throw fail(`QEMU did not answer on QMP (${e.message})`);
  });
  if (waitReady) {
    const deadline = Date.now() + BOOT_DEADLINE_MS;
    while (!(fs.existsSync(serialLog) && fs.readFileSync(serialLog, 'utf8').includes('FTVM-PROBE-READY'))) {
      if (child.exitCode !== null) throw fail('QEMU exited during boot');
      if (Date.now() > deadline) throw fail(`no FTVM-PROBE-READY within ${BOOT_DEADLINE_MS / 1000} s`);
      await sleep(200);
    }
  }
  return { child, qmp, ...(waitReady ? { agent: await connectAgent(dir, tag) } : {}), dir, serialLog };
}

async function connectAgent(dir: string, tag: string): Promise<GuestAgentClient> {
  const deadline = Date.now() + 30_000;
  for (;;) {
    try {
      return await GuestAgentClient.connect({ path: path.join(dir, `qga-${tag}.sock`) }, { connectTimeoutMs: 5_000, commandTimeoutMs: 30_000 });
    } catch (error) {
      if (Date.now() > deadline) throw new CheckFailed(`the guest agent did not answer within 30 s: ${(error as Error).message}`);
      await sleep(500);
    }
  }
}

async function stopVm(vm: Vm): Promise<void> {
  await vm.agent?.close().catch(() => undefined);
  await vm.qmp.execute('quit').catch(() => undefined);
  await vm.qmp.close().catch(() => undefined);
  await new Promise<void>((resolve) => {
    if (vm.child.exitCode !== null || vm.child.signalCode !== null) return resolve();
    const timer = setTimeout(() => vm.child.kill('SIGKILL'), 5_000);
    vm.child.once('exit', () => {
      clearTimeout(timer);
      resolve();
    });
  });
}

// ---- guest agent helpers -----------------------------------------------------------------------

async function readGuestFile(agent: GuestAgentClient, file: string): Promise<string> {
  const handle = await agent.execute<number>('guest-file-open', { path: file, mode: 'r' });
  try {
    const r = await agent.execute<{ 'buf-b64': string }>('guest-file-read', { handle, count: 65536 });
    return Buffer.from(r['buf-b64'], 'base64').toString('utf8');
  } finally {
    await agent.execute('guest-file-close', { handle });
  }
}

async function writeGuestFile(agent: GuestAgentClient, file: string, data: Buffer): Promise<void> {
  const handle = await agent.execute<number>('guest-file-open', { path: file, mode: 'w' });
  try {
    for (let at = 0; at < data.length; at += 48 * 1024) {
      await agent.execute('guest-file-write', { handle, 'buf-b64': data.subarray(at, at + 48 * 1024).toString('base64') });
    }
  } finally {
    await agent.execute('guest-file-close', { handle });
  }
}

interface ExecResult {
  exitcode?: number;
  out: string;
  err: string;
}

async function guestExecStart(agent: GuestAgentClient, cmd: string, args: string[]): Promise<number> {
  const r = await agent.execute<{ pid: number }>('guest-exec', { path: cmd, arg: args, 'capture-output': true });
  return r.pid;
}

async function guestExecWait(agent: GuestAgentClient, pid: number, deadlineMs: number): Promise<ExecResult> {
  const deadline = Date.now() + deadlineMs;
  for (;;) {
    const s = await agent.execute<{ exited: boolean; exitcode?: number; 'out-data'?: string; 'err-data'?: string }>('guest-exec-status', { pid });
    if (s.exited) {
      const dec = (b?: string) => (b ? Buffer.from(b, 'base64').toString('utf8') : '');
      return { ...(s.exitcode === undefined ? {} : { exitcode: s.exitcode }), out: dec(s['out-data']), err: dec(s['err-data']) };
    }
    if (Date.now() > deadline) throw new CheckFailed(`guest process ${pid} still running after ${deadlineMs} ms`);
    await sleep(250);
  }
}

/** Guest realtime − host realtime (ns), the best of 5 guest-get-time exchanges by round trip. */
async function guestOffsetNs(agent: GuestAgentClient, hostNow: () => bigint): Promise<bigint> {
  let best: { rtt: bigint; offset: bigint } | undefined;
  for (let i = 0; i < 5; i++) {
    const before = hostNow();
    const guest = await agent.getTime(5_000);
    const after = hostNow();
    const sample = { rtt: after - before, offset: guest - (before + after) / 2n };
    if (!best || sample.rtt < best.rtt) best = sample;
  }
  return best!.offset;
}

// ---- one case ----------------------------------------------------------------------------------

async function runCase(qemu: string, image: GuestImage, checker: Buffer, trace: KvmClockTrace, clocksource: Clocksource, opts: { pauses: number; pauseMs: number }): Promise<void> {
  const dir = await mkdtemp(path.join(os.tmpdir(), `ftvm-kvm-check-${clocksource}-`));
  const hostNow = realtimeClock();
  let vm: Vm | undefined;
  try {
    let watchdogOff = false;
    vm = await startVm(qemu, qemuArgs(image, clocksource, dir, 'a', false, false), dir, 'a', true);
    let current = (await readGuestFile(vm.agent!, '/sys/devices/system/clocksource/clocksource0/current_clocksource')).trim();
    if (current !== clocksource && clocksource === 'tsc') {
      // The guest did not trust its TSC (no invariant TSC in CPUID): force it, and say the watchdog is off.
      console.log(`# ${clocksource}: the guest chose ${current}; rebooting with tsc=reliable (clocksource watchdog off for this case)`);
      await stopVm(vm);
      watchdogOff = true;
      vm = await startVm(qemu, qemuArgs(image, clocksource, dir, 'a', false, true), dir, 'a', true);
      current = (await readGuestFile(vm.agent!, '/sys/devices/system/clocksource/clocksource0/current_clocksource')).trim();
    }
    check(current === clocksource, `${clocksource}: the guest runs on clocksource ${clocksource}${watchdogOff ? ' (tsc=reliable)' : ''}`, current);
    const online = (await readGuestFile(vm.agent!, '/sys/devices/system/cpu/online')).trim();
    check(online === '0-1', `${clocksource}: the guest has 2 vCPUs online`, online);

    await writeGuestFile(vm.agent!, GUEST_CHECKER, checker);
    const chmod = await guestExecWait(vm.agent!, await guestExecStart(vm.agent!, '/bin/chmod', ['755', GUEST_CHECKER]), 10_000);
    check(chmod.exitcode === 0, `${clocksource}: checker uploaded to the guest`, chmod);

    const before = trace.masterClock(vm.child.pid!);
    check(before?.stable === true, `${clocksource}: KVM_CLOCK_TSC_STABLE (master clock) before the pauses`, before?.line ?? 'no kvm_update_master_clock event of this QEMU');

    // The checker runs across every pause and the restore, until told to end (SIGTERM).
    const runSeconds = 600;
    const checkerPid = await guestExecStart(vm.agent!, GUEST_CHECKER, [String(runSeconds)]);
    const offset0 = await guestOffsetNs(vm.agent!, hostNow);

    // Local compensated pauses.
    let applied = 0n;
    for (let i = 0; i < opts.pauses; i++) {
      await vm.qmp.execute('stop');
      await sleep(opts.pauseMs);
      await vm.qmp.execute('x-ftvm-clock-compensate', { 'include-stopped-time': true });
      await vm.qmp.execute('cont');
      const q = await vm.qmp.execute<{ 'last-resume'?: { 'applied-ns': number } }>('x-ftvm-query-clock-compensation');
      applied += BigInt(q['last-resume']?.['applied-ns'] ?? 0);
      await sleep(500);
    }
    const offset1 = await guestOffsetNs(vm.agent!, hostNow);
    check(applied >= BigInt(opts.pauses * opts.pauseMs) * 1_000_000n, `${clocksource}: QEMU applied the stopped time at each local resume`, { appliedNs: applied });
    const drift1 = offset1 - offset0;
    check(drift1 < TOLERANCE_NS && drift1 > -TOLERANCE_NS, `${clocksource}: ${opts.pauses} compensated local pauses of ${opts.pauseMs} ms leave the guest on time (offset moved ${Number(drift1) / 1e6} ms)`, { offset0, offset1 });

    // A restore: the state saved to a file, loaded into a fresh QEMU, the outage given back as
    // offset-ns. Stopped first, so that the kvmclock and the TSCs are both read at the STOP (a
    // running VM's migration re-reads kvmclock in pre_save, up to a downtime later).
    const state = path.join(dir, 'state.bin');
    const stopped = vm.qmp.waitForEvent('STOP', { timeoutMs: 60_000 });
    await vm.qmp.execute('stop');
    const stopEvent: QmpEvent = await stopped;
    await vm.qmp.execute('migrate', { uri: `exec:cat > ${state}` });
    await waitMigration(vm.qmp, 'completed');
    await stopVm(vm);
    vm = await startVm(qemu, qemuArgs(image, clocksource, dir, 'b', true, watchdogOff), dir, 'b', false);
    await vm.qmp.execute('migrate-incoming', { uri: `exec:cat ${state}` });
    await waitMigration(vm.qmp, 'completed');
    const outageNs = hostNow() - stopEvent.timestampNs;
    await vm.qmp.execute('x-ftvm-clock-compensate', { 'include-stopped-time': true, 'offset-ns': Number(outageNs) });
    await vm.qmp.execute('cont');
    vm.agent = await connectAgent(dir, 'b');
    const restored = await vm.qmp.execute<{ 'last-resume'?: { 'applied-ns': number } }>('x-ftvm-query-clock-compensation');
    const offset2 = await guestOffsetNs(vm.agent!, hostNow);
    const drift2 = offset2 - offset1;
    check(
      drift2 < TOLERANCE_NS && drift2 > -TOLERANCE_NS,
      `${clocksource}: a restore ${Number(outageNs) / 1e6} ms after the stop, compensated by offset-ns, leaves the guest on time (offset moved ${Number(drift2) / 1e6} ms)`,
      { offset1, offset2, applied: restored['last-resume'] },
    );

    const after = trace.masterClock(vm.child.pid!);
    check(after?.stable === true, `${clocksource}: KVM_CLOCK_TSC_STABLE (master clock) after the last resume`, after?.line ?? 'no kvm_update_master_clock event of this QEMU');

    const kill = await guestExecWait(vm.agent!, await guestExecStart(vm.agent!, '/bin/kill', ['-TERM', String(checkerPid)]), 10_000);
    check(kill.exitcode === 0, `${clocksource}: the checker was still running after the restore (ended by SIGTERM)`, kill);
    const result = await guestExecWait(vm.agent!, checkerPid, 30_000);
    let verdict: { cpus: number; reads: number; backwards: number; maxBackNs: number; realtimeBackwards: number } | undefined;
    try {
      verdict = JSON.parse(result.out.trim());
    } catch {
      verdict = undefined;
    }
    check(result.exitcode === 0 && verdict !== undefined && verdict.cpus === 2 && verdict.reads > 0, `${clocksource}: the checker ran on both vCPUs`, result);
    check(verdict!.backwards === 0, `${clocksource}: CLOCK_MONOTONIC never went backwards across vCPUs (${verdict!.reads} reads)`, verdict);
    check(verdict!.realtimeBackwards === 0, `${clocksource}: CLOCK_REALTIME never stepped back on a vCPU`, verdict);

    const dmesg = await guestExecWait(vm.agent!, await guestExecStart(vm.agent!, '/bin/dmesg', []), 10_000);
    const bad = dmesg.out.split('\n').filter((l) => DMESG_BAD.test(l));
    check(dmesg.exitcode === 0 && dmesg.out.length > 0, `${clocksource}: read the guest's dmesg`, dmesg.err);
    check(bad.length === 0, `${clocksource}: the guest's dmesg has no clocksource-unstable or soft-lockup message`, bad);
  } finally {
    if (vm) await stopVm(vm);
    await rm(dir, { recursive: true, force: true });
  }
}

async function waitMigration(qmp: QmpClient, want: 'completed'): Promise<void> {
  const deadline = Date.now() + 60_000;
  for (;;) {
    const s = await qmp.execute<{ status?: string; 'error-desc'?: string }>('query-migrate');
    if (s.status === want) return;
    if (s.status === 'failed' || s.status === 'cancelled') throw new CheckFailed(`migration ${s.status}: ${s['error-desc'] ?? ''}`);
    if (Date.now() > deadline) throw new CheckFailed(`migration not ${want} within 60 s (status ${s.status})`);
    await sleep(100);
  }
}

async function main(): Promise<number> {
  requireKvm();
  const opts = parseArgs(process.argv.slice(2));
  if (process.getuid?.() !== 0) throw new SetupError('run as root (host ftrace for KVM_CLOCK_TSC_STABLE, and build.sh on a cache miss)');
  const qemu = opts.qemu ?? patchedQemu();
  const image = await buildGuest();
  const build = await mkdtemp(path.join(os.tmpdir(), 'ftvm-kvm-check-build-'));
  let checker: Buffer;
  try {
    const out = path.join(build, 'kvm-check-mono');
    try {
      execFileSync('gcc', ['-O2', '-static', '-pthread', '-o', out, CHECKER_SOURCE], { stdio: ['ignore', 'ignore', 'pipe'] });
    } catch (error) {
      throw new SetupError(`cannot build the checker (gcc, libc6-dev, static): ${(error as Error).message}`);
    }
    checker = fs.readFileSync(out);
  } finally {
    await rm(build, { recursive: true, force: true });
  }
  const trace = KvmClockTrace.open();
  console.log(`# qemu ${qemu}; guest ${image.dir}; clocksources ${opts.only.join(', ')}`);
  try {
    for (const clocksource of opts.only) await runCase(qemu, image, checker, trace, clocksource, opts);
  } finally {
    trace.close();
  }
  console.log('# all KVM checks passed');
  return 0;
}

main().then(
  (code) => process.exit(code),
  (error: Error) => {
    if (error instanceof CheckFailed) {
      console.log(`not ok - ${error.message}`);
      process.exit(1);
    }
    console.error(`kvm-check: ${error instanceof SetupError ? '' : 'error: '}${error.message ?? stringify(error)}`);
    process.exit(EXIT_SETUP);
  },
);
