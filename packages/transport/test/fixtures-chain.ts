// Small but complete migration streams for checkpoint-chain tests: a full one carries every page
// of its blocks, an incremental one only some.
import { encodeRecords, RamFlag, type MigrationRecord } from '../src/stream/index.js';
import { pseudoRandom } from './fixtures-synthetic.js';

export const PAGE = 4096;
export const BLOCKS = [
  { idstr: 'pc.ram', usedLength: 6 * PAGE },
  { idstr: 'pc.bios', usedLength: 2 * PAGE },
];

export type Page = { block: string; index: number; data?: Buffer };

/** A migration stream shaped like QEMU's: block list in START, pages in END, a device, EOF. */
export function stream(pages: Page[], blocks = BLOCKS, deviceByte = 0): Buffer {
  const records: MigrationRecord[] = [
    { type: 'header', version: 3 },
    { type: 'configuration', machineType: 'pc-i440fx-7.2', subsections: [] },
    { type: 'section-start', sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 },
    { type: 'ram-mem-size', addr: blocks.reduce((n, b) => n + b.usedLength, 0), flags: RamFlag.MEM_SIZE, blocks },
    { type: 'ram-eos', addr: 0, flags: RamFlag.EOS },
    { type: 'section-footer', sectionId: 2 },
    { type: 'section-end', sectionId: 2 },
  ];
  let last: string | undefined;
  for (const p of pages) {
    const cont = p.block === last ? RamFlag.CONTINUE : 0;
    last = p.block;
    records.push(
      p.data
        ? { type: 'ram-page', addr: p.index * PAGE, flags: RamFlag.PAGE | cont, block: p.block, data: p.data }
        : { type: 'ram-zero', addr: p.index * PAGE, flags: RamFlag.ZERO | cont, block: p.block, fill: 0 },
    );
  }
  records.push(
    { type: 'ram-eos', addr: 0, flags: RamFlag.EOS },
    { type: 'section-footer', sectionId: 2 },
    { type: 'device-section', sectionId: 3, idstr: 'timer', instanceId: 0, versionId: 2, body: Buffer.alloc(24, deviceByte), verified: false },
    { type: 'eof' },
  );
  return encodeRecords(records);
}

export const full = (seed: number): Page[] =>
  BLOCKS.flatMap((b) => Array.from({ length: b.usedLength / PAGE }, (_, index) => ({ block: b.idstr, index, ...(index % 3 === 2 ? {} : { data: pseudoRandom(PAGE, seed + index) }) })));


/** What ftvm's QEMU sends as an increment (patch 0013): the configuration carries the marker subsection. */
export function marked(bytes: Buffer): Buffer {
  const at = 8 + 1 + 4 + 'pc-i440fx-7.2'.length; // header, 0x07, be32 length, machine name
  const marker = Buffer.concat([Buffer.from([0x05, 32]), Buffer.from('configuration/x-ftvm-incremental', 'latin1'), Buffer.from([0, 0, 0, 1])]);
  return Buffer.concat([bytes.subarray(0, at), marker, bytes.subarray(at)]);
}
