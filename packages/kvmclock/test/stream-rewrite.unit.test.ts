import fs from 'node:fs';
import { PassThrough } from 'node:stream';
import zlib from 'node:zlib';
import { describe, expect, it } from 'vitest';
import {
  decodeTimerSection,
  DeviceStateSet,
  encodeRecords,
  encodeTimerSection,
  parseMigrationStream,
  type DeviceSectionRecord,
  type VmDescriptionVmsd,
} from '@ftvm/transport';
import { advanceClockSections, checkpointStopInstant, checkpointVirtualClockNs, loadAndResumeOnTime, splitCheckpoint } from '../src/index.js';

// A real checkpoint of the probe guest (test/guest) under QEMU 7.2 TCG, `migrate` of a plain
// `bootGuest()` VM ~6 s after boot, with the RAM records dropped: header, configuration, every
// device section, EOF and the VM description (206 915 bytes; gzip 8 KB).
const FIXTURE = new URL('./fixtures/probe-guest-tcg-device-state.bin.gz', import.meta.url);
const stream = zlib.gunzipSync(fs.readFileSync(FIXTURE));

function deviceState(): DeviceStateSet {
  return new DeviceStateSet(parseMigrationStream(stream));
}

/** Byte offset and size of each top-level field of a section, from the VM description. */
function fieldOffsets(vmsd: VmDescriptionVmsd): Map<string, { offset: number; size: number }> {
  const out = new Map<string, { offset: number; size: number }>();
  let offset = 0;
  for (const f of vmsd.fields ?? []) {
    out.set(f.name, { offset, size: f.size });
    offset += f.size * (f.array_len ?? 1);
  }
  return out;
}

describe('advanceClockSections on a real TCG checkpoint', () => {
  it('advances the timer section by Δ ns and Δ × ticks/ns ticks, exactly, and nothing else', () => {
    const state = deviceState();
    const before = decodeTimerSection(state.findSection('timer')!);
    const others = state.sections.filter((s) => s.idstr !== 'timer').map((s) => [s.idstr, s.instanceId, Buffer.from(s.body)] as const);
    const deltaNs = 6_123_456_789n;

    const [advance, ...rest] = advanceClockSections(state, deltaNs);
    expect(rest).toEqual([]); // TCG: no kvmclock section
    const after = decodeTimerSection(state.findSection('timer')!);
    const expectedTicks = (deltaNs * before.cpuTicksOffset + before.cpuClockOffsetNs / 2n) / before.cpuClockOffsetNs;
    expect(advance).toMatchObject({ section: 'timer', deltaNs, deltaTicks: expectedTicks });
    expect(after.cpuClockOffsetNs - before.cpuClockOffsetNs).toBe(deltaNs);
    expect(after.cpuTicksOffset - before.cpuTicksOffset).toBe(expectedTicks);
    // This host's TSC rate: ~2.4 ticks per ns.
    expect(advance!.ticksPerNs).toBeGreaterThan(1);
    expect(advance!.ticksPerNs).toBeLessThan(10);
    for (const [idstr, instanceId, body] of others) expect(state.findSection(idstr, instanceId)!.body.equals(body)).toBe(true);

    // The rewritten stream still matches its own VM description, section by section.
    const again = parseMigrationStream(encodeRecords(state.records));
    const sections = again.filter((r): r is DeviceSectionRecord => r.type === 'device-section');
    expect(sections.length).toBe(others.length + 1);
    expect(sections.every((s) => s.verified)).toBe(true);
    expect(decodeTimerSection(sections.find((s) => s.idstr === 'timer')!).cpuClockOffsetNs).toBe(after.cpuClockOffsetNs);
  });

  it('has no TSC state in the cpu section to rewrite under TCG', () => {
    const records = parseMigrationStream(stream);
    const desc = records.find((r) => r.type === 'vm-description')!;
    if (desc.type !== 'vm-description') throw new Error('unreachable');
    const cpuDesc = desc.description.devices.find((d) => d.name === 'cpu')!;
    const cpu = new DeviceStateSet(records).findSection('cpu')!;
    const fields = fieldOffsets(cpuDesc);
    for (const name of ['env.tsc', 'env.tsc_offset']) {
      const f = fields.get(name)!;
      expect(f.size).toBe(8);
      expect(cpu.body.readBigUInt64BE(f.offset)).toBe(0n); // RDTSC under TCG is cpu_get_ticks() + the SVM offset
    }
    const subsections = (cpuDesc.subsections ?? []).map((s) => s.vmsd_name);
    expect(subsections).not.toContain('cpu/msr_tsc_adjust');
    expect(subsections).not.toContain('cpu/msr_tscdeadline');
    // HPET follows the virtual clock through its saved offset.
    expect(desc.description.devices.find((d) => d.name === 'hpet')!.subsections?.map((s) => s.vmsd_name)).toContain('hpet/offset');
  });

  it('refuses state that is not a stopped VM, and streams without clock sections', () => {
    const state = deviceState();
    const timer = decodeTimerSection(state.findSection('timer')!);
    state.replaceSectionBody('timer', encodeTimerSection({ ...timer, cpuClockOffsetNs: 0n }));
    expect(() => advanceClockSections(state, 1n)).toThrow(/non-positive clock/);
    const none = new DeviceStateSet(parseMigrationStream(stream).filter((r) => !(r.type === 'device-section' && r.idstr === 'timer')));
    expect(() => advanceClockSections(none, 1n)).toThrow(/neither a TCG timer nor a kvmclock/);
  });
});

