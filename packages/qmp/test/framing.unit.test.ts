import { describe, expect, it } from 'vitest';
import { encodeMessage, JsonLineDecoder, type Frame } from '../src/framing.js';
import { QmpProtocolError } from '../src/errors.js';

function decode(chunks: Buffer[]) {
  const frames: Frame[] = [];
  const errors: QmpProtocolError[] = [];
  let sentinels = 0;
  const decoder = new JsonLineDecoder({
    frame: (f) => frames.push(f),
    sentinel: () => sentinels++,
    error: (e) => errors.push(e),
  });
  for (const chunk of chunks) decoder.push(chunk);
  return { frames, errors, sentinels };
}

/** Splits a buffer at the given offsets. */
function splitAt(buffer: Buffer, cuts: number[]): Buffer[] {
  const out: Buffer[] = [];
  let start = 0;
  for (const cut of [...cuts].sort((a, b) => a - b)) {
    out.push(buffer.subarray(start, cut));
    start = cut;
  }
  out.push(buffer.subarray(start));
  return out;
}

describe('JsonLineDecoder', () => {
  const stream = Buffer.from(
    '{"return": {}, "id": "a"}\r\n' +
      '{"timestamp": {"seconds": 1700000000, "microseconds": 123456}, "event": "STOP"}\r\n' +
      '{"return": {"status": "running", "note": "ü€"}, "id": "b"}\r\n',
    'utf8',
  );

  it('gives the same messages for every split of the stream, including inside UTF-8 sequences', () => {
    const whole = decode([stream]);
    expect(whole.frames.map((f) => f.value)).toHaveLength(3);
    for (let cut = 1; cut < stream.length; cut++) {
      const split = decode(splitAt(stream, [cut]));
      expect(split.frames.map((f) => f.value)).toEqual(whole.frames.map((f) => f.value));
    }
    for (let trial = 0; trial < 200; trial++) {
      const cuts = Array.from({ length: 1 + (trial % 7) }, () => Math.floor(Math.random() * stream.length));
      expect(decode(splitAt(stream, cuts)).frames.map((f) => f.value)).toEqual(whole.frames.map((f) => f.value));
    }
  });

  it('reports a garbage line as a protocol error naming the line, and keeps decoding', () => {
    const result = decode([Buffer.from('this is not json\n{"return": 1}\n')]);
    expect(result.errors).toHaveLength(1);
    expect(result.errors[0]!.message).toContain('not JSON');
    expect(result.errors[0]!.message).toContain('this is not json');
    expect(result.frames.map((f) => f.value)).toEqual([{ return: 1 }]);
  });

  it('rejects JSON that is not an object', () => {
    const result = decode([Buffer.from('[1,2]\n')]);
    expect(result.errors[0]!.message).toContain('not an object');
  });

  it('drops bytes buffered before a guest-agent sentinel', () => {
    const result = decode([Buffer.from('{"stale": '), Buffer.from([0xff]), Buffer.from('{"return": 7}\n')]);
    expect(result.sentinels).toBe(1);
    expect(result.errors).toHaveLength(0);
    expect(result.frames.map((f) => f.value)).toEqual([{ return: 7 }]);
  });

  it('keeps the raw line so 64-bit integers survive', () => {
    const result = decode([Buffer.from('{"return": 1732990000123456789}\n')]);
    expect(result.frames[0]!.raw).toContain('1732990000123456789');
  });

  it('bounds a line that never ends', () => {
    const errors: QmpProtocolError[] = [];
    const decoder = new JsonLineDecoder({ frame: () => {}, sentinel: () => {}, error: (e) => errors.push(e) }, 1024);
    decoder.push(Buffer.alloc(2048, 0x61));
    expect(errors[0]!.message).toContain('longer than 1024 bytes');
  });
});

describe('encodeMessage', () => {
  it('writes bigints as JSON integers and ends with a newline', () => {
    expect(encodeMessage({ execute: 'guest-set-time', arguments: { time: 1732990000123456789n } })).toBe(
      '{"execute":"guest-set-time","arguments":{"time":1732990000123456789}}\n',
    );
  });
});
