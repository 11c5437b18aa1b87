/**
 * Standalone check of ftvm's QEMU patches at the edges of a checkpoint (issue 17):
 *  - 0011 `stop`: a stop sent while a self-resuming checkpoint holds the VM stopped is honoured
 *    (the VM stays paused, also when the migration is cancelled there), where 7.2 lost it;
 *  - 0011 `migrate` / `migrate-set-capabilities` sent the moment a migration ended, before its
 *    thread and cleanup finished: the next checkpoint is neither broken nor wrongly incremental;
 *  - 0012 `x-ftvm-clock-compensate-disarm`: an arming whose stop never came (a checkpoint that
 *    failed during precopy) can be dropped, and then gives nothing to a later pause;
 *  - 0014: the checkpoint socket's send buffer is raised on a unix socket only, never lowered
 *    (a larger one is kept), and a TCP socket keeps its own.
 *
 *   tsx --conditions=@ftvm/source test/qemu/checkpoint-edges.ts [--qemu <binary>] [--only <check>[,<check>]]
 *
 * Checks: stop, cancel, migrate-race, caps-race, disarm, sndbuf. No lab, no guest OS: QEMU under
 * TCG (SeaBIOS finds nothing to boot) on the patched binary (build.sh's, FTVM_QEMU_PATCHED or
 * --qemu). The checkpoint's stopped phase is held open with `pause-before-switchover`, so a
 * command lands in it every time. The two race checks cannot hold the window open (the
 * announcement and the end are a few µs apart, with no monitor command between), so they send
 * their commands in a burst at the end of the held phase, round after round, until QEMU's trace
 * `migration_ftvm_finish_previous` shows the window was hit. The send-buffer check runs
 * fd-migration-peer.py (python3; root for the larger-buffer case). Prints TAP lines `ok N - ...`;
 * exits 1 at the first mismatch (`not ok - ...`).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { ClockHook, DEFAULT_POLICY, DriftLedger } from '@ftvm/kvmclock';
import { QmpClient, QmpCommandError, type QmpEvent } from '@ftvm/qmp';
import { patchedQemu } from '../support/patched-qemu.js';
import { check, CheckFailed, checksPassed, stringify, quitQemu, baseQemuArgs, startQemu, parseCheckArgs, type MigrateInfo } from './checks.js';

const SINK = 'exec:cat > /dev/null';
const MIGRATION_DEADLINE_MS = 30_000;
/** A full migration of the 128 MiB guest has at least this many pages; an increment a handful. */
const FULL_PAGES = 30_000;
const RACE_BURST = 12;
const RACE_MAX_ROUNDS = 60;
/** A race check ends once QEMU found the previous migration unfinished this often. */
const RACE_HITS = 3;
const here = path.dirname(new URL(import.meta.url).pathname);
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

const CHECKS = ['stop', 'cancel', 'migrate-race', 'caps-race', 'disarm', 'sndbuf'] as const;
type CheckName = (typeof CHECKS)[number];


/** One QEMU (TCG, no guest OS) with two QMP monitors: ours, and a spare for fd-migration-peer.py. */
class TestVm {
  private readonly events: QmpEvent[] = [];
  private constructor(
    readonly dir: string,
    readonly qmp: QmpClient,
    readonly spareQmpPath: string,
    private readonly child: ChildProcess,
    private readonly stderr: string[],
  ) {
    qmp.onEvent((event) => this.events.push(event));
  }

  static async start(binary: string, name: string): Promise<TestVm> {
    const dir = await mkdtemp(path.join(os.tmpdir(), `ftvm-edges-${name}-`));
    const qmpPath = path.join(dir, 'qmp.sock');
    const spareQmpPath = path.join(dir, 'qmp-peer.sock');
    const args = [
      ...baseQemuArgs(qmpPath),
      '-qmp', `unix:${spareQmpPath},server=on,wait=off`,
      // patch 0011's trace: a command found the previous migration still finishing
      '-trace', 'migration_ftvm_finish_previous',
    ];
    const { child, qmp, stderr } = await startQemu(binary, args, qmpPath, dir);
    const vm = new TestVm(dir, qmp, spareQmpPath, child, stderr);
    await vm.setCaps({ events: true });
    return vm;
  }

  async stop(): Promise<void> {
    await quitQemu(this.qmp, this.child, this.dir);
  }

