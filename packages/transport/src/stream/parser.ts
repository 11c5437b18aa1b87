// An incremental parser for QEMU's migration stream, fed Buffers of any size (down to one byte),
// emitting typed records as soon as each is complete — in the manner of pg-protocol's Parser.
//
// Walk (qemu_loadvm_state / qemu_loadvm_state_main in savevm.c): header, configuration, then
// top-level records by type byte. RAM bodies are decoded record by record (ram.ts) because they
// have no length. At the first QEMU_VM_SECTION_FULL the device-state part begins; it is buffered
// and split exactly with the VM description that ends the stream (device-region.ts explains why).
//
// Each step reads one whole record or throws NeedMoreData and is retried from the record's start
// when more bytes arrive, so parser state only changes on complete records. Partial bytes are
// kept as a chunk list and joined only once enough for the pending record arrived, so tiny chunks
// cost O(total) copying, not O(total × record size).

import { DeviceStateRegion } from './device-region.js';
import { configurationCapabilities, configurationIncremental, configurationPageSize, readConfiguration } from './configuration.js';
import {
  DEFAULT_TARGET_PAGE_SIZE,
  MAX_PACKAGED_SIZE,
  MigCommand,
  QEMU_VM_FILE_MAGIC,
  QEMU_VM_FILE_VERSION,
  SectionType,
} from './constants.js';
import { parseVmDescription } from './description.js';
import { MigrationStreamError, NeedMoreData, formatOffset } from './errors.js';
import { readRamRecord, type RamContext } from './ram.js';
import { ByteReader } from './reader.js';
import type { MigrationRecord, RamBlockInfo, SectionStartRecord } from './records.js';

export interface MigrationStreamParserOptions {
  /** TARGET_PAGE_SIZE when the stream does not say (configuration/target-page-bits). Default 4096. */
  pageSize?: number;
  /** Largest device-state part buffered while waiting for the VM description. Default 64 MiB. */
  maxDeviceStateBytes?: number;
  /** Largest VM description accepted. Default 16 MiB. */
  maxDescriptionBytes?: number;
  /**
   * Refuse an increment (a stream whose configuration carries the x-ftvm-incremental marker) with
   * INCREMENTAL_STREAM: for a stream that must load on its own. Default false.
   */
  requireFull?: boolean;
}

export type RecordCallback = (record: MigrationRecord) => void;

type State = 'header' | 'configuration' | 'top' | 'ram' | 'footer' | 'device-state' | 'after-eof' | 'done';

const MAGIC_BYTES = Buffer.from('QEVM', 'latin1');
/** MIG_CMD_MAX in 7.2. */
const MIG_CMD_MAX = MigCommand.RECV_BITMAP + 1;

export class MigrationStreamParser {
  private state: State = 'header';
  /** Unparsed bytes, starting at absolute offset `base`. */
  private chunks: Buffer[] = [];
  private buffered = 0;
  private base = 0;
  /** Buffered bytes needed before the pending record can be retried (> buffered while any are). */
  private need = 1;
  private failure: MigrationStreamError | undefined;
  private ended = false;
  private region: DeviceStateRegion | undefined;
  /** Iterative sections opened by QEMU_VM_SECTION_START (only "ram" is understood). */
  private readonly iterative = new Map<number, SectionStartRecord>();
  private openSectionId = 0;
  private readonly ram: RamContext;
  private readonly maxDeviceStateBytes: number;
  private readonly maxDescriptionBytes: number;
  private readonly requireFull: boolean;
  private isIncremental = false;

  constructor(options: MigrationStreamParserOptions = {}) {
    this.ram = {
      pageSize: options.pageSize ?? DEFAULT_TARGET_PAGE_SIZE,
      lastBlock: undefined,
      blocks: undefined,
      postcopyAdvised: false,
      ignoreShared: false,
    };
    this.maxDeviceStateBytes = options.maxDeviceStateBytes ?? 64 * 1024 * 1024;
    this.maxDescriptionBytes = options.maxDescriptionBytes ?? 16 * 1024 * 1024;
    this.requireFull = options.requireFull ?? false;
  }

  /** True once the configuration was parsed and marks the stream as an x-ftvm-incremental increment. */
  get incremental(): boolean {
    return this.isIncremental;
  }

  /** Absolute offset of the first byte not yet turned into a record. */
  get offset(): number {
    return this.region ? this.region.startOffset : this.base;
  }

