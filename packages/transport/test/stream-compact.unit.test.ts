import { describe, expect, it } from 'vitest';
import {
  ChainCompactionError,
  CheckpointChainCompactor,
  checkpointLayout,
  compactCheckpointChain,
  createStreamVerifier,
  encodeRecords,
  flattenCheckpointChain,
  parseMigrationStream,
  RamFlag,
  type MigrationRecord,
} from '../src/stream/index.js';
import { BLOCKS, full, PAGE, stream, type Page } from './fixtures-chain.js';
import { pseudoRandom } from './fixtures-synthetic.js';

/** The content of every page a stream leaves in guest RAM, applied in stream order (newest wins). */
function ramOf(bytes: Buffer): Map<string, string> {
  const ram = new Map<string, string>();
  for (const r of parseMigrationStream(bytes)) {
    if (r.type === 'ram-page' || r.type === 'ram-compressed') ram.set(`${r.block}@${r.addr}`, `${r.type}:${r.data.toString('hex')}`);
    else if (r.type === 'ram-zero') ram.set(`${r.block}@${r.addr}`, `zero:${r.fill}`);
  }
  return ram;
}

const pageRecords = (bytes: Buffer) => parseMigrationStream(bytes).filter((r) => r.type === 'ram-page' || r.type === 'ram-zero' || r.type === 'ram-compressed');
const devices = (bytes: Buffer) => parseMigrationStream(bytes).filter((r) => r.type === 'device-section' || r.type === 'vm-description');

function verify(bytes: Buffer) {
  const v = createStreamVerifier();
  v.update(bytes);
  return v.end();
}

/** Checks everything a compaction promises against the assembled chain. */
function expectEquivalent(chain: Buffer[]): Buffer {
  const compacted = compactCheckpointChain(chain);
  const assembled = flattenCheckpointChain(chain);
  expect(ramOf(compacted)).toEqual(ramOf(assembled));
  const pages = pageRecords(compacted);
  expect(new Set(pages.map((p) => `${p.block}@${p.addr}`)).size).toBe(pages.length); // each page once
  expect(devices(compacted)).toEqual(devices(chain.at(-1)!));
  const summary = verify(compacted);
  expect(summary).toMatchObject({ fullRam: true, ramPages: pages.length, bytes: compacted.length });
  expect(summary.layout).toEqual(checkpointLayout(compacted));
  expect(compacted.length).toBeLessThanOrEqual(chain.reduce((n, s) => n + s.length, 0));
  return compacted;
}

