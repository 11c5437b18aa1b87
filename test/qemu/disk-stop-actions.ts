/**
 * Standalone check of ftvm's QEMU patch 0015 (x-ftvm-keep-block-active, x-ftvm-arm-stop-actions):
 * a disk checkpoint taken by the migration thread in the stopped instant of a migration.
 *
 *   tsx --conditions=@ftvm/source test/qemu/disk-stop-actions.ts [--runs 10] [--qemu <binary>]
 *
 * No lab, no libvirt, no guest OS: QEMU under TCG (root namespace, unix sockets in a temporary
 * directory) with a qcow2 disk written through the monitor's qemu-io. The binary is
 * packages/kvmclock/qemu/build.sh's (or FTVM_QEMU_PATCHED, or --qemu). Needs qemu-img, qemu-io
 * (qemu-utils) and nbdinfo (libnbd-bin). Prints one line per check and a JSON summary with the
 * STOP→RESUME pause p50 with and without armed actions; exits 1 on any mismatch.
 */
import { execFile, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { QmpClient, type QmpEvent } from '@ftvm/qmp';
import { patchedQemu } from '../support/patched-qemu.js';
import { check, CheckFailed, checksPassed, expectQmpError, quitQemu, baseQemuArgs, startQemu } from './checks.js';

const run = promisify(execFile);
const KiB = 1024;
const MiB = 1024 * KiB;
const DISK_SIZE = 64 * MiB;
const MIGRATION_DEADLINE_MS = 60_000;

interface Range {
  offset: number;
  length: number;
}


function parseArgs(argv: string[]): { runs: number; qemu: string | undefined } {
  let runs = 10;
  let qemu: string | undefined;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    const value = argv[i + 1];
    if (arg === '--runs' && value !== undefined && /^\d+$/.test(value) && Number(value) > 0) {
      runs = Number(value);
      i++;
    } else if (arg === '--qemu' && value !== undefined) {
      qemu = value;
      i++;
    } else {
      throw new Error(`unknown or incomplete argument ${JSON.stringify(arg)} (usage: [--runs N>0] [--qemu <binary>])`);
    }
  }
  return { runs, qemu };
}

const p50 = (values: number[]): number => {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor((sorted.length - 1) / 2)]!;
};

/** One QEMU (TCG, no guest OS) with a qcow2 disk `disk0` behind virtio-blk device `vda`. */
class TestVm {
  private readonly events: QmpEvent[] = [];
  stdout = '';
  private constructor(
    readonly dir: string,
    readonly qmp: QmpClient,
    private readonly child: ChildProcess,
    private readonly stderr: string[],
  ) {
    qmp.onEvent((event) => this.events.push(event));
  }

