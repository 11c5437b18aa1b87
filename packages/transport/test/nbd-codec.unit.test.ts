import { describe, expect, it } from 'vitest';
import {
  ExtentCoalescer,
  NbdCmd,
  NbdError,
  NbdOpt,
  NbdProtocolError,
  NbdRep,
  NbdReplyParser,
  NbdReplyType,
  NbdTransmissionFlag,
  decodeRequest,
  encodeBlockStatus,
  encodeChunk,
  encodeClientFlags,
  encodeErrorChunk,
  encodeGoOption,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeMetaContext,
  encodeMetaContextOption,
  encodeOffsetData,
  encodeOffsetHole,
  encodeOption,
  encodeOptionReply,
  encodeRequest,
  encodeSimpleReply,
  intersectStatus,
  type InFlight,
  type NbdProtocolErrorCode,
  type NbdReplyParserOptions,
  type NbdServerMessage,
} from '../src/index.js';

const hex = (b: Buffer): string => b.toString('hex');
const MiB = 1024 * 1024;

describe('client → server byte layout', () => {
  it('client flags are a be32', () => {
    expect(hex(encodeClientFlags(3))).toBe('00000003');
  });

  it('an option is IHAVEOPT, be32 option, be32 length, data', () => {
    expect(hex(encodeOption(NbdOpt.STRUCTURED_REPLY))).toBe(`${Buffer.from('IHAVEOPT').toString('hex')}0000000800000000`);
    expect(hex(encodeOption(NbdOpt.ABORT))).toBe('49484156454f50540000000200000000');
  });

  it('NBD_OPT_GO carries the name, then the requested info types', () => {
    const b = encodeGoOption('vda', [3]);
    expect(hex(b)).toBe(
      '49484156454f5054' + // IHAVEOPT
        '00000007' + // NBD_OPT_GO
        '0000000b' + // 4 + 3 + 2 + 2 bytes of data
        '00000003' + hex(Buffer.from('vda')) +
        '0001' + '0003', // one info request: NBD_INFO_BLOCK_SIZE
    );
  });

  it('NBD_OPT_SET_META_CONTEXT carries the name, a count and length-prefixed queries', () => {
    const b = encodeMetaContextOption('', ['base:allocation', 'qemu:dirty-bitmap:b']);
    const data = Buffer.concat([
      Buffer.from('00000000', 'hex'), // empty export name
      Buffer.from('00000002', 'hex'),
      Buffer.from('0000000f', 'hex'),
      Buffer.from('base:allocation'),
      Buffer.from('00000013', 'hex'),
      Buffer.from('qemu:dirty-bitmap:b'),
    ]);
    expect(b.subarray(0, 16)).toEqual(Buffer.concat([Buffer.from('IHAVEOPT'), Buffer.from('0000000a', 'hex'), Buffer.from([0, 0, 0, data.length])]));
    expect(b.subarray(16)).toEqual(data);
  });

  it('a request is magic, flags, type, cookie, offset, length (28 bytes)', () => {
    const b = encodeRequest({ command: NbdCmd.BLOCK_STATUS, flags: 8, cookie: 0x01_0203_0405, offset: 2 ** 40 + 5, length: 0xffff_fffe });
    expect(hex(b)).toBe('25609513' + '0008' + '0007' + '0000000102030405' + '0000010000000005' + 'fffffffe');
    expect(decodeRequest(b)).toEqual({ command: 7, flags: 8, cookie: 0x01_0203_0405, offset: 2 ** 40 + 5, length: 0xffff_fffe });
  });

  it('refuses strings and numbers the protocol cannot carry', () => {
    expect(() => encodeGoOption('a\0b')).toThrow(NbdError);
    expect(() => encodeGoOption('x'.repeat(4097))).toThrow(/at most 4096/);
    expect(() => encodeRequest({ command: 0, cookie: 1, offset: -1, length: 1 })).toThrow(/offset -1/);
    expect(() => encodeRequest({ command: 0, cookie: 1, offset: 0, length: 2 ** 32 })).toThrow(/32 bits/);
  });
});

