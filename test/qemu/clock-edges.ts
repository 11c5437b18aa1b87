/**
 * Standalone check of ftvm's QEMU patch 0001 (x-ftvm-clock-compensate, TCG) across a `loadvm`
 * (issue 17): the stop recorded before a load belongs to the clock the load replaced, so the
 * resume after `loadvm` gives the guest the snapshot's clock plus only what was armed after the
 * load (`offset-ns`), never the time the VM waited stopped before the load.
 *
 *   tsx --conditions=@ftvm/source test/qemu/clock-edges.ts [--qemu <binary>]
 *
 * No lab, no guest OS: QEMU under TCG with a small qcow2 disk for the internal snapshot. The guest
 * virtual clock is read while the VM is stopped from the `timer` section of
 * `xen-save-devices-state` (cpu_clock_offset: the guest clock's ns, frozen while stopped).
 * Prints TAP lines `ok N - ...`; exits 1 at the first mismatch (`not ok - ...`).
 */
import { execFileSync } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { patchedQemu } from '../support/patched-qemu.js';
import { baseQemuArgs, check, CheckFailed, checksPassed, quitQemu, startQemu } from './checks.js';

/** How long the VM waits stopped between the snapshot and the load: what must not be given back. */
const WAIT_MS = 1_500;
const OFFSET_NS = 250_000_000n;
/** Slack for the clock reads around cont/stop (the run between them is measured by the host). */
const SLACK_NS = 20_000_000n;
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

interface LastResume {
  compensated: boolean;
  'stopped-ns': number;
  'offset-ns': number;
  'applied-ns': number;
}

function parseArgs(argv: string[]): { qemu: string | undefined } {
  if (argv.length === 0) return { qemu: undefined };
  if (argv.length === 2 && argv[0] === '--qemu') return { qemu: argv[1] };
  throw new Error(`unknown arguments ${JSON.stringify(argv)} (usage: [--qemu <binary>])`);
}

/**
 * cpu_clock_offset from the `timer` section (version 2) of a device-state file: 0x04, be32 section
 * id, 0x05 "timer", be32 instance 0, be32 version 2, then be64 ticks, 8 unused bytes, be64 ns.
 */
function timerClockNs(state: Buffer): bigint {
  const head = Buffer.concat([Buffer.from([0x05]), Buffer.from('timer', 'latin1'), Buffer.from([0, 0, 0, 0, 0, 0, 0, 2])]);
  const at = state.indexOf(head);
  if (at < 5 || state[at - 5] !== 0x04) throw new CheckFailed('no "timer" section (version 2) in the saved device state');
  return state.readBigInt64BE(at + head.length + 16);
}

async function main(): Promise<void> {
  const { qemu } = parseArgs(process.argv.slice(2));
  const binary = qemu ?? patchedQemu();
  console.log(`# ${binary}`);
  const dir = await mkdtemp(path.join(os.tmpdir(), 'ftvm-clock-edges-'));
  const disk = path.join(dir, 'disk.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', disk, '16M']);
  const qmpPath = path.join(dir, 'qmp.sock');
  const { child, qmp, stderr } = await startQemu(binary, [...baseQemuArgs(qmpPath), '-drive', `file=${disk},format=qcow2,if=ide`], qmpPath, dir);
  const hmp = (command: string) => qmp.execute<string>('human-monitor-command', { 'command-line': command });
  let dumps = 0;
  const clock = async (): Promise<bigint> => {
    const file = path.join(dir, `devices-${dumps++}.bin`);
    await qmp.execute('xen-save-devices-state', { filename: file, live: false });
    return timerClockNs(await readFile(file));
  };
  const lastResume = async () => (await qmp.execute<{ 'last-resume'?: LastResume }>('x-ftvm-query-clock-compensation'))['last-resume'];
  /** cont, then stop at once; returns the host ns between sending cont and stop's reply. */
  const runBriefly = async (): Promise<bigint> => {
    const t0 = process.hrtime.bigint();
    await qmp.execute('cont');
    await qmp.execute('stop');
    return process.hrtime.bigint() - t0;
  };
  try {
    await sleep(300);
    await qmp.execute('stop');
    const snapshotClock = await clock();
    await qmp.execute('x-ftvm-clock-compensate', { 'include-stopped-time': true });
    check((await hmp('savevm ftvm-clock')).trim() === '', 'savevm while stopped and armed');
    await sleep(WAIT_MS);
    check((await hmp('loadvm ftvm-clock')).trim() === '', 'loadvm');
    const loaded = await clock();
    check(loaded === snapshotClock, 'loadvm restores the snapshot\'s guest clock', { snapshot: snapshotClock, loaded });

    // Armed before the snapshot with include-stopped-time: the resume after the load owes nothing.
    let ran = await runBriefly();
    let after = await clock();
    let resume = await lastResume();
    check(after - snapshotClock <= ran + SLACK_NS,
      `the guest clock is the snapshot's plus the ${(Number(ran) / 1e6).toFixed(1)} ms it ran, not plus the ${WAIT_MS} ms wait`,
      { advancedNs: after - snapshotClock, ranNs: ran });
    check(resume?.compensated === true && resume['stopped-ns'] === 0 && resume['applied-ns'] === 0,
      'the resume after loadvm gives back no stopped time (the stop before the load is not the guest\'s)', resume);

    // Armed after the load, with an offset: exactly the offset (plus the run).
    check((await hmp('loadvm ftvm-clock')).trim() === '', 'loadvm again');
    await sleep(WAIT_MS / 3);
    await qmp.execute('x-ftvm-clock-compensate', { 'include-stopped-time': true, 'offset-ns': Number(OFFSET_NS) });
    ran = await runBriefly();
    after = await clock();
    resume = await lastResume();
    check(resume?.compensated === true && resume['stopped-ns'] === 0 && BigInt(resume['applied-ns']) === OFFSET_NS,
      'armed after the load, the resume applies the offset only', resume);
    const advanced = after - snapshotClock;
    check(advanced >= OFFSET_NS && advanced <= OFFSET_NS + ran + SLACK_NS,
      `the guest clock is the snapshot's plus the 250 ms offset plus the ${(Number(ran) / 1e6).toFixed(1)} ms it ran`,
      { advancedNs: advanced, ranNs: ran });
    console.log(JSON.stringify({ checks: checksPassed() }));
  } catch (error) {
    console.error(`not ok - ${(error as Error).message}`);
    if (stderr.join('').trim()) console.error(`QEMU stderr:\n${stderr.join('').trim()}`);
    process.exitCode = 1;
  } finally {
    await quitQemu(qmp, child, dir);
  }
}

await main();
