/**
 * Output commit end to end: the probe guest sends its continuity counter to a client on the
 * witness over its service NIC (UDP every ms, TCP request/response on one connection) while the
 * cluster checkpoints it every 100 ms. A failover restores the newest committed checkpoint; the
 * client must never have seen a counter beyond it.
 *
 * - Without output commit the client sees values the failover takes back (why the option exists).
 * - With it, over 30 faults (kill of the primary host, link cut, SIGSTOP of its QEMU) and
 *   checkpoints that fail just before a fault (the backup's receiver killed, or its store refusing
 *   the write: a nack), no value the client saw is ever lost, and the one TCP connection keeps
 *   working across every failover. While the backup nacks, the primary releases nothing.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { OutputBufferInfo } from '@ftvm/coordinator';
import { $ } from 'zx';
import { execIn, hostInfo, killHost } from '../lab/lab.js';
import { allPids, nsOf, netnsFileId, signalAll } from '../lab/procs.js';
import { sleep } from '../lab/wait.js';
import { agentLog, agentLogEntries, controlClient, other, probeService, reviveHost, startCluster, stopCluster, untilAgents, vmStatus, waitProtectedOn, type Cluster } from '../support/ft-cluster.js';
import { readRecord, runFault, type FaultKind, type FaultRun } from '../support/failover-runs.js';
import { patchedQemu } from '../support/patched-qemu.js';
import { describeStats, ServiceClient, type ServiceStats } from '../support/service-client.js';

const INTERVAL_MS = 100;
const FAULTS: FaultKind[] = Array.from({ length: 30 }, (_, i) => (['kill', 'partition', 'freeze'] as const)[i % 3]!);
/** Faults (by index) that first kill the backup's receiver: the checkpoint in flight fails. */
const RECEIVER_KILLED = new Set([0, 7, 14, 21]);
/** Faults (by index) that come while the backup's store refuses writes: its receiver nacks each checkpoint. */
const NACKED = new Set([3, 10, 17, 24]);

let cluster: Cluster | undefined;
let client: ServiceClient | undefined;

/** SIGKILLs every ftvm-receive process running in the lab host `host`. */
function killReceivers(host: 'primary' | 'backup'): number {
  const netns = netnsFileId(`/run/netns/${hostInfo(host).netns}`);
  const pids = allPids().filter((pid) => {
    if (nsOf(pid, 'net') !== netns) return false;
    try {
      return fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes('ftvm-receive');
    } catch {
      return false;
    }
  });
  return signalAll(pids, 'SIGKILL').length;
}

interface OutputBuffers {
  held: number;
  released: number;
  closedEpochs: number;
}

/** The primary QEMU's output buffers, asked through libvirt (the agent holds its own QMP socket). */
async function outputBuffers(host: 'primary' | 'backup', vm: string): Promise<OutputBuffers> {
  const out = await execIn(host, ['virsh', '-c', 'qemu:///system', 'qemu-monitor-command', vm, '{"execute":"x-ftvm-query-output-buffers"}']);
  const buffers = (JSON.parse(out.stdout) as { return: OutputBufferInfo[] }).return;
  return {
    held: buffers.reduce((n, b) => n + b['held-packets'], 0),
    released: buffers.reduce((n, b) => n + b['released-packets'], 0),
    closedEpochs: buffers.reduce((n, b) => n + b['closed-epochs'].length, 0),
  };
}

/**
 * Makes the backup's store refuse every write (the immutable flag: even root cannot create a
 * file in it), until at least `nacks` checkpoints failed on the primary with the receiver's
 * refusal; checks that the primary released nothing meanwhile. Returns with the store writable
 * again (a take-over reads and cleans the store).
 */
async function refuseCheckpoints(primary: 'primary' | 'backup', backup: 'primary' | 'backup', vm: string, nacks: number): Promise<void> {
  const store = path.join(hostInfo(backup).libvirtLibDir, 'ftvm', 'checkpoints', vm);
  const failed = () => agentLogEntries(primary, 'checkpoint failed').filter((e) => /not permitted|EPERM|permission/i.test(String(e['err'])));
  const before = failed().length;
  await $`chattr +i ${store}`;
  try {
    // the first nack may arrive while an earlier release is still in flight
    await pollUntil(() => failed().length > before, 10_000, 'a checkpoint nacked by the backup');
    const held = await outputBuffers(primary, vm);
    await pollUntil(() => failed().length >= before + nacks, 10_000, `${nacks} checkpoints nacked by the backup`);
    const still = await outputBuffers(primary, vm);
    console.log(`nacks: ${failed().length - before} (${String(failed().at(-1)?.['err']).slice(0, 160)}); released ${held.released} → ${still.released}, held ${held.held} → ${still.held} packets in ${still.closedEpochs} closed epochs`);
    expect(still.released, 'the primary released output while the backup nacked its checkpoints').toBe(held.released);
    expect(still.held).toBeGreaterThan(held.held);
    expect(still.closedEpochs).toBeGreaterThanOrEqual(nacks);
  } finally {
    await $`chattr -i ${store}`;
  }
}