describe('checkpointStopInstant', () => {
  const clock = checkpointVirtualClockNs(deviceState());

  it('dates the freeze from the last resume and the virtual clock it ran since', () => {
    const reference = { resumeNs: 1_700_000_000_000_000_000n, virtualClockNs: clock - 2_000_000_000n };
    const freeze = reference.resumeNs + 2_000_000_000n;
    const stop = checkpointStopInstant(stream, { stopEventNs: freeze + 900_000n, reference });
    expect(stop).toEqual({ stopNs: freeze, source: 'stream', stopEventLatenessNs: 900_000n });
  });

  it('falls back to the STOP stamp without a reference, or with one that does not fit', () => {
    expect(checkpointStopInstant(stream, { stopEventNs: 5n })).toEqual({ stopNs: 5n, source: 'stop-event' });
    const resumeNs = 1_700_000_000_000_000_000n;
    // Derived freeze after the STOP stamp: not this VM's last resume.
    const early = checkpointStopInstant(stream, { stopEventNs: resumeNs + 1_000_000_000n, reference: { resumeNs, virtualClockNs: clock - 2_000_000_000n } });
    expect(early).toMatchObject({ stopNs: resumeNs + 1_000_000_000n, source: 'stop-event', rejected: expect.stringMatching(/after the STOP stamp/) });
    // STOP far later than the derived freeze: an unseen pause in between.
    const paused = checkpointStopInstant(stream, { stopEventNs: resumeNs + 3_000_000_000n, reference: { resumeNs, virtualClockNs: clock - 2_000_000_000n } });
    expect(paused).toMatchObject({ source: 'stop-event', rejected: expect.stringMatching(/pause/) });
    // A reference from a later point of the clock than the checkpoint.
    expect(checkpointStopInstant(stream, { stopEventNs: resumeNs, reference: { resumeNs, virtualClockNs: clock + 1n } })).toMatchObject({ source: 'stop-event' });
  });
});

