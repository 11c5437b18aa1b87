/**
 * Standalone check of ftvm's QEMU patch 0013 (x-ftvm-incremental) at its edges (issue 17):
 *  - `savevm`: an internal snapshot taken while an incremental base exists is a full image (it
 *    loads, in a fresh QEMU, to the memory it was taken from), and the next migration is full;
 *  - `plain`: a `migrate` to another URI than the one the base went to (virsh migrate's fd:, a
 *    fresh `-incoming` QEMU) sends every page: the target holds the source's memory;
 *  - `refuse`: an increment that does reach a QEMU with no base (same URI, a new listener) is
 *    refused by it with a clear error instead of loading; the source can go on;
 *  - `stream`: an increment carries the marker (configuration/x-ftvm-incremental), ftvm's parser
 *    exposes it and refuses it where a full image is required, QEMU refuses it as an image, and the
 *    chain (full + increment) assembled by the store's codec has no marker and loads to the
 *    increment's memory.
 *
 *   tsx --conditions=@ftvm/source test/qemu/incremental-edges.ts [--qemu <binary>] [--only <check>[,<check>]]
 *
 * No lab, no guest OS: QEMU under TCG (SeaBIOS runs, finds nothing to boot). Memory is compared
 * as a SHA-256 of `pmemsave` over the guest's 128 MiB: SeaBIOS leaves RAM far from a fresh
 * QEMU's (its shadow copy, tables), so an increment loaded as a full image never matches.
 * Prints TAP lines `ok N - ...`; exits 1 at the first mismatch (`not ok - ...`).
 */
import { execFileSync } from 'node:child_process';
import { copyFile, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { createStreamVerifier, flattenCheckpointChain, MigrationStreamError, parseMigrationStream } from '@ftvm/transport';
import { runChecks, started, stopped, Vm } from './check-vm.js';
import { check, CheckFailed, type MigrateInfo } from './checks.js';

const SINK = 'exec:cat > /dev/null';
/** A full migration of the 128 MiB guest has at least this many pages; an increment a handful. */
const FULL_PAGES = 30_000;
const MARKER_ERROR = /x-ftvm-incremental: this stream is an increment/;
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

const CHECKS = ['savevm', 'plain', 'refuse', 'stream'] as const;
type CheckName = (typeof CHECKS)[number];

const pages = (info: MigrateInfo) => (info.ram?.duplicate ?? 0) + (info.ram?.normal ?? 0);

/** A source with the capability on and a base: one full migration to `uri` completed. */
async function sourceWithBase(binary: string, name: string, uri: string, extra: string[] = []): Promise<Vm> {
  const vm = await Vm.start(binary, name, extra);
  await vm.setCaps({ 'x-ftvm-incremental': true });
  const first = await vm.migrate(uri);
  check(first.status === 'completed' && pages(first) >= FULL_PAGES, `${name}: the first migration with x-ftvm-incremental is full`, { status: first.status, pages: pages(first) });
  return vm;
}

/** savevm while a base exists: a full snapshot, which loads to its memory in a fresh QEMU; the next migration is full. */
async function savevm(binary: string, dir: string): Promise<void> {
  const disk = path.join(dir, 'disk.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', disk, '16M']);
  const drive = ['-drive', `file=${disk},format=qcow2,if=ide`];
  const a = await started(sourceWithBase(binary, 'savevm-source', SINK, drive));
  await a.runAWhile();
  await a.qmp.execute('stop');
  const memory = await a.memoryDigest();
  const saved = await a.hmp('savevm ftvm-snap');
  check(saved.trim() === '', 'savevm with an incremental base succeeds', saved);
  console.log(`# ${(await a.hmp('info snapshots')).trim().split('\n').pop()}`);
  await a.runAWhile();
  const next = await a.migrate(SINK);
  check(next.status === 'completed' && pages(next) >= FULL_PAGES, 'the migration after a savevm is full (the snapshot consumed the base)', { status: next.status, pages: pages(next) });
  await stopped(a);

  const b = await started(Vm.start(binary, 'savevm-load', [...drive, '-S']));
  const loaded = await b.hmp('loadvm ftvm-snap');
  check(loaded.trim() === '', 'loadvm of that snapshot in a fresh QEMU succeeds', loaded);
  const restored = await b.memoryDigest();
  check(restored === memory, 'the snapshot loads to the memory it was taken from (a full image, not an increment)', { saved: memory, loaded: restored });
}