  static async start(binary: string, name: string): Promise<TestVm> {
    const dir = await mkdtemp(path.join(os.tmpdir(), `ftvm-stop-actions-${name}-`));
    const disk = path.join(dir, 'disk.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', disk, String(DISK_SIZE)]);
    const qmpPath = path.join(dir, 'qmp.sock');
    const args = [
      ...baseQemuArgs(qmpPath),
      '-blockdev', `driver=file,filename=${disk},node-name=disk0-file`,
      '-blockdev', 'driver=qcow2,file=disk0-file,node-name=disk0',
      '-device', 'virtio-blk-pci,drive=disk0,id=vda',
    ];
    // qemu-io (HMP) prints its results to QEMU's stdout, not to the monitor: line-buffer it.
    const { child, qmp, stderr } = await startQemu('stdbuf', ['-oL', binary, ...args], qmpPath, dir, 'pipe');
    const vm = new TestVm(dir, qmp, child, stderr);
    child.stdout!.on('data', (chunk: Buffer) => {
      vm.stdout += chunk.toString();
    });
    await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
    return vm;
  }

  async stop(): Promise<void> {
    await quitQemu(this.qmp, this.child, this.dir);
  }

  get log(): string {
    return this.stderr.join('');
  }

  /**
   * Runs a qemu-io read or write (with -P) of `r` on the device's own BlockBackend and returns
   * whether it succeeded: its report line on QEMU's stdout, no failure line before it.
   */
  private async io(op: 'read' | 'write', pattern: number, r: Range): Promise<boolean> {
    const from = this.stdout.length;
    const monitor = await this.qmp.execute<string>('human-monitor-command', {
      'command-line': `qemu-io -d /machine/peripheral/vda/virtio-backend "${op} -P ${pattern} ${r.offset} ${r.length}"`,
    });
    const done = op === 'read' ? `read ${r.length}/${r.length} bytes at offset ${r.offset}` : `wrote ${r.length}/${r.length} bytes at offset ${r.offset}`;
    const deadline = Date.now() + 5_000;
    for (;;) {
      const out = monitor + this.stdout.slice(from);
      const failed = /failed|error|denied/i.test(out);
      if (out.includes(done) || (failed && op === 'write')) {
        if (failed) console.log(`# qemu-io ${op} -P ${pattern} ${r.offset} ${r.length}: ${out.trim()}`);
        return !failed;
      }
      if (Date.now() > deadline) throw new CheckFailed(`qemu-io ${op}: no report within 5 s (output: ${JSON.stringify(out)})`);
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
  }

  async write(pattern: number, r: Range): Promise<void> {
    if (!(await this.io('write', pattern, r))) throw new CheckFailed(`qemu-io write -P ${pattern} ${r.offset} ${r.length} failed`);
  }

  reads(pattern: number, r: Range): Promise<boolean> {
    return this.io('read', pattern, r);
  }

  async status(): Promise<string> {
    return (await this.qmp.execute<{ status: string }>('query-status')).status;
  }

  /** Named dirty bitmaps of disk0 (the backup job's own anonymous one left out). */
  async bitmaps(): Promise<Map<string, { count: number; recording: boolean }>> {
    type Bitmap = { name?: string; count: number; recording: boolean };
    const nodes = await this.qmp.execute<{ 'node-name': string; 'dirty-bitmaps'?: Bitmap[] }[]>('query-named-block-nodes');
    const node = nodes.find((n) => n['node-name'] === 'disk0');
    if (!node) throw new CheckFailed('no block node disk0');
    return new Map((node['dirty-bitmaps'] ?? []).flatMap((b) => (b.name ? [[b.name, { count: b.count, recording: b.recording }]] : [])));
  }

  /**
   * Whether the device's BlockBackend holds the write permission on its root. 7.2 has no "active"
   * flag in its queries; inactivating the nodes drops the device's permissions (blk_root_inactivate).
   */
  async deviceCanWrite(): Promise<boolean> {
    type Graph = {
      nodes: { id: number; type: string; name: string }[];
      edges: { parent: number; child: number; perm: string[] }[];
    };
    const graph = await this.qmp.execute<Graph>('x-debug-query-block-graph');
    // (its root: disk0, or the backup job's copy-before-write filter above it)
    const device = graph.nodes.find((n) => n.type === 'block-backend' && n.name.includes('vda'));
    const edge = graph.edges.find((e) => e.parent === device?.id);
    if (!edge) throw new CheckFailed(`no root edge of the vda BlockBackend in ${JSON.stringify(graph)}`);
    return edge.perm.includes('write');
  }

  /** Events seen since `mark` (an index from `eventMark`). */
  eventMark(): number {
    return this.events.length;
  }

  eventsSince(mark: number): QmpEvent[] {
    return this.events.slice(mark);
  }

  /**
   * `migrate` to a sink and waits until it ends (and, when the source resumes by itself, for
   * RESUME). Returns the final query-migrate and the STOP→RESUME pause if there was one.
   */
  async migrate(
    { uri = 'exec:cat > /dev/null', expectResume }: { uri?: string; expectResume: boolean },
  ): Promise<{ status: string; errorDesc?: string; pauseMs?: number }> {
    const mark = this.eventMark();
    const ended = this.qmp.waitForEvent<{ status: string }>('MIGRATION', {
      timeoutMs: MIGRATION_DEADLINE_MS,
      predicate: (e) => ['completed', 'failed', 'cancelled'].includes(e.data.status),
    });
    const resumed = expectResume ? this.qmp.waitForEvent('RESUME', { timeoutMs: MIGRATION_DEADLINE_MS }) : undefined;
    await this.qmp.execute('migrate', { uri });
    await ended;
    if (resumed) await resumed;
    // the MIGRATION event comes before the thread's last step (runstate postmigrate or resume)
    const deadline = Date.now() + 5_000;
    while ((await this.status()) === 'finish-migrate') {
      if (Date.now() > deadline) throw new CheckFailed('the VM is still in finish-migrate 5 s after the migration ended');
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
    const info = await this.qmp.execute<{ status: string; 'error-desc'?: string }>('query-migrate');
    const events = this.eventsSince(mark);
    const stop = events.find((e) => e.event === 'STOP');
    const resume = events.find((e) => e.event === 'RESUME');
    return {
      status: info.status,
      ...(info['error-desc'] !== undefined ? { errorDesc: info['error-desc'] } : {}),
      ...(stop && resume ? { pauseMs: Number(resume.timestampNs - stop.timestampNs) / 1e6 } : {}),
    };
  }

  async setCaps(caps: Record<string, boolean>): Promise<void> {
    await this.qmp.execute('migrate-set-capabilities', {
      capabilities: Object.entries(caps).map(([capability, state]) => ({ capability, state })),
    });
  }
}

/** The fleecing point of one checkpoint, as the coordinator builds it (disk contract). */
class Fleece {
  static readonly node = 'ftvm-fleece-vda';
  readonly file: string;
  private exported = false;
  constructor(
    private readonly vm: TestVm,
    readonly serial: number,
  ) {
    this.file = path.join(vm.dir, `fleece-${serial}.qcow2`);
  }

  async add(): Promise<void> {
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', this.file, String(DISK_SIZE)]);
    await this.vm.qmp.execute('blockdev-add', {
      driver: 'qcow2',
      'node-name': Fleece.node,
      file: { driver: 'file', filename: this.file },
      backing: 'disk0',
    });
  }

  /** The stop actions of checkpoint `epoch + 1`: freeze bitmap ftvm-<epoch>, start ftvm-<epoch+1>, fleece. */
  static actions(epoch: number): object[] {
    return [
      { type: 'block-dirty-bitmap-disable', data: { node: 'disk0', name: `ftvm-${epoch}` } },
      { type: 'block-dirty-bitmap-add', data: { node: 'disk0', name: `ftvm-${epoch + 1}`, granularity: 4096, persistent: false } },
      {
        type: 'blockdev-backup',
        data: { 'job-id': Fleece.node, device: 'disk0', target: Fleece.node, sync: 'none', 'auto-finalize': true, 'auto-dismiss': true },
      },
    ];
  }

  get socket(): string {
    return path.join(this.vm.dir, 'nbd.sock');
  }

  get uri(): string {
    return `nbd+unix:///vda?socket=${this.socket}`;
  }

  async export(bitmap: string, startServer: boolean): Promise<void> {
    if (startServer) await this.vm.qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: this.socket } } });
    await this.vm.qmp.execute('block-export-add', {
      type: 'nbd', id: 'fleece-vda', 'node-name': Fleece.node, name: 'vda', writable: false, bitmaps: [bitmap],
    });
    this.exported = true;
  }

  /** Reads through NBD: whether the range holds `pattern` in the exported (stop-instant) image. */
  async reads(pattern: number, r: Range): Promise<boolean> {
    const { stdout } = await run('qemu-io', ['-r', '-f', 'raw', this.uri, '-c', `read -P ${pattern} ${r.offset} ${r.length}`]).catch(
      (error: { stdout?: string; stderr?: string }) => ({ stdout: `${error.stdout ?? ''}${error.stderr ?? ''} failed` }),
    );
    return !/fail|error|mismatch/i.test(stdout) && stdout.includes(`read ${r.length}/${r.length} bytes`);
  }

  /** The dirty extents of the exported bitmap (nbdinfo --map, adjacent extents merged). */
  async dirty(bitmap: string): Promise<Range[]> {
    const { stdout } = await run('nbdinfo', ['--json', `--map=qemu:dirty-bitmap:${bitmap}`, this.uri]);
    const extents = JSON.parse(stdout) as { offset: number; length: number; type: number }[];
    const dirty: Range[] = [];
    for (const e of extents) {
      if ((e.type & 1) === 0) continue;
      const last = dirty[dirty.length - 1];
      if (last && last.offset + last.length === e.offset) last.length += e.length;
      else dirty.push({ offset: e.offset, length: e.length });
    }
    return dirty;
  }

  /** block-export-del, block-job-cancel, blockdev-del, rm (the coordinator's teardown). */
  async teardown(): Promise<void> {
    const qmp = this.vm.qmp;
    if (this.exported) {
      const deleted = qmp.waitForEvent('BLOCK_EXPORT_DELETED', { timeoutMs: 10_000 });
      await qmp.execute('block-export-del', { id: 'fleece-vda' });
      await deleted;
      this.exported = false;
    }
    const jobs = await qmp.execute<{ device: string }[]>('query-block-jobs');
    if (jobs.some((j) => j.device === Fleece.node)) {
      const gone = qmp.waitForEvent<{ device: string }>('BLOCK_JOB_CANCELLED', {
        timeoutMs: 10_000,
        predicate: (e) => e.data.device === Fleece.node,
      });
      await qmp.execute('block-job-cancel', { device: Fleece.node });
      await gone;
    }
    await qmp.execute('blockdev-del', { 'node-name': Fleece.node });
    await rm(this.file, { force: true });
  }
}