describe('loadAndResumeOnTime', () => {
  /** A QMP stand-in for an incoming QEMU started with -S: loads when the channel ends, resumes on `cont`. */
  function fakeIncoming(sink: PassThrough, options: { autostart?: boolean; loadMs?: number } = {}) {
    const log: string[] = [];
    const listeners = new Set<(name: string, data: unknown) => void>();
    let running = false;
    let ended = false;
    let loadedAt = 0n;
    const chunks: Buffer[] = [];
    sink.on('data', (c: Buffer) => chunks.push(c));
    const emit = (name: string, data: unknown) => {
      log.push(name);
      for (const l of [...listeners]) l(name, data);
    };
    sink.on('end', () => {
      ended = true;
      setTimeout(() => {
        loadedAt = process.hrtime.bigint();
        emit('MIGRATION', { status: 'completed' });
        if (options.autostart) running = true;
      }, options.loadMs ?? 5);
    });
    sink.resume();
    const qmp = {
      execute: async (command: string) => {
        log.push(command);
        if (command === 'query-status') return { status: running ? 'running' : 'paused', running };
        if (command === 'cont') {
          if (!ended) throw new Error('cont before the load');
          running = true;
          emit('RESUME', {});
        }
        return {};
      },
      waitForEvent: (name: string, opts: { predicate?: (e: never) => boolean } = {}) =>
        new Promise((resolve) => {
          const l = (n: string, data: unknown) => {
            const event = { event: n, data, timestampNs: BigInt(Date.now()) * 1_000_000n };
            if (n === name && (!opts.predicate || opts.predicate(event as never))) {
              listeners.delete(l);
              resolve(event);
            }
          };
          listeners.add(l);
        }),
    };
    return { qmp: qmp as never, log, received: () => Buffer.concat(chunks), loadedAt: () => loadedAt };
  }

  it('sends RAM, then the rewritten device state, and resumes at the target, not at load completion', async () => {
    const sink = new PassThrough();
    const fake = fakeIncoming(sink, { loadMs: 5 });
    const stopNs = BigInt(Date.now()) * 1_000_000n - 3_000_000_000n;
    const result = await loadAndResumeOnTime({ qmp: fake.qmp, sink, checkpoint: stream, stopNs, marginNs: 40_000_000n });
    expect(result.deltaNs).toBe(result.targetNs - stopNs);
    expect(result.targetNs - result.rewriteNs).toBe(40_000_000n);
    expect(result.overrun).toBe(false);
    expect(result.contSentNs).toBeGreaterThanOrEqual(result.targetNs - result.qmpRoundTripNs);
    expect(fake.log.indexOf('cont')).toBeGreaterThan(fake.log.indexOf('MIGRATION'));
    expect(fake.log.filter((c) => c === 'cont')).toHaveLength(1);
    // What QEMU received is the checkpoint with only the timer section changed.
    const got = new DeviceStateSet(parseMigrationStream(fake.received()));
    const want = splitCheckpoint(stream).deviceState;
    advanceClockSections(want, result.deltaNs);
    expect(got.findSection('timer')!.body.equals(want.findSection('timer')!.body)).toBe(true);
  });

  it('refuses to go on when autostart already resumed the VM at load completion', async () => {
    const sink = new PassThrough();
    const fake = fakeIncoming(sink, { autostart: true });
    const stopNs = BigInt(Date.now()) * 1_000_000n - 1_000_000_000n;
    await expect(loadAndResumeOnTime({ qmp: fake.qmp, sink, checkpoint: stream, stopNs, marginNs: 20_000_000n })).rejects.toThrow(/autostart/);
  });

  it('reports an overrun when the load outlasts the margin', async () => {
    const sink = new PassThrough();
    const fake = fakeIncoming(sink, { loadMs: 30 });
    const stopNs = BigInt(Date.now()) * 1_000_000n - 1_000_000_000n;
    const result = await loadAndResumeOnTime({ qmp: fake.qmp, sink, checkpoint: stream, stopNs, marginNs: 1_000_000n });
    expect(result.overrun).toBe(true);
    expect(result.lateNs).toBeGreaterThan(0n);
  });
});
