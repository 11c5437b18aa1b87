/**
 * ftvm's QEMU patch 0013 (x-ftvm-incremental) at its edges (no lab, no libvirt): runs the
 * standalone check incremental-edges.ts, which exits non-zero at the first mismatch (a savevm with
 * an incremental base is full and loads, a plain migrate to another URI is full, a QEMU with no
 * base refuses an increment by its marker, ftvm's codec reads the marker and assembles chains
 * into loadable full images).
 */
import { expect, it } from 'vitest';
import { runCheck } from './run-check.js';

it('patch 0013: savevm is full, plain migrate is full, increments are marked and refused alone', async () => {
  const { oks, notOks } = await runCheck('incremental-edges.ts', { timeoutMs: 240_000 });
  expect(notOks).toEqual([]);
  expect(oks.length).toBe(21);
}, 300_000);
