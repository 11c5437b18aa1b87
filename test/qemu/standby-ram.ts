/**
 * Standalone check of the mapped standby (issue 18) against real QEMU: a standby whose main RAM is
 * a shared file kept current by @ftvm/transport's StandbyRam loads only device state at failover.
 *  - `device-only`: a full checkpoint and an increment committed to a CheckpointStore and applied
 *    to the file of a waiting standby (`-incoming defer`, memory-backend-file share=on as libvirt
 *    makes it); StandbyRam.deviceOnly() with x-ignore-shared set loads in it, the standby then
 *    holds the source's memory at the increment's stop, and runs;
 *  - `refused`: the same stream into a standby without x-ignore-shared is refused by QEMU (the
 *    capability is checked, so a wrong setting cannot load a RAM-less image);
 *  - `cold`: the whole assembled chain loads into a mapped standby with x-ignore-shared off (the
 *    fallback when the file is not warm).
 *
 *   tsx --conditions=@ftvm/source test/qemu/standby-ram.ts [--qemu <binary>] [--only <check>[,<check>]]
 */
import fsSync from 'node:fs';
import fs from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { CheckpointStore, createStreamVerifier, StandbyRam, type CheckpointMetadata } from '@ftvm/transport';
import { RAM_BYTES, runChecks, started, stopped, Vm } from './check-vm.js';
import { check, CheckFailed, stringify } from './checks.js';

const CHECKS = ['device-only', 'refused', 'cold'] as const;
type CheckName = (typeof CHECKS)[number];

/** A source's full checkpoint and one increment, committed; its memory at the increment's stop. */
async function committedChain(binary: string, dir: string): Promise<{ store: CheckpointStore; memory: string }> {
  const out = path.join(dir, 'out.ckpt');
  const uri = `exec:cat > ${out}`;
  const source = await started(Vm.start(binary, 'source'));
  await source.setCaps({ 'x-ftvm-incremental': true });
  await source.runAWhile();
  const store = await new CheckpointStore(path.join(dir, 'store'), 3).open();
  let base: CheckpointMetadata | undefined;
  for (const epoch of [1, 2]) {
    if (epoch > 1) await source.runAWhile();
    const info = await source.migrate(uri);
    if (info.status !== 'completed') throw new CheckFailed(`source migration ${epoch}: ${stringify(info)}`);
    base = await store.commit({
      vm: 'check',
      epoch,
      data: Readable.from([await fs.readFile(out)]),
      stopNs: 1n,
      resumeNs: 2n,
      qemuVersion: '7.2',
      verifier: createStreamVerifier(),
      ...(base ? { base: { epoch: base.epoch, sha256: base.sha256 } } : {}),
    });
  }
  check(base?.base === 1, 'the source committed a full checkpoint and an increment on it', { base: base?.base, bytes: base?.bytes });
  const memory = await source.memoryDigest(); // stopped (postmigrate) since the increment
  await stopped(source);
  return { store, memory };
}

/** A waiting standby whose pc.ram is the shared file `file`, as libvirt's memoryBacking makes it. */
async function mappedStandby(binary: string, name: string, file: string, incoming: string): Promise<Vm> {
  const vm = await started(
    Vm.start(binary, name, ['-object', `memory-backend-file,id=pc.ram,size=${RAM_BYTES},mem-path=${file},share=on`, '-machine', 'memory-backend=pc.ram', '-incoming', 'defer']),
  );
  await vm.qmp.execute('migrate-incoming', { uri: `unix:${incoming}` });
  return vm;
}

/** Sends `parts` into the standby's incoming socket; resolves with how the load ended and how long it took. */
async function send(vm: Vm, incoming: string, parts: Buffer[]): Promise<{ status: string; ms: number; bytes: number }> {
  const ended = vm.qmp.waitForEvent<{ status: string }>('MIGRATION', { timeoutMs: 60_000, predicate: (e) => ['completed', 'failed'].includes(e.data.status) });
  const t0 = performance.now();
  const socket = net.createConnection(incoming);
  socket.on('error', () => undefined); // QEMU closes it when it refuses the stream
  for (const part of parts) socket.write(part);
  socket.end();
  const end = await ended.catch((error: Error) => ({ data: { status: `no end: ${error.message}` } }));
  socket.destroy();
  return { status: end.data.status, ms: Math.round(performance.now() - t0), bytes: parts.reduce((n, p) => n + p.length, 0) };
}

async function deviceOnly(binary: string, dir: string): Promise<void> {
  const { store, memory } = await committedChain(binary, dir);
  const file = path.join(dir, 'pc.ram');
  const incoming = path.join(dir, 'incoming.sock');
  const standby = await mappedStandby(binary, 'standby', file, incoming);
  const ram = new StandbyRam(store, file);
  const applied = await ram.catchUp();
  check(applied.map((a) => a.epoch).join() === '1,2' && ram.epoch === 2, 'the waiting standby\'s RAM file took the full checkpoint and the increment', applied);
  await standby.setCaps({ 'x-ignore-shared': true });
  const only = ram.deviceOnly();
  const load = await send(standby, incoming, [...only.ram, only.deviceState]);
  console.log(`# device-only load: ${load.bytes} bytes in ${load.ms} ms`);
  check(load.status === 'completed', 'the standby loads the device-state-only stream', { load, log: standby.log });
  check(load.bytes < RAM_BYTES / 100, 'that stream carries no main RAM (under 1 % of it)', load.bytes);
  check((await standby.memoryDigest()) === memory, 'the standby holds the source\'s memory at the increment\'s stop');
  await standby.qmp.execute('cont');
  check((await standby.status()) === 'running', 'the standby runs');
}

async function refused(binary: string, dir: string): Promise<void> {
  const { store } = await committedChain(binary, dir);
  const file = path.join(dir, 'pc.ram');
  const incoming = path.join(dir, 'incoming.sock');
  const standby = await mappedStandby(binary, 'refusing', file, incoming);
  const ram = new StandbyRam(store, file);
  await ram.catchUp();
  const only = ram.deviceOnly();
  const load = await send(standby, incoming, [...only.ram, only.deviceState]);
  const ended = await standby.exitWithin(10_000);
  check(load.status !== 'completed' && /x-ignore-shared/.test(standby.log), 'without x-ignore-shared QEMU refuses the stream, naming the capability', { load, ended, log: standby.log.trim() });
}

async function cold(binary: string, dir: string): Promise<void> {
  const { store, memory } = await committedChain(binary, dir);
  const file = path.join(dir, 'pc.ram');
  const incoming = path.join(dir, 'incoming.sock');
  const standby = await mappedStandby(binary, 'cold', file, incoming);
  const latest = (await store.latestVerified())!;
  const assembled = store.assemble(latest);
  const load = await send(standby, incoming, [...assembled.ram, assembled.deviceState]);
  console.log(`# whole-chain load into the mapped standby: ${load.bytes} bytes in ${load.ms} ms`);
  check(load.status === 'completed', 'a mapped standby loads the whole chain with x-ignore-shared off', { load, log: standby.log });
  check((await standby.memoryDigest()) === memory, 'it then holds the source\'s memory at the increment\'s stop');
}

const RUN: Record<CheckName, (binary: string, dir: string) => Promise<void>> = { 'device-only': deviceOnly, refused, cold };

// the RAM file on tmpfs, as a backup keeps it
await runChecks(CHECKS, RUN, { prefix: 'ftvm-standby-ram-', tmpRoot: fsSync.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir() });