  get log(): string {
    return this.stderr.join('');
  }

  /** How often QEMU found the previous migration still finishing (patch 0011's trace). */
  get finishPreviousHits(): number {
    return this.log.split('\n').filter((l) => /migration_ftvm_finish_previous previous migration/.test(l)).length;
  }

  get exited(): string | undefined {
    if (this.child.exitCode !== null) return `exit status ${this.child.exitCode}`;
    if (this.child.signalCode !== null) return `signal ${this.child.signalCode}`;
    return undefined;
  }

  async status(): Promise<{ status: string; running: boolean }> {
    return this.qmp.execute<{ status: string; running: boolean }>('query-status');
  }

  eventMark(): number {
    return this.events.length;
  }

  eventsSince(mark: number): QmpEvent[] {
    return this.events.slice(mark);
  }

  async setCaps(caps: Record<string, boolean>): Promise<void> {
    await this.qmp.execute('migrate-set-capabilities', {
      capabilities: Object.entries(caps).map(([capability, state]) => ({ capability, state })),
    });
  }

  migrationEvent(statuses: string[]): Promise<QmpEvent<{ status: string }>> {
    return this.qmp.waitForEvent<{ status: string }>('MIGRATION', {
      timeoutMs: MIGRATION_DEADLINE_MS,
      predicate: (e) => statuses.includes(e.data.status),
    });
  }

  /** `migrate` (pause-before-switchover on) and wait until it holds the VM stopped before the switchover. */
  async holdAtSwitchover(uri = SINK): Promise<void> {
    const held = this.migrationEvent(['pre-switchover']);
    await this.qmp.execute('migrate', { uri });
    await held;
  }

  /** The MIGRATION event comes before the thread's last step: wait until the run state moved on. */
  async settled(): Promise<{ status: string; running: boolean }> {
    const deadline = Date.now() + 5_000;
    for (;;) {
      const status = await this.status();
      if (status.status !== 'finish-migrate') return status;
      if (Date.now() > deadline) throw new CheckFailed('the VM is still in finish-migrate 5 s after the migration ended');
      await sleep(5);
    }
  }

  async migrateInfo(): Promise<MigrateInfo> {
    return this.qmp.execute<MigrateInfo>('query-migrate');
  }

  /** A whole checkpoint to the sink; returns its query-migrate once the VM moved on. */
  async checkpoint(): Promise<MigrateInfo> {
    const ended = this.migrationEvent(['completed', 'failed', 'cancelled']);
    await this.qmp.execute('migrate', { uri: SINK });
    await ended;
    await this.settled();
    return this.migrateInfo();
  }
}

const isMigrationActive = (error: unknown) => error instanceof QmpCommandError && /migration process in progress/i.test(error.desc);
const pages = (info: MigrateInfo) => (info.ram?.duplicate ?? 0) + (info.ram?.normal ?? 0);

/** 0011: `stop` inside the checkpoint's stopped phase, then the checkpoint completes: the VM stays paused. */
async function stopInPause(vm: TestVm): Promise<void> {
  await vm.setCaps({ 'x-ftvm-resume-source': true, 'pause-before-switchover': true });
  const plain = vm.eventMark();
  await vm.holdAtSwitchover();
  const ended = vm.migrationEvent(['completed']);
  await vm.qmp.execute('migrate-continue', { state: 'pre-switchover' });
  await ended;
  check((await vm.settled()).status === 'running' && vm.eventsSince(plain).some((e) => e.event === 'RESUME'),
    'without a stop, the held checkpoint resumes the VM by itself');

  const mark = vm.eventMark();
  await vm.holdAtSwitchover();
  check((await vm.status()).status === 'finish-migrate', 'pause-before-switchover holds the checkpoint\'s stopped phase open');
  await vm.qmp.execute('stop'); // the fence
  const completed = vm.migrationEvent(['completed']);
  await vm.qmp.execute('migrate-continue', { state: 'pre-switchover' });
  await completed;
  const after = await vm.settled();
  check(after.status === 'paused' && !after.running, 'a stop sent in the checkpoint\'s stopped phase holds: query-status says paused', after);
  await sleep(100);
  check(!vm.eventsSince(mark).some((e) => e.event === 'RESUME') && !(await vm.status()).running,
    'no RESUME, and the VM is still stopped 100 ms later', vm.eventsSince(mark).map((e) => e.event));
  const resumed = vm.qmp.waitForEvent('RESUME', { timeoutMs: 10_000 });
  await vm.qmp.execute('cont');
  await resumed;
  check((await vm.status()).running, 'cont resumes it');
  await vm.setCaps({ 'pause-before-switchover': false });
  const next = await vm.checkpoint();
  check(next.status === 'completed' && (await vm.status()).status === 'running', 'the next checkpoint resumes by itself again (the stop was forgotten)', next);
}