/** What the agents said since `sinceMs` that explains a long silence: warnings, errors, output commit. */
function agentTrouble(sinceMs: number): string {
  const lines: string[] = [];
  for (const host of ['primary', 'backup'] as const) {
    for (const line of fs.existsSync(agentLog(host)) ? fs.readFileSync(agentLog(host), 'utf8').split('\n') : []) {
      if (!line) continue;
      const entry = JSON.parse(line) as { time?: string; level?: number; msg?: string; err?: string };
      if (Date.parse(String(entry.time)) < sinceMs) continue;
      if ((entry.level ?? 0) >= 40 || /output commit|reprotect|resumed|running as primary/.test(entry.msg ?? '')) lines.push(`${host} ${entry.time} ${entry.msg}${entry.err ? `: ${entry.err}` : ''}`);
    }
  }
  return lines.sort((a, b) => a.split(' ')[1]!.localeCompare(b.split(' ')[1]!)).slice(0, 60).join('\n');
}

async function pollUntil(done: () => boolean, timeoutMs: number, what: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!done()) {
    if (Date.now() > deadline) throw new Error(`${what}: not within ${timeoutMs} ms`);
    await sleep(20);
  }
}

/** Waits until datagrams and TCP answers of the resumed copy have come in (after `resumeNs`). */
async function afterResume(resumeNs: bigint, tcpBefore: number): Promise<ServiceStats> {
  return client!.waitFor('datagrams and TCP answers after the resume', (s) => s.udpLastAtNs > resumeNs && s.tcpLastAtNs > resumeNs && s.tcpResponses > tcpBefore + 2, 60_000);
}

