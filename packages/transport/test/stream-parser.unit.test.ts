import { describe, expect, it } from 'vitest';
import {
  MigrationStreamError,
  MigrationStreamParser,
  configurationCapabilities,
  configurationIncremental,
  encodeRecords,
  encodeRecordStream,
  iterateMigrationStream,
  parseMigrationStream,
  RamFlag,
  type DeviceSectionRecord,
  type MigrationRecord,
  type MigrationStreamErrorCode,
} from '../src/stream/index.js';
import { digestRecords } from './stream-digest.js';
import { Bytes, PAGE, RAM_SECTION_ID, syntheticDevices, syntheticStream } from './fixtures-synthetic.js';

function parseChunked(bytes: Buffer, sizes: () => number): MigrationRecord[] {
  const out: MigrationRecord[] = [];
  const parser = new MigrationStreamParser();
  for (let p = 0; p < bytes.length; ) {
    const n = Math.max(1, sizes());
    parser.push(bytes.subarray(p, p + n), (r) => out.push(r));
    p += n;
  }
  parser.end((r) => out.push(r));
  return out;
}

function streamError(fn: () => unknown): MigrationStreamError {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(MigrationStreamError);
    return e as MigrationStreamError;
  }
  throw new Error('expected a MigrationStreamError, the parse succeeded');
}

function expectError(bytes: Buffer, code: MigrationStreamErrorCode, offset: number, message?: RegExp): MigrationStreamError {
  const e = streamError(() => parseMigrationStream(bytes));
  expect({ code: e.code, offset: e.offset }).toEqual({ code, offset });
  if (message) expect(e.message).toMatch(message);
  // The same error, at the same offset, when the bytes arrive one at a time.
  const e1 = streamError(() => parseChunked(bytes, () => 1));
  expect({ code: e1.code, offset: e1.offset }).toEqual({ code, offset });
  return e;
}

