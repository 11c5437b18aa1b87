import { describe, expect, it } from 'vitest';
import { CheckpointChainError, createStreamVerifier, flattenCheckpointChain, parseMigrationStream } from '../src/stream/index.js';
import { BLOCKS, full, PAGE, stream, type Page } from './fixtures-chain.js';
import { pseudoRandom } from './fixtures-synthetic.js';

/** The content of every page a stream leaves in guest RAM (undefined = zero page). */
function ramOf(bytes: Buffer): Map<string, string> {
  const ram = new Map<string, string>();
  for (const r of parseMigrationStream(bytes)) {
    if (r.type === 'ram-page') ram.set(`${r.block}@${r.addr}`, r.data.toString('hex'));
    else if (r.type === 'ram-zero') ram.set(`${r.block}@${r.addr}`, 'zero');
  }
  return ram;
}

function verify(bytes: Buffer) {
  const v = createStreamVerifier();
  v.update(bytes);
  return v.end();
}

describe('checkpoint chains', () => {
  it('flattens a full checkpoint and its increments into one full stream, newest page and device state winning', async () => {
    const base = full(100);
    const delta1: Page[] = [{ block: 'pc.ram', index: 1, data: pseudoRandom(PAGE, 1) }, { block: 'pc.ram', index: 2, data: pseudoRandom(PAGE, 2) }];
    const delta2: Page[] = [{ block: 'pc.ram', index: 1 }, { block: 'pc.bios', index: 0, data: pseudoRandom(PAGE, 3) }];
    const chain = [stream(base, BLOCKS, 1), stream(delta1, BLOCKS, 2), stream(delta2, BLOCKS, 3)];

    const flat = await flattenCheckpointChain(chain, { sliceBytes: 1000 });

    const expected = ramOf(chain[0]!);
    for (const [k, v] of [...ramOf(chain[1]!), ...ramOf(chain[2]!)]) expected.set(k, v);
    expect(ramOf(flat)).toEqual(expected);
    expect(expected.get('pc.ram@4096')).toBe('zero'); // delta2 zeroed what delta1 wrote
    const device = parseMigrationStream(flat).find((r) => r.type === 'device-section');
    expect(device).toMatchObject({ idstr: 'timer', body: Buffer.alloc(24, 3) });
    expect(verify(flat)).toMatchObject({ fullRam: true, ramPages: 8 });
  });

  it('tells full streams from incremental ones', () => {
    expect(verify(stream(full(1)))).toMatchObject({ fullRam: true, ramBlocks: [{ id: 'pc.ram', bytes: 6 * PAGE }, { id: 'pc.bios', bytes: 2 * PAGE }] });
    expect(verify(stream([{ block: 'pc.bios', index: 1 }]))).toMatchObject({ fullRam: false, ramGap: { block: 'pc.ram', missingPages: 6 } });
  });

  it('refuses a chain that does not start with a full checkpoint', async () => {
    const chain = [stream([{ block: 'pc.ram', index: 0 }]), stream([])];
    await expect(flattenCheckpointChain(chain)).rejects.toThrow(CheckpointChainError);
    await expect(flattenCheckpointChain(chain)).rejects.toThrow(/first checkpoint is not full: 5 pages of block 'pc.ram'/);
  });

  it('refuses increments whose RAM blocks differ from the base', async () => {
    const other = [{ idstr: 'pc.ram', usedLength: 8 * PAGE }, BLOCKS[1]!];
    await expect(flattenCheckpointChain([stream(full(1)), stream([], other)])).rejects.toThrow(/has RAM blocks pc.ram:32768, pc.bios:8192, its base pc.ram:24576/);
  });

  it('returns a lone full checkpoint as it is', async () => {
    const only = stream(full(7));
    expect((await flattenCheckpointChain([only])).equals(only)).toBe(true);
  });
});
