import { describe, expect, it } from 'vitest';
import { runFuzz } from './stream-fuzz.js';
import { syntheticStream } from './fixtures-synthetic.js';

// Property tests on a synthetic stream, in a worker thread with a per-run watchdog so that a
// hanging parse fails the test instead of freezing it. Real QEMU streams get the same treatment
// in stream-qemu.int.test.ts.
describe('fuzzing the parser (synthetic stream)', () => {
  const stream = syntheticStream().bytes;
  const seed = Number(process.env.FTVM_FUZZ_SEED ?? 20240601);

  it('parses 100 random chunkings to the same records, re-encoding byte for byte', async () => {
    const result = await runFuzz({ stream, mode: 'split', runs: 100, seed }, 5_000);
    expect(result.failures).toEqual([]);
    expect(result.outcomes).toEqual({ ok: 100 });
  }, 60_000);

  it('answers every truncation with a MigrationStreamError or a valid parse, chunked or not', async () => {
    const result = await runFuzz({ stream, mode: 'truncate', runs: 300, seed }, 5_000);
    expect(result.failures).toEqual([]);
    expect(result.outcomes.TRUNCATED).toBeGreaterThan(250);
  }, 60_000);

  it('answers every corruption with a MigrationStreamError or a valid parse, chunked or not', async () => {
    const result = await runFuzz({ stream, mode: 'corrupt', runs: 500, seed }, 5_000);
    expect(result.failures).toEqual([]);
    expect(Object.keys(result.outcomes).length).toBeGreaterThan(2);
  }, 60_000);
});
