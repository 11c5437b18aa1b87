/**
 * The lab's service network end to end: the protected probe guest with its service NIC on the
 * hosts' `ftvmsvc` bridges, its client on the witness (counter datagrams every ms, one TCP
 * connection doing request/response), and one failover by killing the primary host. Afterwards the
 * datagrams and answers come from the copy on the backup (the guest's MAC has moved to the
 * backup's uplink). Output commit is not needed for any of that; with FTVM_SERVICE_TEST_OUTPUT_COMMIT=1
 * the cluster protects with it and the test also asks what output commit promises: the same TCP
 * connection works on, and the client never saw a value the failover took back.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { $ } from 'zx';
import { SERVICE_BRIDGE, hostInfo } from '../lab/lab.js';
import { probeOn, probeService, startCluster, stopCluster, type Cluster } from '../support/ft-cluster.js';
import { runFault } from '../support/failover-runs.js';
import { patchedQemu } from '../support/patched-qemu.js';
import { clockOffset } from '../support/probe-client.js';
import { describeStats, ServiceClient, type ServiceStats } from '../support/service-client.js';
import { sleep } from '../lab/wait.js';

const OUTPUT_COMMIT = process.env.FTVM_SERVICE_TEST_OUTPUT_COMMIT === '1';
// Held until its checkpoint is committed, each answer waits for the next commit (~the 1 s
// interval, measured p50 1.0 s): request/response in a loop then gets about one answer a second,
// and datagrams come in bursts of a checkpoint's worth.
const TCP_ANSWERS = OUTPUT_COMMIT ? 3 : 100;
const TCP_MIN_RATE = OUTPUT_COMMIT ? 0.5 : 50;
let cluster: Cluster | undefined;
let client: ServiceClient | undefined;

/** The bridge port (root namespace) the service bridge has learnt `mac` on. */
async function fdbPort(mac: string): Promise<string | undefined> {
  const out = await $({ quiet: true, timeout: 10_000 })`bridge fdb show br ${SERVICE_BRIDGE}`;
  return out.stdout.split('\n').find((l) => l.startsWith(`${mac} `))?.match(/ dev (\S+)/)?.[1];
}

const perSecond = (a: ServiceStats, b: ServiceStats, count: (s: ServiceStats) => number) => (count(b) - count(a)) / (Number(b.atNs - a.atNs) / 1e9);

describe('service network: a client of the protected guest on the witness', () => {
  beforeAll(async () => {
    cluster = await startCluster({ emulator: patchedQemu(), workloadMiBps: 4, checkpointIntervalMs: 1000, service: true, ...(OUTPUT_COMMIT ? { outputCommit: true } : {}) });
    client = await ServiceClient.start(probeService(cluster.vm).guestIp);
  }, 300_000);
  afterAll(async () => {
    const last = await client?.stop();
    if (last) console.log(`service client at the end: ${describeStats(last)}`);
    await stopCluster(cluster);
  }, 60_000);

  it('gets the counter every ms over UDP and answers over TCP, from the guest on primary', async () => {
    const svc = probeService(cluster!.vm);
    await client!.waitFor('datagrams and TCP answers', (s) => s.udpCount > 100 && s.tcpResponses > TCP_ANSWERS, 60_000);
    const a = await client!.stats({ resetLatencies: true });
    await sleep(5_000);
    const b = await client!.stats();
    const udpRate = perSecond(a, b, (s) => s.udpCount);
    const tcpRate = perSecond(a, b, (s) => s.tcpResponses);
    console.log(`on primary: udp ${udpRate.toFixed(0)}/s, tcp ${tcpRate.toFixed(0)} answers/s; ${describeStats(b)}`);
    expect(udpRate).toBeGreaterThanOrEqual(500);
    expect(tcpRate).toBeGreaterThan(TCP_MIN_RATE);
    // the guest the clock probe measures, counting
    const probe = await clockOffset(probeOn('primary'), { samples: 1 });
    expect(b.lastBootId).toBe(probe.bootId);
    expect(b.highestUdpCounter!).toBeGreaterThan(a.highestUdpCounter!);
    expect(b.highestTcpCounter!).toBeGreaterThan(0n);
    expect(b).toMatchObject({ udpBad: 0, tcpErrors: 0, tcpReconnects: 0, tcpConnected: true, rollbacks: [] });
    expect(await fdbPort(svc.mac)).toBe(hostInfo('primary').service.vethOutside);
  }, 120_000);

  it('carries on from the backup after the primary is killed', async () => {
    const svc = probeService(cluster!.vm);
    const before = await client!.stats();
    const run = await runFault(cluster!, 'kill', (line) => console.log(line));
    console.log(JSON.stringify(run));
    expect(run.continuityOk).toBe(true);
    expect(cluster!.primary).toBe('backup');
    const resumeNs = BigInt(run.resumeNs);
    // the old copy is dead (its host was killed): what comes after the resume comes from the backup
    const after = await client!.waitFor(
      'datagrams and TCP answers after the resume on backup',
      (s) => s.udpLastAtNs > resumeNs && s.tcpLastAtNs > resumeNs && s.tcpResponses > before.tcpResponses + TCP_ANSWERS,
      60_000,
    );
    expect(after.lastBootId).toBe(before.lastBootId); // the same guest, not a reboot
    const boot = after.boots.get(after.lastBootId!)!;
    expect(boot.highestUdpCounter).toBeGreaterThan(before.highestUdpCounter!);
    const a = await client!.stats({ resetLatencies: true });
    await sleep(3_000);
    const b = await client!.stats();
    const udpRate = perSecond(a, b, (s) => s.udpCount);
    console.log(
      `after the failover (re-protected): udp ${udpRate.toFixed(0)}/s, tcp ${perSecond(a, b, (s) => s.tcpResponses).toFixed(0)} answers/s, latency p50 ${((b.latencyUs.p50 ?? NaN) / 1000).toFixed(2)} ms; client outage udp ${after.udpMaxGapMs.toFixed(0)} ms, tcp ${after.tcpMaxGapMs.toFixed(0)} ms; ` +
        `TCP connection ${after.tcpReconnects === before.tcpReconnects ? 'survived' : `broke (${after.tcpReconnects - before.tcpReconnects} reconnects, last error: ${after.tcpLastError})`}; ` +
        `values the client saw and the failover took back: ${after.rollbacks.map((r) => `${r.via} ${r.lost}`).join(', ') || 'none'}`,
    );
    expect(udpRate).toBeGreaterThanOrEqual(500);
    // the announce (and the guest's own datagrams) moved the MAC to the backup's uplink
    expect(await fdbPort(svc.mac)).toBe(hostInfo('backup').service.vethOutside);
    if (OUTPUT_COMMIT) {
      expect(after.tcpReconnects, 'the TCP connection survives the failover').toBe(before.tcpReconnects);
      expect(after.rollbacks, 'no value the client saw was lost').toEqual([]);
    }
  }, 600_000);
});
