import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  DeviceStateSet,
  MigrationStreamParser,
  decodeTimerSection,
  encodeRecords,
  encodeTimerSection,
  parseMigrationStream,
  type DeviceSectionRecord,
  type MigrationRecord,
} from '../src/stream/index.js';
import { loadFromFile, makeStream, migrateToFile, startVm, type Vm } from './fixtures-qemu.js';
import { runFuzz } from './stream-fuzz.js';

// Real streams from QEMU 7.2 (TCG, firmware only), made once per run in a temp dir.
let dir: string;
// A device-rich VM too: virtio devices save through custom put() functions, VGA adds a RAM block.
const DEVICES = [
  '-smp', '2',
  '-netdev', 'user,id=n0', '-device', 'virtio-net-pci,netdev=n0,romfile=',
  '-netdev', 'user,id=n1', '-device', 'e1000,netdev=n1,romfile=',
  '-device', 'virtio-serial', '-device', 'virtio-balloon', '-device', 'virtio-rng-pci',
  '-device', 'piix3-usb-uhci', '-device', 'usb-tablet', '-device', 'isa-serial', '-device', 'VGA',
];
const streams: Record<'pc64' | 'q35' | 'pc256' | 'devices', { file: string; memMiB: number; machine?: string; extraArgs?: string[] }> = {
  pc64: { file: '', memMiB: 64 },
  q35: { file: '', memMiB: 64, machine: 'q35' },
  pc256: { file: '', memMiB: 256 },
  devices: { file: '', memMiB: 128, extraArgs: DEVICES },
};
const vms: Vm[] = [];

beforeAll(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ftvm-stream-int-'));
  for (const [name, s] of Object.entries(streams)) {
    s.file = await makeStream({ dir, name, memMiB: s.memMiB, ...(s.machine ? { machine: s.machine } : {}), ...(s.extraArgs ? { extraArgs: s.extraArgs } : {}) });
  }
});

afterAll(async () => {
  for (const vm of vms) await vm.kill();
  fs.rmSync(dir, { recursive: true, force: true });
});

function read(name: keyof typeof streams): Buffer {
  return fs.readFileSync(streams[name].file);
}

function deviceSections(records: MigrationRecord[]): DeviceSectionRecord[] {
  return records.filter((r): r is DeviceSectionRecord => r.type === 'device-section');
}

describe.each(Object.keys(streams) as Array<keyof typeof streams>)('real stream %s', (name) => {
  it('parses completely and writes back byte for byte', () => {
    const bytes = read(name);
    const records = parseMigrationStream(bytes);
    expect(encodeRecords(records).equals(bytes)).toBe(true);

    const config = records[1];
    expect(config).toMatchObject({ type: 'configuration', machineType: name === 'q35' ? 'pc-q35-7.2' : 'pc-i440fx-7.2' });
    const memSize = records.find((r) => r.type === 'ram-mem-size');
    expect(memSize?.type === 'ram-mem-size' && memSize.blocks.find((b) => b.idstr === 'pc.ram')?.usedLength).toBe(streams[name].memMiB << 20);
    const sections = deviceSections(records);
    expect(sections.length).toBeGreaterThan(20);
    expect(sections.every((s) => s.verified)).toBe(true);
    const desc = records.at(-1);
    expect(desc?.type === 'vm-description' && desc.description.devices.map((d) => d.name)).toEqual(sections.map((s) => s.idstr));
    expect(sections.map((s) => s.idstr)).toEqual(expect.arrayContaining(['timer', 'cpu', 'apic', 'globalstate']));
  });
});

describe('fuzzing with real streams (worker thread, per-run watchdog)', () => {
  it('gives the same records for 100 random chunkings, 1-byte chunks included', async () => {
    const result = await runFuzz({ stream: read('pc64'), mode: 'split', runs: 100, seed: 7 }, 20_000);
    expect(result.failures).toEqual([]);
    expect(result.outcomes).toEqual({ ok: 100 });
  }, 170_000);

  it('answers cuts at random offsets with a MigrationStreamError (or a valid parse)', async () => {
    const result = await runFuzz({ stream: read('q35'), mode: 'truncate', runs: 150, seed: 8 }, 20_000);
    expect(result.failures).toEqual([]);
    expect(result.outcomes.TRUNCATED).toBeGreaterThan(140);
  }, 170_000);

  it('answers flipped bytes with a MigrationStreamError (or a valid parse)', async () => {
    const result = await runFuzz({ stream: read('pc64'), mode: 'corrupt', runs: 150, seed: 9 }, 20_000);
    expect(result.failures).toEqual([]);
  }, 170_000);
});

