import { execFile } from 'node:child_process';
import { EventEmitter } from 'node:events';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import pino from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startControlServer, type ControlServer } from '../src/api/server.js';
import { agentCommand, type RunAgent } from '../src/cli/agent-command.js';
import { runCli } from '../src/cli/program.js';
import { AgentMetrics } from '../src/metrics/agent-metrics.js';
import { agentStatus, FakeControl } from './fake-control.js';

const packageDir = path.dirname(path.dirname(fileURLToPath(import.meta.url)));
const bin = path.join(packageDir, 'src', 'bin', 'ftvm.ts');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'ftvm-cli-'));
const socketPath = path.join(tmp, 'agent.sock');
const fake = new FakeControl();
let server: ControlServer;

beforeAll(async () => {
  server = await startControlServer({ socketPath, control: fake, log: pino({ level: 'silent' }) });
});
afterAll(async () => {
  await server.close();
  fs.rmSync(tmp, { recursive: true, force: true });
});

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** `ftvm …` as a real child process (TypeScript sources through tsx), stdout and stderr pipes (no TTY). */
function ftvm(args: string[], env: NodeJS.ProcessEnv = {}): Promise<Run> {
  return new Promise((resolve) => {
    const { FTVM_SOCKET: _ignored, ...inherited } = process.env;
    execFile(
      process.execPath,
      ['--conditions=@ftvm/source', '--import', 'tsx', bin, ...args],
      { cwd: packageDir, env: { ...inherited, ...env }, timeout: 30_000 },
      (error, stdout, stderr) => resolve({ code: error ? (typeof error.code === 'number' ? error.code : null) : 0, stdout, stderr }),
    );
  });
}

const config = `
host: alpha
hosts:
  alpha: { address: 10.0.0.1 }
  beta: { address: 10.0.0.2 }
ssh: { privateKey: /etc/ftvm/id_ed25519, knownHosts: /etc/ftvm/known_hosts }
etcd: { endpoints: [http://10.0.0.3:2379] }
vms:
  - { name: vm1, domainXml: /etc/ftvm/vm1.xml, primary: alpha, backup: beta }
`;
const writeConfig = (name: string, text: string) => {
  const file = path.join(tmp, name);
  fs.writeFileSync(file, text);
  return file;
};

