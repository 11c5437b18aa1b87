import { loadAgentConfig, type AgentConfig } from '../config/agent-config.js';
import { createLogger, flushLogger, reopenLogFile, type Logger } from '../log/logger.js';
import { AgentMetrics } from '../metrics/agent-metrics.js';
import { ExitCode, exitCodeFor } from './exit-codes.js';

export type RunAgent = (config: AgentConfig, options: { log: Logger; metrics: AgentMetrics }) => Promise<{ stop(): Promise<void> }>;

/** Where stop and reopen requests come from: `process` in the CLI, an EventEmitter in tests. */
export interface SignalSource {
  on(signal: NodeJS.Signals, listener: () => void): unknown;
  off(signal: NodeJS.Signals, listener: () => void): unknown;
}

export interface AgentCommandOptions {
  configFile: string;
  runAgent: RunAgent;
  signals: SignalSource;
  stderr: { write(text: string): unknown };
  /** How long a stop may take before the process gives up on it (default 30 s). */
  stopTimeoutMs?: number;
}

/**
 * `ftvm agent --config FILE`: loads the config, creates the logger and the metrics, runs the agent
 * (runAgent serves the control socket and the metrics endpoint) until SIGTERM or SIGINT, then stops it.
 * A second signal while stopping gives up waiting. SIGHUP reopens the log file (logrotate).
 * Resolves with the process's exit code.
 */
export async function agentCommand(options: AgentCommandOptions): Promise<ExitCode> {
  const config = loadAgentConfig(options.configFile); // ConfigError: the caller reports it (exit 2)
  const rootLog = createLogger({ level: config.log.level, file: config.log.file, name: 'ftvm-agent' });
  const log = rootLog.child({ host: config.host });
  const metrics = new AgentMetrics();
  const stopTimeoutMs = options.stopTimeoutMs ?? 30_000;

  let signalled: (signal: NodeJS.Signals) => void = () => undefined;
  const firstSignal = new Promise<NodeJS.Signals>((resolve) => (signalled = resolve));
  let secondSignal: (signal: NodeJS.Signals) => void = () => undefined;
  const forced = new Promise<NodeJS.Signals>((resolve) => (secondSignal = resolve));
  let signals = 0;
  const onStop = (signal: NodeJS.Signals) => () => {
    signals++;
    if (signals === 1) signalled(signal);
    else secondSignal(signal);
  };
  const onTerm = onStop('SIGTERM');
  const onInt = onStop('SIGINT');
  const onHup = () => {
    if (reopenLogFile(rootLog)) log.info('log file reopened (SIGHUP)');
  };
  options.signals.on('SIGTERM', onTerm);
  options.signals.on('SIGINT', onInt);
  options.signals.on('SIGHUP', onHup);

  try {
    const agent = await options.runAgent(config, { log, metrics });
    const signal = await firstSignal;
    log.info({ signal }, 'stopping the agent');
    let timer: NodeJS.Timeout | undefined;
    const why = await Promise.race([
      agent.stop().then(() => undefined),
      forced.then((second) => `${second} received while stopping`),
      new Promise<string>((resolve) => (timer = setTimeout(() => resolve(`it did not stop within ${stopTimeoutMs} ms`), stopTimeoutMs))),
    ]).finally(() => clearTimeout(timer));
    if (why === undefined) {
      log.info('agent stopped');
      return ExitCode.ok;
    }
    log.error(`exiting without a clean stop: ${why}`);
    options.stderr.write(`ftvm agent: exiting without a clean stop: ${why}\n`);
    return ExitCode.failed;
  } catch (error) {
    log.fatal({ err: error }, 'agent failed');
    options.stderr.write(`ftvm agent: ${(error as Error).message}\n`);
    return exitCodeFor(error);
  } finally {
    options.signals.off('SIGTERM', onTerm);
    options.signals.off('SIGINT', onInt);
    options.signals.off('SIGHUP', onHup);
    await flushLogger(rootLog);
  }
}
