import os from 'node:os';
import type { AgentConfig } from '../config/agent-config.js';
import { startHookListener } from '../api/hook-listener.js';
import { startControlServer } from '../api/server.js';
import type { Logger } from '../log/logger.js';
import type { AgentMetrics } from '../metrics/agent-metrics.js';
import { startMetricsServer } from '../metrics/server.js';
import { Agent } from './agent.js';

/** Runs the agent of this host: the agent itself, its control socket and its metrics endpoint. */
export async function runAgent(config: AgentConfig, options: { log: Logger; metrics: AgentMetrics }): Promise<{ agent: Agent; stop(): Promise<void> }> {
  const { log, metrics } = options;
  try {
    os.setPriority(config.nice);
  } catch (error) {
    log.warn({ nice: config.nice, err: (error as Error).message }, 'cannot set the agent priority');
  }
  const agent = await Agent.start(config, { log, metrics });
  const control = await startControlServer({ socketPath: config.control.socket, control: agent, log });
  const hook = await startHookListener({ socketPath: config.control.hookSocket, log, onEvent: (event) => agent.hookEvent(event) });
  const metricsServer = config.control.metrics ? await startMetricsServer({ address: config.control.metrics.address, port: config.control.metrics.port, metrics }) : undefined;
  log.info({ host: config.host, socket: config.control.socket, metrics: config.control.metrics }, 'ftvm agent running');
  return {
    agent,
    async stop() {
      await control.close().catch(() => undefined);
      await hook.close().catch(() => undefined);
      await metricsServer?.close().catch(() => undefined);
      await agent.stop();
      log.info('ftvm agent stopped');
    },
  };
}
