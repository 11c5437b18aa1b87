/**
 * ftvm's QEMU patch 0015 on its own (no lab, no libvirt): runs the standalone check
 * disk-stop-actions.ts, which exits non-zero at the first mismatch (fleece data at the stop
 * instant, exact bitmaps, failure and one-shot semantics, postmigrate writes).
 */
import { execFile } from 'node:child_process';
import path from 'node:path';
import { promisify } from 'node:util';
import { expect, it } from 'vitest';
import { patchedQemu } from '../support/patched-qemu.js';

const run = promisify(execFile);
const here = path.dirname(new URL(import.meta.url).pathname);

it('patch 0015: armed stop actions make a fleecing point at the checkpoint\'s stop instant', async () => {
  const qemu = patchedQemu();
  const tsx = path.resolve(here, '../../node_modules/.bin/tsx');
  const { stdout } = await run(tsx, ['--conditions=@ftvm/source', path.join(here, 'disk-stop-actions.ts'), '--runs', '3', '--qemu', qemu], { timeout: 240_000, maxBuffer: 16 * 1024 * 1024 });
  const oks = stdout.split('\n').filter((l) => /^ok \d+ - /.test(l));
  expect(oks.length).toBeGreaterThan(40);
  expect(stdout).not.toMatch(/^not ok/m);
}, 300_000);
