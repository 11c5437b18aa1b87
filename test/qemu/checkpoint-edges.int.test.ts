/**
 * ftvm's QEMU patches 0011, 0012 and 0014 at the edges of a checkpoint (no lab, no libvirt): runs
 * the standalone check checkpoint-edges.ts, which exits non-zero at the first mismatch (a stop
 * sent in a checkpoint's stopped phase holds, commands right after `completed` leave the next
 * checkpoint sound, x-ftvm-clock-compensate-disarm, the send buffer raised on unix sockets only).
 */
import { execFile } from 'node:child_process';
import path from 'node:path';
import { promisify } from 'node:util';
import { expect, it } from 'vitest';
import { patchedQemu } from '../support/patched-qemu.js';

const run = promisify(execFile);
const here = path.dirname(new URL(import.meta.url).pathname);

it('patches 0011/0012/0014: fences, races after completed, disarm, send buffer', async () => {
  const qemu = patchedQemu();
  const tsx = path.resolve(here, '../../node_modules/.bin/tsx');
  const { stdout } = await run(tsx, ['--conditions=@ftvm/source', path.join(here, 'checkpoint-edges.ts'), '--qemu', qemu], {
    timeout: 240_000,
    maxBuffer: 16 * 1024 * 1024,
  });
  const oks = stdout.split('\n').filter((l) => /^ok \d+ - /.test(l));
  expect(oks.length).toBeGreaterThan(20);
  expect(stdout).not.toMatch(/^not ok/m);
}, 300_000);
