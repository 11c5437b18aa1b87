import { Command, CommanderError, InvalidArgumentError, Option } from 'commander';
import { ControlError, type Progress, type VmStatus } from '../agent/control.js';
import { ControlClient, type CallOptions } from '../api/client.js';
import { vmNameSchema } from '../api/protocol.js';
import { ConfigError } from '../config/agent-config.js';
import type { RunAgent, SignalSource } from './agent-command.js';
import { checkConfig, formatConfigCheck } from './config-command.js';
import { ExitCode, exitCodeFor } from './exit-codes.js';
import { formatCheckpoint, formatDrift, formatStatus, formatSwitchover, formatVmTable } from './format.js';
import { createProgressView } from './progress.js';

export const DEFAULT_SOCKET = '/run/ftvm/agent.sock';

interface Out {
  write(text: string): unknown;
}

export interface CliDeps {
  /** Runs the agent for `ftvm agent` (default: the real one, src/agent/run.ts, loaded only by that command). */
  runAgent: RunAgent;
  stdout: Out;
  stderr: Out;
  env: NodeJS.ProcessEnv;
  signals: SignalSource;
}

interface GlobalOptions {
  socket: string;
  json?: boolean;
  timeout?: number;
}

const parseVm = (value: string): string => {
  const checked = vmNameSchema.safeParse(value);
  if (!checked.success) throw new InvalidArgumentError(`'${value}' is not ${checked.error.issues[0]?.message ?? 'a VM name'}.`);
  return value;
};

const parseInteger = (min: number, max: number) => (value: string): number => {
  const n = Number(value);
  if (!/^\d+$/.test(value) || n < min || n > max) throw new InvalidArgumentError(`expected a whole number of milliseconds from ${min} to ${max}.`);
  return n;
};

/** The agent and all it pulls in (etcd, SSH, libvirt) load only for `ftvm agent`, not for the client commands. */
const loadAgent: RunAgent = async (config, options) => (await import('../agent/run.js')).runAgent(config, options);

/**
 * `ftvm`: runs one command line, resolves with the exit code (0 ok, 1 operation failed,
 * 2 usage or config error, 3 agent not reachable). With `--json`, stdout carries exactly one JSON
 * document (the result, or `{"error":…}`); human-readable errors go to stderr.
 */
