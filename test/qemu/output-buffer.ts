/**
 * Standalone check of ftvm's QEMU patch 0016 (output commit): the x-ftvm-output-buffer net filter,
 * the x-ftvm-output-close transaction action (plain, and armed with x-ftvm-arm-stop-actions at a
 * checkpoint's stop), x-ftvm-output-release, x-ftvm-query-output-buffers, and the
 * x-ftvm-single-pass migration capability.
 *
 *   tsx --conditions=@ftvm/source test/qemu/output-buffer.ts [--qemu <binary>]
 *
 * No lab: the ftvm test guest (test/guest) under TCG on the patched binary (build.sh's, or
 * FTVM_QEMU_PATCHED, or --qemu), with two NICs:
 *  - virtio-net on slirp netdev `n0`: real guest output, the probe's replies to the UDP requests
 *    this script sends (request ids are echoed, so every held and released packet is identified);
 *  - e1000 `nic1` (no guest driver: the guest never sends on it) on a UDP socket netdev `n1`
 *    whose far end is this script: `announce-self` makes that NIC send one 60-byte RARP frame per
 *    call, so buffer `ob1` on `n1` has exact packet and byte counts, and every frame released is
 *    a datagram received here.
 * Prints TAP lines `ok N - ...`; exits 1 at the first mismatch (`not ok - ...`).
 */
import dgram from 'node:dgram';
import type { OutputBufferInfo } from '@ftvm/coordinator';
import { QmpClient, type QmpEvent } from '@ftvm/qmp';
import { bootGuest, buildGuest, type BootedGuest } from '../guest/boot-qemu.js';
import { patchedQemu } from '../support/patched-qemu.js';
import { check, CheckFailed, checksPassed, expectQmpError, stringify } from './checks.js';
import { Command, decodeReply, encodeRequest, startWorkload } from '../support/probe-client.js';

const RARP_BYTES = 60;
const MIGRATION_DEADLINE_MS = 60_000;
/** How long "nothing arrives" is watched. Short: the guest's ARP probes are held too (see holdFor). */
const QUIET_MS = 1_000;

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

function parseArgs(argv: string[]): { qemu: string | undefined } {
  let qemu: string | undefined;
  for (let i = 0; i < argv.length; i++) {
    const value = argv[i + 1];
    if (argv[i] === '--qemu' && value !== undefined) {
      qemu = value;
      i++;
    } else {
      throw new Error(`unknown or incomplete argument ${JSON.stringify(argv[i])} (usage: [--qemu <binary>])`);
    }
  }
  return { qemu };
}

/** A UDP socket bound on 127.0.0.1 that records what arrives, in order. */
class Receiver<T> {
  readonly items: T[] = [];
  private constructor(
    readonly socket: dgram.Socket,
    readonly port: number,
  ) {}

  static async open<T>(decode: (msg: Buffer) => T | undefined): Promise<Receiver<T>> {
    const socket = dgram.createSocket('udp4');
    await new Promise<void>((resolve, reject) => {
      socket.once('error', reject);
      socket.bind(0, '127.0.0.1', () => resolve());
    });
    const receiver = new Receiver<T>(socket, socket.address().port);
    socket.on('message', (msg) => {
      const item = decode(msg);
      if (item !== undefined) receiver.items.push(item);
    });
    return receiver;
  }

  mark(): number {
    return this.items.length;
  }

  since(mark: number): T[] {
    return this.items.slice(mark);
  }

  /** Waits until `count` items arrived after `mark` (deadline), then returns all since `mark`. */
  async waitFor(mark: number, count: number, timeoutMs = 5_000): Promise<T[]> {
    const deadline = Date.now() + timeoutMs;
    while (this.items.length - mark < count) {
      if (Date.now() > deadline) throw new CheckFailed(`only ${this.items.length - mark} of ${count} datagrams arrived within ${timeoutMs} ms: ${stringify(this.since(mark))}`);
      await sleep(10);
    }
    return this.since(mark);
  }

  close(): void {
    this.socket.close();
  }
}

async function freeUdpPort(): Promise<number> {
  const r = await Receiver.open(() => undefined);
  const port = r.port;
  r.close();
  return port;
}