const sameRanges = (a: Range[], b: Range[]) => JSON.stringify(a) === JSON.stringify(b);
const A = { offset: 1 * MiB, length: 64 * KiB };
const A2 = { offset: 8 * MiB, length: 4 * KiB };
const C = { offset: 16 * MiB, length: 128 * KiB };
const UNTOUCHED = { offset: 0, length: 1 * MiB };

/**
 * Two chained disk checkpoints on one VM: the fleece of each shows the disk of its stop instant,
 * its bitmap exactly the ranges written since the previous stop, the live disk the newer data.
 */
async function chainedCheckpoints(vm: TestVm, resumeSource: boolean): Promise<void> {
  const tag = resumeSource ? '[resume-source on]' : '[resume-source off]';
  await vm.setCaps({ 'x-ftvm-keep-block-active': true, 'x-ftvm-resume-source': resumeSource });
  await vm.qmp.execute('block-dirty-bitmap-add', { node: 'disk0', name: 'ftvm-1', granularity: 4096, persistent: false });
  await vm.write(0x11, A);
  await vm.write(0x12, A2);

  // checkpoint 2: the stop actions freeze ftvm-1 and fleece the disk
  const f1 = new Fleece(vm, 1);
  await f1.add();
  await vm.qmp.execute('x-ftvm-arm-stop-actions', { actions: Fleece.actions(1) });
  const m1 = await vm.migrate({ expectResume: resumeSource });
  check(m1.status === 'completed', `${tag} armed checkpoint migration completes`, m1);
  check(await vm.deviceCanWrite(), `${tag} the device keeps its write permission on disk0 after the completed migration`);
  if (resumeSource) {
    check((await vm.status()) === 'running', `${tag} the VM resumed by itself`);
    await vm.write(0x22, A);
  } else {
    check((await vm.status()) === 'postmigrate', `${tag} the VM waits in postmigrate`);
    await vm.write(0x22, A); // the nodes are writable while the VM is stopped after completion
    check(await vm.reads(0x22, A), `${tag} the disk is readable and written in postmigrate`);
    const resumed = vm.qmp.waitForEvent('RESUME', { timeoutMs: 10_000 });
    await vm.qmp.execute('cont');
    await resumed;
    check((await vm.status()) === 'running', `${tag} cont resumes the VM after the completed migration`);
  }
  const jobs = await vm.qmp.execute<{ device: string; type: string }[]>('query-block-jobs');
  check(jobs.some((j) => j.device === Fleece.node && j.type === 'backup'), `${tag} the fleecing job runs across the migration`, jobs);
  let bitmaps = await vm.bitmaps();
  check(bitmaps.get('ftvm-1')?.recording === false && bitmaps.get('ftvm-1')?.count === A.length + A2.length,
    `${tag} ftvm-1 is frozen at the stop with the pre-stop writes`, [...bitmaps]);
  check(bitmaps.get('ftvm-2')?.recording === true && bitmaps.get('ftvm-2')?.count === A.length,
    `${tag} ftvm-2 records the writes after the stop`, [...bitmaps]);

  await f1.export('ftvm-1', true);
  check(await f1.reads(0x11, A), `${tag} the fleece shows pattern A (stop instant) where the live disk was rewritten`);
  check(await f1.reads(0x12, A2), `${tag} the fleece shows the second pre-stop write`);
  check(await f1.reads(0, UNTOUCHED), `${tag} the fleece reads zeros where nothing was written`);
  check(await vm.reads(0x22, A), `${tag} the live disk shows pattern B`);
  const dirty1 = await f1.dirty('ftvm-1');
  check(sameRanges(dirty1, [A, A2]), `${tag} ftvm-1 lists exactly the written ranges`, dirty1);
  await f1.teardown();
  await vm.qmp.execute('block-dirty-bitmap-remove', { node: 'disk0', name: 'ftvm-1' });

  // checkpoint 3 with a new fleece: ftvm-2 covers B and C
  await vm.write(0x33, C);
  const f2 = new Fleece(vm, 2);
  await f2.add();
  await vm.qmp.execute('x-ftvm-arm-stop-actions', { actions: Fleece.actions(2) });
  const m2 = await vm.migrate({ expectResume: resumeSource });
  check(m2.status === 'completed', `${tag} the second checkpoint (new fleece) completes`, m2);
  if (!resumeSource) {
    const resumed = vm.qmp.waitForEvent('RESUME', { timeoutMs: 10_000 });
    await vm.qmp.execute('cont');
    await resumed;
  }
  await vm.write(0x44, C);
  await vm.write(0x44, { offset: A.offset, length: 4 * KiB });
  await f2.export('ftvm-2', false);
  check(await f2.reads(0x33, C) && await f2.reads(0x22, A), `${tag} the second fleece shows its own stop instant`);
  check(await vm.reads(0x44, C), `${tag} the live disk moved on`);
  const dirty2 = await f2.dirty('ftvm-2');
  check(sameRanges(dirty2, [A, C]), `${tag} ftvm-2 lists exactly the ranges written between the stops`, dirty2);
  await f2.teardown();
  await vm.qmp.execute('block-dirty-bitmap-remove', { node: 'disk0', name: 'ftvm-2' });
  await vm.qmp.execute('nbd-server-stop');
  bitmaps = await vm.bitmaps();
  check(bitmaps.size === 1 && bitmaps.get('ftvm-3')?.recording === true, `${tag} only ftvm-3 is left, recording`, [...bitmaps]);
  await vm.qmp.execute('block-dirty-bitmap-remove', { node: 'disk0', name: 'ftvm-3' });
}