// ---- a whole conversation, server side -----------------------------------------------------------

const requests = new Map<number, InFlight>([
  [1, { command: NbdCmd.READ, offset: 4096, length: 4096 }],
  [3, { command: NbdCmd.BLOCK_STATUS, offset: 0, length: MiB }],
  [4, { command: NbdCmd.READ, offset: 0, length: 512 }],
  [5, { command: NbdCmd.READ, offset: 0, length: 8192 }],
  [6, { command: NbdCmd.BLOCK_STATUS, offset: 0, length: 512 }],
  [7, { command: NbdCmd.READ, offset: 0, length: 512 }],
]);
const lookup = (c: number): InFlight | undefined => requests.get(c);
const payload = Buffer.from(Array.from({ length: 1000 }, (_, i) => (i * 7) & 0xff));

const handshake = [
  encodeGreeting(3),
  encodeOptionReply(NbdOpt.STRUCTURED_REPLY, NbdRep.ACK),
  encodeOptionReply(NbdOpt.SET_META_CONTEXT, NbdRep.META_CONTEXT, encodeMetaContext(1, 'base:allocation')),
  encodeOptionReply(NbdOpt.SET_META_CONTEXT, NbdRep.META_CONTEXT, encodeMetaContext(2, 'qemu:dirty-bitmap:b')),
  encodeOptionReply(NbdOpt.SET_META_CONTEXT, NbdRep.ACK),
  encodeOptionReply(NbdOpt.GO, NbdRep.INFO, encodeInfoExport(2 ** 40, NbdTransmissionFlag.HAS_FLAGS | NbdTransmissionFlag.READ_ONLY)),
  encodeOptionReply(NbdOpt.GO, NbdRep.INFO, encodeInfoBlockSize(1, 4096, 32 * MiB)),
  encodeOptionReply(NbdOpt.GO, NbdRep.ERR_UNKNOWN, Buffer.from("export 'x' not present")),
  encodeOptionReply(NbdOpt.GO, NbdRep.ACK),
];
const transmission = [
  // A read answered out of order: hole first, then data; NONE ends it.
  encodeOffsetHole(1, 4096 + 1000, 3096, false),
  encodeOffsetData(1, 4096, payload, false),
  encodeChunk(1, NbdReplyType.NONE, Buffer.alloc(0), true),
  encodeBlockStatus(3, 1, [{ length: 65536, flags: 0 }, { length: 983040, flags: 3 }], false),
  encodeBlockStatus(3, 2, [{ length: 4096, flags: 1 }], true),
  encodeErrorChunk(4, 5, 'boom', true),
  encodeErrorChunk(5, 5, 'bad sector', false, 4608),
  encodeOffsetData(5, 0, payload.subarray(0, 16), true),
  encodeSimpleReply(6, 22),
  // An error type this client does not know: bit 15 set, so it is an error with the generic layout.
  encodeChunk(7, 0x8000 + 99, Buffer.concat([Buffer.from('0000000c0002', 'hex'), Buffer.from('no')]), true),
];
const conversation = Buffer.concat([...handshake, ...transmission]);

/** Parses in chunks and joins the data pieces of each OFFSET_DATA chunk, for comparison. */
function parse(bytes: Buffer, cuts: number[], options: NbdReplyParserOptions = { lookup }): NbdServerMessage[] {
  const parser = new NbdReplyParser(options);
  const out: NbdServerMessage[] = [];
  let prev = 0;
  for (const cut of [...cuts, bytes.length]) {
    parser.push(bytes.subarray(prev, cut), (m) => {
      const last = out[out.length - 1];
      if (m.type === 'data' && last?.type === 'data' && last.at === m.at) {
        expect(m.offset).toBe(last.offset + last.data.length);
        out[out.length - 1] = { ...last, data: Buffer.concat([last.data, m.data]), done: m.done };
      } else out.push(m.type === 'data' ? { ...m, data: Buffer.from(m.data) } : m);
    });
    prev = cut;
  }
  parser.end();
  return out;
}