describe('parsing a well-formed stream', () => {
  const s = syntheticStream();
  const records = parseMigrationStream(s.bytes);

  it('emits the records of every part of the stream', () => {
    expect(records.map((r) => r.type)).toEqual([
      'header',
      'configuration',
      'command',
      'section-start', 'ram-mem-size', 'ram-eos', 'section-footer',
      'section-part', 'ram-page', 'ram-zero', 'ram-page', 'ram-zero', 'ram-xbzrle', 'ram-compressed', 'ram-eos', 'section-footer',
      'section-end', 'ram-page', 'ram-eos', 'section-footer',
      ...s.devices.map(() => 'device-section'),
      'eof',
      'vm-description',
    ]);
    expect(records[0]).toEqual({ type: 'header', version: 3 });
    expect(records[1]).toMatchObject({ type: 'configuration', machineType: 'pc-i440fx-7.2', subsections: [] });
    expect(records[2]).toMatchObject({ type: 'command', command: 1 });
    expect(records[3]).toEqual({ type: 'section-start', sectionId: RAM_SECTION_ID, idstr: 'ram', instanceId: 0, versionId: 4 });
    expect(records[4]).toEqual({
      type: 'ram-mem-size',
      addr: (1 << 20) + (128 << 10) + (256 << 10),
      flags: RamFlag.MEM_SIZE,
      blocks: [
        { idstr: 'pc.ram', usedLength: 1 << 20 },
        { idstr: '/rom@etc/acpi/tables', usedLength: 128 << 10 },
        { idstr: 'pc.bios', usedLength: 256 << 10 },
      ],
    });
  });

  it('decodes pages with their block, resolving RAM_SAVE_FLAG_CONTINUE', () => {
    const pages = records.filter((r) => r.type.startsWith('ram-') && 'block' in r);
    expect(pages.map((p) => [p.type, (p as { block: string }).block, (p as { addr: number }).addr])).toEqual([
      ['ram-page', 'pc.ram', 0],
      ['ram-zero', 'pc.ram', PAGE],
      ['ram-page', 'pc.ram', 2 * PAGE],
      ['ram-zero', '/rom@etc/acpi/tables', 0],
      ['ram-xbzrle', 'pc.ram', 3 * PAGE],
      ['ram-compressed', 'pc.ram', 4 * PAGE],
      ['ram-page', 'pc.bios', 0x3f000],
    ]);
    expect((pages[0] as { data: Buffer }).data.equals(s.pages.pcRam0)).toBe(true);
    expect((pages[2] as { data: Buffer }).data.equals(s.pages.pcRam2)).toBe(true);
    expect((pages[2] as { flags: number }).flags).toBe(RamFlag.PAGE | RamFlag.CONTINUE);
    expect(pages[1]).toMatchObject({ fill: 0 });
    expect(pages[4]).toMatchObject({ encoding: 1 });
    expect((pages[4] as { data: Buffer }).data.length).toBe(5);
    expect((pages[5] as { data: Buffer }).data.length).toBe(9);
  });

  it('splits device state exactly with the VM description, past look-alike footers and headers', () => {
    const sections = records.filter((r): r is DeviceSectionRecord => r.type === 'device-section');
    expect(sections.map((d) => [d.idstr, d.sectionId, d.instanceId, d.versionId, d.verified])).toEqual(
      s.devices.map((d) => [d.idstr, d.sectionId, d.instanceId, d.versionId, true]),
    );
    sections.forEach((d, i) => expect(d.body.equals(s.devices[i]!.body)).toBe(true));
    const desc = records.at(-1)!;
    expect(desc.type === 'vm-description' && desc.description.devices.length).toBe(s.devices.length);
  });

  it('writes the records back byte for byte', () => {
    expect(encodeRecords(records).equals(s.bytes)).toBe(true);
  });

  it('gives the same records for 100 random chunkings, including 1-byte chunks', () => {
    const whole = encodeRecords(records);
    const digest = digestRecords(records);
    let seed = 42;
    const rand = (): number => {
      seed = (seed * 1103515245 + 12345) & 0x7fffffff;
      return seed / 0x7fffffff;
    };
    for (let run = 0; run < 100; run++) {
      const max = [1, 2, 7, 64, 4096, 5000, 100_000][run % 7]!;
      const got = parseChunked(s.bytes, () => 1 + Math.floor(rand() * max));
      expect(digestRecords(got)).toBe(digest);
      expect(encodeRecords(got).equals(whole)).toBe(true);
    }
  });

  it('parses from an async chunk source and writes through the chunked encoder', async () => {
    async function* source(): AsyncGenerator<Buffer> {
      for (let p = 0; p < s.bytes.length; p += 1000) yield s.bytes.subarray(p, p + 1000);
    }
    const got: MigrationRecord[] = [];
    for await (const r of iterateMigrationStream(source())) got.push(r);
    expect(got).toEqual(records);
    const chunks: Buffer[] = [];
    for await (const c of encodeRecordStream(got, 2000)) chunks.push(c);
    expect(chunks.length).toBeGreaterThan(2);
    expect(Buffer.concat(chunks).equals(s.bytes)).toBe(true);
  });

  it('reports its offset and completion', () => {
    const parser = new MigrationStreamParser();
    parser.push(s.bytes.subarray(0, s.at.firstPage + 3), () => {});
    expect(parser.offset).toBe(s.at.firstPage);
    expect(parser.complete).toBe(false);
    parser.push(s.bytes.subarray(s.at.firstPage + 3), () => {});
    expect(parser.complete).toBe(true);
  });
});

describe('capabilities that change the RAM block list', () => {
  it('reads the page size of postcopy blocks and the region address of x-ignore-shared', () => {
    const s = syntheticStream({ postcopy: true, capabilities: ['x-ignore-shared'] });
    const records = parseMigrationStream(s.bytes);
    const config = records[1]!;
    expect(config.type === 'configuration' && configurationCapabilities(config)).toEqual(['x-ignore-shared']);
    const memSize = records.find((r) => r.type === 'ram-mem-size');
    expect(memSize).toMatchObject({
      blocks: [
        { idstr: 'pc.ram', usedLength: 1 << 20, pageSize: 0x200000, mrAddr: 0 },
        { idstr: '/rom@etc/acpi/tables', usedLength: 128 << 10, mrAddr: 0x100000000 },
        { idstr: 'pc.bios', usedLength: 256 << 10, mrAddr: 0x200000000 },
      ],
    });
    expect((memSize as { blocks: object[] }).blocks[1]).not.toHaveProperty('pageSize');
    expect(encodeRecords(records).equals(s.bytes)).toBe(true);
  });

  it('reads a postcopy page size without x-ignore-shared', () => {
    const s = syntheticStream({ postcopy: true });
    const memSize = parseMigrationStream(s.bytes).find((r) => r.type === 'ram-mem-size');
    expect(memSize).toMatchObject({ blocks: [{ idstr: 'pc.ram', pageSize: 0x200000 }, { idstr: '/rom@etc/acpi/tables' }, { idstr: 'pc.bios' }] });
  });
});

