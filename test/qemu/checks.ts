/**
 * The QEMU patch checks' little TAP-like harness (`ok N - what`, a CheckFailed on the first
 * failure), shared by the standalone check scripts in this folder.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { rm } from 'node:fs/promises';
import { QmpClient, QmpCommandError } from '@ftvm/qmp';

export class CheckFailed extends Error {
  override name = 'CheckFailed';
}

let count = 0;

/** How many checks passed so far in this process. */
export const checksPassed = (): number => count;

export const stringify = (v: unknown): string => JSON.stringify(v, (_k, x) => (typeof x === 'bigint' ? x.toString() : x));

export function check(ok: boolean, what: string, detail?: unknown): void {
  count++;
  if (!ok) throw new CheckFailed(`${what}${detail === undefined ? '' : `: ${stringify(detail)}`}`);
  console.log(`ok ${count} - ${what}`);
}

/** `promise` must fail with a QMP error whose description matches. */
export async function expectQmpError(promise: Promise<unknown>, match: RegExp, what: string): Promise<void> {
  try {
    await promise;
  } catch (error) {
    check(error instanceof QmpCommandError && match.test(error.desc), what, (error as Error).message);
    return;
  }
  check(false, what, 'the command succeeded');
}

/** Quits a check's QEMU (SIGKILL if it has not exited 5 s later) and removes its directory. */
export async function quitQemu(qmp: QmpClient, child: ChildProcess, dir: string): Promise<void> {
  await qmp.execute('quit').catch(() => undefined); // the socket closes under the reply
  await qmp.close();
  await new Promise<void>((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) return resolve();
    const timer = setTimeout(() => child.kill('SIGKILL'), 5_000);
    child.once('exit', () => {
      clearTimeout(timer);
      resolve();
    });
  });
  await rm(dir, { recursive: true, force: true });
}

/** The arguments every check's QEMU starts with (TCG, no guest OS), its QMP socket at `qmpPath`. */
export const baseQemuArgs = (qmpPath: string): string[] => [
  '-machine', 'pc', '-accel', 'tcg', '-m', '128', '-nodefaults', '-display', 'none', '-serial', 'none',
  '-qmp', `unix:${qmpPath},server=on,wait=off`,
];

/**
 * Starts a check's QEMU (`command args`, its stderr kept) and connects to its QMP socket within
 * 15 s; if it does not answer, kills it, removes `dir` and fails with its stderr.
 */
export async function startQemu(
  command: string,
  args: string[],
  qmpPath: string,
  dir: string,
  stdout: 'ignore' | 'pipe' = 'ignore',
): Promise<{ child: ChildProcess; qmp: QmpClient; stderr: string[] }> {
  const child = spawn(command, args, { stdio: ['ignore', stdout, 'pipe'] });
  const stderr: string[] = [];
  child.stderr!.on('data', (chunk: Buffer) => stderr.push(chunk.toString()));
  const qmp = await QmpClient.connectWhenReady({ path: qmpPath }, { timeoutMs: 15_000, commandTimeoutMs: 20_000 }).catch(async (error: Error) => {
    child.kill('SIGKILL');
    await rm(dir, { recursive: true, force: true });
    throw new CheckFailed(`QEMU did not answer (${error.message}); its stderr: ${stderr.join('').trim()}`);
  });
  return { child, qmp, stderr };
}

/** `[--qemu <binary>] [--only <check>[,<check>]]`: the QEMU to test and which of `checks` to run. */
export function parseCheckArgs<C extends string>(argv: string[], checks: readonly C[]): { qemu: string | undefined; only: C[] } {
  let qemu: string | undefined;
  let only: C[] = [...checks];
  for (let i = 0; i < argv.length; i++) {
    const value = argv[i + 1];
    if (argv[i] === '--qemu' && value !== undefined) {
      qemu = value;
      i++;
    } else if (argv[i] === '--only' && value !== undefined) {
      const names = value.split(',');
      const unknown = names.filter((n) => !(checks as readonly string[]).includes(n));
      if (unknown.length) throw new Error(`unknown check ${unknown.join(', ')} (known: ${checks.join(', ')})`);
      only = names as C[];
      i++;
    } else {
      throw new Error(`unknown or incomplete argument ${JSON.stringify(argv[i])} (usage: [--qemu <binary>] [--only <check>[,<check>]])`);
    }
  }
  return { qemu, only };
}

/** `query-migrate` as the checks read it. */
export interface MigrateInfo {
  status: string;
  'error-desc'?: string;
  ram?: { duplicate: number; normal: number };
}