describe('parsing server messages', () => {
  const whole = parse(conversation, []);
  const h = (i: number) => handshake.slice(0, i).reduce((n, b) => n + b.length, 0);
  const t = (i: number) => h(handshake.length) + transmission.slice(0, i).reduce((n, b) => n + b.length, 0);

  it('decodes the handshake: greeting, option replies, infos, contexts, errors', () => {
    expect(whole.slice(0, handshake.length)).toEqual([
      { type: 'greeting', at: 0, handshakeFlags: 3 },
      { type: 'option-reply', at: h(1), option: 8, reply: 1, data: Buffer.alloc(0) },
      expect.objectContaining({ type: 'option-reply', at: h(2), option: 10, reply: 4, context: { id: 1, name: 'base:allocation' } }),
      expect.objectContaining({ context: { id: 2, name: 'qemu:dirty-bitmap:b' } }),
      expect.objectContaining({ option: 10, reply: 1 }),
      expect.objectContaining({ option: 7, reply: 3, info: { type: 'export', size: 2 ** 40, transmissionFlags: 3 } }),
      expect.objectContaining({ info: { type: 'block-size', minimum: 1, preferred: 4096, maximum: 32 * MiB } }),
      expect.objectContaining({ option: 7, reply: NbdRep.ERR_UNKNOWN, message: "export 'x' not present" }),
      expect.objectContaining({ at: h(8), option: 7, reply: 1 }),
    ]);
  });

  it('decodes every reply kind of the transmission phase', () => {
    expect(whole.slice(handshake.length)).toEqual([
      { type: 'hole', at: t(0), cookie: 1, offset: 5096, length: 3096, done: false },
      { type: 'data', at: t(1), cookie: 1, offset: 4096, data: payload, done: false },
      { type: 'none', at: t(2), cookie: 1, done: true },
      { type: 'block-status', at: t(3), cookie: 3, contextId: 1, extents: [{ length: 65536, flags: 0 }, { length: 983040, flags: 3 }], done: false },
      { type: 'block-status', at: t(4), cookie: 3, contextId: 2, extents: [{ length: 4096, flags: 1 }], done: true },
      { type: 'error', at: t(5), cookie: 4, chunkType: NbdReplyType.ERROR, errno: 5, message: 'boom', done: true },
      { type: 'error', at: t(6), cookie: 5, chunkType: NbdReplyType.ERROR_OFFSET, errno: 5, message: 'bad sector', errorOffset: 4608, done: false },
      { type: 'data', at: t(7), cookie: 5, offset: 0, data: payload.subarray(0, 16), done: true },
      { type: 'simple', at: t(8), cookie: 6, error: 22 },
      { type: 'error', at: t(9), cookie: 7, chunkType: 0x8000 + 99, errno: 12, message: 'no', done: true },
    ]);
  });

  it('gives the same messages for every split of the bytes into two chunks', () => {
    // Compared as JSON (Buffers as byte arrays): toEqual on 1,600 splits is slow.
    const key = (ms: NbdServerMessage[]) => JSON.stringify(ms);
    const expected = key(whole);
    for (let cut = 1; cut < conversation.length; cut++) {
      const got = key(parse(conversation, [cut]));
      if (got !== expected) expect(parse(conversation, [cut]), `cut at ${cut}`).toEqual(whole);
    }
  });

  it('gives the same messages when the bytes arrive one at a time', () => {
    expect(parse(conversation, Array.from({ length: conversation.length - 1 }, (_, i) => i + 1))).toEqual(whole);
  });

  it('streams OFFSET_DATA as views of the input, without buffering it', () => {
    const parser = new NbdReplyParser({ lookup, phase: 'transmission' });
    const chunk = encodeOffsetData(1, 4096, payload, true);
    const pieces: Buffer[] = [];
    parser.push(chunk.subarray(0, 100), (m) => m.type === 'data' && pieces.push(m.data));
    parser.push(chunk.subarray(100), (m) => m.type === 'data' && pieces.push(m.data));
    expect(pieces.map((p) => p.length)).toEqual([100 - 28, 1000 - 72]);
    expect(pieces[1]!.buffer).toBe(chunk.buffer); // a view, not a copy
    expect(parser.idle).toBe(true);
  });

  it('switches to transmission right after the ACK to NBD_OPT_GO, within one chunk', () => {
    const parser = new NbdReplyParser({ lookup, phase: 'options' });
    const seen: string[] = [];
    parser.push(Buffer.concat([encodeOptionReply(NbdOpt.GO, NbdRep.ACK), encodeSimpleReply(6, 0)]), (m) => seen.push(m.type));
    expect(seen).toEqual(['option-reply', 'simple']);
    expect(parser.phase).toBe('transmission');
  });
});

