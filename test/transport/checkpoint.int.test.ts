import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Checkpointer } from '@ftvm/coordinator';
import { CheckpointStore, openRemoteReceiver, parseMigrationStream, ReplicationError, type ReplicationSender, type SshConnection } from '@ftvm/transport';
import { execIn, hostInfo, labUp } from '../lab/lab.js';
import { connectLabSsh } from '../support/lab-ssh.js';
import { waitForProbe } from '../support/probe-client.js';
import { patchedQemu } from '../support/patched-qemu.js';
import { restoreCheckpoint, startProbeVm, type ProbeVm } from '../support/probe-vm.js';

// Continuous checkpoints of a libvirt domain on `primary`, over SSH into the store on `backup`.
const VM = 'ckpt-probe';
const STORE_INSIDE = `/var/lib/libvirt/ftvm/${VM}`;
const storeOutside = () => path.join(hostInfo('backup').libvirtLibDir, 'ftvm', VM);

let vm: ProbeVm;
let ssh: SshConnection;
let checkpointer: Checkpointer;
let receiver: { sender: ReplicationSender; stderr: () => string };

beforeAll(async () => {
  await labUp();
  fs.rmSync(storeOutside(), { recursive: true, force: true });
  vm = await startProbeVm({ host: 'primary', name: VM, workloadMiBps: 4, emulator: patchedQemu() });
  ssh = await connectLabSsh('backup');
  receiver = await openRemoteReceiver(ssh, { storeDir: STORE_INSIDE, keep: 3 });
  checkpointer = await Checkpointer.create({
    vm: VM,
    qmp: vm.qmp,
    socketPath: vm.paths.migrationOutside,
    qemuSocketPath: vm.paths.migration,
    qemuVersion: '7.2',
    domainXml: vm.xml,
  });
});

afterAll(async () => {
  await checkpointer?.close();
  receiver?.sender.close();
  ssh?.close();
  await vm?.destroy();
});

function checkpoint(epoch: number) {
  return checkpointer.checkpoint(epoch, receiver.sender).catch((e: Error) => {
    throw new Error(`${e.message}; receiver stderr: ${receiver.stderr()}`);
  });
}

async function expectPrimaryRunning(): Promise<void> {
  expect(await vm.qmp.execute('query-status')).toMatchObject({ status: 'running' });
  await waitForProbe(vm.probe, 5_000);
}

