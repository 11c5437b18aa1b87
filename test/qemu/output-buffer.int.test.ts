/**
 * ftvm's QEMU patch 0016 on its own (no lab, no libvirt): runs the standalone check
 * output-buffer.ts, which boots the test guest on the patched QEMU and exits non-zero at the first
 * mismatch (guest output held per epoch, closed by a transaction or at a checkpoint's stop,
 * released in order by epoch, nothing closed by failed checkpoints, released by object-del, and
 * the x-ftvm-single-pass capability).
 */
import { execFile } from 'node:child_process';
import path from 'node:path';
import { promisify } from 'node:util';
import { expect, it } from 'vitest';
import { patchedQemu } from '../support/patched-qemu.js';

const run = promisify(execFile);
const here = path.dirname(new URL(import.meta.url).pathname);

it('patch 0016: guest output is held per epoch and released by committed epoch', async () => {
  const qemu = patchedQemu();
  const tsx = path.resolve(here, '../../node_modules/.bin/tsx');
  const { stdout } = await run(tsx, ['--conditions=@ftvm/source', path.join(here, 'output-buffer.ts'), '--qemu', qemu], {
    timeout: 240_000,
    maxBuffer: 16 * 1024 * 1024,
  });
  const oks = stdout.split('\n').filter((l) => /^ok \d+ - /.test(l));
  expect(oks.length).toBeGreaterThan(40);
  expect(stdout).not.toMatch(/^not ok/m);
}, 300_000);