// Each run starts node and tsx (about a second of CPU): generous timeouts for loaded CI machines.
describe('ftvm (child process) against an agent with a fake control', { timeout: 60_000 }, () => {
  it('status --json: exactly one JSON document on stdout, the agent status', async () => {
    const run = await ftvm(['--socket', socketPath, 'status', '--json']);
    expect(run).toMatchObject({ code: 0, stderr: '' });
    expect(JSON.parse(run.stdout)).toEqual(JSON.parse(JSON.stringify(agentStatus())));
  });

  it('status: the VM table, then host, lease and peers ($FTVM_SOCKET)', async () => {
    const run = await ftvm(['status'], { FTVM_SOCKET: socketPath });
    expect(run.code).toBe(0);
    expect(run.stdout.split('\n').slice(0, 3)).toEqual([
      'VM   ROLE     STATE    PHASE      PRIMARY  BACKUP  LEASE HOLDER  INTERVAL  OUTPUT  CHECKPOINT AGE  STANDBY  CLOCK   WHY',
      'vm1  primary  running  protected  alpha    beta    alpha         1.0s      direct  730ms           -        -0.4ms  checkpointed into beta',
      'vm2  backup   absent   degraded   alpha    beta    -             100ms     held    -               warm@42  -       checkpointed into beta',
    ]);
    expect(run.stdout).toContain('lease: 694d8a1b2c3d4e5f healthy, renewed 120ms ago');
    expect(run.stdout).toContain('peer beta: alive (last heartbeat udp 80ms ago, ssh never)');
  });

  it('protect without a TTY: one line per step event, in order, then the VM; the options reach the agent', async () => {
    const before = fake.calls.length;
    const run = await ftvm(['--socket', socketPath, 'protect', 'vm7', '--backup', 'beta', '--interval', '400', '--output-commit', '--full-every', '600']);
    expect(run).toMatchObject({ code: 0, stderr: '' });
    expect(fake.calls.slice(before)).toEqual([{ op: 'protect', request: { vm: 'vm7', backup: 'beta', checkpointIntervalMs: 400, outputCommit: true, fullEvery: 600 } }]);
    const lines = run.stdout.split('\n').map((line) => line.trimEnd());
    const steps = lines.filter((line) => /^[❯✔✖]/.test(line)).map((line) => line.replace(/ \[\d+\.\ds\]$/, ''));
    expect(steps).toEqual(['❯ connect to backup', '✔ connect to backup', '❯ first checkpoint', '✔ first checkpoint: epoch 42', '❯ arm clock hook', '✔ arm clock hook']);
    expect(lines).toContain('vm7  primary  running  protected  alpha    beta    alpha         1.0s      direct  730ms           -        -0.4ms  checkpointed into beta');
  });

  it('a failing operation exits 1: the step is marked failed and the agent’s error is printed', async () => {
    fake.failStep = 'first checkpoint';
    try {
      const run = await ftvm(['--socket', socketPath, 'switchover', 'vm1']);
      expect(run.code).toBe(1);
      expect(run.stderr).toContain('✖ first checkpoint [FAILED: first checkpoint refused]');
      expect(run.stderr).toContain('ftvm: switchover: first checkpoint refused');
      const json = await ftvm(['--socket', socketPath, '--json', 'switchover', 'vm1']);
      expect(json).toMatchObject({ code: 1, stderr: '' });
      expect(JSON.parse(json.stdout)).toEqual({ error: { message: 'switchover: first checkpoint refused', status: 409 } });
    } finally {
      fake.failStep = undefined;
    }
  });

  it('--json on operations: only the result on stdout', async () => {
    const [switchover, checkpoint, reprotect] = await Promise.all([
      ftvm(['--socket', socketPath, 'switchover', 'vm1', '--json']),
      ftvm(['--socket', socketPath, '--json', 'checkpoint-now', 'vm1']),
      ftvm(['--socket', socketPath, '--json', 'reprotect', 'vm1', '--backup', 'gamma']),
    ]);
    for (const run of [switchover, checkpoint, reprotect]) expect(run).toMatchObject({ code: 0, stderr: '' });
    expect(JSON.parse(switchover.stdout)).toEqual({ vm: 'vm1', from: 'alpha', to: 'beta', downtimeMs: 183, epoch: 43 });
    expect(JSON.parse(checkpoint.stdout)).toEqual({ vm: 'vm1', epoch: 44, bytes: 1_048_576, pauseMs: 9.25 });
    expect(JSON.parse(reprotect.stdout)).toMatchObject({ name: 'vm1', backupHost: 'gamma' });
  });

  it('checkpoint-now, drift, unprotect in human form', async () => {
    const [checkpoint, drift, unprotect] = await Promise.all([
      ftvm(['--socket', socketPath, 'checkpoint-now', 'vm1']),
      ftvm(['--socket', socketPath, 'drift', 'vm1']),
      ftvm(['--socket', socketPath, 'unprotect', 'vm1']),
    ]);
    expect(checkpoint.stdout).toBe('vm1: checkpoint epoch 44 committed (full), 1.0 MiB, guest pause 9.3ms\n');
    expect(drift.stdout.split('\n')[0]).toBe('vm1: predicted guest clock lag 0.4ms');
    expect(unprotect.code).toBe(0);
    expect(unprotect.stdout).toMatch(/^vm1 +primary +running +unprotected +alpha +- /m);
  });

  it('no agent on the socket: exit 3 with the reason', async () => {
    const missing = path.join(tmp, 'nobody.sock');
    const run = await ftvm(['--socket', missing, 'status']);
    expect(run).toEqual({ code: 3, stdout: '', stderr: `ftvm: no ftvm agent at ${missing} (is \`ftvm agent\` running?)\n` });
    const json = await ftvm(['--socket', missing, 'switchover', 'vm1', '--json']);
    expect(json.code).toBe(3);
    expect(JSON.parse(json.stdout)).toEqual({ error: { message: `no ftvm agent at ${missing} (is \`ftvm agent\` running?)` } });
  });

  it('config check: a bad file exits 2 naming each field; a good one exits 0', async () => {
    const bad = writeConfig('bad.yaml', `${config.replace('http://10.0.0.3:2379', 'etcd host')}hearbeat: { intervalMs: 100 }\n`);
    const run = await ftvm(['config', 'check', bad]);
    expect(run.code).toBe(2);
    expect(run.stdout).toBe('');
    expect(run.stderr).toContain(`${bad}: invalid config`);
    expect(run.stderr).toContain('  - etcd.endpoints[0]: an http(s) URL such as http://10.0.0.3:2379');
    expect(run.stderr).toContain("  - (top level): unknown field 'hearbeat'");
    const json = await ftvm(['config', 'check', bad, '--json']);
    expect(json.code).toBe(2);
    expect(JSON.parse(json.stdout)).toEqual({ file: bad, ok: false, problems: ['etcd.endpoints[0]: an http(s) URL such as http://10.0.0.3:2379', "(top level): unknown field 'hearbeat'"] });

    const good = writeConfig('good.yaml', config);
    expect(await ftvm(['config', 'check', good])).toEqual({ code: 0, stdout: `${good}: ok — this host is alpha; hosts: alpha, beta; VMs: vm1 (alpha → beta)\n`, stderr: '' });
  });

  it('usage errors exit 2: bad VM name, bad interval, missing option, unknown command, no command', async () => {
    const cases = [['protect', 'vm 1', '--backup', 'beta'], ['protect', 'vm1', '--backup', 'beta', '--interval', '10'], ['protect', 'vm1'], ['explode'], []];
    const runs = await Promise.all(cases.map((args) => ftvm(['--socket', socketPath, ...args])));
    expect(runs.map((run) => run.code)).toEqual(cases.map(() => 2));
    expect(runs[0]!.stderr).toContain("'vm 1' is not a libvirt domain name");
    expect(runs[1]!.stderr).toContain('expected a whole number of milliseconds from 50 to 3600000');
    expect(runs[2]!.stderr).toContain("required option '--backup <host>' not specified");
    expect(runs[3]!.stderr).toContain("unknown command 'explode'");
    expect(runs[4]!.stderr).toContain('Usage: ftvm');
    expect(fake.calls.filter((call) => call.op === 'protect' && call.request.vm === 'vm1')).toEqual([]);
    expect((await ftvm(['--help'])).code).toBe(0);
  });

  it('agent with an invalid config exits 2 naming the field, before starting anything', async () => {
    const bad = writeConfig('bad-agent.yaml', config.replace('host: alpha', 'host: delta'));
    const run = await ftvm(['agent', '--config', bad]);
    expect(run.code).toBe(2);
    expect(run.stderr).toContain("host: 'delta' is not one of hosts (alpha, beta)");
  });
});