/** Armed actions that fail abort the migration with a named error; the VM runs on; one-shot. */
async function failingActions(vm: TestVm): Promise<void> {
  await vm.setCaps({ 'x-ftvm-keep-block-active': true, 'x-ftvm-resume-source': true });
  await vm.qmp.execute('x-ftvm-arm-stop-actions', {
    actions: [
      { type: 'block-dirty-bitmap-add', data: { node: 'disk0', name: 'ftvm-x', granularity: 4096 } },
      { type: 'block-dirty-bitmap-disable', data: { node: 'disk0', name: 'no-such-bitmap' } },
    ],
  });
  // the migration fails, the VM resumes as after any failed migration
  const m = await vm.migrate({ expectResume: true });
  check(m.status === 'failed', 'failing armed actions fail the migration', m);
  check(/x-ftvm-arm-stop-actions/.test(m.errorDesc ?? '') && /no-such-bitmap/.test(m.errorDesc ?? ''),
    'error-desc names the stop actions and what failed', m.errorDesc);
  check((await vm.status()) === 'running', 'the VM keeps running after the failed checkpoint');
  check(!(await vm.bitmaps()).has('ftvm-x'), 'the failed transaction left nothing behind (ftvm-x absent)');
  await vm.write(0x55, A);
  const again = await vm.migrate({ expectResume: true });
  check(again.status === 'completed', 'the failed actions were dropped (one-shot): the next migration completes', again);
}