/** 0011, failure path: `stop` in the stopped phase, then the migration is cancelled: the VM stays paused. */
async function stopThenCancel(vm: TestVm): Promise<void> {
  await vm.setCaps({ 'x-ftvm-resume-source': true, 'pause-before-switchover': true });
  const mark = vm.eventMark();
  await vm.holdAtSwitchover();
  await vm.qmp.execute('stop');
  const cancelled = vm.migrationEvent(['cancelled', 'failed']);
  await vm.qmp.execute('migrate_cancel');
  const end = await cancelled;
  const after = await vm.settled();
  check(after.status === 'paused' && !after.running, `a stop sent in the stopped phase holds when the migration then ends ${end.data.status}`, after);
  check(!vm.eventsSince(mark).some((e) => e.event === 'RESUME'), 'no RESUME event', vm.eventsSince(mark).map((e) => e.event));
  await vm.qmp.execute('cont');
  await vm.setCaps({ 'pause-before-switchover': false });
  const next = await vm.checkpoint();
  check(next.status === 'completed' && (await vm.status()).running, 'after cont, the next checkpoint completes and resumes', next);
}

/**
 * 0011: `migrate` sent in a burst as the held checkpoint ends: the first accepted one may land
 * between `completed` and the end of the previous migration's thread and cleanup. Every round
 * must leave QEMU alive, every checkpoint completed and the VM running.
 */
async function migrateRace(vm: TestVm): Promise<void> {
  await vm.setCaps({ 'x-ftvm-resume-source': true, 'x-ftvm-incremental': true, 'pause-before-switchover': true });
  let held = false;
  let rounds = 0;
  let accepted = 0;
  while (rounds < RACE_MAX_ROUNDS && vm.finishPreviousHits < RACE_HITS) {
    rounds++;
    if (!held) await vm.holdAtSwitchover();
    const completed = vm.migrationEvent(['completed', 'failed']);
    const nextHeld = vm.migrationEvent(['pre-switchover']);
    nextHeld.catch(() => undefined);
    const burst = [vm.qmp.execute('migrate-continue', { state: 'pre-switchover' }).then(() => false)];
    for (let i = 0; i < RACE_BURST; i++) {
      burst.push(vm.qmp.execute('migrate', { uri: SINK }).then(() => true, (error: unknown) => {
        if (isMigrationActive(error)) return false;
        throw new CheckFailed(`round ${rounds}: migrate failed with something else than "in progress": ${(error as Error).message}`);
      }));
    }
    const results = await Promise.all(burst).catch((error: Error) => {
      throw new CheckFailed(`${error.message}${vm.exited ? ` (QEMU ended: ${vm.exited})` : ''}`);
    });
    const end = await completed;
    if (end.data.status !== 'completed') throw new CheckFailed(`round ${rounds}: the held checkpoint ended ${end.data.status}`);
    held = results.some((r) => r);
    if (held) {
      accepted++;
      await nextHeld; // the accepted migrate: it holds at its own switchover next round
    } else {
      const status = await vm.settled();
      if (!status.running) throw new CheckFailed(`round ${rounds}: the VM did not resume after the checkpoint: ${stringify(status)}`);
    }
  }
  if (held) {
    const ended = vm.migrationEvent(['completed', 'failed']);
    await vm.qmp.execute('migrate-continue', { state: 'pre-switchover' });
    await ended;
  }
  await vm.setCaps({ 'pause-before-switchover': false });
  const status = await vm.settled();
  const info = await vm.migrateInfo();
  console.log(`# migrate-race: ${rounds} rounds, ${accepted} migrate accepted in a burst, ${vm.finishPreviousHits} landed before the previous migration had finished`);
  check(vm.exited === undefined && info.status === 'completed' && status.running,
    'a migrate accepted right after completed starts a sound checkpoint: it completed, QEMU lives, the VM runs', { info: info.status, status });
  const next = await vm.checkpoint();
  check(next.status === 'completed' && (await vm.status()).running, 'and the checkpoint after it completes too', next.status);
  check(vm.finishPreviousHits > 0, `the window was hit (QEMU finished the previous migration first ${vm.finishPreviousHits} time(s) in ${rounds} rounds)`);
}