export async function runCli(argv: readonly string[], deps: Partial<CliDeps> = {}): Promise<ExitCode> {
  const io: CliDeps = {
    runAgent: deps.runAgent ?? loadAgent,
    stdout: deps.stdout ?? process.stdout,
    stderr: deps.stderr ?? process.stderr,
    env: deps.env ?? process.env,
    signals: deps.signals ?? process,
  };
  let exitCode: ExitCode = ExitCode.ok;
  const print = (text: string) => io.stdout.write(text.endsWith('\n') ? text : `${text}\n`);
  const printJson = (value: unknown) => print(JSON.stringify(value, null, 2));

  const program = new Command('ftvm')
    .description('ftvm: fault-tolerant QEMU/KVM virtual machines across two hosts')
    .exitOverride()
    .configureOutput({ writeOut: (s) => io.stdout.write(s), writeErr: (s) => io.stderr.write(s) })
    .showHelpAfterError('(run with --help for usage)')
    .addOption(new Option('--socket <path>', "the agent's control socket").default(io.env.FTVM_SOCKET || DEFAULT_SOCKET, io.env.FTVM_SOCKET ? '$FTVM_SOCKET' : DEFAULT_SOCKET))
    .option('--json', 'machine-readable output: one JSON document on stdout, nothing else')
    .option('--timeout <ms>', "give up waiting for the agent's answer after this long (default: 10 s for queries, 2 min for checkpoint-now, 15 min for operations)", parseInteger(1, 24 * 3_600_000));

  const globals = (command: Command) => command.optsWithGlobals<GlobalOptions>();
  const client = (g: GlobalOptions) => new ControlClient({ socketPath: g.socket });
  const callOptions = (g: GlobalOptions): CallOptions => (g.timeout === undefined ? {} : { timeoutMs: g.timeout });

  /** A long operation: listr2 progress (human) or the bare result (--json). */
  async function operate<T>(g: GlobalOptions, run: (progress: Progress | undefined) => Promise<T>, describe: (result: T) => string): Promise<void> {
    if (g.json) return void printJson(await run(undefined));
    const view = createProgressView();
    let result: T;
    try {
      result = await run(view.progress);
    } catch (error) {
      await view.finish(false);
      throw error;
    }
    await view.finish(true);
    print(describe(result));
  }
  const describeVm = (vm: VmStatus) => formatVmTable([vm]);

  program
    .command('agent')
    .description("run this host's ftvm agent (in the foreground; SIGTERM or SIGINT stops it)")
    .requiredOption('--config <file>', "the agent's YAML config")
    .action(async (options: { config: string }) => {
      const { agentCommand } = await import('./agent-command.js'); // logger and metrics: only the agent needs them
      exitCode = await agentCommand({ configFile: options.config, runAgent: io.runAgent, signals: io.signals, stderr: io.stderr });
    });

  program
    .command('status')
    .description("this host's agent: its VMs, its lease, its peers")
    .action(async (_options, command: Command) => {
      const g = globals(command);
      const status = await client(g).status(callOptions(g));
      if (g.json) printJson(status);
      else print(formatStatus(status));
    });

  program
    .command('protect')
    .description('protect a VM running on this host: checkpoint it continuously to a backup host')
    .argument('<vm>', 'libvirt domain name', parseVm)
    .requiredOption('--backup <host>', 'the host that becomes its backup')
    .option('--interval <ms>', 'checkpoint interval', parseInteger(50, 3_600_000))
    .option('--output-commit', "hold the VM's network output until its checkpoint is committed (adds up to one interval of latency)")
    .option('--no-output-commit', 'release output at once (the default for a new VM)')
    .option('--full-every <n>', 'a full checkpoint at least every n (default: only the first; the backup compacts increments)', parseInteger(1, 1_000_000))
    .action(async (vm: string, options: { backup: string; interval?: number; outputCommit?: boolean; fullEvery?: number }, command: Command) => {
      const g = globals(command);
      const request = {
        vm,
        backup: options.backup,
        ...(options.interval === undefined ? {} : { checkpointIntervalMs: options.interval }),
        ...(options.outputCommit === undefined ? {} : { outputCommit: options.outputCommit }),
        ...(options.fullEvery === undefined ? {} : { fullEvery: options.fullEvery }),
      };
      await operate(g, (progress) => client(g).protect(request, progress, callOptions(g)), describeVm);
    });

  program
    .command('unprotect')
    .description('stop protecting a VM (it keeps running here; the backup drops its checkpoints)')
    .argument('<vm>', 'libvirt domain name', parseVm)
    .action(async (vm: string, _options, command: Command) => {
      const g = globals(command);
      await operate(g, (progress) => client(g).unprotect(vm, progress, callOptions(g)), describeVm);
    });

  program
    .command('switchover')
    .description('move a VM to its backup host with no loss (planned maintenance)')
    .argument('<vm>', 'libvirt domain name', parseVm)
    .action(async (vm: string, _options, command: Command) => {
      const g = globals(command);
      await operate(g, (progress) => client(g).switchover(vm, progress, callOptions(g)), formatSwitchover);
    });

  program
    .command('reprotect')
    .description('after a failover: make the old primary (or --backup) the VM’s new backup')
    .argument('<vm>', 'libvirt domain name', parseVm)
    .option('--backup <host>', 'the host that becomes its backup (default: the old primary)')
    .action(async (vm: string, options: { backup?: string }, command: Command) => {
      const g = globals(command);
      await operate(g, (progress) => client(g).reprotect(vm, options.backup, progress, callOptions(g)), describeVm);
    });

  program
    .command('checkpoint-now')
    .description('take and commit a checkpoint of a VM now')
    .argument('<vm>', 'libvirt domain name', parseVm)
    .action(async (vm: string, _options, command: Command) => {
      const g = globals(command);
      const result = await client(g).checkpointNow(vm, callOptions(g));
      if (g.json) printJson(result);
      else print(formatCheckpoint(result));
    });

  program
    .command('drift')
    .description("a VM's guest clock: the drift ledger's pauses, corrections and predicted lag")
    .argument('<vm>', 'libvirt domain name', parseVm)
    .action(async (vm: string, _options, command: Command) => {
      const g = globals(command);
      const report = await client(g).drift(vm, callOptions(g));
      if (g.json) printJson(report);
      else print(formatDrift(report));
    });

  program
    .command('config')
    .description('agent config files')
    .command('check')
    .description('validate an agent config file (exit 2 and name each bad field when it is invalid)')
    .argument('<file>', 'the YAML config')
    .action((file: string, _options, command: Command) => {
      const g = globals(command);
      const check = checkConfig(file);
      if (g.json) printJson(check);
      else if (check.ok) print(formatConfigCheck(check));
      else io.stderr.write(`${formatConfigCheck(check)}\n`);
      if (!check.ok) exitCode = ExitCode.usage;
    });

  try {
    await program.parseAsync(argv, { from: 'user' });
    return exitCode;
  } catch (error) {
    if (error instanceof CommanderError) return error.exitCode === 0 ? ExitCode.ok : ExitCode.usage; // commander printed it
    if (program.opts<GlobalOptions>().json) printJson({ error: { message: (error as Error).message, ...(error instanceof ControlError ? { status: error.status } : {}), ...(error instanceof ConfigError ? { problems: error.problems } : {}) } });
    else io.stderr.write(`ftvm: ${(error as Error).message}\n`);
    return exitCodeFor(error);
  }
}