/** Armed, then disarmed with an empty list: the migration runs nothing. */
async function disarm(vm: TestVm): Promise<void> {
  await vm.qmp.execute('block-dirty-bitmap-add', { node: 'disk0', name: 'ftvm-d', granularity: 4096 });
  await vm.qmp.execute('x-ftvm-arm-stop-actions', {
    actions: [{ type: 'block-dirty-bitmap-disable', data: { node: 'disk0', name: 'ftvm-d' } }],
  });
  await vm.qmp.execute('x-ftvm-arm-stop-actions', { actions: [] });
  const m = await vm.migrate({ expectResume: true });
  check(m.status === 'completed' && (await vm.bitmaps()).get('ftvm-d')?.recording === true,
    'actions: [] disarms (the bitmap is still recording after the migration)', m);
  // armed actions of a migration that ran them do not come back
  await vm.qmp.execute('x-ftvm-arm-stop-actions', {
    actions: [{ type: 'block-dirty-bitmap-disable', data: { node: 'disk0', name: 'ftvm-d' } }],
  });
  const ran = await vm.migrate({ expectResume: true });
  await vm.qmp.execute('block-dirty-bitmap-enable', { node: 'disk0', name: 'ftvm-d' });
  const next = await vm.migrate({ expectResume: true });
  check(ran.status === 'completed' && next.status === 'completed' && (await vm.bitmaps()).get('ftvm-d')?.recording === true,
    'actions run once: the migration after the one that ran them runs nothing', { ran, next });
  await vm.qmp.execute('block-dirty-bitmap-remove', { node: 'disk0', name: 'ftvm-d' });
}

