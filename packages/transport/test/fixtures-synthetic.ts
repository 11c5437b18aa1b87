// Hand-built migration streams for unit tests, written byte by byte from the QEMU 7.2 wire format
// (savevm.c / ram.c) without the package's writer, so parser and writer are both checked against
// an independent encoding. Shaped like a real `migrate` stream: configuration, "ram" START with
// the block list, PART and END with pages, device sections, EOF and the JSON description.

export class Bytes {
  private parts: Buffer[] = [];
  u8(v: number): this {
    this.parts.push(Buffer.from([v]));
    return this;
  }
  u16(v: number): this {
    const b = Buffer.alloc(2);
    b.writeUInt16BE(v);
    this.parts.push(b);
    return this;
  }
  u32(v: number): this {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(v);
    this.parts.push(b);
    return this;
  }
  u64(v: number | bigint): this {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(BigInt(v));
    this.parts.push(b);
    return this;
  }
  str8(s: string): this {
    return this.u8(s.length).raw(Buffer.from(s, 'latin1'));
  }
  raw(b: Uint8Array | string): this {
    this.parts.push(typeof b === 'string' ? Buffer.from(b, 'latin1') : Buffer.from(b));
    return this;
  }
  get length(): number {
    return this.parts.reduce((n, p) => n + p.length, 0);
  }
  build(): Buffer {
    return Buffer.concat(this.parts);
  }
}

/** Deterministic pseudo-random bytes. */
export function pseudoRandom(n: number, seed: number): Buffer {
  const b = Buffer.alloc(n);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b[i] = x & 0xff;
  }
  return b;
}

export const PAGE = 4096;
export const RAM_SECTION_ID = 2;

export interface SyntheticDevice {
  sectionId: number;
  idstr: string;
  instanceId: number;
  versionId: number;
  body: Buffer;
  /** The device's JSON description entry (fields/subsections sized to match `body`). */
  desc: Record<string, unknown>;
}

function subsectionBytes(name: string, version: number, fields: Buffer): Buffer {
  return new Bytes().u8(0x05).str8(name).u32(version).raw(fields).build();
}