class Rig {
  private readonly events: QmpEvent[] = [];
  private nextId = 1n;

  constructor(
    readonly guest: BootedGuest,
    readonly qmp: QmpClient,
    readonly replies: Receiver<bigint>, // probe reply ids, as they arrive
    readonly frames: Receiver<number>, // frame sizes from netdev n1
  ) {
    qmp.onEvent((e) => this.events.push(e));
  }

  /** Sends a TIME request to the probe; returns its id. The reply is guest output on n0. */
  request(): bigint {
    const id = this.nextId++;
    this.replies.socket.send(encodeRequest(Command.time, id), this.guest.probePort, '127.0.0.1');
    return id;
  }

  /** One RARP frame from nic1 into netdev n1 (guest output as far as the filter can tell). */
  async announce(times = 1): Promise<void> {
    for (let i = 0; i < times; i++) {
      await this.qmp.execute('announce-self', { initial: 50, max: 550, rounds: 1, step: 100, interfaces: ['nic1'] });
    }
  }

  async buffers(): Promise<Map<string, OutputBufferInfo>> {
    const list = await this.qmp.execute<OutputBufferInfo[]>('x-ftvm-query-output-buffers');
    return new Map(list.map((b) => [b.id, b]));
  }

  async buffer(id: string): Promise<OutputBufferInfo> {
    const b = (await this.buffers()).get(id);
    if (!b) throw new CheckFailed(`x-ftvm-query-output-buffers does not list ${id}`);
    return b;
  }

  /**
   * Sends probe requests and waits until the guest's replies are held in ob0's open epoch (its
   * open-packets grew by as many; a margin after, since a held ARP probe of the guest counts too).
   */
  async heldRequests(count: number): Promise<bigint[]> {
    const before = (await this.buffer('ob0'))['open-packets'];
    const ids = Array.from({ length: count }, () => this.request());
    const deadline = Date.now() + 5_000;
    while ((await this.buffer('ob0'))['open-packets'] < before + count) {
      if (Date.now() > deadline) throw new CheckFailed(`the guest's replies to ${stringify(ids)} never reached ob0's open epoch`);
      await sleep(20);
    }
    await sleep(300);
    return ids;
  }

  close(epoch: number): Promise<unknown> {
    return this.qmp.execute('transaction', { actions: [{ type: 'x-ftvm-output-close', data: { epoch } }] });
  }

  release(epoch: number): Promise<{ packets: number; bytes: number }> {
    return this.qmp.execute('x-ftvm-output-release', { epoch });
  }

  async status(): Promise<string> {
    return (await this.qmp.execute<{ status: string }>('query-status')).status;
  }

  async setCaps(caps: Record<string, boolean>): Promise<void> {
    await this.qmp.execute('migrate-set-capabilities', {
      capabilities: Object.entries(caps).map(([capability, state]) => ({ capability, state })),
    });
  }

  /**
   * Starts a migration and waits until it left setup; `ended` resolves at its end. (Wrapped: an
   * async function returning a bare promise would wait for it.)
   */
  async startMigration(uri: string): Promise<{ ended: Promise<MigrationEnd> }> {
    const mark = this.events.length;
    const ended = this.qmp.waitForEvent<{ status: string }>('MIGRATION', {
      timeoutMs: MIGRATION_DEADLINE_MS,
      predicate: (e) => ['completed', 'failed', 'cancelled'].includes(e.data.status),
    });
    await this.qmp.execute('migrate', { uri });
    const deadline = Date.now() + 10_000;
    while ((await this.qmp.execute<{ status?: string }>('query-migrate')).status === 'setup') {
      if (Date.now() > deadline) throw new CheckFailed('the migration stayed in setup for 10 s');
      await sleep(10);
    }
    return { ended: ended.then(() => this.migrationEnd(mark)) };
  }