/** Arming while a migration is before its stop: that migration runs them. */
async function armDuringMigration(vm: TestVm): Promise<void> {
  await vm.qmp.execute('block-dirty-bitmap-add', { node: 'disk0', name: 'ftvm-r', granularity: 4096 });
  const mark = vm.eventMark();
  // the sink reads nothing for 1.5 s: the migration stays active, blocked on the pipe
  const migrating = vm.migrate({ uri: 'exec:sleep 1.5; cat > /dev/null', expectResume: true });
  const deadline = Date.now() + 10_000;
  while ((await vm.qmp.execute<{ status?: string }>('query-migrate')).status !== 'active') {
    if (Date.now() > deadline) throw new CheckFailed('the migration never became active');
    await new Promise((r) => setTimeout(r, 20));
  }
  await vm.qmp.execute('x-ftvm-arm-stop-actions', {
    actions: [{ type: 'block-dirty-bitmap-disable', data: { node: 'disk0', name: 'ftvm-r' } }],
  });
  const m = await migrating;
  const stoppedAfterArm = vm.eventsSince(mark).some((e) => e.event === 'STOP');
  check(m.status === 'completed' && stoppedAfterArm && (await vm.bitmaps()).get('ftvm-r')?.recording === false,
    'actions armed during an active migration run at its stop', m);
  await vm.qmp.execute('block-dirty-bitmap-remove', { node: 'disk0', name: 'ftvm-r' });
}

