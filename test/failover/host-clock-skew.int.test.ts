/**
 * Hosts whose clocks disagree. The failover rewrite moves the guest clock by (resume instant on the
 * backup's clock) − (stop instant on the old primary's clock): a skew between the two clocks is
 * the same error in the guest, unless the backup converts the stop instant with the offset its
 * heartbeats measured (NTP-style rounds, see ClockOffsetEstimator).
 *
 * The lab's hosts share one kernel clock, so the backup agent is started with
 * FTVM_TEST_REALTIME_SKEW_MS=2000 (test only, host-clock.ts): its host realtime — its heartbeat
 * stamps and the resume instant it rewrites the clock for — runs 2 s ahead. QEMU's own stamps
 * cannot be skewed, so the skewed host is the one failed over *to*. The guest−host offset is
 * measured with the probe against the kernel clock, before the kill and after the take-over.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { controlClient, stopCluster, type Cluster } from '../support/ft-cluster.js';
import { runFault } from '../support/failover-runs.js';
import { SKEW_MS, skewedCluster as startSkewed, takeOverClock } from '../support/skewed-cluster.js';

let cluster: Cluster | undefined;

/** Starts the cluster with the backup's clock SKEW_MS ahead and checks the measure both status views show. */
async function skewedCluster(extraEnv: Record<string, string> = {}) {
  const { cluster: started, fromBackup, fromPrimary } = await startSkewed(extraEnv);
  cluster = started;
  console.log(JSON.stringify({ fromBackup, fromPrimary }));
  // the bound is for the clocks as read; each agent anchors its ns clock to within a few µs
  expect(Math.abs(fromBackup.offsetMs + SKEW_MS)).toBeLessThanOrEqual(fromBackup.errorMs + 0.05);
  expect(Math.abs(fromPrimary.offsetMs - SKEW_MS)).toBeLessThanOrEqual(fromPrimary.errorMs + 0.05);
  expect(fromBackup.errorMs).toBeLessThan(5);
  return started;
}

describe(`failover onto a host whose clock is ${SKEW_MS} ms ahead`, () => {
  afterEach(async () => {
    await stopCluster(cluster);
    cluster = undefined;
  }, 60_000);

  it('with the measured offset applied, the guest clock moves by at most 5 ms', async () => {
    const c = await skewedCluster();
    const run = await runFault(c, 'kill', (line) => console.log(line));
    console.log(JSON.stringify({ measured: true, run, hostOffset: takeOverClock() }));
    expect(run.sameBoot).toBe(true);
    expect(run.continuityOk, 'workload continues from the last committed checkpoint').toBe(true);
    expect(takeOverClock()).toMatchObject({ peer: 'primary', applied: true });
    expect(Math.abs(Number(takeOverClock()!['offsetMs']) + SKEW_MS)).toBeLessThan(5);
    expect(Math.abs(run.offsetMs)).toBeLessThanOrEqual(5);
    // the new primary's `ftvm drift` carries it too
    const drift = await controlClient(c.primary).drift(c.vm);
    expect(drift.ledger).toMatchObject({ vm: c.vm, byCause: { failover: { pauses: expect.any(Number) } }, lastHostOffset: { peer: 'primary', applied: true, offsetNs: expect.stringMatching(/^-\d+$/) } });
  }, 900_000);

  it('without it (FTVM_TEST_IGNORE_HOST_OFFSET), the guest comes back the skew ahead', async () => {
    const c = await skewedCluster({ FTVM_TEST_IGNORE_HOST_OFFSET: '1' });
    const run = await runFault(c, 'kill', (line) => console.log(line));
    console.log(JSON.stringify({ measured: false, run, hostOffset: takeOverClock() }));
    expect(run.sameBoot).toBe(true);
    // measured and recorded all the same, only not applied
    expect(takeOverClock()).toMatchObject({ peer: 'primary', applied: false, detail: expect.stringMatching(/FTVM_TEST_IGNORE_HOST_OFFSET/) });
    expect(Math.abs(run.offsetMs - SKEW_MS)).toBeLessThan(50);
  }, 900_000);
});
