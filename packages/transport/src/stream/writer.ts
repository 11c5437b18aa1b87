// Serialising records back to wire bytes: the inverse of the parser, byte for byte. Stateless:
// every record carries what it needs (e.g. a page's block id is written unless its flags have
// RAM_SAVE_FLAG_CONTINUE, mirroring save_page_header in ram.c).

import { QEMU_VM_FILE_MAGIC, RamFlag, SectionType, MigCommand } from './constants.js';
import type { DeviceSectionRecord, MigrationRecord, RamRecord } from './records.js';

const TWO_POW_32 = 0x1_0000_0000;

/** An append-only byte builder that writes into one exactly-sized buffer. */
class Out {
  readonly buf: Buffer;
  pos = 0;
  constructor(size: number) {
    this.buf = Buffer.allocUnsafe(size);
  }
  u8(v: number): void {
    this.buf[this.pos++] = v;
  }
  u16(v: number): void {
    this.pos = this.buf.writeUInt16BE(v, this.pos);
  }
  u32(v: number): void {
    this.pos = this.buf.writeUInt32BE(v, this.pos);
  }
  u64(v: number): void {
    this.u32(Math.floor(v / TWO_POW_32));
    this.u32(v % TWO_POW_32);
  }
  bytes(b: Uint8Array): void {
    this.buf.set(b, this.pos);
    this.pos += b.length;
  }
  latin1(s: string): void {
    this.pos += this.buf.write(s, this.pos, 'latin1');
  }
  /** u8 length + latin1 string (vmstate idstr / block id encoding). */
  str8(s: string): void {
    this.u8(s.length);
    this.latin1(s);
  }
}

function assertByte(n: number, what: string): void {
  if (n > 0xff) throw new RangeError(`${what} '${n}' is longer than 255 bytes`);
}

function blockIdSize(r: RamRecord & { block: string }): number {
  return r.flags & RamFlag.CONTINUE ? 0 : 1 + r.block.length;
}

function ramSize(r: RamRecord): number {
  switch (r.type) {
    case 'ram-mem-size':
      return 8 + r.blocks.reduce((n, b) => n + 1 + b.idstr.length + 8 + (b.pageSize !== undefined ? 8 : 0) + (b.mrAddr !== undefined ? 8 : 0), 0);
    case 'ram-zero':
      return 8 + blockIdSize(r) + 1;
    case 'ram-page':
      return 8 + blockIdSize(r) + r.data.length;
    case 'ram-compressed':
      return 8 + blockIdSize(r) + 4 + r.data.length;
    case 'ram-xbzrle':
      return 8 + blockIdSize(r) + 3 + r.data.length;
    case 'ram-eos':
      return 8;
  }
}

function deviceSectionSize(r: DeviceSectionRecord): number {
  return 1 + 4 + 1 + r.idstr.length + 8 + r.body.length + 5;
}

/** Bytes `record` takes on the wire. */
export function encodedSize(record: MigrationRecord): number {
  switch (record.type) {
    case 'header':
      return 8;
    case 'configuration':
      return 5 + record.machineType.length + record.subsections.reduce((n, s) => n + 2 + s.name.length + 4 + s.data.length, 0);
    case 'command':
      return 5 + record.data.length + (record.packaged?.length ?? 0);
    case 'section-start':
      return 1 + 4 + 1 + record.idstr.length + 8;
    case 'section-part':
    case 'section-end':
    case 'section-footer':
      return 5;
    case 'device-section':
      return deviceSectionSize(record);
    case 'eof':
      return 1;
    case 'vm-description':
      return 5 + record.data.length;
    default:
      return ramSize(record);
  }
}