/** Arming once the migration has stopped the VM for its completion is refused (it could not run). */
async function armDuringCompletion(vm: TestVm): Promise<void> {
  await vm.setCaps({ 'pause-before-switchover': true });
  const paused = vm.qmp.waitForEvent<{ status: string }>('MIGRATION', {
    timeoutMs: MIGRATION_DEADLINE_MS,
    predicate: (e) => e.data.status === 'pre-switchover',
  });
  const migrating = vm.migrate({ expectResume: true });
  await paused;
  check((await vm.status()) === 'finish-migrate', 'pause-before-switchover holds the VM stopped in the completion');
  await expectQmpError(
    vm.qmp.execute('x-ftvm-arm-stop-actions', { actions: Fleece.actions(7) }),
    /already stopped the VM for its completion/,
    'arming while the migration is in its completion is refused',
  );
  await vm.qmp.execute('x-ftvm-arm-stop-actions', { actions: [] }); // disarming is harmless
  await vm.qmp.execute('migrate-continue', { state: 'pre-switchover' });
  const m = await migrating;
  check(m.status === 'completed', 'the paused migration completes after migrate-continue', m);
  await vm.setCaps({ 'pause-before-switchover': false });
}

/** Capability off, nothing armed: 7.2's behaviour (nodes inactive after completion, cont regains them). */
async function stockBehaviour(vm: TestVm): Promise<void> {
  await vm.setCaps({ 'x-ftvm-keep-block-active': false, 'x-ftvm-resume-source': false });
  await vm.qmp.execute('block-dirty-bitmap-add', { node: 'disk0', name: 'ftvm-s', granularity: 4096 });
  await vm.write(0x66, A);
  const m = await vm.migrate({ expectResume: false });
  check(m.status === 'completed' && (await vm.status()) === 'postmigrate', 'without the capabilities: completed, postmigrate', m);
  check(!(await vm.deviceCanWrite()), 'without x-ftvm-keep-block-active the nodes are inactivated as in 7.2');
  const resumed = vm.qmp.waitForEvent('RESUME', { timeoutMs: 10_000 });
  await vm.qmp.execute('cont');
  await resumed;
  check((await vm.deviceCanWrite()) && (await vm.status()) === 'running', 'cont regains the nodes');
  const b = (await vm.bitmaps()).get('ftvm-s');
  check(b?.recording === true && b.count === A.length, 'nothing armed: the bitmap is untouched', b);
  await vm.write(0x67, A);
  check(await vm.reads(0x67, A), 'the disk is writable after cont');
  // why the capability exists: 7.2's inactivation at completion fails with a running fleecing job
  const fleece = new Fleece(vm, 50);
  await fleece.add();
  await vm.qmp.execute('x-ftvm-arm-stop-actions', { actions: Fleece.actions(50).slice(2) });
  const withJob = await vm.migrate({ expectResume: true });
  check(withJob.status === 'failed' && (await vm.status()) === 'running',
    'without x-ftvm-keep-block-active a fleecing job started at the stop fails the migration; the VM runs on', withJob);
  await fleece.teardown();
  await vm.write(0x68, A);
  await vm.qmp.execute('block-dirty-bitmap-remove', { node: 'disk0', name: 'ftvm-s' });
  await expectQmpError(
    vm.setCaps({ 'x-ftvm-keep-block-active': true, 'postcopy-ram': true }),
    /x-ftvm-keep-block-active works with precopy only/,
    'x-ftvm-keep-block-active is refused with postcopy-ram',
  );
  // armed actions are never dropped silently by a migration that has no such stop
  const probe = [{ type: 'block-dirty-bitmap-add', data: { node: 'disk0', name: 'ftvm-p' } }];
  await vm.qmp.execute('x-ftvm-arm-stop-actions', { actions: probe });
  await vm.setCaps({ 'postcopy-ram': true });
  await expectQmpError(vm.qmp.execute('migrate', { uri: 'exec:cat > /dev/null' }), /plain precopy migration only/,
    'migrate with actions armed is refused under postcopy-ram');
  await expectQmpError(vm.qmp.execute('x-ftvm-arm-stop-actions', { actions: probe }), /plain precopy migration only/,
    'arming is refused under postcopy-ram');
  await vm.qmp.execute('x-ftvm-arm-stop-actions', { actions: [] });
  await vm.setCaps({ 'postcopy-ram': false });
}

