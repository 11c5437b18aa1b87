import { describe, expect, it } from 'vitest';
import {
  assembleCheckpointChain,
  CheckpointChainError,
  checkpointLayout,
  compactCheckpointChain,
  createStreamVerifier,
  flattenCheckpointChain,
  parseMigrationStream,
} from '../src/stream/index.js';
import { BLOCKS, full, marked, PAGE, stream, type Page } from './fixtures-chain.js';
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
  const delta1: Page[] = [{ block: 'pc.ram', index: 1, data: pseudoRandom(PAGE, 1) }, { block: 'pc.ram', index: 2, data: pseudoRandom(PAGE, 2) }];
  const delta2: Page[] = [{ block: 'pc.ram', index: 1 }, { block: 'pc.bios', index: 0, data: pseudoRandom(PAGE, 3) }];
  const chain = [stream(full(100), BLOCKS, 1), stream(delta1, BLOCKS, 2), stream(delta2, BLOCKS, 3)];

  it('assembles a full checkpoint and its increments into one stream: the newest page and device state win', () => {
    const flat = flattenCheckpointChain(chain);

    const expected = ramOf(chain[0]!);
    for (const [k, v] of [...ramOf(chain[1]!), ...ramOf(chain[2]!)]) expected.set(k, v);
    expect(ramOf(flat)).toEqual(expected); // pages apply in stream order, as QEMU loads them
    expect(expected.get('pc.ram@4096')).toBe('zero'); // delta2 zeroed what delta1 wrote
    const devices = parseMigrationStream(flat).filter((r) => r.type === 'device-section');
    expect(devices).toEqual([expect.objectContaining({ idstr: 'timer', body: Buffer.alloc(24, 3) })]);
    // one "ram" START, then the increments' page sections as further iterations
    const sections = parseMigrationStream(flat).filter((r) => r.type === 'section-start' || r.type === 'section-end');
    expect(sections.map((r) => r.type)).toEqual(['section-start', 'section-end', 'section-end', 'section-end']);
    expect(verify(flat)).toMatchObject({ fullRam: true, ramPages: 8 + 2 + 2 });
  });

  it('uses the layouts the verifier recorded, and copies nothing until asked', () => {
    const layouts = chain.map((s) => verify(s).layout!);
    expect(layouts[0]).toEqual(checkpointLayout(chain[0]!));
    const parts = assembleCheckpointChain(chain, layouts);
    expect(parts.ram).toHaveLength(3);
    expect(parts.ram[1]!.buffer).toBe(chain[1]!.buffer); // a view into the stored stream
    expect(Buffer.concat([...parts.ram, parts.deviceState]).equals(flattenCheckpointChain(chain))).toBe(true);
    expect(parts.preamble.equals(chain[2]!.subarray(0, layouts[2]!.preambleEnd))).toBe(true);
  });

  it('tells full streams from incremental ones', () => {
    expect(verify(stream(full(1)))).toMatchObject({ fullRam: true, ramBlocks: [{ id: 'pc.ram', bytes: 6 * PAGE }, { id: 'pc.bios', bytes: 2 * PAGE }] });
    expect(verify(stream([{ block: 'pc.bios', index: 1 }]))).toMatchObject({ fullRam: false, ramGap: { block: 'pc.ram', missingPages: 6 } });
  });

  it('refuses streams of different QEMUs, and layouts that do not fit', () => {
    const layouts = chain.map((s) => checkpointLayout(s));
    expect(() => assembleCheckpointChain(chain, [layouts[0]!, { ...layouts[1]!, ramSectionId: 9 }, layouts[2]!])).toThrow(CheckpointChainError);
    expect(() => assembleCheckpointChain(chain, [layouts[0]!, { ...layouts[1]!, deviceStateStart: 1e9 }, layouts[2]!])).toThrow(/shorter/);
    expect(() => assembleCheckpointChain(chain, layouts.slice(1))).toThrow(/3 streams but 2 layouts/);
  });

  it('returns a lone full checkpoint as it is', () => {
    const only = stream(full(7));
    expect(flattenCheckpointChain([only]).equals(only)).toBe(true);
  });
});

describe("chains with QEMU's increment marker (x-ftvm-incremental, patch 0013)", () => {
  const delta: Page[] = [{ block: 'pc.ram', index: 1, data: pseudoRandom(PAGE, 7) }];
  const base = stream(full(200), BLOCKS, 1);
  const increment = marked(stream(delta, BLOCKS, 2));

  it('the verifier tells a marked increment from a full stream', () => {
    expect(verify(increment).incremental).toBe(true);
    expect(verify(base).incremental).toBeUndefined();
  });

  it('assembles a full stream and a marked increment into a full image with no marker', () => {
    const flat = flattenCheckpointChain([base, increment]);
    const summary = verify(flat);
    expect(summary.incremental).toBeUndefined();
    expect(summary.fullRam).toBe(true);
    expect(() => parseMigrationStream(flat, { requireFull: true })).not.toThrow();
    expect(ramOf(flat).get('pc.ram@4096')).toBe(pseudoRandom(PAGE, 7).toString('hex'));
    const compacted = compactCheckpointChain([base, increment]);
    expect(verify(compacted).incremental).toBeUndefined();
  });

  it('refuses a chain whose base is itself an increment, naming the marker and its offset', () => {
    expect(() => assembleCheckpointChain([marked(base), increment])).toThrow(CheckpointChainError);
    expect(() => assembleCheckpointChain([marked(base), increment])).toThrow(/checkpoint 0 of the chain must be a full stream: .*at offset 26 \(0x1a\) \[INCREMENTAL_STREAM\]/);
    expect(() => compactCheckpointChain([marked(base), increment])).toThrow(/checkpoint 0 of the chain: .*\[INCREMENTAL_STREAM\].* at offset 26/);
  });
});
