/**
 * Runs one of the standalone QEMU checks in this directory (`ok N - …` / `not ok N - …` lines,
 * non-zero exit at the first mismatch) against ftvm's patched QEMU, for its vitest wrapper.
 */
import { execFile } from 'node:child_process';
import path from 'node:path';
import { promisify } from 'node:util';
import { patchedQemu } from '../support/patched-qemu.js';

const run = promisify(execFile);
const here = path.dirname(new URL(import.meta.url).pathname);

export interface CheckOutput {
  stdout: string;
  /** The `ok N - …` lines. */
  oks: string[];
  /** The `not ok N - …` lines (a failing check exits non-zero first, so this is for the message). */
  notOks: string[];
}

export async function runCheck(script: string, options: { args?: string[]; timeoutMs?: number } = {}): Promise<CheckOutput> {
  const tsx = path.resolve(here, '../../node_modules/.bin/tsx');
  const { stdout } = await run(tsx, ['--conditions=@ftvm/source', path.join(here, script), ...(options.args ?? []), '--qemu', patchedQemu()], {
    timeout: options.timeoutMs ?? 240_000,
    maxBuffer: 16 * 1024 * 1024,
  });
  const lines = stdout.split('\n');
  return { stdout, oks: lines.filter((l) => /^ok \d+ - /.test(l)), notOks: lines.filter((l) => /^not ok/.test(l)) };
}