// ---- errors ---------------------------------------------------------------------------------------

function parseError(bytes: Buffer, cuts: number[], options: NbdReplyParserOptions): NbdProtocolError {
  try {
    parse(bytes, cuts, options);
  } catch (e) {
    expect(e).toBeInstanceOf(NbdProtocolError);
    return e as NbdProtocolError;
  }
  throw new Error('expected an NbdProtocolError, the parse succeeded');
}

function expectError(bytes: Buffer, code: NbdProtocolErrorCode, offset: number, message: RegExp, options: NbdReplyParserOptions = { lookup, phase: 'transmission' }): void {
  const e = parseError(bytes, [], options);
  expect({ code: e.code, offset: e.offset }).toEqual({ code, offset });
  expect(e.message).toMatch(message);
  expect(e.message).toContain(`offset ${offset} (0x${offset.toString(16)})`);
  // The same error at the same offset when the bytes trickle in one at a time.
  const e1 = parseError(bytes, Array.from({ length: bytes.length - 1 }, (_, i) => i + 1), options);
  expect({ code: e1.code, offset: e1.offset }).toEqual({ code, offset });
}

const chunkWithLength = (cookie: number, type: number, p: Buffer, length: number): Buffer => {
  const b = encodeChunk(cookie, type, p, true);
  b.writeUInt32BE(length, 16);
  return b;
};

