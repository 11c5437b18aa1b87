import { register as globalRegistry } from 'prom-client';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AgentMetrics } from '../src/metrics/agent-metrics.js';
import { startMetricsServer, type MetricsServer } from '../src/metrics/server.js';

let now = 1_700_000_000_000;
const metrics = new AgentMetrics({ now: () => now });
let server: MetricsServer;
const url = (p: string) => `http://127.0.0.1:${server.port}${p}`;
const get = (p: string, init: RequestInit = {}) => fetch(url(p), { ...init, signal: AbortSignal.timeout(5_000) });
const scrape = async () => {
  const res = await get('/metrics');
  expect(res.status).toBe(200);
  expect(res.headers.get('content-type')).toContain('text/plain');
  return res.text();
};
/** The value of one series line, e.g. `ftvm_role{vm="vm1",role="primary"}`. */
const value = (text: string, series: string): number | undefined => {
  const line = text.split('\n').find((l) => l.startsWith(`${series} `));
  return line === undefined ? undefined : Number(line.slice(series.length + 1));
};

beforeAll(async () => {
  server = await startMetricsServer({ address: '127.0.0.1', port: 0, metrics });
});
afterAll(() => server.close());

describe('AgentMetrics over GET /metrics', () => {
  it('serves the process metrics of its own registry, not the global one', async () => {
    const text = await scrape();
    expect(text).toContain('process_cpu_user_seconds_total');
    expect(text).toContain('nodejs_eventloop_lag_seconds');
    expect(await globalRegistry.metrics()).not.toContain('ftvm_');
  });

  it('checkpoints: pause histogram, bytes, outcome counter, age computed at scrape time', async () => {
    metrics.checkpointCommitted('vm1', { bytes: 268_435_456, pauseMs: 12, at: now - 500 });
    metrics.checkpointCommitted('vm1', { bytes: 300_000_000, pauseMs: 3, at: now - 250 });
    metrics.checkpointFailed('vm1');
    let text = await scrape();
    expect(value(text, 'ftvm_checkpoint_pause_seconds_bucket{le="0.002",vm="vm1"}')).toBe(0);
    expect(value(text, 'ftvm_checkpoint_pause_seconds_bucket{le="0.005",vm="vm1"}')).toBe(1);
    expect(value(text, 'ftvm_checkpoint_pause_seconds_bucket{le="0.02",vm="vm1"}')).toBe(2);
    expect(value(text, 'ftvm_checkpoint_pause_seconds_bucket{le="0.5",vm="vm1"}')).toBe(2);
    expect(value(text, 'ftvm_checkpoint_pause_seconds_sum{vm="vm1"}')).toBeCloseTo(0.015, 9);
    expect(value(text, 'ftvm_checkpoint_pause_seconds_count{vm="vm1"}')).toBe(2);
    expect(value(text, 'ftvm_checkpoint_bytes{vm="vm1"}')).toBe(300_000_000);
    expect(value(text, 'ftvm_checkpoints_total{vm="vm1",outcome="ok"}')).toBe(2);
    expect(value(text, 'ftvm_checkpoints_total{vm="vm1",outcome="failed"}')).toBe(1);
    expect(value(text, 'ftvm_checkpoint_age_seconds{vm="vm1"}')).toBe(0.25);
    now += 4_000; // no new checkpoint: the age grows by itself
    text = await scrape();
    expect(value(text, 'ftvm_checkpoint_age_seconds{vm="vm1"}')).toBe(4.25);
  });

  it('clock residual, failovers, role, lease, peers', async () => {
    metrics.clockResidual('vm1', -0.42);
    metrics.failover('vm1', 'failover', 1.8);
    metrics.failover('vm1', 'switchover', 0.3);
    metrics.role('vm1', 'backup');
    metrics.role('vm1', 'primary');
    metrics.leaseHealthy(false);
    metrics.leaseHealthy(true);
    metrics.peerAlive('beta', true);
    metrics.peerAlive('gamma', false);
    const text = await scrape();
    expect(value(text, 'ftvm_clock_residual_seconds{vm="vm1"}')).toBeCloseTo(-0.00042, 12);
    expect(value(text, 'ftvm_failovers_total{vm="vm1",kind="failover"}')).toBe(1);
    expect(value(text, 'ftvm_failovers_total{vm="vm1",kind="switchover"}')).toBe(1);
    expect(value(text, 'ftvm_failover_duration_seconds_bucket{le="0.5",vm="vm1"}')).toBe(1);
    expect(value(text, 'ftvm_failover_duration_seconds_bucket{le="2",vm="vm1"}')).toBe(2);
    expect(value(text, 'ftvm_role{vm="vm1",role="primary"}')).toBe(1);
    expect(value(text, 'ftvm_role{vm="vm1",role="backup"}')).toBe(0);
    expect(value(text, 'ftvm_role{vm="vm1",role="none"}')).toBe(0);
    expect(value(text, 'ftvm_lease_healthy')).toBe(1);
    expect(value(text, 'ftvm_peer_alive{peer="beta"}')).toBe(1);
    expect(value(text, 'ftvm_peer_alive{peer="gamma"}')).toBe(0);
  });

  it('forgetVm drops every series of the VM and only those', async () => {
    metrics.checkpointCommitted('vm2', { bytes: 1, pauseMs: 1 });
    metrics.role('vm2', 'primary');
    metrics.forgetVm('vm1');
    const text = await scrape();
    expect(text).not.toContain('vm="vm1"');
    expect(value(text, 'ftvm_checkpoint_bytes{vm="vm2"}')).toBe(1);
    expect(value(text, 'ftvm_checkpoint_age_seconds{vm="vm2"}')).toBe(0);
    expect(value(text, 'ftvm_role{vm="vm2",role="primary"}')).toBe(1);
  });

  it('404 off /metrics, 405 for other methods', async () => {
    expect((await get('/')).status).toBe(404);
    expect((await get('/metrics/extra')).status).toBe(404);
    const post = await get('/metrics', { method: 'POST' });
    expect(post.status).toBe(405);
    expect(post.headers.get('allow')).toBe('GET');
    expect((await get('/metrics?x=1')).status).toBe(200);
  });

  it('a taken port is reported with the address', async () => {
    await expect(startMetricsServer({ address: '127.0.0.1', port: server.port, metrics })).rejects.toThrow(`metrics server cannot listen on 127.0.0.1:${server.port}: EADDRINUSE`);
  });
});