  /** True once the stream's last record (EOF or VM description) has been parsed. */
  get complete(): boolean {
    return this.state === 'done' || this.state === 'after-eof';
  }

  /**
   * Feeds bytes; calls `onRecord` for every record they complete. Throws MigrationStreamError.
   * Record buffers (pages, bodies) may be views into `chunk`: do not reuse its memory afterwards.
   */
  push(chunk: Uint8Array, onRecord: RecordCallback): void {
    if (this.failure) throw this.failure;
    if (this.ended) throw new Error('MigrationStreamParser: push() after end()');
    if (chunk.length === 0) return;
    let buf = Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.length);
    while (buf.length > 0) {
      if (this.state === 'device-state') return this.feedRegion(buf, onRecord);
      if (this.buffered === 0) return this.run(buf, onRecord); // zero-copy: records view `buf`
      // A record is pending across chunks: join only the bytes it still needs, then go on with
      // the rest of this chunk without copying it.
      const missing = this.need - this.buffered;
      if (buf.length < missing) {
        this.chunks.push(buf);
        this.buffered += buf.length;
        return;
      }
      const head = Buffer.concat([...this.chunks, buf.subarray(0, missing)], this.need);
      this.chunks = [];
      this.buffered = 0;
      buf = buf.subarray(missing);
      this.run(head, onRecord);
    }
  }

  /** Declares the end of input; emits what the end completes, throws if the stream is cut short. */
  end(onRecord: RecordCallback): void {
    if (this.failure) throw this.failure;
    if (this.ended) return;
    this.ended = true;
    if (this.state === 'device-state' && this.region) {
      const region = this.region;
      const result = this.guard(() => region.finish());
      this.region = undefined;
      this.state = 'done';
      this.base = region.startOffset + region.bufferedBytes;
      for (const r of result.records) onRecord(r);
      return;
    }
    if ((this.state === 'done' || this.state === 'after-eof') && this.buffered === 0) return;
    const streamEnd = this.base + this.buffered;
    if (this.buffered > 0) {
      this.fail(
        'TRUNCATED',
        this.base,
        `the record starting here is cut short: the stream ends ${this.buffered} bytes into it, at ${formatOffset(streamEnd)} (it needs at least ${this.need} bytes)`,
      );
    }
    this.fail('TRUNCATED', streamEnd, this.base === 0 ? 'empty stream' : `stream ends before QEMU_VM_EOF (in state '${this.state}')`);
  }

  private fail(code: MigrationStreamError['code'], offset: number, detail: string): never {
    this.failure = new MigrationStreamError(code, offset, detail);
    throw this.failure;
  }

  /** Runs `fn`, remembering a MigrationStreamError so the parser stays failed. */
  private guard<T>(fn: () => T): T {
    try {
      return fn();
    } catch (e) {
      if (e instanceof MigrationStreamError) this.failure = e;
      throw e;
    }
  }

  private feedRegion(buf: Buffer, onRecord: RecordCallback): void {
    const region = this.region!;
    const result = this.guard(() => region.append(buf));
    if (!result) return;
    this.region = undefined;
    this.state = 'done';
    this.base = result.trailingOffset;
    for (const r of result.records) onRecord(r);
    if (result.trailing.length > 0) this.fail('TRAILING_DATA', result.trailingOffset, `${result.trailing.length} bytes after the VM description`);
  }

  private run(buf: Buffer, onRecord: RecordCallback): void {
    let pos = 0;
    let handedOff = false;
    try {
      while (pos < buf.length) {
        if (this.state === 'device-state') {
          // Everything from the first FULL section on goes to the region buffer.
          handedOff = true;
          this.base += pos;
          this.feedRegion(buf.subarray(pos), onRecord);
          return;
        }
        const r = new ByteReader(buf, pos, this.base);
        const stateBefore = this.state;
        let records: MigrationRecord[];
        try {
          records = this.guard(() => this.step(r));
        } catch (e) {
          if (!(e instanceof NeedMoreData)) throw e;
          this.need = e.needed - (this.base + pos);
          break;
        }
        if (r.pos === pos && records.length === 0 && this.state === stateBefore) {
          throw new Error(`MigrationStreamParser: no progress in state '${this.state}' at ${formatOffset(this.base + pos)}`);
        }
        pos = r.pos;
        for (const rec of records) onRecord(rec);
      }
      if (pos === buf.length) this.need = 1;
    } finally {
      if (!handedOff) {
        if (pos < buf.length) {
          this.chunks = [buf.subarray(pos)];
          this.buffered = buf.length - pos;
        }
        this.base += pos;
      }
    }
  }

  /** Reads one record (or makes one state transition). Only mutates state after all reads. */
  private step(r: ByteReader): MigrationRecord[] {
    switch (this.state) {
      case 'header':
        return [this.readHeader(r)];
      case 'configuration': {
        if (r.peekU8() !== SectionType.CONFIGURATION) {
          this.state = 'top';
          return [];
        }
        const rec = readConfiguration(r, { requireFull: this.requireFull });
        if (configurationIncremental(rec)) this.isIncremental = true;
        const pageSize = configurationPageSize(rec);
        if (pageSize !== undefined) this.ram.pageSize = pageSize;
        if (configurationCapabilities(rec).includes('x-ignore-shared')) this.ram.ignoreShared = true;
        this.state = 'top';
        return [rec];
      }
      case 'top':
        return this.readTopLevel(r);
      case 'ram': {
        const rec = readRamRecord(r, this.ram);
        switch (rec.type) {
          case 'ram-mem-size':
            this.ram.blocks = new Map<string, RamBlockInfo>(rec.blocks.map((b) => [b.idstr, b]));
            break;
          case 'ram-eos':
            this.state = 'footer';
            break;
          default:
            this.ram.lastBlock = rec.block;
        }
        return [rec];
      }
      case 'footer': {
        const at = r.offset;
        const type = r.u8();
        if (type !== SectionType.FOOTER) {
          r.fail('FOOTER_MISMATCH', `expected the footer (0x7e) of section ${this.openSectionId} after RAM_SAVE_FLAG_EOS, found byte 0x${type.toString(16)}`, at);
        }
        const id = r.u32();
        if (id !== this.openSectionId) r.fail('FOOTER_MISMATCH', `footer names section ${id}, but section ${this.openSectionId} is open`, at);
        this.state = 'top';
        return [{ type: 'section-footer', sectionId: id }];
      }
      case 'after-eof':
        return [this.readDescriptionAfterEof(r)];
      case 'done':
        return r.fail('TRAILING_DATA', 'bytes after the end of the stream (QEMU_VM_EOF / VM description)');
      case 'device-state':
        throw new Error('unreachable: device state is fed to the region');
    }
  }

  private readHeader(r: ByteReader): MigrationRecord {
    // Check the magic byte by byte so that garbage is reported at once, not after 4 bytes arrive.
    for (let i = 0; i < 4; i++) {
      if (r.peekU8(i) !== MAGIC_BYTES[i]) r.fail('BAD_MAGIC', `not a QEMU migration stream (magic is not 'QEVM')`, r.offset + i);
    }
    const magic = r.u32();
    if (magic !== QEMU_VM_FILE_MAGIC) r.fail('BAD_MAGIC', 'bad magic', 0);
    const at = r.offset;
    const version = r.u32();
    if (version !== QEMU_VM_FILE_VERSION) r.fail('BAD_VERSION', `stream version ${version}, only ${QEMU_VM_FILE_VERSION} is supported`, at);
    this.state = 'configuration';
    return { type: 'header', version };
  }

  private readTopLevel(r: ByteReader): MigrationRecord[] {
    const at = r.offset;
    const type = r.peekU8();
    switch (type) {
      case SectionType.START: {
        r.u8();
        const sectionId = r.u32();
        const idstr = r.latin1(r.u8());
        const instanceId = r.u32();
        const versionId = r.u32();
        if (idstr !== 'ram') {
          r.fail('UNSUPPORTED', `iterative section '${idstr}' (id ${sectionId}) is not understood: its body has no length and only "ram" can be walked`, at);
        }
        const rec: SectionStartRecord = { type: 'section-start', sectionId, idstr, instanceId, versionId };
        this.iterative.set(sectionId, rec);
        this.openSectionId = sectionId;
        this.state = 'ram';
        return [rec];
      }
      case SectionType.PART:
      case SectionType.END: {
        r.u8();
        const sectionId = r.u32();
        if (!this.iterative.has(sectionId)) {
          r.fail('UNKNOWN_SECTION_ID', `${type === SectionType.PART ? 'PART' : 'END'} section for section id ${sectionId}, which no START section opened`, at);
        }
        this.openSectionId = sectionId;
        this.state = 'ram';
        return [{ type: type === SectionType.PART ? 'section-part' : 'section-end', sectionId }];
      }
      case SectionType.FULL:
        // Device state: from here to the VM description it is buffered and split exactly.
        this.region = new DeviceStateRegion(at, {
          maxDeviceStateBytes: this.maxDeviceStateBytes,
          maxDescriptionBytes: this.maxDescriptionBytes,
        });
        this.state = 'device-state';
        return [];
      case SectionType.EOF:
        r.u8();
        this.state = 'after-eof';
        return [{ type: 'eof' }];
      case SectionType.COMMAND:
        return [this.readCommand(r)];
      case SectionType.CONFIGURATION:
        return r.fail('UNKNOWN_SECTION_TYPE', 'a configuration section (0x07) is only valid right after the file header', at);
      case SectionType.VMDESCRIPTION:
        return r.fail('UNKNOWN_SECTION_TYPE', 'a VM description (0x06) before QEMU_VM_EOF', at);
      case SectionType.FOOTER:
        return r.fail('FOOTER_MISMATCH', 'a section footer (0x7e) where no section is open', at);
      default:
        return r.fail('UNKNOWN_SECTION_TYPE', `unknown section type byte 0x${type.toString(16).padStart(2, '0')}`, at);
    }
  }

  private readCommand(r: ByteReader): MigrationRecord {
    const at = r.offset;
    r.u8();
    const command = r.u16();
    const len = r.u16();
    if (command === MigCommand.INVALID || command >= MIG_CMD_MAX) r.fail('BAD_COMMAND', `QEMU_VM_COMMAND ${command} is out of range`, at);
    const data = r.bytes(len);
    if (command === MigCommand.PACKAGED) {
      // loadvm_handle_cmd_packaged: be32 length, then that many bytes of a nested stream.
      if (len !== 4) r.fail('BAD_COMMAND', `MIG_CMD_PACKAGED with a ${len}-byte argument`, at);
      const size = data.readUInt32BE(0);
      if (size > MAX_PACKAGED_SIZE) r.fail('BAD_COMMAND', `MIG_CMD_PACKAGED of ${size} bytes`, at);
      return { type: 'command', command, data, packaged: r.bytes(size) };
    }
    if (command === MigCommand.POSTCOPY_ADVISE) this.ram.postcopyAdvised = true;
    return { type: 'command', command, data };
  }

  private readDescriptionAfterEof(r: ByteReader): MigrationRecord {
    const at = r.offset;
    const type = r.u8();
    if (type !== SectionType.VMDESCRIPTION) r.fail('TRAILING_DATA', `byte 0x${type.toString(16)} after QEMU_VM_EOF (only a VM description may follow)`, at);
    const len = r.u32();
    if (len > this.maxDescriptionBytes) r.fail('LIMIT_EXCEEDED', `VM description of ${len} bytes`, at);
    const data = r.bytes(len);
    const description = parseVmDescription(data);
    if (!description) r.fail('BAD_DESCRIPTION', 'the VM description is not JSON with a "devices" array', at + 5);
    if (description.devices.length > 0) {
      r.fail('DESCRIPTION_MISMATCH', `the VM description lists ${description.devices.length} device sections but the stream has none`, at);
    }
    this.state = 'done';
    return { type: 'vm-description', data, description };
  }
}

/** Parses a whole stream held in memory. */
export function parseMigrationStream(stream: Uint8Array, options?: MigrationStreamParserOptions): MigrationRecord[] {
  const records: MigrationRecord[] = [];
  const parser = new MigrationStreamParser(options);
  const add = (r: MigrationRecord): void => {
    records.push(r);
  };
  parser.push(stream, add);
  parser.end(add);
  return records;
}

/** Parses a stream arriving as chunks (a Readable, a socket, a file stream...), yielding records. */
export async function* iterateMigrationStream(
  source: AsyncIterable<Uint8Array> | Iterable<Uint8Array>,
  options?: MigrationStreamParserOptions,
): AsyncGenerator<MigrationRecord> {
  const parser = new MigrationStreamParser(options);
  let batch: MigrationRecord[] = [];
  const add = (r: MigrationRecord): void => {
    batch.push(r);
  };
  for await (const chunk of source) {
    parser.push(chunk, add);
    if (batch.length > 0) {
      const out = batch;
      batch = [];
      yield* out;
    }
  }
  parser.end(add);
  yield* batch;
}