describe('coded errors with byte offsets', () => {
  const greeting = { phase: 'greeting' as const };
  const options = { phase: 'options' as const };

  it('bad magic in the greeting, at the first wrong byte, before the rest arrives', () => {
    expectError(Buffer.from('NBDMAGIX'), 'BAD_MAGIC', 7, /not an NBD server/, greeting);
    expectError(Buffer.from('HTTP/1.1 400'), 'BAD_MAGIC', 0, /not an NBD server/, greeting);
    const g = encodeGreeting(3);
    g[12] = 0x21;
    expectError(g, 'BAD_MAGIC', 12, /IHAVEOPT/, greeting);
  });

  it('an oldstyle server is named as such', () => {
    const old = Buffer.concat([Buffer.from('NBDMAGIC'), Buffer.from('0000420281861253', 'hex'), Buffer.alloc(10)]);
    expectError(old, 'UNSUPPORTED', 8, /oldstyle/, greeting);
  });

  it('option replies: bad magic, an ACK with data, an INFO of the wrong size, a huge reply', () => {
    const r = encodeOptionReply(NbdOpt.GO, NbdRep.ACK);
    r[3] = 0;
    expectError(r, 'BAD_MAGIC', 3, /option reply magic/, options);
    expectError(encodeOptionReply(NbdOpt.GO, NbdRep.ACK, Buffer.alloc(4)), 'BAD_LENGTH', 16, /ACK has none/, options);
    expectError(encodeOptionReply(NbdOpt.GO, NbdRep.INFO, encodeInfoExport(1, 1).subarray(0, 10)), 'BAD_LENGTH', 16, /NBD_INFO_EXPORT of 10 bytes/, options);
    const huge = encodeOptionReply(NbdOpt.LIST, NbdRep.SERVER);
    huge.writeUInt32BE(0x7fff_ffff, 16);
    expectError(huge, 'LIMIT_EXCEEDED', 16, /limit/, options);
    const size = encodeInfoExport(0, 1);
    size.writeUInt32BE(0xffff_ffff, 2);
    expectError(encodeOptionReply(NbdOpt.GO, NbdRep.INFO, size), 'BAD_REPLY', 22, /beyond 2\^53/, options);
  });

  it('transmission: bad reply magic, unknown chunk type, unknown cookie', () => {
    expectError(Buffer.from('deadbeef00000000', 'hex'), 'BAD_MAGIC', 0, /neither simple/);
    // After a good reply, so the offset is absolute.
    const good = encodeSimpleReply(6, 0);
    expectError(Buffer.concat([good, encodeChunk(1, 3, Buffer.alloc(0), true)]), 'UNKNOWN_CHUNK_TYPE', good.length + 6, /unknown structured reply chunk type 3/);
    expectError(encodeSimpleReply(99, 0), 'UNKNOWN_COOKIE', 8, /0x0000000000000063/);
    expectError(encodeOffsetData(42, 0, payload, true), 'UNKNOWN_COOKIE', 8, /no request in flight/);
  });

  it('lengths that lie', () => {
    expectError(chunkWithLength(1, NbdReplyType.NONE, Buffer.alloc(0), 4), 'BAD_LENGTH', 16, /NONE has no payload/);
    expectError(chunkWithLength(1, NbdReplyType.OFFSET_HOLE, Buffer.alloc(16), 16), 'BAD_LENGTH', 16, /OFFSET_HOLE is 12 bytes/);
    expectError(chunkWithLength(1, NbdReplyType.OFFSET_DATA, Buffer.alloc(8), 8), 'BAD_LENGTH', 16, /at least one byte of data/);
    // 1 MiB of data claimed for a 4 KiB read: refused at the header, before any data is awaited.
    expectError(chunkWithLength(1, NbdReplyType.OFFSET_DATA, Buffer.alloc(8), MiB + 8), 'BAD_LENGTH', 16, /answers a read of 4096 bytes/);
    expectError(chunkWithLength(3, NbdReplyType.BLOCK_STATUS, Buffer.alloc(10), 10), 'BAD_LENGTH', 16, /8 bytes per extent/);
    expectError(chunkWithLength(3, NbdReplyType.BLOCK_STATUS, Buffer.alloc(0), 0x7000_0004), 'LIMIT_EXCEEDED', 16, /limit/);
    const e = encodeErrorChunk(4, 5, 'boom', true);
    e.writeUInt16BE(200, 24);
    expectError(e, 'BAD_LENGTH', 24, /message length 200/);
    const eo = encodeErrorChunk(5, 5, 'x', true, 0);
    expectError(chunkWithLength(5, NbdReplyType.ERROR_OFFSET, eo.subarray(20, eo.length - 1), eo.length - 21), 'BAD_LENGTH', 24, /message length 1/);
    expectError(chunkWithLength(4, NbdReplyType.ERROR, Buffer.alloc(4), 4), 'BAD_LENGTH', 16, /needs 6 bytes/);
  });

  it('replies whose content contradicts the request', () => {
    // Data outside the read's range, a hole past its end, a zero-length extent, errno 0.
    expectError(encodeOffsetData(1, 0, payload, true), 'BAD_REPLY', 20, /outside the request \[4096, 8192\)/);
    expectError(encodeOffsetHole(1, 8000, 4096, true), 'BAD_REPLY', 20, /outside the request/);
    expectError(encodeOffsetHole(1, 4096, 0, true), 'BAD_REPLY', 28, /OFFSET_HOLE of 0 bytes/);
    expectError(encodeBlockStatus(3, 1, [{ length: 512, flags: 0 }, { length: 0, flags: 0 }], true), 'BAD_REPLY', 32, /extent 1 of context 1 has length 0/);
    expectError(encodeErrorChunk(4, 0, 'ok?', true), 'BAD_REPLY', 20, /errno 0/);
    expectError(encodeErrorChunk(5, 5, 'x', true, 9000), 'BAD_REPLY', 27, /outside the request/);
    // The right chunk for the wrong command, NONE without DONE, a READ answered by a simple reply.
    expectError(encodeBlockStatus(1, 1, [{ length: 512, flags: 0 }], true), 'UNEXPECTED_REPLY', 6, /BLOCK_STATUS chunk in the reply to NBD_CMD_READ/);
    expectError(encodeOffsetData(3, 0, payload, true), 'UNEXPECTED_REPLY', 6, /reply to NBD_CMD_BLOCK_STATUS/);
    const none = encodeChunk(1, NbdReplyType.NONE, Buffer.alloc(0), false);
    expectError(none, 'BAD_REPLY', 4, /without NBD_REPLY_FLAG_DONE/);
    expectError(encodeSimpleReply(1, 0), 'UNEXPECTED_REPLY', 0, /no framing/);
  });

  it('a stream cut inside a message is TRUNCATED where it is cut', () => {
    const d = encodeOffsetData(1, 4096, payload, true);
    const parser = new NbdReplyParser({ lookup, phase: 'transmission' });
    parser.push(Buffer.concat([encodeSimpleReply(6, 0), d.subarray(0, 500)]), () => undefined);
    const e = (() => {
      try {
        parser.end();
      } catch (err) {
        return err as NbdProtocolError;
      }
      throw new Error('no error');
    })();
    expect({ code: e.code, offset: e.offset }).toEqual({ code: 'TRUNCATED', offset: 16 + 500 });
    expect(e.message).toMatch(/528 bytes before the end of the OFFSET_DATA chunk at 16/);
  });

  it('a failed parser stays failed', () => {
    const parser = new NbdReplyParser({ lookup, phase: 'transmission' });
    expect(() => parser.push(Buffer.from('ffffffff', 'hex'), () => undefined)).toThrow(NbdProtocolError);
    expect(() => parser.push(encodeSimpleReply(6, 0), () => undefined)).toThrow(/BAD_MAGIC/);
  });
});