describe('streams without a VM description', () => {
  const plainDevices = syntheticDevices().filter((d) => d.idstr !== 'trap');

  it('falls back to a footer scan and marks the sections unverified', () => {
    const s = syntheticStream({ noDescription: true, devices: plainDevices });
    const records = parseMigrationStream(s.bytes);
    const sections = records.filter((r): r is DeviceSectionRecord => r.type === 'device-section');
    expect(sections.map((d) => [d.idstr, d.verified])).toEqual(s.devices.map((d) => [d.idstr, false]));
    sections.forEach((d, i) => expect(d.body.equals(s.devices[i]!.body)).toBe(true));
    expect(records.at(-1)).toEqual({ type: 'eof' });
    expect(encodeRecords(records).equals(s.bytes)).toBe(true);
  });

  it('refuses to guess when look-alike footers allow two splits', () => {
    // The "trap" body holds its own footer and a plausible "dma" header: without the description
    // both the true split and a shifted one are consistent, so the scan must not pick one.
    const s = syntheticStream({ noDescription: true });
    expectError(s.bytes, 'UNDELIMITED_DEVICE_STATE', s.at.devices, /more than one/);
  });

  it('accepts a stream with no device sections at all', () => {
    const s = syntheticStream({ devices: [] });
    const records = parseMigrationStream(s.bytes);
    expect(records.slice(-2).map((r) => r.type)).toEqual(['eof', 'vm-description']);
    expect(encodeRecords(records).equals(s.bytes)).toBe(true);
  });
});

