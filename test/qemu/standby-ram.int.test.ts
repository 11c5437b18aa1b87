/**
 * The mapped standby against real QEMU (no lab, no libvirt): runs the standalone check
 * standby-ram.ts, which exits non-zero at the first mismatch (a standby whose RAM file
 * StandbyRam kept current loads only device state and holds the source's memory; without
 * x-ignore-shared QEMU refuses that stream; the whole chain still loads into a mapped standby).
 */
import { expect, it } from 'vitest';
import { runCheck } from './run-check.js';

it('a standby on a RAM file kept current loads only device state, to the source\'s memory', async () => {
  const { oks, notOks } = await runCheck('standby-ram.ts', { timeoutMs: 120_000 });
  expect(notOks).toEqual([]);
  expect(oks.length).toBe(11);
}, 180_000);