  /** After the MIGRATION end event: the final query-migrate, once the VM left finish-migrate and resumed. */
  private async migrationEnd(mark: number): Promise<MigrationEnd> {
    const deadline = Date.now() + 10_000;
    for (;;) {
      const status = await this.status();
      const resumed = this.events.slice(mark).some((e) => e.event === 'RESUME');
      const stopped = this.events.slice(mark).some((e) => e.event === 'STOP');
      if (status === 'running' && (!stopped || resumed)) break;
      if (Date.now() > deadline) throw new CheckFailed(`the VM is ${status} 10 s after the migration ended`);
      await sleep(10);
    }
    const info = await this.qmp.execute<{ status: string; 'error-desc'?: string; ram?: Record<string, number> }>('query-migrate');
    return { status: info.status, errorDesc: info['error-desc'], ram: info.ram };
  }

  async migrate(uri = 'exec:cat > /dev/null'): Promise<MigrationEnd> {
    return await (await this.startMigration(uri)).ended;
  }
}

interface MigrationEnd {
  status: string;
  errorDesc: string | undefined;
  ram: Record<string, number> | undefined;
}

const sameIds = (a: bigint[], b: bigint[]) => stringify(a) === stringify(b);

/** x-ftvm-single-pass: no dirty-bitmap sync while the VM runs (exactly 2: setup and stop). */
async function singlePass(rig: Rig): Promise<void> {
  await rig.setCaps({ events: true, 'x-ftvm-resume-source': true });
  await startWorkload(rig.guest.probe, 64);
  const stock = await rig.migrate();
  check(stock.status === 'completed' && (stock.ram?.['dirty-sync-count'] ?? 0) >= 3,
    'without x-ftvm-single-pass a migration of a dirtying guest syncs the bitmap while it runs (>= 3 syncs)', stock);
  await rig.setCaps({ 'x-ftvm-single-pass': true });
  const single = await rig.migrate();
  check(single.status === 'completed' && single.ram?.['dirty-sync-count'] === 2,
    'with x-ftvm-single-pass it completes after one pass: 2 syncs (setup, stop)', single);
  check((single.ram?.transferred ?? Infinity) <= 256 * 1024 * 1024 + 64 * 1024 * 1024,
    'the single pass sent no more than the RAM plus what was dirtied during it', single.ram);
  const ram = (m: MigrationEnd) => ({ syncs: m.ram?.['dirty-sync-count'], transferredMiB: Math.round((m.ram?.transferred ?? 0) / 2 ** 20) });
  console.log(`# 64 MiB/s dirtying guest: stock ${stringify(ram(stock))}, single pass ${stringify(ram(single))}`);
  await expectQmpError(rig.setCaps({ 'postcopy-ram': true }), /x-ftvm-single-pass works with precopy only/,
    'x-ftvm-single-pass is refused with postcopy-ram');
  await rig.setCaps({ 'x-ftvm-single-pass': false });
  await startWorkload(rig.guest.probe, 0);
}

async function addBuffers(rig: Rig): Promise<void> {
  // direct path first: a frame from nic1 reaches this script at once without a buffer
  const mark = rig.frames.mark();
  await rig.announce();
  check((await rig.frames.waitFor(mark, 1))[0] === RARP_BYTES, 'unbuffered: announce-self on nic1 reaches the socket at once (60 bytes)');

  for (const queue of ['tx', 'all']) {
    await expectQmpError(
      rig.qmp.execute('object-add', { 'qom-type': 'x-ftvm-output-buffer', id: `bad-${queue}`, netdev: 'n1', queue }),
      /guest's output.*'rx' queue.*queue=/,
      `a buffer on queue=${queue} is refused (guest output is the netdev's rx queue)`,
    );
  }
  await rig.qmp.execute('object-add', { 'qom-type': 'x-ftvm-output-buffer', id: 'ob0', netdev: 'n0', queue: 'rx' });
  await rig.qmp.execute('object-add', { 'qom-type': 'x-ftvm-output-buffer', id: 'ob1', netdev: 'n1' });
  const queue = await rig.qmp.execute<string>('qom-get', { path: '/objects/ob1', property: 'queue' });
  check(queue === 'rx', 'queue defaults to rx', queue);
  const all = await rig.buffers();
  const ob1 = all.get('ob1');
  check(all.size === 2 && ob1?.netdev === 'n1' && ob1['open-packets'] === 0 && ob1['closed-epochs'].length === 0 &&
    ob1['last-closed-epoch'] === undefined, 'query lists both buffers, empty, nothing closed yet', [...all.values()]);
}