describe('errors name what is not understood and where', () => {
  const s = syntheticStream();

  it('rejects a bad magic at the first wrong byte, without waiting for more', () => {
    expectError(Buffer.from('QEVX\0\0\0\x03'), 'BAD_MAGIC', 3, /QEVM/);
    const parser = new MigrationStreamParser();
    expect(() => parser.push(Buffer.from('X'), () => {})).toThrow(MigrationStreamError);
    expect(() => parser.push(Buffer.from('Q'), () => {})).toThrow(/QEVM/); // stays failed
  });

  it('rejects an unsupported version', () => {
    const b = Buffer.from(s.bytes);
    b.writeUInt32BE(2, 4);
    expectError(b, 'BAD_VERSION', 4, /version 2/);
  });

  it('rejects an unknown section type byte', () => {
    const b = Buffer.from(s.bytes);
    b[s.at.ramStart] = 0x09;
    expectError(b, 'UNKNOWN_SECTION_TYPE', s.at.ramStart, /0x09/);
  });

  it('rejects a RAM section whose footer names another section', () => {
    const b = Buffer.from(s.bytes);
    const footer = s.at.ramEnd - 5;
    expect(b[footer]).toBe(0x7e);
    b.writeUInt32BE(7, footer + 1);
    expectError(b, 'FOOTER_MISMATCH', footer, /names section 7/);
  });

  it('rejects a PART for a section that was never started', () => {
    const b = Buffer.from(s.bytes);
    b.writeUInt32BE(99, s.at.firstPage + 1);
    expectError(b, 'UNKNOWN_SECTION_ID', s.at.firstPage, /99/);
  });

  it('rejects RAM records with several kinds of flags, unknown blocks, or CONTINUE without a block', () => {
    const pageHeader = s.at.firstPage + 5;
    let b = Buffer.from(s.bytes);
    b[pageHeader + 7] = 0x08 | 0x02;
    expectError(b, 'BAD_RAM_RECORD', pageHeader, /flags 0xa/);
    b = Buffer.from(s.bytes);
    b[pageHeader + 7] = 0x08 | 0x20;
    expectError(b, 'BAD_RAM_RECORD', pageHeader + 8, /CONTINUE but no previous block/);
    b = Buffer.from(s.bytes);
    b[pageHeader + 9] = 'P'.charCodeAt(0);
    expectError(b, 'BAD_RAM_RECORD', pageHeader + 8, /unknown block 'Pc.ram'/);
    b = Buffer.from(s.bytes);
    b[pageHeader + 7] = 0x80;
    expectError(b, 'UNSUPPORTED', pageHeader, /RDMA/);
  });

  it('rejects an iterative section other than "ram"', () => {
    const b = new Bytes().raw('QEVM').u32(3).u8(0x01).u32(5).str8('dirty-bitmap').u32(0).u32(1).u64(0).build();
    expectError(b, 'UNSUPPORTED', 8, /'dirty-bitmap'/);
  });

  it('reports truncation with the offset of the cut record', () => {
    expectError(Buffer.alloc(0), 'TRUNCATED', 0, /empty stream/);
    expectError(s.bytes.subarray(0, 5), 'TRUNCATED', 0, /needs at least 8/);
    expectError(s.bytes.subarray(0, s.at.firstPage + 5 + 100), 'TRUNCATED', s.at.firstPage + 5, /needs at least/);
    expectError(s.bytes.subarray(0, s.at.ramEnd), 'TRUNCATED', s.at.ramEnd, /before QEMU_VM_EOF/);
    expectError(s.bytes.subarray(0, s.at.devices + 40), 'TRUNCATED', s.at.devices + 40, /device state/);
    expectError(s.bytes.subarray(0, s.at.description + 20), 'TRUNCATED', s.at.description + 20, /inside the VM description/);
  });

  it('accepts a stream cut right after QEMU_VM_EOF as one without a description', () => {
    const plain = syntheticStream({ devices: syntheticDevices().filter((d) => d.idstr !== 'trap') });
    const records = parseMigrationStream(plain.bytes.subarray(0, plain.at.eof + 1));
    expect(records.filter((r) => r.type === 'device-section')).toHaveLength(plain.devices.length);
    expect(records.filter((r) => r.type === 'device-section').every((r) => r.type === 'device-section' && !r.verified)).toBe(true);
  });

  it('rejects bytes after the end', () => {
    expectError(Buffer.concat([s.bytes, Buffer.from([0])]), 'TRAILING_DATA', s.bytes.length);
    const noDevices = syntheticStream({ devices: [] }).bytes;
    expectError(Buffer.concat([noDevices, Buffer.from([1, 2])]), 'TRAILING_DATA', noDevices.length);
  });

  it('rejects a description that disagrees with the stream', () => {
    // One byte more for the timer's last field: the footer is not where the description says.
    const bigger = syntheticStream({ descriptionText: (j) => j.replace('"cpu_clock_offset","type":"int64","size":8', '"cpu_clock_offset","type":"int64","size":9') });
    expectError(bigger.bytes, 'FOOTER_MISMATCH', bigger.at.devices + 14 + 5 + 25, /'timer'.*no footer/);
    const renamed = syntheticStream({ descriptionText: (j) => j.replace('"name":"cpu"', '"name":"cpv"') });
    const cpuAt = renamed.at.devices + 14 + 5 + 24 + 5;
    expectError(renamed.bytes, 'DESCRIPTION_MISMATCH', cpuAt, /'cpv'.*has section 'cpu'/);
    const missing = syntheticStream({ descriptionText: (j) => j.replace(/,\{"name":"globalstate".*\]\}$/, ']}') });
    expectError(missing.bytes, 'DESCRIPTION_MISMATCH', missing.at.eof - (14 + 11 + 104 + 5), /after the last described section/);
    const notJson = syntheticStream({ descriptionText: (j) => `${j.slice(0, -2)}?}` });
    expectError(notJson.bytes, 'BAD_DESCRIPTION', notJson.at.description + 5, /not JSON/);
    const badShape = syntheticStream({ descriptionText: (j) => j.replace('"size":24', '"size":"24"').replace('"type":"int64","size":8', '"type":"int64","size":"x"') });
    expectError(badShape.bytes, 'BAD_DESCRIPTION', badShape.at.description + 5, /numeric "size"/);
    const extra = syntheticStream({ devices: [], descriptionText: () => JSON.stringify({ devices: [syntheticDevices()[0]!.desc] }) });
    expectError(extra.bytes, 'DESCRIPTION_MISMATCH', extra.at.description, /has none/);
  });

  it('bounds the device state it buffers', () => {
    const e = streamError(() => {
      const parser = new MigrationStreamParser({ maxDeviceStateBytes: 100 });
      parser.push(s.bytes, () => {});
    });
    expect({ code: e.code, offset: e.offset }).toEqual({ code: 'LIMIT_EXCEEDED', offset: s.at.devices + 100 });
  });

  it('rejects unknown configuration subsections and commands out of range', () => {
    const sub = new Bytes().raw('QEVM').u32(3).u8(0x07).u32(2).raw('pc').u8(0x05).str8('configuration/new-thing').u32(1).u32(0).build();
    expectError(sub, 'UNSUPPORTED', 8 + 7, /configuration\/new-thing/);
    const cmd = new Bytes().raw('QEVM').u32(3).u8(0x08).u16(42).u16(0).build();
    expectError(cmd, 'BAD_COMMAND', 8, /42/);
  });

  it('refuses to go on after an error or after end()', () => {
    const parser = new MigrationStreamParser();
    parser.push(s.bytes, () => {});
    parser.end(() => {});
    expect(() => parser.push(Buffer.from([0]), () => {})).toThrow(/after end/);
  });
});