describe('the TCG timer section', () => {
  it('holds sane absolute values while the VM is stopped', () => {
    const set = new DeviceStateSet(parseMigrationStream(read('pc64')));
    const section = set.findSection('timer');
    expect(section).toMatchObject({ versionId: 2, instanceId: 0 });
    const t = decodeTimerSection(section!);
    expect(t.unused.equals(Buffer.alloc(8))).toBe(true);
    expect(t.subsections.length).toBe(0);
    // The VM ran about a second before the migration.
    expect(t.cpuClockOffsetNs).toBeGreaterThan(100_000_000n);
    expect(t.cpuClockOffsetNs).toBeLessThan(120_000_000_000n);
    const ticksPerNs = Number(t.cpuTicksOffset) / Number(t.cpuClockOffsetNs);
    expect(ticksPerNs).toBeGreaterThan(0.3); // host TSC rate in GHz
    expect(ticksPerNs).toBeLessThan(10);
  });

  it('rewritten (+100 s), is accepted by a fresh QEMU, which runs on from the new clock', async () => {
    const records = parseMigrationStream(read('pc64'));
    const set = new DeviceStateSet(records);
    const t = decodeTimerSection(set.findSection('timer')!);
    const deltaNs = 100_000_000_000n;
    const ratio = Number(t.cpuTicksOffset) / Number(t.cpuClockOffsetNs);
    const deltaTicks = BigInt(Math.round(Number(deltaNs) * ratio));
    set.replaceSectionBody('timer', encodeTimerSection({ ...t, cpuTicksOffset: t.cpuTicksOffset + deltaTicks, cpuClockOffsetNs: t.cpuClockOffsetNs + deltaNs }));
    const modified = path.join(dir, 'pc64-timer.mig');
    fs.writeFileSync(modified, encodeRecords(set.records));

    const vm = await startVm({ dir, name: 'dest', memMiB: 64, incoming: true });
    vms.push(vm);
    await loadFromFile(vm, modified);
    expect(await vm.qmp.run('query-status')).toMatchObject({ status: 'running' });

    // Migrate the destination out again: its clock continued from the rewritten value.
    const again = path.join(dir, 'pc64-again.mig');
    await migrateToFile(vm, again);
    await vm.kill();
    const t2 = decodeTimerSection(new DeviceStateSet(parseMigrationStream(fs.readFileSync(again))).findSection('timer')!);
    const advanced = t2.cpuClockOffsetNs - t.cpuClockOffsetNs;
    expect(advanced).toBeGreaterThanOrEqual(deltaNs);
    expect(advanced).toBeLessThan(deltaNs + 60_000_000_000n);
    expect(t2.cpuTicksOffset - t.cpuTicksOffset).toBeGreaterThanOrEqual(deltaTicks);
  });

  it.each(['q35', 'devices'] as const)('a %s stream re-encoded by the writer loads too', async (name) => {
    const s = streams[name];
    const reencoded = path.join(dir, `${name}-reencoded.mig`);
    fs.writeFileSync(reencoded, encodeRecords(parseMigrationStream(read(name))));
    const vm = await startVm({
      dir,
      name: `dest-${name}`,
      memMiB: s.memMiB,
      incoming: true,
      ...(s.machine ? { machine: s.machine } : {}),
      ...(s.extraArgs ? { extraArgs: s.extraArgs } : {}),
    });
    vms.push(vm);
    await loadFromFile(vm, reencoded);
    expect(await vm.qmp.run('query-status')).toMatchObject({ status: 'running' });
    await vm.kill();
  });
});

describe('throughput', () => {
  async function measure(file: string, highWaterMark: number): Promise<{ mbPerS: number; recordsPerS: number; records: number; bytes: number }> {
    const bytes = fs.statSync(file).size;
    let best = Infinity;
    let records = 0;
    for (let rep = 0; rep < 3; rep++) {
      const parser = new MigrationStreamParser();
      let n = 0;
      const t0 = performance.now();
      for await (const chunk of fs.createReadStream(file, { highWaterMark })) parser.push(chunk as Buffer, () => n++);
      parser.end(() => n++);
      best = Math.min(best, (performance.now() - t0) / 1000);
      records = n;
    }
    return { mbPerS: bytes / 1e6 / best, recordsPerS: records / best, records, bytes };
  }

  it('parses a 256 MiB guest stream fast', async () => {
    // 192 MiB of random data in guest RAM (generic loader device) makes most pages real pages.
    const blob = path.join(dir, 'random.bin');
    const fd = fs.openSync(blob, 'w');
    for (let i = 0; i < 192; i++) fs.writeSync(fd, randomBytes(1 << 20));
    fs.closeSync(fd);
    const full = await makeStream({ dir, name: 'rand256', memMiB: 256, extraArgs: ['-device', `loader,file=${blob},addr=0x2000000,force-raw=on`] });
    fs.rmSync(blob);
    const lines: string[] = [];
    for (const [label, file] of [['256 MiB guest, 192 MiB random', full], ['256 MiB guest, firmware only', streams.pc256.file]] as const) {
      for (const hwm of [64 * 1024, 1024 * 1024]) {
        const m = await measure(file, hwm);
        lines.push(`${label}: ${(m.bytes / 1e6).toFixed(1)} MB, ${m.records} records, ${hwm >> 10} KiB chunks: ${m.mbPerS.toFixed(0)} MB/s, ${(m.recordsPerS / 1e6).toFixed(2)} M records/s`);
        if (label.includes('random')) expect(m.mbPerS).toBeGreaterThan(50);
      }
    }
    console.log(`stream parse throughput (file read + parse, best of 3):\n${lines.join('\n')}`);
    fs.rmSync(full);
  });
});