/**
 * 0011 with 0013: x-ftvm-incremental decides, in the ending migration's cleanup, whether its dirty
 * log stays as the next migration's base. Capability commands sent in a burst as the held
 * checkpoint ends may land before that cleanup; the next checkpoint must still be what the
 * commands asked for. Two kinds of rounds, alternating:
 *  - the checkpoint ran with the capability off, the burst turns it on: that checkpoint left no
 *    base, so the next one is full (7.2 + 0013 kept a base when "on" came before the cleanup);
 *  - the coordinator's "force a full one" (dropQemuBase): off and on, in pairs.
 */
async function capsRace(vm: TestVm): Promise<void> {
  await vm.setCaps({ 'x-ftvm-resume-source': true, 'x-ftvm-incremental': true, 'pause-before-switchover': false });
  const first = await vm.checkpoint();
  const increment = await vm.checkpoint();
  check(pages(first) >= FULL_PAGES && pages(increment) < FULL_PAGES / 4,
    'with x-ftvm-incremental, a checkpoint after a completed one is an increment', { full: pages(first), increment: pages(increment) });
  const incremental = (state: boolean) => ({ capabilities: [{ capability: 'x-ftvm-incremental', state }] });
  const tolerate = (error: unknown) => {
    if (isMigrationActive(error)) return false;
    throw error;
  };
  let rounds = 0;
  let judged = 0;
  while (rounds < RACE_MAX_ROUNDS && vm.finishPreviousHits < RACE_HITS) {
    rounds++;
    const turnOn = rounds % 2 === 1;
    await vm.setCaps({ 'x-ftvm-incremental': !turnOn, 'pause-before-switchover': true });
    await vm.holdAtSwitchover();
    const completed = vm.migrationEvent(['completed', 'failed']);
    const burst: Promise<boolean>[] = [vm.qmp.execute('migrate-continue', { state: 'pre-switchover' }).then(() => false)];
    for (let i = 0; i < RACE_BURST / 2; i++) {
      if (turnOn) {
        burst.push(vm.qmp.execute('migrate-set-capabilities', incremental(true)).then(() => true, tolerate));
      } else {
        burst.push(vm.qmp.execute('migrate-set-capabilities', incremental(false)).then(() => true, tolerate));
        burst.push(vm.qmp.execute('migrate-set-capabilities', incremental(true)).then(() => false, tolerate));
      }
    }
    const results = await Promise.all(burst);
    await completed;
    await vm.settled();
    await vm.setCaps({ 'x-ftvm-incremental': true, 'pause-before-switchover': false });
    const next = await vm.checkpoint();
    if (!results.some((r) => r)) continue; // every command came before completed: nothing to judge
    judged++;
    const what = turnOn ? 'on, after a checkpoint without the capability' : 'off and on';
    check(pages(next) >= FULL_PAGES, `round ${rounds}: x-ftvm-incremental turned ${what} right after completed: the next checkpoint is full`,
      { pages: pages(next), finishPreviousHits: vm.finishPreviousHits });
  }
  console.log(`# caps-race: ${rounds} rounds, ${judged} judged, ${vm.finishPreviousHits} commands before the previous migration had finished`);
  check(vm.finishPreviousHits > 0, `the window was hit (QEMU finished the previous migration first ${vm.finishPreviousHits} time(s) in ${rounds} rounds)`);
}

interface Compensation {
  armed: boolean;
  'last-resume'?: { compensated: boolean; 'applied-ns': number; 'stopped-ns': number };
}