/** Holding, closing with a plain transaction, releasing, merge, refusals. */
async function epochs(rig: Rig): Promise<void> {
  const rMark = rig.replies.mark();
  const fMark = rig.frames.mark();
  const e1 = await rig.heldRequests(3);
  await rig.announce(2);
  await sleep(QUIET_MS);
  check(rig.replies.since(rMark).length === 0 && rig.frames.since(fMark).length === 0,
    'packets are held: no probe reply and no frame arrives', { replies: rig.replies.since(rMark), frames: rig.frames.since(fMark) });
  let ob1 = await rig.buffer('ob1');
  check(ob1['open-packets'] === 2 && ob1['open-bytes'] === 2 * RARP_BYTES && ob1['held-packets'] === 0,
    'ob1 holds exactly the 2 frames in its open epoch', ob1);

  const none = await rig.release(10);
  await sleep(QUIET_MS / 2);
  check(none.packets === 0 && none.bytes === 0 && rig.replies.since(rMark).length === 0 && rig.frames.since(fMark).length === 0,
    'releasing with no epoch closed releases nothing (not the open epoch)', none);

  await rig.close(1);
  ob1 = await rig.buffer('ob1');
  let ob0 = await rig.buffer('ob0');
  check(ob1['closed-epochs'].join() === '1' && ob1['held-packets'] === 2 && ob1['held-bytes'] === 2 * RARP_BYTES &&
    ob1['open-packets'] === 0 && ob1['last-closed-epoch'] === 1, 'transaction x-ftvm-output-close 1: ob1 holds epoch 1 (2 frames)', ob1);
  check(ob0['closed-epochs'].join() === '1' && ob0['held-packets'] >= 3 && ob0['last-closed-epoch'] === 1,
    'the same close closed ob0 as well (>= 3 replies held in epoch 1)', ob0);

  // epoch 2 (open): sent after the close
  const e2 = await rig.heldRequests(2);
  await rig.announce(3);
  const ob0Held = ob0['held-packets'];
  const ob0HeldBytes = ob0['held-bytes'];
  const r1 = await rig.release(1);
  check(r1.packets === 2 + ob0Held && r1.bytes === 2 * RARP_BYTES + ob0HeldBytes,
    'release 1 returns the packets and bytes of epoch 1 over both buffers', { r1, ob0Held, ob0HeldBytes });
  const got = await rig.replies.waitFor(rMark, 3);
  await rig.frames.waitFor(fMark, 2);
  await sleep(QUIET_MS);
  check(sameIds(rig.replies.since(rMark), e1), 'release 1 delivers exactly epoch 1\'s replies, in the order sent', { got, e1 });
  check(rig.frames.since(fMark).length === 2, 'release 1 delivers exactly epoch 1\'s 2 frames', rig.frames.since(fMark));
  ob1 = await rig.buffer('ob1');
  check(ob1['open-packets'] === 3 && ob1['held-packets'] === 0 && ob1['released-packets'] === 2 &&
    ob1['released-bytes'] === 2 * RARP_BYTES && ob1['unsent-packets'] === 0 && ob1['closed-epochs'].length === 0,
    'epoch 2 (open) stays held; ob1 counts 2 released', ob1);

  await expectQmpError(rig.close(1), /epoch 1 is not greater than the last epoch closed/, 'closing epoch 1 again is refused');
  await expectQmpError(rig.close(0), /epoch 0 is not greater than the last epoch closed/, 'closing an older epoch is refused');
  await expectQmpError(
    rig.qmp.execute('transaction', { actions: [
      { type: 'x-ftvm-output-close', data: { epoch: 2 } }, { type: 'x-ftvm-output-close', data: { epoch: 3 } }] }),
    /at most one per transaction/, 'two closes in one transaction are refused');
  await expectQmpError(
    rig.qmp.execute('transaction', { actions: [{ type: 'x-ftvm-output-close', data: { epoch: 2 } }, { type: 'abort', data: {} }] }),
    /Transaction aborted/, 'a transaction with a close and a failing action fails');
  ob1 = await rig.buffer('ob1');
  ob0 = await rig.buffer('ob0');
  check(ob1['last-closed-epoch'] === 1 && ob0['last-closed-epoch'] === 1 && ob1['open-packets'] === 3 && ob1['closed-epochs'].length === 0,
    'the failed transactions closed nothing', { ob0, ob1 });

  const early = await rig.release(5);
  await sleep(QUIET_MS / 2);
  check(early.packets === 0 && rig.replies.since(rMark).length === 3 && rig.frames.since(fMark).length === 2,
    'releasing an epoch not closed yet releases nothing of the open epoch', early);

  // merge: epoch 2 never released by name, release 3 covers it
  await rig.close(2);
  const e3 = await rig.heldRequests(1);
  await rig.announce(1);
  await rig.close(3);
  const e4 = await rig.heldRequests(1);
  await rig.announce(1);
  ob1 = await rig.buffer('ob1');
  check(ob1['closed-epochs'].join() === '2,3' && ob1['held-packets'] === 4 && ob1['open-packets'] === 1,
    'ob1: epochs 2 (3 frames) and 3 (1 frame) closed, 1 frame open', ob1);
  const r3 = await rig.release(3);
  await rig.replies.waitFor(rMark, 6);
  await rig.frames.waitFor(fMark, 6);
  await sleep(QUIET_MS);
  check(sameIds(rig.replies.since(rMark), [...e1, ...e2, ...e3]),
    'release 3 delivers epochs 2 and 3 in order (merged), not the open epoch', { got: rig.replies.since(rMark), e4 });
  check(rig.frames.since(fMark).length === 6 && r3.packets >= 4 + 3, 'release 3 delivers the 4 frames of epochs 2 and 3',
    { r3, frames: rig.frames.since(fMark).length });
  check(!rig.replies.since(rMark).includes(e4[0]!), 'the reply sent after close 3 stays held');
}

