/**
 * ftvm's QEMU patch 0001 across a loadvm (no lab, no libvirt, TCG): runs the standalone check
 * clock-edges.ts, which exits non-zero at the first mismatch (the resume after loadvm gives the
 * snapshot's clock plus only what was armed after the load, not the wait before it).
 */
import { expect, it } from 'vitest';
import { runCheck } from './run-check.js';

it('patch 0001: loadvm resets the stop bookkeeping of x-ftvm-clock-compensate', async () => {
  const { oks, notOks } = await runCheck('clock-edges.ts', { timeoutMs: 120_000 });
  expect(notOks).toEqual([]);
  expect(oks.length).toBe(8);
}, 180_000);
