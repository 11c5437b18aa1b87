import { describe, expect, it } from 'vitest';
import {
  decodeDiskExtent,
  encodeDiskExtentFrame,
  encodeFrameHeader,
  encodeJsonFrame,
  FrameDecoder,
  FrameError,
  FrameType,
  type Frame,
} from '../src/replication/frames.js';
import { prng } from './fixtures-disks.js';

const MiB = 1024 * 1024;

describe('disk frames', () => {
  /** A seed and a checkpoint with disk sections; `bigBytes`: the largest extent's data. */
  const build = (bigBytes: number) => {
    const extents = [
      { offset: 0, length: 4096, data: Buffer.alloc(4096, 0xa5) },
      { offset: 2 ** 40, length: 1 << 30 }, // ZERO, past 32 bits of offset
      { offset: 8192, length: bigBytes, data: prng(7).bytes(bigBytes) },
      { offset: 3, length: 1, data: Buffer.from([7]) },
    ];
    const dataBytes = 4096 + bigBytes + 1;
    const wire = Buffer.concat([
      encodeJsonFrame(FrameType.SeedBegin, { seed: 's1', disks: [{ disk: 'vda', sizeBytes: 2 ** 41 }] }),
      encodeJsonFrame(FrameType.DiskBegin, { disk: 'vda', sizeBytes: 2 ** 41 }),
      ...extents.flatMap((e) => encodeDiskExtentFrame(e)),
      encodeJsonFrame(FrameType.DiskEnd, { extents: 4, dataBytes }),
      encodeJsonFrame(FrameType.SeedEnd, {}),
      encodeJsonFrame(FrameType.Header, { vm: 'probe', epoch: 1, qemuVersion: '7.2' }),
      Buffer.concat([encodeFrameHeader(FrameType.Data, 3), Buffer.from([1, 2, 3])]),
      encodeJsonFrame(FrameType.DiskBegin, { disk: 'vda', sizeBytes: 2 ** 41 }),
      encodeJsonFrame(FrameType.DiskEnd, { extents: 0, dataBytes: 0 }),
      encodeJsonFrame(FrameType.Trailer, { stopNs: '1', resumeNs: '2' }),
    ]);
    return { extents, dataBytes, wire };
  };

  const decode = (wire: Buffer, sizes: () => number) => {
    const decoder = new FrameDecoder();
    const out: Frame[] = [];
    for (let at = 0; at < wire.length; ) {
      const size = sizes();
      out.push(...decoder.push(Buffer.from(wire.subarray(at, at + size))));
      at += size;
    }
    expect(decoder.pendingBytes).toBe(0);
    return out;
  };

  it('round-trips every frame for any chunking, each disk extent whole', () => {
    const random = prng(1);
    const runs: [number, () => number][] = [
      [4 * MiB, () => Infinity], // the largest extent allowed
      [4 * MiB, () => 1 + random.int(70_000)],
      [4 * MiB, () => 1 + random.int(3 * MiB)],
      [20_000, () => 1],
      [20_000, () => 5],
      [20_000, () => 13],
      [20_000, () => 1 + random.int(7)],
    ];
    for (const [bigBytes, sizes] of runs) {
      const { extents, dataBytes, wire } = build(bigBytes);
      const out = decode(wire, sizes);
      const types = out.map((f) => f.type);
      expect(types).toEqual([
        FrameType.SeedBegin,
        FrameType.DiskBegin,
        FrameType.DiskExtent,
        FrameType.DiskExtent,
        FrameType.DiskExtent,
        FrameType.DiskExtent,
        FrameType.DiskEnd,
        FrameType.SeedEnd,
        FrameType.Header,
        ...types.slice(9, -3).map(() => FrameType.Data), // DATA may come in pieces
        FrameType.DiskBegin,
        FrameType.DiskEnd,
        FrameType.Trailer,
      ]);
      expect(Buffer.concat(out.filter((f) => f.type === FrameType.Data).map((f) => f.payload))).toEqual(Buffer.from([1, 2, 3]));
      const decoded = out.filter((f) => f.type === FrameType.DiskExtent).map((f) => decodeDiskExtent(f.payload));
      expect(decoded.map((e) => [e.offset, e.length, e.data?.length])).toEqual(extents.map((e) => [e.offset, e.length, e.data?.length]));
      decoded.forEach((e, i) => expect(e.data?.equals(extents[i]!.data!) ?? true).toBe(true));
      expect(JSON.parse(out[0]!.payload.toString())).toEqual({ seed: 's1', disks: [{ disk: 'vda', sizeBytes: 2 ** 41 }] });
      expect(JSON.parse(out[6]!.payload.toString())).toEqual({ extents: 4, dataBytes });
    }
  });

  it('gives a disk extent that lies in one chunk as a view of it, not a copy', () => {
    const frame = Buffer.concat(encodeDiskExtentFrame({ offset: 512, length: 4, data: Buffer.from('abcd') }));
    const [out] = new FrameDecoder().push(frame);
    expect(out!.payload.buffer).toBe(frame.buffer);
    expect(out!.payload.byteOffset).toBe(frame.byteOffset + 5);
    expect(decodeDiskExtent(out!.payload)).toEqual({ offset: 512, length: 4, data: Buffer.from('abcd') });
  });

  it('refuses a malformed disk extent, naming it and its offset', () => {
    const at = (bytes: Buffer, prefix: Buffer = Buffer.alloc(0)) => () => new FrameDecoder().push(Buffer.concat([prefix, bytes]));
    const header = (offset: number, length: number, flags: number) => {
      const b = Buffer.alloc(13);
      b.writeBigUInt64BE(BigInt(offset));
      b.writeUInt32BE(length, 8);
      b.writeUInt8(flags, 12);
      return b;
    };
    const frame = (payload: Buffer) => Buffer.concat([encodeFrameHeader(FrameType.DiskExtent, payload.length), payload]);
    const prefix = encodeJsonFrame(FrameType.DiskBegin, { disk: 'vda', sizeBytes: 1 << 20 });
    const p = prefix.length;
    const cases: [Buffer, RegExp][] = [
      [frame(header(0, 4, 0x02)), new RegExp(`unknown extent flags 0x2 at offset ${p + 5 + 12} `)],
      [frame(Buffer.concat([header(0, 4, 1), Buffer.alloc(4)])), new RegExp(`a ZERO extent with 4 bytes of data`)],
      [frame(Buffer.concat([header(0, 8, 0), Buffer.alloc(4)])), /an extent of 8 bytes with 4 bytes of data/],
      [frame(header(0, 0, 1)), /extent of length 0/],
      [frame(Buffer.alloc(5)), new RegExp(`disk extent frame of 5 bytes at stream offset ${p}`)],
      [Buffer.concat([encodeFrameHeader(FrameType.DiskExtent, 13 + 4 * MiB + 1)]), /plus at most 4194304 of data/],
      [frame(header(2 ** 60, 4096, 1)), /out of range/],
    ];
    for (const [bytes, message] of cases) {
      expect(at(bytes, prefix)).toThrow(FrameError);
      expect(at(bytes, prefix)).toThrow(message);
    }
    // the same bytes split anywhere give the same error
    const split = new FrameDecoder();
    const bad = Buffer.concat([prefix, cases[0]![0]]);
    split.push(bad.subarray(0, p + 9));
    expect(() => split.push(bad.subarray(p + 9))).toThrow(cases[0]![1]);
  });
});