/** Armed with x-ftvm-arm-stop-actions: the close happens at the migration's stop. */
async function armedAtStop(rig: Rig): Promise<bigint> {
  await rig.setCaps({ 'x-ftvm-resume-source': true });
  const rMark = rig.replies.mark();
  const fMark = rig.frames.mark();
  // still open from epochs(): one reply (e4) and one frame
  await rig.qmp.execute('x-ftvm-arm-stop-actions', { actions: [{ type: 'x-ftvm-output-close', data: { epoch: 4 } }] });
  // the sink reads nothing for 5 s: the migration stays active (precopy) meanwhile
  const { ended } = await rig.startMigration('exec:sleep 5; cat > /dev/null');
  const during = await rig.heldRequests(1);
  await rig.announce(2);
  const before = await rig.buffer('ob1');
  const state = (await rig.qmp.execute<{ status?: string }>('query-migrate')).status;
  check(state === 'active' && before['last-closed-epoch'] === 3 && before['open-packets'] === 3,
    'armed, migration active: nothing closed yet; packets sent now join the open epoch', { state, before });
  const m = await ended;
  check(m.status === 'completed', 'the checkpoint migration completes (and the VM resumed by itself)', m);
  const after = await rig.buffer('ob1');
  check(after['last-closed-epoch'] === 4 && after['closed-epochs'].join() === '4' && after['held-packets'] === 3 && after['open-packets'] === 0,
    'the migration closed epoch 4 at its stop, with every frame sent before the stop', after);
  const ob0 = await rig.buffer('ob0');
  check(ob0['last-closed-epoch'] === 4 && ob0['closed-epochs'].join() === '4', 'ob0 closed epoch 4 too', ob0);
  const next = await rig.heldRequests(1);
  await rig.announce(1);
  await rig.release(4);
  await rig.frames.waitFor(fMark, 3);
  await rig.replies.waitFor(rMark, 2);
  await sleep(QUIET_MS);
  const got = rig.replies.since(rMark);
  check(got.length === 2 && got[1] === during[0] && !got.includes(next[0]!),
    'release 4 delivers the replies sent before the stop (also those during the precopy), not the one after the resume', { got, during, next });
  check(rig.frames.since(fMark).length === 3 && (await rig.buffer('ob1'))['open-packets'] === 1,
    'release 4 delivers the 3 frames of epoch 4; the frame sent after the resume stays held', rig.frames.since(fMark).length);
  return next[0]!;
}