describe('ftvm agent (in process, fake runAgent and signals)', () => {
  const logFile = path.join(tmp, 'agent.log');
  const agentConfig = () => writeConfig('agent.yaml', `${config}log: { level: debug, file: ${logFile} }\n`);
  const sink = () => {
    let text = '';
    return { write: (s: string) => (text += s), get text() { return text; } };
  };

  it('runs the agent with the parsed config, a logger and metrics; SIGTERM stops it and exits 0', async () => {
    const signals = new EventEmitter();
    const seen: Parameters<RunAgent>[] = [];
    let stops = 0;
    const runAgent: RunAgent = async (...args) => {
      seen.push(args);
      return { stop: async () => void stops++ };
    };
    const exit = runCli(['agent', '--config', agentConfig()], { runAgent, signals, stdout: sink(), stderr: sink() });
    await expect.poll(() => seen.length).toBe(1);
    const [[config, options]] = seen as [Parameters<RunAgent>];
    expect(config).toMatchObject({ host: 'alpha', vms: [{ name: 'vm1', checkpointIntervalMs: 1_000 }] });
    expect(options.metrics).toBeInstanceOf(AgentMetrics);
    options.log.child({ vm: 'vm1' }).info('hello from the agent');
    signals.emit('SIGTERM');
    expect(await exit).toBe(0);
    expect(stops).toBe(1);
    expect(signals.listenerCount('SIGTERM') + signals.listenerCount('SIGINT') + signals.listenerCount('SIGHUP')).toBe(0);
    const lines = fs.readFileSync(logFile, 'utf8').trimEnd().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(lines).toEqual(
      expect.arrayContaining([
        expect.objectContaining({ name: 'ftvm-agent', host: 'alpha', vm: 'vm1', msg: 'hello from the agent' }),
        expect.objectContaining({ signal: 'SIGTERM', msg: 'stopping the agent' }),
        expect.objectContaining({ msg: 'agent stopped' }),
      ]),
    );
  });

  it('a second signal while stopping gives up waiting: exit 1', async () => {
    const signals = new EventEmitter();
    const stderr = sink();
    let started = false;
    const runAgent: RunAgent = async () => {
      started = true;
      return { stop: () => new Promise<void>(() => undefined) };
    };
    const exit = runCli(['agent', '--config', agentConfig()], { runAgent, signals, stdout: sink(), stderr });
    await expect.poll(() => started).toBe(true);
    signals.emit('SIGINT');
    signals.emit('SIGINT');
    expect(await exit).toBe(1);
    expect(stderr.text).toBe('ftvm agent: exiting without a clean stop: SIGINT received while stopping\n');
  });

  it('a stop that takes too long: exit 1', async () => {
    const signals = new EventEmitter();
    const stderr = sink();
    let started = false;
    const runAgent: RunAgent = async () => {
      started = true;
      return { stop: () => new Promise<void>(() => undefined) };
    };
    const exit = agentCommand({ configFile: agentConfig(), runAgent, signals, stderr, stopTimeoutMs: 50 });
    await expect.poll(() => started).toBe(true);
    signals.emit('SIGTERM');
    expect(await exit).toBe(1);
    expect(stderr.text).toBe('ftvm agent: exiting without a clean stop: it did not stop within 50 ms\n');
  });

  it('an agent that fails to start: exit 1 with its error', async () => {
    const stderr = sink();
    const runAgent: RunAgent = async () => {
      throw new Error('etcd at http://10.0.0.3:2379: no answer within 500 ms');
    };
    expect(await runCli(['agent', '--config', agentConfig()], { runAgent, signals: new EventEmitter(), stdout: sink(), stderr })).toBe(1);
    expect(stderr.text).toBe('ftvm agent: etcd at http://10.0.0.3:2379: no answer within 500 ms\n');
  });
});
