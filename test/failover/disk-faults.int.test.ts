/**
 * Disk replication under faults (issue #15), CI-sized: the probe guest with its two local qcow2
 * disks, protected by the real agents with 1 s checkpoints.
 *
 * - Byte equality and the guest's view, one fault per kill point (test/support/disk-faults.ts):
 *   each pause point holds a process at a precise moment of a checkpoint and the fault goes in
 *   then; the replica the backup resumed on must hash as the primary's fleece did at that
 *   checkpoint, the guest's read-back must find no disk/RAM mismatch, e2fsck of the ext4 replica
 *   must be clean. (`pnpm bench:disk-faults` runs the whole modes × points cycle.)
 * - Backup loss: (a) the backup dies right after committing a checkpoint, before its ack left
 *   (the primary never hears of it), and returns with its store: protection resumes without a
 *   reseed, the next delta (on the older epoch the primary knows) commits on the newest, and a
 *   later failover is byte-exact; (d) a corrupt newest delta: the failover takes the previous
 *   checkpoint, memory and disk together; (b) the backup returns with an empty store: reseed;
 *   (c) its store's file system fills (a tmpfs mounted over the store inside the backup host):
 *   `no-space` nacks, then, with space back, the next checkpoint commits without a reseed and a
 *   failover is byte-exact — the nacked epochs' writes went with it.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execIn, hostInfo, killHost, restartHost } from '../lab/lab.js';
import { sleep } from '../lab/wait.js';
import { checkAfterFailover, clearDiskFaultEnv, committedEpochs, diskFaultEnv, pauseAt, runDiskFault, storeDirHere, type DiskCheck, type KillMode, type KillPoint } from '../support/disk-faults.js';
import { killQemuAndFailOver, reprotectToOther } from '../support/failover-runs.js';
import { agentLogEntries, other, probeOn, reviveHost, startAgent, startCluster, stopCluster, untilAgents, vmStatus, waitProtectedOn, type AgentHost, type Cluster } from '../support/ft-cluster.js';
import { patchedQemu } from '../support/patched-qemu.js';
import { diskCounters } from '../support/probe-client.js';

let cluster: Cluster | undefined;
/** A tmpfs mounted over a host's store of the VM (backup loss c), unmounted at the end. */
let tmpfsOn: { host: AgentHost; dir: string } | undefined;
const PAUSE_MS = 4000;
const STORE_IN_HOST = (vm: string) => path.posix.join('/var/lib/libvirt/ftvm/checkpoints', vm);

beforeAll(async () => {
  diskFaultEnv();
  cluster = await startCluster({ vm: 'ft-disk', emulator: patchedQemu(), checkpointIntervalMs: 1000, fullEvery: 30, disks: { format: 'qcow2', ringMiB: 4, fsMiB: 32 } });
}, 240_000);

afterAll(async () => {
  await stopCluster(cluster);
  if (tmpfsOn) await execIn(tmpfsOn.host, ['umount', '--lazy', tmpfsOn.dir]).nothrow();
  clearDiskFaultEnv();
}, 60_000);

const seedsSince = (host: AgentHost, since: number) => agentLogEntries(host, 'disks seeded').filter((e) => Date.parse(String(e['time'])) >= since).length;

function expectClean(check: DiskCheck, what: string): void {
  expect(check.disks.map((d) => d.disk).sort(), what).toEqual(['vda', 'vdb']);
  for (const d of check.disks) expect(d.replica, `${what}: disk ${d.disk} at epoch ${check.epoch}`).toBe(d.fleece);
  expect(check.equal, what).toBe(true);
  expect(check.guestViolations, `${what}: the guest's read-back`).toBe(0);
  expect(check.ring, `${what}: the ring replica`).toMatchObject({ missing: 0, ok: true });
  expect(check.guestWrites, `${what}: the guest writes on`).toBe(true);
  expect(check.fsckClean, `${what}: ${check.fsckOutput}`).toBe(true);
}

/** Kills the VM's QEMU where it runs, checks what the backup resumed on, and reprotects (a reseed). */
async function failOverAndCheck(what: string, expectEpoch?: number): Promise<DiskCheck> {
  const c = cluster!;
  const from = c.primary;
  const before = await diskCounters(probeOn(from));
  const { record, doubles } = await killQemuAndFailOver(c);
  expect(doubles).toBe(0);
  if (expectEpoch !== undefined) expect(record.lastMove!.epoch, `${what}: the checkpoint resumed`).toBe(expectEpoch);
  const check = await checkAfterFailover(from, c.primary, record.lastMove!.epoch, before);
  expectClean(check, what);
  await reprotectToOther(c);
  return check;
}

describe('disk replication under faults', () => {
  const faults: [KillMode, KillPoint][] = [
    ['kill', 'delta-read'],
    ['partition', 'before-disk-frames'],
    ['freeze', 'before-meta-rename'],
    ['kill', 'mid-apply'],
  ];
  it.each(faults)('%s at %s: the backup resumes on a replica equal to the fleece, and the guest sees no disk/RAM mismatch', async (mode, point) => {
    const run = await runDiskFault(cluster!, mode, point, { pauseMs: PAUSE_MS, log: (line) => console.error(line) });
    console.error(`${mode} at ${point}: paused epoch ${run.hit?.epoch}, resumed ${run.epoch} (staged ${run.stagings}x), failover ${run.failoverS} s, cycle ${run.cycleS} s`);
    expect(run.hit?.point).toBe(point);
    expectClean(run, `${mode} at ${point}`);
    expect(run.reseeded).toBe(true);
  }, 240_000);
});

