/**
 * ftvm's QEMU patches 0011, 0012 and 0014 at the edges of a checkpoint (no lab, no libvirt): runs
 * the standalone check checkpoint-edges.ts, which exits non-zero at the first mismatch (a stop
 * sent in a checkpoint's stopped phase holds, commands right after `completed` leave the next
 * checkpoint sound, x-ftvm-clock-compensate-disarm, the send buffer raised on unix sockets only).
 */
import { expect, it } from 'vitest';
import { runCheck } from './run-check.js';

it('patches 0011/0012/0014: fences, races after completed, disarm, send buffer', async () => {
  const { oks, notOks } = await runCheck('checkpoint-edges.ts', { timeoutMs: 240_000 });
  expect(notOks).toEqual([]);
  expect(oks.length).toBeGreaterThan(20);
}, 300_000);