/** A plain `migrate` to a fresh -incoming QEMU (another URI than the base's) sends every page. */
async function plain(binary: string, dir: string): Promise<void> {
  const s = await started(sourceWithBase(binary, 'plain-source', SINK));
  await s.runAWhile();
  const target = path.join(dir, 'target.sock');
  const t = await started(Vm.start(binary, 'plain-target', ['-S', '-incoming', `unix:${target}`]));
  const info = await s.migrate(`unix:${target}`);
  check(info.status === 'completed', 'a plain migrate to a fresh target completes', info);
  check(pages(info) >= FULL_PAGES, 'a plain migrate to another URI than the base\'s is full, the capability notwithstanding', { pages: pages(info) });
  const deadline = Date.now() + 10_000;
  while ((await t.status()) === 'inmigrate') {
    if (Date.now() > deadline) throw new CheckFailed('the target is still inmigrate 10 s after the source completed');
    await sleep(20);
  }
  check((await t.memoryDigest()) === (await s.memoryDigest()), 'the target holds the source\'s memory');
  await t.qmp.execute('cont');
  check((await t.status()) === 'running', 'the target runs');
}

/** An increment that reaches a QEMU with no base (the base's URI, a new listener) is refused by it. */
async function refuse(binary: string, dir: string): Promise<void> {
  const target = path.join(dir, 'target.sock');
  const first = await started(Vm.start(binary, 'refuse-target-1', ['-S', '-incoming', `unix:${target}`]));
  const s = await started(sourceWithBase(binary, 'refuse-source', `unix:${target}`));
  await stopped(first);
  await s.runAWhile();

  const fresh = await started(Vm.start(binary, 'refuse-target-2', ['-S', '-incoming', `unix:${target}`]));
  const info = await s.migrate(`unix:${target}`);
  console.log(`# the increment: ${info.status}, ${pages(info)} pages${info['error-desc'] ? `, ${info['error-desc']}` : ''}`);
  const ended = await fresh.exitWithin(10_000);
  check(ended !== undefined && ended !== 'exit status 0', 'the target with no base refuses the increment and exits', { ended, status: ended ? undefined : await fresh.status() });
  check(MARKER_ERROR.test(fresh.log), 'the target names the reason (x-ftvm-incremental marker)', fresh.log.trim());
  // The source cannot hear of the refusal without a return path: it saw `completed` (or `failed`).
  if ((await s.status()) !== 'running') await s.qmp.execute('cont');
  check((await s.status()) === 'running', 'the source goes on running', await s.status());
}

/** The marker in the stream, ftvm's parser on it, QEMU refusing it as an image, and the assembled chain loading. */
async function stream(binary: string, dir: string): Promise<void> {
  const out = path.join(dir, 'stream.bin');
  const uri = `exec:cat > ${out}`;
  const s = await started(sourceWithBase(binary, 'stream-source', uri));
  const full = await readFile(out);
  await s.runAWhile();
  const info = await s.migrate(uri);
  check(info.status === 'completed' && pages(info) < FULL_PAGES, 'a migration to the base\'s URI is an increment', { status: info.status, pages: pages(info) });
  const increment = await readFile(out);
  const memory = await s.memoryDigest(); // stopped (postmigrate) since the increment

  const summary = (bytes: Buffer) => {
    const v = createStreamVerifier();
    v.update(bytes);
    return v.end();
  };
  check(summary(full).incremental === undefined && summary(increment).incremental === true, 'ftvm\'s parser reads the marker: the full stream unmarked, the increment marked');
  try {
    parseMigrationStream(increment, { requireFull: true });
    check(false, 'ftvm\'s parser refuses the increment where a full image is required', 'it parsed');
  } catch (error) {
    check(error instanceof MigrationStreamError && error.code === 'INCREMENTAL_STREAM' && error.offset > 8 && error.offset < 200,
      'ftvm\'s parser refuses the increment where a full image is required (INCREMENTAL_STREAM in the configuration)', (error as Error).message);
  }

  const raw = path.join(dir, 'increment.bin');
  await copyFile(out, raw);
  const alone = await started(Vm.start(binary, 'stream-alone', ['-S', '-incoming', 'defer']));
  await alone.qmp.execute('migrate-incoming', { uri: `exec:cat ${raw}` }).catch(() => undefined);
  const ended = await alone.exitWithin(10_000);
  check(ended !== undefined && ended !== 'exit status 0' && MARKER_ERROR.test(alone.log), 'QEMU refuses to load the increment on its own, naming the marker', { ended, log: alone.log.trim() });

  const assembled = flattenCheckpointChain([full, increment]);
  const flat = summary(assembled);
  check(flat.incremental === undefined && flat.fullRam, 'the assembled chain (full + increment) is a full image with no marker', { incremental: flat.incremental, fullRam: flat.fullRam });
  const file = path.join(dir, 'assembled.bin');
  await writeFile(file, assembled);
  const t = await started(Vm.start(binary, 'stream-restore', ['-S', '-incoming', 'defer']));
  await t.incoming(`exec:cat ${file}`);
  check((await t.memoryDigest()) === memory, 'the assembled chain loads to the memory of the increment\'s stop');
}

const RUN: Record<CheckName, (binary: string, dir: string) => Promise<void>> = { savevm, plain, refuse, stream };

await runChecks(CHECKS, RUN, { prefix: 'ftvm-incr-' });