function writeRam(o: Out, r: RamRecord): void {
  o.u64(r.addr + r.flags);
  switch (r.type) {
    case 'ram-mem-size':
      for (const b of r.blocks) {
        assertByte(b.idstr.length, 'RAM block id');
        o.str8(b.idstr);
        o.u64(b.usedLength);
        if (b.pageSize !== undefined) o.u64(b.pageSize);
        if (b.mrAddr !== undefined) o.u64(b.mrAddr);
      }
      return;
    case 'ram-eos':
      return;
  }
  if (!(r.flags & RamFlag.CONTINUE)) {
    assertByte(r.block.length, 'RAM block id');
    o.str8(r.block);
  }
  switch (r.type) {
    case 'ram-zero':
      o.u8(r.fill);
      return;
    case 'ram-page':
      o.bytes(r.data);
      return;
    case 'ram-compressed':
      o.u32(r.data.length);
      o.bytes(r.data);
      return;
    case 'ram-xbzrle':
      o.u8(r.encoding);
      o.u16(r.data.length);
      o.bytes(r.data);
      return;
  }
}

function writeRecord(o: Out, record: MigrationRecord): void {
  switch (record.type) {
    case 'header':
      o.u32(QEMU_VM_FILE_MAGIC);
      o.u32(record.version);
      return;
    case 'configuration':
      o.u8(SectionType.CONFIGURATION);
      o.u32(record.machineType.length);
      o.latin1(record.machineType);
      for (const s of record.subsections) {
        assertByte(s.name.length, 'configuration subsection name');
        o.u8(SectionType.SUBSECTION);
        o.str8(s.name);
        o.u32(s.versionId);
        o.bytes(s.data);
      }
      return;
    case 'command':
      o.u8(SectionType.COMMAND);
      o.u16(record.command);
      o.u16(record.data.length);
      o.bytes(record.data);
      if (record.command === MigCommand.PACKAGED && record.packaged) o.bytes(record.packaged);
      return;
    case 'section-start':
      assertByte(record.idstr.length, 'section idstr');
      o.u8(SectionType.START);
      o.u32(record.sectionId);
      o.str8(record.idstr);
      o.u32(record.instanceId);
      o.u32(record.versionId);
      return;
    case 'section-part':
    case 'section-end':
      o.u8(record.type === 'section-part' ? SectionType.PART : SectionType.END);
      o.u32(record.sectionId);
      return;
    case 'section-footer':
      o.u8(SectionType.FOOTER);
      o.u32(record.sectionId);
      return;
    case 'device-section':
      assertByte(record.idstr.length, 'section idstr');
      o.u8(SectionType.FULL);
      o.u32(record.sectionId);
      o.str8(record.idstr);
      o.u32(record.instanceId);
      o.u32(record.versionId);
      o.bytes(record.body);
      o.u8(SectionType.FOOTER);
      o.u32(record.sectionId);
      return;
    case 'eof':
      o.u8(SectionType.EOF);
      return;
    case 'vm-description':
      o.u8(SectionType.VMDESCRIPTION);
      o.u32(record.data.length);
      o.bytes(record.data);
      return;
    default:
      writeRam(o, record);
  }
}

/** The wire bytes of one record. */
export function encodeRecord(record: MigrationRecord): Buffer {
  const o = new Out(encodedSize(record));
  writeRecord(o, record);
  return o.buf;
}

/** The wire bytes of a sequence of records, in one buffer. */
export function encodeRecords(records: Iterable<MigrationRecord>): Buffer {
  const list = Array.isArray(records) ? (records as MigrationRecord[]) : [...records];
  const o = new Out(list.reduce((n, r) => n + encodedSize(r), 0));
  for (const r of list) writeRecord(o, r);
  return o.buf;
}

/**
 * Streams records as wire chunks of about `chunkSize` bytes (records are never split across
 * chunks unless one is larger), for piping to a socket or `migrate-incoming` without building the
 * whole stream in memory.
 */
export async function* encodeRecordStream(
  records: Iterable<MigrationRecord> | AsyncIterable<MigrationRecord>,
  chunkSize = 256 * 1024,
): AsyncGenerator<Buffer> {
  let batch: MigrationRecord[] = [];
  let size = 0;
  for await (const r of records) {
    batch.push(r);
    size += encodedSize(r);
    if (size >= chunkSize) {
      yield encodeRecords(batch);
      batch = [];
      size = 0;
    }
  }
  if (batch.length > 0) yield encodeRecords(batch);
}
