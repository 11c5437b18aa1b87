/**
 * One QEMU of a standalone check (TCG, no guest OS, 128 MiB), in its own directory: migrations
 * and incoming loads with their deadlines, the guest's memory as a digest.
 */
import type { ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type { QmpClient, QmpEvent } from '@ftvm/qmp';
import { patchedQemu } from '../support/patched-qemu.js';
import { baseQemuArgs, CheckFailed, checksPassed, parseCheckArgs, quitQemu, startQemu, stringify, type MigrateInfo } from './checks.js';

export const RAM_BYTES = 128 * 1024 * 1024;
const MIGRATION_DEADLINE_MS = 60_000;
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** One QEMU of a check (TCG, no guest OS), in its own directory. */
export class Vm {
  private readonly events: QmpEvent[] = [];
  private constructor(
    readonly name: string,
    readonly dir: string,
    readonly qmp: QmpClient,
    readonly child: ChildProcess,
    private readonly stderr: string[],
  ) {
    qmp.onEvent((event) => this.events.push(event));
  }

  static async start(binary: string, name: string, extra: string[] = []): Promise<Vm> {
    const dir = await mkdtemp(path.join(os.tmpdir(), `ftvm-check-${name}-`));
    const qmpPath = path.join(dir, 'qmp.sock');
    const { child, qmp, stderr } = await startQemu(binary, [...baseQemuArgs(qmpPath), ...extra], qmpPath, dir);
    const vm = new Vm(name, dir, qmp, child, stderr);
    await vm.setCaps({ events: true });
    return vm;
  }

  get log(): string {
    return this.stderr.join('');
  }

  async stop(): Promise<void> {
    await quitQemu(this.qmp, this.child, this.dir);
  }

  async setCaps(caps: Record<string, boolean>): Promise<void> {
    await this.qmp.execute('migrate-set-capabilities', {
      capabilities: Object.entries(caps).map(([capability, state]) => ({ capability, state })),
    });
  }

  async status(): Promise<string> {
    return (await this.qmp.execute<{ status: string }>('query-status')).status;
  }

  async hmp(command: string): Promise<string> {
    return this.qmp.execute<string>('human-monitor-command', { 'command-line': command });
  }

  /** `migrate` to `uri`; resolves with query-migrate once it ended (completed, failed or cancelled). */
  async migrate(uri: string): Promise<MigrateInfo> {
    const ended = this.qmp.waitForEvent<{ status: string }>('MIGRATION', {
      timeoutMs: MIGRATION_DEADLINE_MS,
      predicate: (e) => ['completed', 'failed', 'cancelled'].includes(e.data.status),
    });
    await this.qmp.execute('migrate', { uri });
    await ended;
    // the MIGRATION event comes before the thread's last step: wait until the run state moved on
    const deadline = Date.now() + 5_000;
    while ((await this.status()) === 'finish-migrate') {
      if (Date.now() > deadline) throw new CheckFailed(`${this.name}: still in finish-migrate 5 s after the migration ended`);
      await sleep(5);
    }
    return this.qmp.execute<MigrateInfo>('query-migrate');
  }

  /** An incoming QEMU (`-incoming defer`): load `uri` and wait until it loaded. */
  async incoming(uri: string): Promise<void> {
    const ended = this.qmp.waitForEvent<{ status: string }>('MIGRATION', {
      timeoutMs: MIGRATION_DEADLINE_MS,
      predicate: (e) => ['completed', 'failed'].includes(e.data.status),
    });
    await this.qmp.execute('migrate-incoming', { uri });
    const end = await ended;
    if (end.data.status !== 'completed') throw new CheckFailed(`${this.name}: the incoming migration ${end.data.status}: ${this.log}`);
  }

  /** SHA-256 of the guest's RAM (pmemsave over all of it). */
  async memoryDigest(): Promise<string> {
    const file = path.join(this.dir, 'ram.dump');
    await this.qmp.execute('pmemsave', { val: 0, size: RAM_BYTES, filename: file });
    const digest = createHash('sha256').update(await readFile(file)).digest('hex');
    await rm(file, { force: true });
    return digest;
  }

  /** Resolves with how the process ended, or undefined if it still runs after `ms`. */
  async exitWithin(ms: number): Promise<string | undefined> {
    const ended = () => (this.child.exitCode !== null ? `exit status ${this.child.exitCode}` : this.child.signalCode !== null ? `signal ${this.child.signalCode}` : undefined);
    const deadline = Date.now() + ms;
    while (!ended() && Date.now() < deadline) await sleep(20);
    return ended();
  }

  /** Gives the guest a moment to run (and write) after a migration left it in postmigrate. */
  async runAWhile(): Promise<void> {
    await this.qmp.execute('cont');
    await sleep(300);
  }
}

/** The QEMUs a check started (stopped after each check, their stderr printed on a failure). */
export const vms: Vm[] = [];

export async function started(vm: Promise<Vm>): Promise<Vm> {
  const v = await vm;
  vms.push(v);
  return v;
}

/** Stops `vm` now and forgets it. */
export async function stopped(vm: Vm): Promise<void> {
  vms.splice(vms.indexOf(vm), 1);
  await vm.stop();
}

async function stopAll(): Promise<void> {
  for (const vm of vms.splice(0)) await vm.stop().catch(() => undefined);
}

/**
 * A check script's main: `[--qemu <binary>] [--only <check>[,<check>]]` from argv, each check run
 * in its own directory under a fresh one in `tmpRoot` (default the OS's), its QEMUs stopped after
 * it; a JSON line with the count at the end, or `not ok` and exit status 1 at the first failure.
 */
export async function runChecks<C extends string>(checks: readonly C[], run: Record<C, (binary: string, dir: string) => Promise<void>>, options: { prefix: string; tmpRoot?: string }): Promise<void> {
  const { qemu, only } = parseCheckArgs(process.argv.slice(2), checks);
  const binary = qemu ?? patchedQemu();
  console.log(`# ${binary}`);
  const root = await mkdtemp(path.join(options.tmpRoot ?? os.tmpdir(), options.prefix));
  try {
    for (const name of only) {
      console.log(`# ${name}`);
      await run[name](binary, await mkdtemp(path.join(root, `${name}-`)));
      await stopAll();
    }
    console.log(JSON.stringify({ checks: checksPassed() }));
  } catch (error) {
    console.error(`not ok - ${(error as Error).message}`);
    for (const vm of vms) if (vm.log.trim()) console.error(`QEMU ${vm.name} stderr:\n${vm.log.trim()}`);
    if (!(error instanceof CheckFailed)) console.error(stringify((error as Error).stack));
    process.exitCode = 1;
  } finally {
    await stopAll();
    await rm(root, { recursive: true, force: true });
  }
}