/** 0012: arm while running, the checkpoint fails before its stop, disarm: a later user pause gets nothing. */
async function disarm(vm: TestVm): Promise<void> {
  const query = () => vm.qmp.execute<Compensation>('x-ftvm-query-clock-compensation');
  const userPause = async () => {
    await vm.qmp.execute('stop');
    await sleep(50);
    await vm.qmp.execute('cont');
    return (await query())['last-resume'];
  };
  await vm.setCaps({ 'x-ftvm-resume-source': true });
  await vm.qmp.execute('x-ftvm-clock-compensate', { 'include-stopped-time': true });
  // the sink exits at once: the migration fails before the checkpoint's stop
  const mark = vm.eventMark();
  const failed = vm.migrationEvent(['failed']);
  await vm.qmp.execute('migrate', { uri: 'exec:true' });
  await failed;
  check(!vm.eventsSince(mark).some((e) => e.event === 'STOP') && (await vm.status()).running && (await query()).armed,
    'a checkpoint that failed before its stop (no STOP) leaves the arming in place');
  const control = await userPause();
  check(control?.compensated === true && control['applied-ns'] >= 40_000_000,
    'left armed, it gives the next, unrelated user pause its stopped time (the hazard)', control);

  await vm.qmp.execute('x-ftvm-clock-compensate', { 'include-stopped-time': true });
  const failedAgain = vm.migrationEvent(['failed']);
  await vm.qmp.execute('migrate', { uri: 'exec:true' });
  await failedAgain;
  await vm.qmp.execute('x-ftvm-clock-compensate-disarm');
  check(!(await query()).armed, 'x-ftvm-clock-compensate-disarm disarms it');
  const pause = await userPause();
  check(pause?.compensated === false && pause['applied-ns'] === 0 && pause['stopped-ns'] >= 40_000_000,
    'disarmed: the user pause is not compensated (its stopped time is still reported)', pause);
  await vm.qmp.execute('x-ftvm-clock-compensate-disarm');
  check(!(await query()).armed, 'disarming when nothing is armed is a no-op');

  // armed while stopped, disarmed before the resume
  await vm.qmp.execute('stop');
  await vm.qmp.execute('x-ftvm-clock-compensate', { 'offset-ns': 250_000_000 });
  await vm.qmp.execute('x-ftvm-clock-compensate-disarm');
  await vm.qmp.execute('cont');
  const stopped = (await query())['last-resume'];
  check(stopped?.compensated === false && stopped['applied-ns'] === 0, 'armed while stopped and disarmed: the resume applies nothing', stopped);

  // ftvm's side, as the primary's checkpoint loop drives it: announce and arm before a
  // self-resuming checkpoint, the checkpoint fails before its stop, the failure path disarms
  const ledger = new DriftLedger('edges');
  const hook = await ClockHook.create({ qmp: vm.qmp, ledger, policy: { ...DEFAULT_POLICY, compensate: ['checkpoint'] } });
  try {
    hook.expect('checkpoint');
    await hook.arm('checkpoint');
    const failedHooked = vm.migrationEvent(['failed']);
    await vm.qmp.execute('migrate', { uri: 'exec:true' });
    await failedHooked;
    check((await query()).armed, 'the clock hook armed QEMU before the checkpoint');
    await hook.disarm();
    check(!(await query()).armed, 'ClockHook.disarm() (the checkpoint failure path) drops the arming in QEMU');
    const resumed = vm.qmp.waitForEvent('RESUME', { timeoutMs: 10_000 });
    await userPause();
    await resumed;
    const deadline = Date.now() + 2_000;
    while (ledger.entries.at(-1)?.uncorrected === undefined && Date.now() < deadline) await sleep(10);
    const entry = ledger.entries.at(-1);
    check(entry?.cause === 'user' && entry.correction === undefined && entry.uncorrected?.reason === 'not-in-policy',
      'the later user pause is the user\'s in the ledger, uncorrected as the policy says', stringify(entry));
  } finally {
    hook.close();
  }
}

/** fd-migration-peer.py: hands QEMU a sized migration socket and reads its SO_SNDBUF on request. */
class Peer {
  private readonly lines: string[] = [];
  private readonly waiters: ((line: string) => void)[] = [];
  private readonly stderr: string[] = [];
  private constructor(private readonly child: ChildProcess) {
    readline.createInterface({ input: child.stdout! }).on('line', (line) => {
      const waiter = this.waiters.shift();
      if (waiter) waiter(line);
      else this.lines.push(line);
    });
    child.stderr!.on('data', (chunk: Buffer) => this.stderr.push(chunk.toString()));
  }

