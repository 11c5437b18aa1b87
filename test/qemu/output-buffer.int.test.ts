/**
 * ftvm's QEMU patch 0016 on its own (no lab, no libvirt): runs the standalone check
 * output-buffer.ts, which boots the test guest on the patched QEMU and exits non-zero at the first
 * mismatch (guest output held per epoch, closed by a transaction or at a checkpoint's stop,
 * released in order by epoch, nothing closed by failed checkpoints, released by object-del, and
 * the x-ftvm-single-pass capability).
 */
import { expect, it } from 'vitest';
import { runCheck } from './run-check.js';

it('patch 0016: guest output is held per epoch and released by committed epoch', async () => {
  const { oks, notOks } = await runCheck('output-buffer.ts', { timeoutMs: 240_000 });
  expect(notOks).toEqual([]);
  expect(oks.length).toBeGreaterThan(40);
}, 300_000);
