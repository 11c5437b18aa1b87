import { describe, expect, it } from 'vitest';
import {
  DeviceStateError,
  DeviceStateSet,
  MigrationStreamError,
  createStreamVerifier,
  decodeKvmclockSection,
  decodeTimerSection,
  encodeKvmclockSection,
  encodeRecords,
  encodeTimerSection,
  parseMigrationStream,
} from '../src/stream/index.js';
import { syntheticDevices, syntheticStream } from './fixtures-synthetic.js';

describe('DeviceStateSet', () => {
  const s = syntheticStream();
  const records = parseMigrationStream(s.bytes);

  it('finds sections by idstr and instance', () => {
    const set = new DeviceStateSet(records);
    expect(set.sections.map((d) => d.idstr)).toEqual(s.devices.map((d) => d.idstr));
    expect(set.findSection('timer')).toMatchObject({ sectionId: 0, versionId: 2 });
    expect(set.findSection('dma', 1)).toMatchObject({ sectionId: 13 });
    expect(set.findSection('dma', 0)).toBeUndefined();
    expect(set.findSection('nope')).toBeUndefined();
  });

  it('replaces a body without touching the original records, and the result parses back', () => {
    const set = new DeviceStateSet(records);
    const timer = decodeTimerSection(set.findSection('timer')!);
    const delta = 10_000_000_000n;
    set.replaceSectionBody('timer', encodeTimerSection({ ...timer, cpuClockOffsetNs: timer.cpuClockOffsetNs + delta }));
    expect(decodeTimerSection(records.find((r) => r.type === 'device-section' && r.idstr === 'timer') as never).cpuClockOffsetNs).toBe(timer.cpuClockOffsetNs);
    const written = encodeRecords(set.records);
    expect(written.length).toBe(s.bytes.length);
    const again = new DeviceStateSet(parseMigrationStream(written));
    expect(decodeTimerSection(again.findSection('timer')!).cpuClockOffsetNs).toBe(timer.cpuClockOffsetNs + delta);
    expect(again.findSection('timer')!.verified).toBe(true);
  });

  it('refuses a body of another length unless asked, and unknown sections', () => {
    const set = new DeviceStateSet(records);
    expect(() => set.replaceSectionBody('timer', Buffer.alloc(25))).toThrow(DeviceStateError);
    expect(() => set.replaceSectionBody('nope', Buffer.alloc(1))).toThrow(/no device section 'nope'/);
    const changed = set.replaceSectionBody('timer', Buffer.alloc(25), { allowLengthChange: true });
    expect(changed.body.length).toBe(25);
    // QEMU skips the description on load, but this parser checks it: the stream is now inconsistent.
    expect(() => parseMigrationStream(encodeRecords(set.records))).toThrow(MigrationStreamError);
  });
});

describe('timer section', () => {
  it('decodes and encodes version 2 exactly', () => {
    const body = Buffer.from('00000001ca37dfd9' + '0000000000000000' + '00000000bb60aea5', 'hex');
    const t = decodeTimerSection(body);
    expect(t).toMatchObject({ cpuTicksOffset: 7_687_626_713n, cpuClockOffsetNs: 3_143_675_557n });
    expect(encodeTimerSection(t).equals(body)).toBe(true);
    const withIcount = Buffer.concat([body, Buffer.from([5, 1, 2, 3])]);
    expect(encodeTimerSection(decodeTimerSection(withIcount)).equals(withIcount)).toBe(true);
  });

  it('rejects other sections, versions and short bodies', () => {
    const base = { type: 'device-section' as const, sectionId: 0, instanceId: 0, body: Buffer.alloc(24), verified: true };
    expect(() => decodeTimerSection({ ...base, idstr: 'timer', versionId: 1 })).toThrow(/version 1/);
    expect(() => decodeTimerSection({ ...base, idstr: 'cpu', versionId: 2 })).toThrow(/not the timer/);
    expect(() => decodeTimerSection(Buffer.alloc(23))).toThrow(DeviceStateError);
  });
});

describe('kvmclock section', () => {
  it('decodes and encodes the clock with and without clock_is_reliable', () => {
    const s = syntheticStream();
    const set = new DeviceStateSet(parseMigrationStream(s.bytes));
    const k = decodeKvmclockSection(set.findSection('kvmclock')!);
    expect(k).toEqual({ clockNs: 123_456_789_000n, clockIsReliable: true, subsectionVersion: 1 });
    expect(encodeKvmclockSection(k).equals(set.findSection('kvmclock')!.body)).toBe(true);
    const plain = encodeKvmclockSection({ clockNs: 5n, clockIsReliable: undefined });
    expect(plain.length).toBe(8);
    expect(decodeKvmclockSection(plain)).toEqual({ clockNs: 5n, clockIsReliable: undefined });
    expect(() => decodeKvmclockSection(Buffer.alloc(12))).toThrow(/clock_is_reliable/);
  });
});

describe('stream verifier (for the checkpoint store)', () => {
  const s = syntheticStream();

  it('accepts a whole stream fed in pieces and summarises it', () => {
    const v = createStreamVerifier();
    for (let p = 0; p < s.bytes.length; p += 777) v.update(s.bytes.subarray(p, p + 777));
    expect(v.end()).toEqual({
      bytes: s.bytes.length,
      records: expect.any(Number),
      ramPages: 7,
      deviceSections: s.devices.length,
      hasDescription: true,
      ramBlocks: [{ id: 'pc.ram', bytes: 1 << 20 }, { id: '/rom@etc/acpi/tables', bytes: 128 << 10 }, { id: 'pc.bios', bytes: 256 << 10 }],
      // the synthetic stream carries a handful of pages: an incremental one, to the store
      fullRam: false,
      ramGap: { block: 'pc.ram', missingPages: 251 },
      layout: { ramSectionId: 2, preambleEnd: s.at.ramStart, ramSetupEnd: s.at.firstPage, deviceStateStart: s.at.devices },
      // the timer section's cpu_clock_offset: the VM's virtual clock at the freeze
      guestClockNs: 3_143_675_557n,
    });
  });

  it('reports no guest clock without a timer section, or with one of a layout it does not know, and still accepts the stream', () => {
    for (const devices of [
      syntheticDevices().filter((d) => d.idstr !== 'timer'),
      syntheticDevices().map((d) => (d.idstr === 'timer' ? { ...d, versionId: 3, desc: { ...d.desc, version: 3 } } : d)),
    ]) {
      const stream = syntheticStream({ devices });
      const v = createStreamVerifier();
      v.update(stream.bytes);
      const summary = v.end();
      expect(summary.deviceSections).toBe(devices.length);
      expect(summary.guestClockNs).toBeUndefined();
    }
  });

  it('never throws from update(); end() reports a cut or garbled stream', () => {
    const cut = createStreamVerifier();
    cut.update(s.bytes.subarray(0, 1000));
    expect(() => cut.end()).toThrow(MigrationStreamError);
    const garbled = createStreamVerifier();
    expect(() => garbled.update(Buffer.from('not a stream'))).not.toThrow();
    expect(() => garbled.update(Buffer.from('more'))).not.toThrow();
    expect(() => garbled.end()).toThrow(/magic/);
  });
});