/** A migration that fails or is cancelled closes nothing. */
async function failedCheckpoints(rig: Rig): Promise<void> {
  await rig.qmp.execute('x-ftvm-arm-stop-actions', { actions: [{ type: 'x-ftvm-output-close', data: { epoch: 5 } }] });
  const { ended } = await rig.startMigration('exec:sleep 2; cat > /dev/null');
  await rig.qmp.execute('migrate_cancel');
  const cancelled = await ended;
  let ob1 = await rig.buffer('ob1');
  check(cancelled.status === 'cancelled' && ob1['last-closed-epoch'] === 4 && ob1['open-packets'] === 1,
    'a cancelled checkpoint closes nothing', { cancelled, ob1 });
  const plain = await rig.migrate();
  ob1 = await rig.buffer('ob1');
  check(plain.status === 'completed' && ob1['last-closed-epoch'] === 4,
    'the cancelled migration\'s armed close died with it: the next migration closes nothing', { plain, ob1 });

  await rig.qmp.execute('x-ftvm-arm-stop-actions', { actions: [
    { type: 'x-ftvm-output-close', data: { epoch: 5 } },
    { type: 'block-dirty-bitmap-disable', data: { node: 'no-such-node', name: 'x' } },
  ] });
  const failed = await rig.migrate();
  ob1 = await rig.buffer('ob1');
  check(failed.status === 'failed' && /x-ftvm-arm-stop-actions/.test(failed.errorDesc ?? '') && ob1['last-closed-epoch'] === 4 &&
    ob1['open-packets'] === 1 && (await rig.status()) === 'running',
    'a checkpoint whose stop actions fail closes nothing (atomic), the VM runs on', { failed, ob1 });

  await rig.qmp.execute('x-ftvm-arm-stop-actions', { actions: [{ type: 'x-ftvm-output-close', data: { epoch: 4 } }] });
  const stale = await rig.migrate();
  check(stale.status === 'failed' && /epoch 4 is not greater than the last epoch closed/.test(stale.errorDesc ?? ''),
    'an armed close with a stale epoch fails the checkpoint, named in error-desc', stale);
  const r = await rig.release(100);
  check(r.packets === 0 && (await rig.buffer('ob1'))['open-packets'] === 1, 'after all that, only the open epoch is held; release 100 releases nothing', r);
}

/** Released while the VM is stopped: held as unsent (in order) until it runs again. */
async function releaseWhileStopped(rig: Rig, heldReply: bigint): Promise<void> {
  const rMark = rig.replies.mark();
  const fMark = rig.frames.mark();
  await rig.close(5); // epoch 5: the frame and the reply sent after armedAtStop's resume
  await rig.announce(1);
  const stopped = rig.qmp.waitForEvent('STOP', { timeoutMs: 10_000 });
  await rig.qmp.execute('stop');
  await stopped;
  const r = await rig.release(5);
  await sleep(QUIET_MS / 2);
  const ob1 = await rig.buffer('ob1');
  check(r.packets >= 2 && ob1['unsent-packets'] === 1 && ob1['unsent-bytes'] === RARP_BYTES && ob1['held-packets'] === 0 &&
    ob1['open-packets'] === 1 && rig.frames.since(fMark).length === 0 && rig.replies.since(rMark).length === 0,
    'released while the VM is stopped: counted as released, kept as unsent, nothing sent yet', { r, ob1 });
  const resumed = rig.qmp.waitForEvent('RESUME', { timeoutMs: 10_000 });
  await rig.qmp.execute('cont');
  await resumed;
  await rig.frames.waitFor(fMark, 1);
  const got = await rig.replies.waitFor(rMark, 1);
  await sleep(QUIET_MS / 2);
  const after = await rig.buffer('ob1');
  check(got.length === 1 && got[0] === heldReply && rig.frames.since(fMark).length === 1 && after['unsent-packets'] === 0 &&
    after['open-packets'] === 1, 'cont: the unsent packets go out; the open epoch stays held', { got, after });
}

