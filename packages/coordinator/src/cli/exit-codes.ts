import { CommanderError } from 'commander';
import { AgentUnreachableError } from '../api/client.js';
import { ConfigError } from '../config/agent-config.js';

/** `ftvm` exit codes. */
export const ExitCode = {
  ok: 0,
  /** The operation failed (the agent refused it, it failed on the way, or no result in time). */
  failed: 1,
  /** Bad command line or bad config file. */
  usage: 2,
  /** No agent answers on the control socket. */
  unreachable: 3,
} as const;
export type ExitCode = (typeof ExitCode)[keyof typeof ExitCode];

export function exitCodeFor(error: unknown): ExitCode {
  if (error instanceof AgentUnreachableError) return ExitCode.unreachable;
  if (error instanceof ConfigError || error instanceof CommanderError) return ExitCode.usage;
  return ExitCode.failed;
}
