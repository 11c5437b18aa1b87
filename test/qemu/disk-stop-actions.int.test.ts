/**
 * ftvm's QEMU patch 0015 on its own (no lab, no libvirt): runs the standalone check
 * disk-stop-actions.ts, which exits non-zero at the first mismatch (fleece data at the stop
 * instant, exact bitmaps, failure and one-shot semantics, postmigrate writes).
 */
import { expect, it } from 'vitest';
import { runCheck } from './run-check.js';

it('patch 0015: armed stop actions make a fleecing point at the checkpoint\'s stop instant', async () => {
  const { oks, notOks } = await runCheck('disk-stop-actions.ts', { args: ['--runs', '3'], timeoutMs: 240_000 });
  expect(notOks).toEqual([]);
  expect(oks.length).toBeGreaterThan(40);
}, 300_000);