describe('compactCheckpointChain', () => {
  const delta1: Page[] = [{ block: 'pc.ram', index: 1, data: pseudoRandom(PAGE, 1) }, { block: 'pc.ram', index: 2, data: pseudoRandom(PAGE, 2) }];
  // a zero page over a data page; bios named after ram; a CONTINUE run
  const delta2: Page[] = [{ block: 'pc.ram', index: 1 }, { block: 'pc.bios', index: 0, data: pseudoRandom(PAGE, 3) }, { block: 'pc.bios', index: 1, data: pseudoRandom(PAGE, 4) }];
  const delta3: Page[] = [{ block: 'pc.bios', index: 0, data: pseudoRandom(PAGE, 5) }, { block: 'pc.ram', index: 5, data: pseudoRandom(PAGE, 6) }, { block: 'pc.ram', index: 2 }];
  const chain = [stream(full(100), BLOCKS, 1), stream(delta1, BLOCKS, 2), stream(delta2, BLOCKS, 3), stream(delta3, BLOCKS, 4)];

  it('gives one full stream with each page once, its newest version, and the newest device state', () => {
    const compacted = expectEquivalent(chain);
    const ram = ramOf(compacted);
    expect(ram.get(`pc.ram@${PAGE}`)).toBe('zero:0'); // delta2 zeroed what delta1 wrote
    expect(ram.get(`pc.ram@${2 * PAGE}`)).toBe('zero:0');
    expect(ram.get('pc.bios@0')).toBe(`ram-page:${pseudoRandom(PAGE, 5).toString('hex')}`);
    expect(pageRecords(compacted)).toHaveLength(8);
    expect(devices(compacted)).toEqual([expect.objectContaining({ idstr: 'timer', body: Buffer.alloc(24, 4) })]);
    // the full stream's setup as it was, then one END section with the pages
    const layout = checkpointLayout(chain[0]!);
    expect(compacted.subarray(0, layout.ramSetupEnd).equals(chain[0]!.subarray(0, layout.ramSetupEnd))).toBe(true);
    const sections = parseMigrationStream(compacted).filter((r) => r.type === 'section-start' || r.type === 'section-end' || r.type === 'section-part');
    expect(sections.map((r) => r.type)).toEqual(['section-start', 'section-end']);
  });

  it('names each block at its first page, whatever the page followed in its own stream', () => {
    // bios first, ram pages descending: every ram page but the first came with CONTINUE
    const reversed = stream([...full(7)].reverse());
    const late: Page[] = [{ block: 'pc.bios', index: 1, data: pseudoRandom(PAGE, 9) }, { block: 'pc.ram', index: 0, data: pseudoRandom(PAGE, 10) }];
    const compacted = expectEquivalent([reversed, stream(late)]);
    const pages = pageRecords(compacted);
    expect(pages.map((p) => `${p.block}@${p.addr / PAGE}:${p.flags & RamFlag.CONTINUE ? 'c' : 'n'}`)).toEqual([
      'pc.ram@0:n',
      ...[1, 2, 3, 4, 5].map((i) => `pc.ram@${i}:c`),
      'pc.bios@0:n',
      'pc.bios@1:c',
    ]);
  });

  it('keeps only the newest copy of a page a full stream itself sent twice (precopy iterations)', () => {
    const again = stream([...full(1), { block: 'pc.ram', index: 3, data: pseudoRandom(PAGE, 33) }, { block: 'pc.ram', index: 4 }]);
    const compacted = expectEquivalent([again]);
    expect(pageRecords(compacted)).toHaveLength(8);
    expect(compacted.length).toBeLessThan(again.length);
  });

  it('carries compressed pages over as they are', () => {
    const records = parseMigrationStream(stream([{ block: 'pc.ram', index: 2, data: pseudoRandom(PAGE, 1) }]));
    const page = records.findIndex((r) => r.type === 'ram-page');
    const compressed: MigrationRecord = { type: 'ram-compressed', addr: 2 * PAGE, flags: RamFlag.COMPRESS_PAGE, block: 'pc.ram', data: pseudoRandom(100, 2) };
    const increment = encodeRecords([...records.slice(0, page), compressed, ...records.slice(page + 1)]);
    const compacted = expectEquivalent([stream(full(1)), increment]);
    expect(pageRecords(compacted).find((p) => p.addr === 2 * PAGE && p.block === 'pc.ram')).toMatchObject({ type: 'ram-compressed', data: pseudoRandom(100, 2) });
  });

  it('works in steps: sliced parsing (records across slices) and chunked output give the same bytes', () => {
    const whole = compactCheckpointChain(chain);
    const compactor = new CheckpointChainCompactor(chain, chain.map((s) => verify(s).layout!));
    let slices = 0;
    for (const _ of compactor.index(777)) slices++;
    expect(slices).toBeGreaterThan(chain.length);
    const chunks = [...compactor.chunks(5000)];
    expect(chunks.length).toBeGreaterThan(3);
    expect(Buffer.concat(chunks).equals(whole)).toBe(true);
    expect(compactor.bytes).toBe(whole.length);
    expect(compactor.layout).toEqual(checkpointLayout(whole));
    expect(compactor.pageCount).toBe(8);
  });

  it('refuses what it cannot compact, saying which stream and where', () => {
    const error = (streams: Buffer[], layouts?: Parameters<typeof compactCheckpointChain>[1]) => {
      try {
        compactCheckpointChain(streams, layouts);
      } catch (e) {
        return e as ChainCompactionError;
      }
      throw new Error('compacted');
    };
    expect(error([])).toMatchObject({ code: 'EMPTY_CHAIN' });
    const bigger = stream([], [{ idstr: 'pc.ram', usedLength: 8 * PAGE }, BLOCKS[1]!]);
    expect(error([chain[0]!, bigger])).toMatchObject({ code: 'BLOCKS_DIFFER', link: 1, message: expect.stringContaining("'pc.ram' 32768 bytes") });
    const layouts = chain.map((s) => checkpointLayout(s));
    expect(error(chain, [layouts[0]!, { ...layouts[1]!, ramSectionId: 9 }, layouts[2]!, layouts[3]!])).toMatchObject({ code: 'NOT_ONE_QEMU', link: 1 });
    expect(error(chain, [layouts[0]!, layouts[1]!, { ...layouts[2]!, deviceStateStart: layouts[2]!.deviceStateStart - 3 }, layouts[3]!])).toMatchObject({ code: 'LAYOUT_MISMATCH', link: 2 });
    expect(error(chain, [layouts[0]!, { ...layouts[1]!, ramSetupEnd: layouts[1]!.ramSetupEnd - 5 }, layouts[2]!, layouts[3]!])).toMatchObject({ code: 'LAYOUT_MISMATCH', link: 1 });

    const records = parseMigrationStream(chain[1]!);
    const page = records.findIndex((r) => r.type === 'ram-page');
    const xbzrle: MigrationRecord = { type: 'ram-xbzrle', addr: PAGE, flags: RamFlag.XBZRLE, block: 'pc.ram', encoding: 1, data: Buffer.alloc(10) };
    const withXbzrle = encodeRecords([...records.slice(0, page), xbzrle, ...records.slice(page + 1)]);
    expect(error([chain[0]!, withXbzrle])).toMatchObject({ code: 'UNSUPPORTED', link: 1, offset: expect.any(Number), message: expect.stringContaining('XBZRLE') });
    const outside: MigrationRecord = { type: 'ram-page', addr: 6 * PAGE, flags: RamFlag.PAGE, block: 'pc.ram', data: Buffer.alloc(PAGE) };
    expect(error([chain[0]!, encodeRecords([...records.slice(0, page), outside, ...records.slice(page + 1)])])).toMatchObject({ code: 'BAD_PAGE', link: 1 });
    const torn = Buffer.from(chain[1]!);
    torn[checkpointLayout(chain[1]!).ramSetupEnd] = 0x55; // no section type
    expect(error([chain[0]!, torn], layouts.slice(0, 2))).toMatchObject({ code: 'BAD_STREAM', link: 1 });
  });
});