/** Device sections shaped like QEMU's, including bodies that contain look-alike footers and headers. */
export function syntheticDevices(): SyntheticDevice[] {
  const timerBody = new Bytes().u64(7_687_626_713n).u64(0).u64(3_143_675_557n).build();
  // "cpu": fields, an array of 16 regs (compressed), a struct, and two subsections (one nested).
  const nested = subsectionBytes('cpu/nested/inner', 1, Buffer.from([9, 9]));
  const cpuBody = Buffer.concat([
    pseudoRandom(16 * 8, 1),
    pseudoRandom(4, 2),
    pseudoRandom(10, 3),
    subsectionBytes('cpu/tsc_khz', 1, pseudoRandom(8, 4)),
    subsectionBytes('cpu/nested', 2, Buffer.concat([pseudoRandom(3, 5), nested])),
  ]);
  // A body that contains, byte for byte, a footer of its own section followed by a plausible FULL
  // header ("dma") and a description look-alike `00 06 len {}`: a footer scan would be fooled,
  // the description split must not be.
  const trap = new Bytes()
    .raw(pseudoRandom(5, 6))
    .u8(0x7e).u32(12) // looks like this section's footer
    .u8(0x04).u32(13).str8('dma').u32(0).u32(1) // looks like the next header
    .u8(0x00).u8(0x06).u32(2).raw('{}') // looks like EOF + a description
    .raw(pseudoRandom(7, 7))
    .build();
  const dmaBody = pseudoRandom(3 + 4 * 17, 8);
  const kvmclockBody = Buffer.concat([
    new Bytes().u64(123_456_789_000n).build(),
    subsectionBytes('kvmclock/clock_is_reliable', 1, Buffer.from([1])),
  ]);
  const globalBody = Buffer.concat([new Bytes().u32(8).build(), Buffer.from('running'.padEnd(100, '\0'), 'latin1')]);
  return [
    {
      sectionId: 0, idstr: 'timer', instanceId: 0, versionId: 2, body: timerBody,
      desc: { name: 'timer', instance_id: 0, vmsd_name: 'timer', version: 2, fields: [
        { name: 'cpu_ticks_offset', type: 'int64', size: 8 },
        { name: 'unused', type: 'unused_buffer', size: 8 },
        { name: 'cpu_clock_offset', type: 'int64', size: 8 },
      ] },
    },
    {
      sectionId: 3, idstr: 'cpu', instanceId: 0, versionId: 12, body: cpuBody,
      desc: { name: 'cpu', instance_id: 0, vmsd_name: 'cpu', version: 12, fields: [
        { name: 'env.regs', type: 'uint64', size: 8, array_len: 16 },
        { name: 'env.hflags', type: 'uint32', size: 4 },
        { name: 'seg', type: 'struct', size: 10, struct: { vmsd_name: 'seg', version: 1, fields: [{ name: 'a', type: 'uint64', size: 8 }, { name: 'b', type: 'uint16', size: 2 }] } },
      ], subsections: [
        { vmsd_name: 'cpu/tsc_khz', version: 1, fields: [{ name: 'env.tsc_khz', type: 'int64', size: 8 }] },
        { vmsd_name: 'cpu/nested', version: 2, fields: [{ name: 'x', type: 'buffer', size: 3 }], subsections: [
          { vmsd_name: 'cpu/nested/inner', version: 1, fields: [{ name: 'y', type: 'uint8', size: 1, array_len: 2 }] },
        ] },
      ] },
    },
    {
      sectionId: 12, idstr: 'trap', instanceId: 0, versionId: 1, body: trap,
      desc: { name: 'trap', instance_id: 0, vmsd_name: 'old_style', version: 1, fields: [{ name: 'data', size: trap.length }] },
    },
    {
      sectionId: 13, idstr: 'dma', instanceId: 1, versionId: 1, body: dmaBody,
      desc: { name: 'dma', instance_id: 1, vmsd_name: 'dma', version: 1, fields: [
        { name: 'command', type: 'uint8', size: 1 },
        { name: 'mask', type: 'uint8', size: 1 },
        { name: 'flip_flop', type: 'uint8', size: 1 },
        { name: 'regs', type: 'struct', size: 17, array_len: 4 },
      ] },
    },
    {
      sectionId: 21, idstr: 'kvmclock', instanceId: 0, versionId: 1, body: kvmclockBody,
      desc: { name: 'kvmclock', instance_id: 0, vmsd_name: 'kvmclock', version: 1, fields: [{ name: 'clock', type: 'uint64', size: 8 }],
        subsections: [{ vmsd_name: 'kvmclock/clock_is_reliable', version: 1, fields: [{ name: 'clock_is_reliable', type: 'bool', size: 1 }] }] },
    },
    {
      sectionId: 40, idstr: 'globalstate', instanceId: 0, versionId: 1, body: globalBody,
      desc: { name: 'globalstate', instance_id: 0, vmsd_name: 'globalstate', version: 1, fields: [
        { name: 'size', type: 'uint32', size: 4 },
        { name: 'runstate', type: 'buffer', size: 100 },
      ] },
    },
  ];
}

export interface SyntheticOptions {
  /** Capabilities in configuration/capabilities (e.g. 'x-ignore-shared'). */
  capabilities?: string[];
  /** Send MIG_CMD_POSTCOPY_ADVISE and give "pc.ram" a 2 MiB page size in the block list. */
  postcopy?: boolean;
  /** Leave out the VM description (like suppress_vmdesc machines). */
  noDescription?: boolean;
  /** Replace the description JSON text. */
  descriptionText?: (json: string) => string;
  devices?: SyntheticDevice[];
}

export interface SyntheticStream {
  bytes: Buffer;
  /** Offsets of interesting places, for error-offset assertions. */
  at: { configuration: number; ramStart: number; firstPage: number; ramEnd: number; devices: number; eof: number; description: number };
  devices: SyntheticDevice[];
  pages: { pcRam0: Buffer; pcRam2: Buffer; end: Buffer };
}

