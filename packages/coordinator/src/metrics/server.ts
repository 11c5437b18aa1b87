import http from 'node:http';
import type { AddressInfo } from 'node:net';
import type { AgentMetrics } from './agent-metrics.js';

export interface MetricsServerOptions {
  /** Address to bind, e.g. `0.0.0.0` or `127.0.0.1`. */
  address: string;
  /** TCP port; 0 picks a free one (see the returned `port`). */
  port: number;
  metrics: AgentMetrics;
  /** A scraper must send its request within this (default 10 s). */
  requestTimeoutMs?: number;
}

export interface MetricsServer {
  readonly port: number;
  close(): Promise<void>;
}

/** Serves `GET /metrics` for Prometheus; every other path is 404. */
export async function startMetricsServer(options: MetricsServerOptions): Promise<MetricsServer> {
  const requestTimeoutMs = options.requestTimeoutMs ?? 10_000;
  const server = http.createServer({ requestTimeout: requestTimeoutMs, headersTimeout: requestTimeoutMs }, (req, res) => {
    const path = (req.url ?? '/').split('?')[0];
    if (path !== '/metrics') return send(res, 404, 'text/plain; charset=utf-8', 'not found: metrics are at /metrics\n');
    if (req.method !== 'GET') {
      res.setHeader('Allow', 'GET');
      return send(res, 405, 'text/plain; charset=utf-8', `${req.method} not allowed on /metrics\n`);
    }
    options.metrics.scrape().then(
      (text) => send(res, 200, options.metrics.contentType, text),
      (error: unknown) => send(res, 500, 'text/plain; charset=utf-8', `metrics collection failed: ${(error as Error).message}\n`),
    );
  });
  server.keepAliveTimeout = 5_000;
  await new Promise<void>((resolve, reject) => {
    const onError = (error: NodeJS.ErrnoException) =>
      reject(new Error(`metrics server cannot listen on ${options.address}:${options.port}: ${error.code ?? error.message}`, { cause: error }));
    server.once('error', onError);
    server.listen(options.port, options.address, () => {
      server.off('error', onError);
      resolve();
    });
  });
  return {
    port: (server.address() as AddressInfo).port,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}

function send(res: http.ServerResponse, status: number, contentType: string, body: string): void {
  res.writeHead(status, { 'Content-Type': contentType, 'Content-Length': Buffer.byteLength(body) });
  res.end(body);
}