// ---- extent arithmetic ----------------------------------------------------------------------------

describe('intersectStatus', () => {
  it('cuts at the boundaries of every context and stops where the shortest ends', () => {
    const alloc = [{ length: 100, flags: 0 }, { length: 300, flags: 3 }];
    const dirty = [{ length: 50, flags: 0 }, { length: 100, flags: 1 }];
    expect(intersectStatus(1000, 2000, [alloc, dirty])).toEqual([
      { offset: 1000, length: 50, flags: [0, 0] },
      { offset: 1050, length: 50, flags: [0, 1] },
      { offset: 1100, length: 50, flags: [3, 1] },
    ]);
  });

  it('clips a last extent that reaches past the request', () => {
    expect(intersectStatus(0, 64, [[{ length: 4096, flags: 2 }]])).toEqual([{ offset: 0, length: 64, flags: [2] }]);
  });
});

describe('ExtentCoalescer', () => {
  it('joins adjacent ranges of the same kind only', () => {
    const c = new ExtentCoalescer(1000);
    expect([...c.add(0, 100, false), ...c.add(100, 50, false), ...c.add(150, 50, true), ...c.add(300, 10, true), ...c.flush()]).toEqual([
      { offset: 0, length: 150, zero: false },
      { offset: 150, length: 50, zero: true },
      { offset: 300, length: 10, zero: true },
    ]);
  });

  it('never yields more than maxLength', () => {
    const c = new ExtentCoalescer(4);
    const out = [...c.add(0, 3, false), ...c.add(3, 3, false), ...c.add(6, 9, false), ...c.flush()];
    expect(out).toEqual([
      { offset: 0, length: 4, zero: false },
      { offset: 4, length: 4, zero: false },
      { offset: 8, length: 4, zero: false },
      { offset: 12, length: 3, zero: false },
    ]);
    expect(() => new ExtentCoalescer(0)).toThrow(RangeError);
  });
});