export function syntheticStream(o: SyntheticOptions = {}): SyntheticStream {
  const b = new Bytes();
  const ignoreShared = o.capabilities?.includes('x-ignore-shared') ?? false;
  b.raw('QEVM').u32(3);
  const configuration = b.length;
  b.u8(0x07).u32(13).raw('pc-i440fx-7.2');
  if (o.capabilities) {
    b.u8(0x05).str8('configuration/capabilities').u32(1).u32(o.capabilities.length);
    for (const c of o.capabilities) b.str8(c);
  }
  b.u8(0x08).u16(1).u16(0); // MIG_CMD_OPEN_RETURN_PATH
  if (o.postcopy) b.u8(0x08).u16(3).u16(16).u64(0x201000).u64(PAGE); // MIG_CMD_POSTCOPY_ADVISE
  // START "ram": the block list (ram_save_setup), EOS, footer.
  const ramStart = b.length;
  const blocks: Array<[string, number]> = [['pc.ram', 1 << 20], ['/rom@etc/acpi/tables', 128 << 10], ['pc.bios', 256 << 10]];
  b.u8(0x01).u32(RAM_SECTION_ID).str8('ram').u32(0).u32(4);
  b.u64(blocks.reduce((n, [, l]) => n + l, 0) + 0x04);
  blocks.forEach(([id, len], i) => {
    b.str8(id).u64(len);
    if (o.postcopy && id === 'pc.ram') b.u64(0x200000);
    // Powers of two on purpose: they look like page sizes to a careless reader.
    if (ignoreShared) b.u64(i === 0 ? 0 : 0x100000000 * i);
  });
  b.u64(0x10).u8(0x7e).u32(RAM_SECTION_ID);
  // PART: pages with and without CONTINUE, a zero page, XBZRLE and compressed pages.
  const firstPage = b.length;
  const pcRam0 = pseudoRandom(PAGE, 10);
  const pcRam2 = pseudoRandom(PAGE, 11);
  b.u8(0x02).u32(RAM_SECTION_ID);
  b.u64(0 + 0x08).str8('pc.ram').raw(pcRam0);
  b.u64(PAGE + 0x02 + 0x20).u8(0);
  b.u64(2 * PAGE + 0x08 + 0x20).raw(pcRam2);
  b.u64(0x02).str8('/rom@etc/acpi/tables').u8(0);
  b.u64(3 * PAGE + 0x40).str8('pc.ram').u8(0x01).u16(5).raw(pseudoRandom(5, 12));
  b.u64(4 * PAGE + 0x100 + 0x20).u32(9).raw(pseudoRandom(9, 13));
  b.u64(0x10).u8(0x7e).u32(RAM_SECTION_ID);
  // END: one more page, EOS, footer.
  const ramEnd = b.length;
  const end = pseudoRandom(PAGE, 14);
  b.u8(0x03).u32(RAM_SECTION_ID);
  b.u64(0x3f000 + 0x08).str8('pc.bios').raw(end);
  b.u64(0x10).u8(0x7e).u32(RAM_SECTION_ID);
  // Device state.
  const devices = o.devices ?? syntheticDevices();
  const devicesAt = b.length;
  for (const d of devices) {
    b.u8(0x04).u32(d.sectionId).str8(d.idstr).u32(d.instanceId).u32(d.versionId).raw(d.body).u8(0x7e).u32(d.sectionId);
  }
  const eof = b.length;
  b.u8(0x00);
  const description = b.length;
  if (!o.noDescription) {
    let json = JSON.stringify({ page_size: PAGE, devices: devices.map((d) => d.desc) });
    if (o.descriptionText) json = o.descriptionText(json);
    const data = Buffer.from(json, 'utf8');
    b.u8(0x06).u32(data.length).raw(data);
  }
  return {
    bytes: b.build(),
    at: { configuration, ramStart, firstPage, ramEnd, devices: devicesAt, eof, description },
    devices,
    pages: { pcRam0, pcRam2, end },
  };
}