describe('commands', () => {
  it('parses MIG_CMD_PACKAGED with its blob and writes it back', () => {
    const inner = syntheticStream({ devices: [] }).bytes.subarray(8);
    const b = new Bytes().raw('QEVM').u32(3).u8(0x08).u16(7).u16(4).u32(inner.length).raw(inner).u8(0x00).build();
    const records = parseMigrationStream(b);
    expect(records[1]).toMatchObject({ type: 'command', command: 7 });
    expect((records[1] as { packaged: Buffer }).packaged.equals(inner)).toBe(true);
    expect(encodeRecords(records).equals(b)).toBe(true);
  });
});

describe("ftvm's x-ftvm-incremental marker (QEMU patch 0013)", () => {
  // 0x05, name length, "configuration/x-ftvm-incremental", be32 version 1, no fields.
  const MARKER = Buffer.concat([Buffer.from([0x05, 32]), Buffer.from('configuration/x-ftvm-incremental', 'latin1'), Buffer.from([0, 0, 0, 1])]);
  const s = syntheticStream();
  const markerAt = s.at.configuration + 1 + 4 + 'pc-i440fx-7.2'.length;
  const marked = Buffer.concat([s.bytes.subarray(0, markerAt), MARKER, s.bytes.subarray(markerAt)]);

  it('parses the marker, exposes the stream as incremental and writes it back byte for byte', () => {
    const parser = new MigrationStreamParser();
    const records: MigrationRecord[] = [];
    parser.push(marked, (r) => records.push(r));
    parser.end((r) => records.push(r));
    expect(parser.incremental).toBe(true);
    const configuration = records.find((r) => r.type === 'configuration')!;
    expect(configuration.type === 'configuration' && configurationIncremental(configuration)).toBe(true);
    expect(encodeRecords(records).equals(marked)).toBe(true);

    const plain = new MigrationStreamParser();
    plain.push(s.bytes, () => undefined);
    expect(plain.incremental).toBe(false);
  });

  it('refuses an increment where a full image is required, at the marker, also byte by byte', () => {
    const whole = streamError(() => parseMigrationStream(marked, { requireFull: true }));
    expect({ code: whole.code, offset: whole.offset }).toEqual({ code: 'INCREMENTAL_STREAM', offset: markerAt });
    expect(whole.message).toMatch(/x-ftvm-incremental increment .* where a full image is required/);
    const parser = new MigrationStreamParser({ requireFull: true });
    const bytewise = streamError(() => {
      for (let p = 0; p < marked.length; p++) parser.push(marked.subarray(p, p + 1), () => undefined);
    });
    expect({ code: bytewise.code, offset: bytewise.offset }).toEqual({ code: 'INCREMENTAL_STREAM', offset: markerAt });
    // a full stream passes the same requirement
    expect(() => parseMigrationStream(s.bytes, { requireFull: true })).not.toThrow();
  });
});