  static start(qmpPath: string, mode: string): Peer {
    return new Peer(spawn('python3', [path.join(here, 'fd-migration-peer.py'), qmpPath, mode], { stdio: ['pipe', 'pipe', 'pipe'] }));
  }

  /** The next line matching `prefix <bytes>`, within 20 s. */
  async read(prefix: string): Promise<number> {
    const line = this.lines.shift() ?? (await new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => reject(new CheckFailed(`fd-migration-peer.py said nothing within 20 s; its stderr: ${this.stderr.join('').trim()}`)), 20_000);
      this.waiters.push((l) => {
        clearTimeout(timer);
        resolve(l);
      });
    }));
    const match = new RegExp(`^${prefix} (\\d+)$`).exec(line);
    if (!match) throw new CheckFailed(`fd-migration-peer.py: expected "${prefix} <bytes>", got ${JSON.stringify(line)}`);
    return Number(match[1]);
  }

  query(): Promise<number> {
    this.child.stdin!.write('query\n');
    return this.read('now');
  }

  close(): void {
    this.child.stdin!.end('quit\n');
    setTimeout(() => this.child.kill('SIGKILL'), 2_000).unref();
  }
}

/** 0014: SO_SNDBUF of the migration socket while the checkpoint is stopped. */
async function sendBuffer(vm: TestVm): Promise<void> {
  // what the patch asks for on a unix socket: 4 MiB, capped by net.core.wmem_max, reported doubled
  const wmemMax = Number((await import('node:fs')).readFileSync('/proc/sys/net/core/wmem_max', 'utf8'));
  const raised = 2 * Math.min(4 * 1024 * 1024, wmemMax);
  await vm.setCaps({ 'x-ftvm-resume-source': true, 'x-ftvm-incremental': true, 'pause-before-switchover': true });
  const during = async (mode: string): Promise<{ before: number; stopped: number }> => {
    const peer = Peer.start(vm.spareQmpPath, mode);
    try {
      const held = vm.migrationEvent(['pre-switchover']);
      const before = await peer.read('before');
      await held;
      const stopped = await peer.query();
      const ended = vm.migrationEvent(['completed', 'failed']);
      await vm.qmp.execute('migrate-continue', { state: 'pre-switchover' });
      const end = await ended;
      if (end.data.status !== 'completed') throw new CheckFailed(`the ${mode} migration ${end.data.status}: ${stringify(await vm.migrateInfo())}`);
      await vm.settled();
      return { before, stopped };
    } finally {
      peer.close();
    }
  };
  const unix = await during('unix-default');
  check(unix.stopped === Math.max(unix.before, raised), `a unix socket's send buffer is raised to ${raised} once the checkpoint is stopped`, unix);
  if (process.getuid?.() === 0) {
    const large = await during('unix-large');
    check(large.before > raised && large.stopped === large.before, 'a unix socket with a larger send buffer keeps it (never lowered)', large);
  } else {
    console.log('# skipped: the larger-buffer case needs root (SO_SNDBUFFORCE)');
  }
  const tcp = await during('tcp-small');
  check(tcp.stopped === tcp.before, 'a TCP socket keeps its own send buffer', tcp);
  await vm.setCaps({ 'pause-before-switchover': false });
}

const RUN: Record<CheckName, (vm: TestVm) => Promise<void>> = {
  stop: stopInPause,
  cancel: stopThenCancel,
  'migrate-race': migrateRace,
  'caps-race': capsRace,
  disarm,
  sndbuf: sendBuffer,
};

async function main(): Promise<void> {
  const { qemu, only } = parseCheckArgs(process.argv.slice(2), CHECKS);
  const binary = qemu ?? patchedQemu();
  console.log(`# ${binary}`);
  let current: TestVm | undefined;
  try {
    for (const name of only) {
      console.log(`# ${name}`);
      current = await TestVm.start(binary, name);
      await RUN[name](current);
      await current.stop();
      current = undefined;
    }
    console.log(JSON.stringify({ checks: checksPassed() }));
  } catch (error) {
    console.error(`not ok - ${(error as Error).message}`);
    if (current) console.error(`QEMU stderr:\n${current.log}${current.exited ? `\nQEMU ended: ${current.exited}` : ''}`);
    process.exitCode = 1;
  } finally {
    await current?.stop().catch(() => undefined);
  }
}

await main();