describe('output commit: no client sees a value a failover loses', () => {
  beforeAll(async () => {
    cluster = await startCluster({ emulator: patchedQemu(), workloadMiBps: 4, checkpointIntervalMs: INTERVAL_MS, service: true });
    // A failover after a stalled checkpoint leaves the client's requests unanswered for seconds, and
    // TCP's retransmission backoff stretches that further: the client waits like a patient
    // application (30 s), so a reconnect means the connection really broke.
    client = await ServiceClient.start(probeService(cluster.vm).guestIp, { requestTimeoutMs: 30_000 });
    await client.waitFor('the guest\'s datagrams and TCP answers', (s) => s.udpCount > 100 && s.tcpResponses > 10, 60_000);
  }, 300_000);
  afterAll(async () => {
    const last = await client?.stop();
    if (last) console.log(`service client at the end: ${describeStats(last)}`);
    await stopCluster(cluster);
  }, 60_000);

  it('without output commit, the client sees values that a failover takes back', async () => {
    const runs: FaultRun[] = [];
    for (let i = 0; i < 3; i++) {
      const before = await client!.stats();
      const run = await runFault(cluster!, 'kill', (line) => console.log(line));
      runs.push(run);
      await afterResume(BigInt(run.resumeNs), before.tcpResponses);
    }
    const stats = await client!.stats();
    const lost = stats.rollbacks.filter((r) => r.lost > 0n);
    console.log(`without output commit: ${lost.length} rollbacks seen by the client over ${runs.length} kills: ${lost.map((r) => `${r.via} −${r.lost}`).join(', ')}`);
    expect(runs.every((r) => r.continuityOk)).toBe(true);
    expect(lost.length, 'the client saw counters newer than the checkpoint the backup resumed').toBeGreaterThan(0);
  }, 600_000);

  it('with output commit, over 30 faults and failed checkpoints, the client never saw a lost value and TCP survives', async () => {
    const status = await controlClient(cluster!.primary).protect({ vm: cluster!.vm, backup: cluster!.primary === 'primary' ? 'backup' : 'primary', checkpointIntervalMs: INTERVAL_MS, outputCommit: true }, () => undefined);
    expect(status.outputCommit).toBe(true);
    expect((await vmStatus(cluster!.primary, cluster!.vm))?.outputCommit).toBe(true);
    // from here on, every rollback is one output commit let through
    await sleep(1_000);
    const start = await client!.stats();
    const rollbacksBefore = start.rollbacks.length;
    const reconnectsBefore = start.tcpReconnects;
    const runs: FaultRun[] = [];
    for (const [i, kind] of FAULTS.entries()) {
      const before = await client!.stats();
      if (RECEIVER_KILLED.has(i)) {
        const killed = killReceivers(cluster!.primary === 'primary' ? 'backup' : 'primary');
        console.log(`fault ${i}: killed ${killed} receiver(s) on the backup first`);
        await sleep(30);
      }
      if (NACKED.has(i)) {
        const backup = cluster!.primary === 'primary' ? 'backup' : 'primary';
        await refuseCheckpoints(cluster!.primary, backup, cluster!.vm, 3);
      }
      const faultAt = Date.now();
      const run = await runFault(cluster!, kind, (line) => console.log(line));
      runs.push(run);
      const after = await afterResume(BigInt(run.resumeNs), before.tcpResponses);
      if (after.udpMaxGapEndNs > before.atNs && after.udpMaxGapMs > 8_000) console.log(`fault ${i}: ${after.udpMaxGapMs.toFixed(0)} ms without a datagram; the agents said:\n${agentTrouble(faultAt - 2_000)}`);
      const boot = after.boots.get(after.lastBootId!)!;
      console.log(
        `fault ${i} (${kind}): highest counter the client saw before ${before.highestUdpCounter}, restored guest now ${boot.highestUdpCounter}; rollbacks ${after.rollbacks.length - rollbacksBefore}; tcp reconnects ${after.tcpReconnects - reconnectsBefore}${after.tcpLastError ? ` (last error: ${after.tcpLastError})` : ''}; longest tcp silence ${after.tcpMaxGapMs.toFixed(0)} ms`,
      );
      expect(after.rollbacks.slice(rollbacksBefore), `fault ${i} (${kind}): a value the client saw was lost`).toEqual([]);
      expect(after.lastBootId).toBe(before.lastBootId);
    }
    const end = await client!.stats();
    console.log(JSON.stringify({ faults: runs.length, lostValuesSeen: end.rollbacks.length - rollbacksBefore, tcpReconnects: end.tcpReconnects - reconnectsBefore, doubleActive: runs.filter((r) => r.doubleActive).length, kinds: FAULTS }));
    expect(runs).toHaveLength(30);
    expect(runs.every((r) => r.continuityOk && !r.doubleActive)).toBe(true);
    expect(end.rollbacks.length - rollbacksBefore).toBe(0);
    expect(end.tcpReconnects - reconnectsBefore, 'the one TCP connection survived every failover').toBe(0);
    expect(end.tcpErrors - start.tcpErrors).toBe(0);
  }, 30 * 60_000);

  it('a lost backup does not silence the VM: it runs on unprotected, and is protected again once the backup is back', async () => {
    const { vm } = cluster!;
    const from = cluster!.primary;
    const to = other(from);
    await controlClient(from).protect({ vm, backup: to, checkpointIntervalMs: INTERVAL_MS, outputCommit: true }, () => undefined);
    expect((await readRecord(vm)).outputCommit).toBe(true);
    const start = await client!.stats();
    const killedAt = Date.now();
    await killHost(to);
    const lost = await untilAgents(`${from} records its backup lost`, async () => {
      const r = await readRecord(vm);
      return r.suspended?.why === 'backup-lost' ? r : undefined;
    }, 30_000);
    const lostAfterMs = Date.now() - killedAt;
    expect(lost.protected).toBe(false);
    expect(lost.primary).toBe(from);
    // the held output goes and the service answers again, from the same copy of the VM
    const flowing = await client!.waitFor('datagrams and TCP answers after the backup was taken as lost', (s) => s.udpCount > start.udpCount + 500 && s.tcpResponses > start.tcpResponses + 20, 30_000);
    console.log(`backup killed; recorded lost after ${lostAfterMs} ms; longest datagram silence ${flowing.udpMaxGapMs.toFixed(0)} ms; ${describeStats(flowing)}`);
    expect(flowing.rollbacks.length).toBe(start.rollbacks.length);
    expect(flowing.lastBootId).toBe(start.lastBootId);
    expect(flowing.tcpReconnects).toBe(start.tcpReconnects);

    await reviveHost(to, cluster!);
    const again = await untilAgents('protection resumes once the backup answers', async () => {
      const r = await readRecord(vm);
      return r.protected && !r.suspended ? r : undefined;
    }, 60_000);
    expect(again.checkpointsSince).toBeGreaterThan(lost.checkpointsSince ?? 0);
    const status = await waitProtectedOn(from, vm, { committedAfter: Date.now() });
    expect(status.outputCommit).toBe(true);
  }, 240_000);
});