describe('backup loss', () => {
  it('(a) the backup dies after a commit whose ack never left and returns with its store: no reseed, and the next delta commits on it', async () => {
    const c = cluster!;
    const primary = c.primary;
    const backup = other(primary);
    const store = storeDirHere(backup, c.vm);
    await waitProtectedOn(primary, c.vm, { committedAfter: Date.now() });
    const since = Date.now();
    const hit = await pauseAt('after-meta-rename', 15_000);
    await killHost(backup);
    const lost = hit.epoch!;
    expect(committedEpochs(store), 'the checkpoint committed before the kill').toContain(lost);
    // the primary heard nothing of it
    await sleep(2000);
    expect((await vmStatus(primary, c.vm))?.lastCheckpoint?.epoch).toBeLessThan(lost);
    const revivedAt = Date.now();
    await reviveHost(backup, c);
    await waitProtectedOn(primary, c.vm, { timeoutMs: 90_000, committedAfter: revivedAt });
    expect(seedsSince(primary, since), "the primary's seeds since the kill").toBe(0);
    // the first commit after the return applies on the lost one: its delta named the older base the primary knew
    const after = committedEpochs(store).filter((e) => e > lost);
    expect(after.length).toBeGreaterThan(0);
    const meta = JSON.parse(fs.readFileSync(path.join(store, `${after[0]}.json`), 'utf8')) as { diskBase: unknown };
    expect(meta.diskBase).toEqual({ epoch: lost });
    await failOverAndCheck('after the backup returned with its store');
  }, 300_000);

  it('(d) a corrupt newest delta: the failover takes the previous checkpoint, memory and disk together', async () => {
    const c = cluster!;
    const primary = c.primary;
    const backup = other(primary);
    const store = storeDirHere(backup, c.vm);
    await waitProtectedOn(primary, c.vm, { committedAfter: Date.now() });
    // the primary holds its next checkpoint before the disk frames: nothing newer commits meanwhile
    await pauseAt('before-disk-frames', 20_000);
    const epochs = committedEpochs(store);
    const newest = epochs.at(-1)!;
    const previous = epochs.at(-2)!;
    const deltas = fs.readdirSync(store).filter((n) => n.startsWith(`${newest}.`) && n.endsWith('.delta'));
    expect(deltas.length).toBe(2);
    const file = path.join(store, deltas.map((n) => ({ n, size: fs.statSync(path.join(store, n)).size })).sort((a, b) => b.size - a.size)[0]!.n);
    const bytes = fs.readFileSync(file);
    const at = Math.floor(bytes.length / 2);
    bytes[at] = bytes[at]! ^ 0x40;
    fs.writeFileSync(file, bytes);
    await failOverAndCheck('after a corrupt newest delta', previous);
    const skipped = agentLogEntries(backup, 'skipping a checkpoint that does not verify').map((e) => String(e['err']));
    expect(skipped.some((m) => m.includes(`checkpoint ${newest}'s delta`))).toBe(true);
  }, 300_000);

  it('(b) the backup returns with an empty store: reseed; (c) its store fills: no-space nacks, then nothing lost once space is back', async () => {
    const c = cluster!;
    const primary = c.primary;
    const backup = other(primary);
    await waitProtectedOn(primary, c.vm, { committedAfter: Date.now() });
    await killHost(backup);
    fs.rmSync(storeDirHere(backup, c.vm), { recursive: true, force: true });
    // the host comes back with its store on a 1 GiB tmpfs (visible only inside it), then its agent
    await restartHost(backup);
    fs.mkdirSync(path.join(hostInfo(backup).runDir, 'ftvm'), { recursive: true });
    const dir = STORE_IN_HOST(c.vm);
    await execIn(backup, ['mkdir', '-p', dir]);
    await execIn(backup, ['mount', '-t', 'tmpfs', '-o', 'size=1024m,mode=0755', 'ftvm-test-store', dir]);
    tmpfsOn = { host: backup, dir };
    const revivedAt = Date.now();
    c.agentPids[backup] = await startAgent(backup);
    await waitProtectedOn(primary, c.vm, { timeoutMs: 120_000, committedAfter: revivedAt });
    expect(seedsSince(primary, revivedAt), 'a reseed into the empty store').toBe(1);

    // (c) fill it, leaving 1 MiB
    await waitProtectedOn(primary, c.vm, { committedAfter: Date.now() });
    const avail = Number((await execIn(backup, ['df', '-B1', '--output=avail', dir])).stdout.trim().split('\n').at(-1));
    const filler = path.posix.join(dir, 'filler');
    const filledAt = Date.now();
    await execIn(backup, ['fallocate', '-l', String(avail - 1024 * 1024), filler]);
    const nacks = await untilAgents('two no-space nacks', async () => {
      const found = agentLogEntries(primary, 'checkpoint failed').filter((e) => Date.parse(String(e['time'])) >= filledAt && /disk full|no-space|ENOSPC/i.test(String(e['err'])));
      return found.length >= 2 ? found : undefined;
    }, 60_000);
    console.error(`no-space: ${String(nacks[0]!['err']).slice(0, 300)}`);
    const freedAt = Date.now();
    await execIn(backup, ['rm', '-f', filler]);
    await waitProtectedOn(primary, c.vm, { timeoutMs: 90_000, committedAfter: freedAt });
    expect(seedsSince(primary, filledAt), 'no reseed after the no-space nacks').toBe(0);
    const check = await failOverAndCheck('after no-space nacks');
    expect(check.epoch).toBeGreaterThan(freedAt);
  }, 420_000);
});