/** Turning protection off: status=off and object-del release everything, in order. */
async function protectionOff(rig: Rig): Promise<void> {
  const rMark = rig.replies.mark();
  const fMark = rig.frames.mark();
  // held: one frame (open) from releaseWhileStopped; close 6, then more in the open epoch
  await rig.close(6);
  const open = await rig.heldRequests(2);
  await rig.announce(2);
  const ob1 = await rig.buffer('ob1');
  check(ob1['held-packets'] === 1 && ob1['open-packets'] === 2, 'ob1 holds epoch 6 (1 frame) and 2 open frames', ob1);

  await rig.qmp.execute('qom-set', { path: '/objects/ob1', property: 'status', value: 'off' });
  await rig.frames.waitFor(fMark, 3);
  let after = await rig.buffer('ob1');
  check(after['held-packets'] === 0 && after['open-packets'] === 0 && after['released-packets'] === 2 + 4 + 3 + 1 + 3,
    'status=off releases everything ob1 held (closed and open)', after);
  let mark = rig.frames.mark();
  await rig.announce(1);
  await rig.frames.waitFor(mark, 1);
  check((await rig.buffer('ob1'))['open-packets'] === 0, 'with status=off frames pass at once');
  await rig.qmp.execute('qom-set', { path: '/objects/ob1', property: 'status', value: 'on' });
  mark = rig.frames.mark();
  await rig.announce(2);
  await sleep(QUIET_MS / 2);
  after = await rig.buffer('ob1');
  check(rig.frames.since(mark).length === 0 && after['open-packets'] === 2, 'status=on holds again', after);
  await rig.qmp.execute('object-del', { id: 'ob1' });
  await rig.frames.waitFor(mark, 2);
  check((await rig.buffers()).size === 1, 'object-del ob1 released its 2 frames; only ob0 is left');

  await rig.qmp.execute('object-del', { id: 'ob0' });
  await rig.replies.waitFor(rMark, 2);
  await sleep(QUIET_MS / 2);
  const got = rig.replies.since(rMark);
  check(sameIds(got, open), 'object-del ob0 releases everything it held (the open epoch too), in order', { got: rig.replies.since(rMark), open });
  check((await rig.buffers()).size === 0, 'no buffers are left');
  const m = rig.replies.mark();
  const id = rig.request();
  check((await rig.replies.waitFor(m, 1))[0] === id, 'without a buffer the guest\'s replies pass at once');
  await rig.close(1);
  check(true, 'x-ftvm-output-close with no buffer succeeds and closes nothing');
}

async function main(): Promise<void> {
  const { qemu } = parseArgs(process.argv.slice(2));
  const binary = qemu ?? patchedQemu();
  console.log(`# ${binary}`);
  const replies = await Receiver.open<bigint>((msg) => decodeReply(msg)?.id);
  const frames = await Receiver.open<number>((msg) => msg.length);
  let guest: BootedGuest | undefined;
  let qmp: QmpClient | undefined;
  try {
    const image = await buildGuest();
    const n1Local = await freeUdpPort();
    guest = await bootGuest({
      image,
      qemuBinary: binary,
      memoryMiB: 256,
      keepDir: false,
      qemuArgs: [
        '-netdev', `socket,id=n1,udp=127.0.0.1:${frames.port},localaddr=127.0.0.1:${n1Local}`,
        '-device', 'e1000,netdev=n1,id=nic1,romfile=,mac=52:54:00:f7:00:01',
      ],
    });
    qmp = await QmpClient.connectWhenReady({ path: guest.qmpSocket }, { timeoutMs: 15_000, commandTimeoutMs: 20_000 });
    const rig = new Rig(guest, qmp, replies, frames);
    await rig.setCaps({ events: true });
    await singlePass(rig);
    await addBuffers(rig);
    await epochs(rig);
    const heldReply = await armedAtStop(rig);
    await failedCheckpoints(rig);
    await releaseWhileStopped(rig, heldReply);
    await protectionOff(rig);
    console.log(JSON.stringify({ checks: checksPassed() }));
  } catch (error) {
    console.log(`not ok - ${(error as Error).message}`);
    process.exitCode = 1;
  } finally {
    await qmp?.close().catch(() => undefined);
    await guest?.kill();
    replies.close();
    frames.close();
  }
}

await main();