/** STOP→RESUME with x-ftvm-resume-source: plain checkpoints vs checkpoints with the disk actions. */
async function pauses(vm: TestVm, runs: number): Promise<{ plainMs: number[]; armedMs: number[] }> {
  await vm.setCaps({ 'x-ftvm-keep-block-active': true, 'x-ftvm-resume-source': true });
  const plainMs: number[] = [];
  const armedMs: number[] = [];
  await vm.qmp.execute('block-dirty-bitmap-add', { node: 'disk0', name: 'ftvm-100', granularity: 4096, persistent: false });
  for (let i = 0; i < runs; i++) {
    await vm.write(0x70 + (i % 16), { offset: (i % 32) * MiB, length: 64 * KiB });
    const plain = await vm.migrate({ expectResume: true });
    if (plain.status !== 'completed' || plain.pauseMs === undefined) throw new CheckFailed(`plain run ${i}: ${JSON.stringify(plain)}`);
    plainMs.push(plain.pauseMs);

    const epoch = 100 + i;
    const fleece = new Fleece(vm, 100 + i);
    await fleece.add();
    await vm.qmp.execute('x-ftvm-arm-stop-actions', { actions: Fleece.actions(epoch) });
    const armed = await vm.migrate({ expectResume: true });
    if (armed.status !== 'completed' || armed.pauseMs === undefined) throw new CheckFailed(`armed run ${i}: ${JSON.stringify(armed)}`);
    armedMs.push(armed.pauseMs);
    await fleece.teardown();
    await vm.qmp.execute('block-dirty-bitmap-remove', { node: 'disk0', name: `ftvm-${epoch}` });
  }
  check(plainMs.length === runs && armedMs.length === runs, `${runs} plain and ${runs} armed checkpoints completed`);
  return { plainMs, armedMs };
}

async function main(): Promise<void> {
  const { runs, qemu } = parseArgs(process.argv.slice(2));
  const binary = qemu ?? patchedQemu();
  console.log(`# ${binary}`);
  const vms: TestVm[] = [];
  let current: TestVm | undefined;
  try {
    const on = await TestVm.start(binary, 'on');
    vms.push((current = on));
    await chainedCheckpoints(on, true);
    await failingActions(on);
    await disarm(on);
    await armDuringMigration(on);
    await armDuringCompletion(on);
    const timing = await pauses(on, runs);

    const off = await TestVm.start(binary, 'off');
    vms.push((current = off));
    await chainedCheckpoints(off, false);
    await stockBehaviour(off);

    const round = (v: number) => Math.round(v * 1000) / 1000;
    console.log(JSON.stringify({
      checks: checksPassed(),
      runs,
      pause_ms: {
        plain: { p50: round(p50(timing.plainMs)), all: timing.plainMs.map(round) },
        armed: { p50: round(p50(timing.armedMs)), all: timing.armedMs.map(round) },
      },
    }));
  } catch (error) {
    console.error(`not ok - ${(error as Error).message}`);
    if (current) console.error(`QEMU stderr:\n${current.log}`);
    process.exitCode = 1;
  } finally {
    for (const vm of vms) await vm.stop().catch(() => undefined);
  }
}

await main();