describe('continuous checkpoints, primary → backup over SSH', () => {
  it('commits successive checkpoints on the backup, the VM running between them: a full one, then increments', async () => {
    expect(checkpointer.incremental).toBe(true);
    const results = [];
    for (const epoch of [1, 2, 3]) {
      const result = await checkpoint(epoch);
      const pauseMs = Number(result.resumeNs - result.stopNs) / 1e6;
      console.log(`epoch ${epoch}: ${(result.bytes / 1e6).toFixed(1)} MB in ${result.durationMs.toFixed(0)} ms, pause ${pauseMs.toFixed(2)} ms, base ${result.base}`);
      expect(pauseMs).toBeGreaterThan(0);
      results.push(result);
      await expectPrimaryRunning();
    }
    expect(results.map((r) => r.base)).toEqual([undefined, 1, 2]);
    expect(results[0]!.bytes).toBeGreaterThan(20_000_000); // the whole guest
    // the guest writes 4 MiB/s: an increment is what changed in about a second, not the guest
    expect(results[1]!.bytes).toBeLessThan(results[0]!.bytes / 4);
    expect(results[2]!.bytes).toBeLessThan(results[0]!.bytes / 4);
    const store = await new CheckpointStore(storeOutside(), 3).open();
    expect(await store.epochs()).toEqual([1, 2, 3]);
    const meta = await store.verify(3);
    expect(meta.base).toBe(2);
    expect(BigInt(meta.resumeNs) > BigInt(meta.stopNs)).toBe(true);
    expect(meta.domainXml).toContain(VM);
  });

  it('keeps the primary running and the previous checkpoint intact when the receiver dies mid-checkpoint', async () => {
    const store = await new CheckpointStore(storeOutside(), 3).open();
    const before = await store.verify(3);
    // a full one, so that 150 ms in the stream is still flowing
    const attempt = checkpointer.checkpoint(4, receiver.sender, { full: true }).catch((e: unknown) => e);
    await new Promise((r) => setTimeout(r, 150)); // the stream is flowing by now
    await execIn('backup', ['pkill', '-KILL', '-f', 'ftvm-receive']);
    const error = await attempt;
    expect(error).toBeInstanceOf(ReplicationError);
    await expectPrimaryRunning();
    expect(await store.epochs()).toEqual([1, 2, 3]);
    expect(await store.verify(3)).toEqual(before);
    expect(await store.latestEpoch()).toBe(3); // the killed receiver's partial file is never "latest"
    // A new receiver cleans up what the killed one left and picks up from there.
    receiver = await openRemoteReceiver(ssh, { storeDir: STORE_INSIDE, keep: 3 });
    // the failed checkpoint broke the chain: the next one is full
    await expect(checkpointer.checkpoint(5, receiver.sender)).resolves.toMatchObject({ epoch: 5, base: undefined });
    // the newest three, and checkpoint 1 that 2 and 3 build on
    expect(await store.epochs()).toEqual([1, 2, 3, 5]);
    expect(fs.readdirSync(storeOutside()).filter((f) => f.endsWith('.tmp'))).toEqual([]);
  });

  it('detects a stored checkpoint with a flipped byte and falls back to the previous one', async () => {
    const store = await new CheckpointStore(storeOutside(), 3).open();
    const file = store.dataPath(5);
    const copy = `${file}.orig`;
    fs.copyFileSync(file, copy);
    try {
      const fd = fs.openSync(file, 'r+');
      const offset = Math.floor(fs.fstatSync(fd).size / 2);
      const byte = Buffer.alloc(1);
      fs.readSync(fd, byte, 0, 1, offset);
      byte[0] = byte[0]! ^ 0xff;
      fs.writeSync(fd, byte, 0, 1, offset);
      fs.closeSync(fd);
      const corrupt: string[] = [];
      const latest = await store.latestVerified((e) => corrupt.push(e.message));
      expect(latest?.metadata.epoch).toBe(3);
      expect(corrupt[0]).toContain('checkpoint 5 is corrupt');
    } finally {
      fs.renameSync(copy, file);
    }
  });

  it('loads the newest committed checkpoint, a full one and two increments flattened, into a fresh domain on the backup, and the probe answers there', async () => {
    await checkpoint(6);
    const before7 = await waitForProbe(vm.probe, 5_000);
    expect((await checkpoint(7)).base).toBe(6);
    const store = await new CheckpointStore(storeOutside(), 3).open();
    const latest = await store.latestVerified();
    expect(latest?.metadata.epoch).toBe(7);
    expect(latest?.chain.map((m) => m.epoch)).toEqual([5, 6, 7]);
    const flat = path.join(fs.mkdtempSync('/tmp/ftvm-ckpt-'), 'epoch-7.mig');
    fs.writeFileSync(flat, store.read(latest!));
    const restored = await startProbeVm({ host: 'backup', name: VM, incoming: true, emulator: patchedQemu() });
    try {
      const { loadMs } = await restoreCheckpoint(restored, flat);
      console.log(`restored epoch 7 (chain 5-6-7, ${fs.statSync(flat).size} bytes flattened) on backup in ${loadMs.toFixed(0)} ms`);
      const reply = await waitForProbe(restored.probe, 10_000);
      expect(restored.probe.host).toBe(hostInfo('backup').ip);
      expect(reply.bootId).toBe(before7.bootId); // the same guest, continued — not a fresh boot
      // its memory is as of checkpoint 7: the workload had counted past what it had before 7
      expect(reply.workloadCounter).toBeGreaterThanOrEqual(before7.workloadCounter);
    } finally {
      await restored.destroy();
      fs.rmSync(path.dirname(flat), { recursive: true, force: true });
    }
  });

  it('assembles a chain to exactly the guest memory QEMU holds at its last checkpoint', async () => {
    await checkpoint(8);
    // the switchover's kind of checkpoint: incremental, and the VM stays stopped after it
    const last = await checkpointer.checkpoint(9, receiver.sender, { leaveStopped: true });
    expect(last.base).toBe(8);
    expect(await vm.qmp.execute('query-status')).toMatchObject({ running: false });
    try {
      const store = await new CheckpointStore(storeOutside(), 3).open();
      const latest = (await store.latestVerified())!;
      expect(latest.chain.length).toBeGreaterThanOrEqual(3); // a full one and increments up to 9
      const chainRam = ramImage(store.read(latest)).get('pc.ram')!;
      // nothing ran since: QEMU's own copy of guest RAM must be the very same bytes
      const dump = 'ckpt-compare.mem';
      await vm.qmp.execute('pmemsave', { val: 0, size: chainRam.length, filename: `${vm.paths.run}/${dump}` });
      const dumpPath = path.join(hostInfo('primary').runDir, 'ftvm', dump);
      const memory = fs.readFileSync(dumpPath);
      fs.rmSync(dumpPath, { force: true });
      expect(memory.length).toBe(chainRam.length);
      // 0xa0000–0xfffff is VGA and ROM in the physical address space, not pc.ram
      for (const [from, to] of [[0, 0xa0000], [0x100000, chainRam.length]] as const) {
        const differs = firstDifference(chainRam.subarray(from, to), memory.subarray(from, to));
        expect(differs === -1 ? 'identical' : `first difference at guest physical 0x${(from + differs).toString(16)}`).toBe('identical');
      }
    } finally {
      await vm.qmp.execute('cont');
    }
  });
});

/** Every RAM block's content as a stream leaves it (pages in stream order, zero pages zero-filled). */
function ramImage(stream: Buffer): Map<string, Buffer> {
  const images = new Map<string, Buffer>();
  for (const r of parseMigrationStream(stream)) {
    if (r.type === 'ram-mem-size') for (const b of r.blocks) images.set(b.idstr, Buffer.alloc(b.usedLength));
    else if (r.type === 'ram-page') r.data.copy(images.get(r.block)!, r.addr);
    else if (r.type === 'ram-zero') images.get(r.block)!.fill(r.fill, r.addr, r.addr + 4096);
  }
  return images;
}

function firstDifference(a: Buffer, b: Buffer): number {
  if (a.equals(b)) return -1;
  for (let page = 0; page < a.length; page += 4096) {
    if (!a.subarray(page, page + 4096).equals(b.subarray(page, page + 4096))) return page;
  }
  return a.length;
}
