/**
 * Provisioning, exercised for real: ansible-lint and the playbook's syntax check, `vagrant
 * validate`, then ansible/site.yml run twice against the lab hosts over SSH (the second run must
 * change nothing), the agents it started answering `ftvm status --json`, and one of them
 * protecting a VM. See ansible/README.md ("The lab variation") for how the lab inventory differs
 * from real hosts.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { AgentStatus, VmStatus } from '@ftvm/coordinator';
import { ftReadyFromSpec } from '@ftvm/libvirt';
import { Etcd3 } from 'etcd3';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildGuest } from '../guest/boot-qemu.js';
import { hostInfo, labSshConfig, labUp, type LabHostName } from '../lab/lab.js';
import { sleep } from '../lab/wait.js';

const REPO = path.resolve(fileURLToPath(new URL('../..', import.meta.url)));
const ANSIBLE = path.join(REPO, 'ansible');
const VAGRANT = path.join(REPO, 'vagrant');
const KVM_HOSTS = ['primary', 'backup'] as const;
const VM = 'prov-vm';

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
  ms: number;
}

/** Runs a command to its end (or its deadline), output captured; never throws on a non-zero exit. */
function run(argv: string[], options: { cwd?: string; env?: NodeJS.ProcessEnv; timeoutMs: number }): Promise<Run> {
  const started = performance.now();
  return new Promise((resolve, reject) => {
    const child = spawn(argv[0]!, argv.slice(1), { cwd: options.cwd, env: options.env ?? process.env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), options.timeoutMs);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr, ms: Math.round(performance.now() - started) });
    });
  });
}

const ansibleEnv: NodeJS.ProcessEnv = {
  ...process.env,
  ANSIBLE_CONFIG: path.join(ANSIBLE, 'ansible.cfg'),
  ANSIBLE_NOCOLOR: '1',
  ANSIBLE_FORCE_COLOR: '0',
  PY_COLORS: '0',
};

/** `host : ok=N changed=N unreachable=N failed=N …` lines of the last PLAY RECAP. */
function parseRecap(output: string): Record<string, Record<string, number>> {
  const at = output.lastIndexOf('PLAY RECAP');
  if (at < 0) throw new Error(`no PLAY RECAP in the output:\n${output.slice(-3000)}`);
  const recap: Record<string, Record<string, number>> = {};
  for (const line of output.slice(at).split('\n').slice(1)) {
    const m = /^(\S+)\s+:\s+(.*\S)\s*$/.exec(line);
    if (!m) continue;
    recap[m[1]!] = Object.fromEntries([...m[2]!.matchAll(/(\w+)=(\d+)/g)].map((f) => [f[1]!, Number(f[2])]));
  }
  return recap;
}

let runs = 0;
async function playbook(): Promise<{ run: Run; recap: Record<string, Record<string, number>> }> {
  const result = await run(['ansible-playbook', '-i', 'inventory/lab', 'site.yml'], { cwd: ANSIBLE, env: ansibleEnv, timeoutMs: 900_000 });
  const log = path.join(os.tmpdir(), `ftvm-provision-run${++runs}.log`);
  fs.writeFileSync(log, `${result.stdout}\n--- stderr\n${result.stderr}`);
  if (result.code !== 0) throw new Error(`ansible-playbook exited ${result.code} after ${result.ms} ms (whole output: ${log}):\n${result.stdout.slice(-6000)}\n${result.stderr.slice(-2000)}`);
  return { run: result, recap: parseRecap(result.stdout) };
}

/** The tasks that reported `changed` (for a readable failure). */
function changedTasks(output: string): string[] {
  const out: string[] = [];
  let task = '';
  for (const line of output.split('\n')) {
    const t = /^(?:TASK|RUNNING HANDLER) \[(.*)\]/.exec(line);
    if (t) task = t[1]!;
    else if (/^changed: /.test(line)) out.push(`${task}: ${line}`);
  }
  return out;
}

/** A command on a lab host over SSH, as an operator would run it (the lab's ssh_config: key, pinned host key). */
const ssh = (host: LabHostName, command: string, timeoutMs = 60_000) => run(['ssh', '-F', labSshConfig(), host, command], { timeoutMs });

/** The lab inventory's value of a variable for a host (literal values only). */
async function inventoryVar(host: LabHostName, name: string): Promise<string> {
  const result = await run(['ansible-inventory', '-i', 'inventory/lab', '--host', host], { cwd: ANSIBLE, env: ansibleEnv, timeoutMs: 60_000 });
  const vars = JSON.parse(result.stdout) as Record<string, unknown>;
  const value = vars[name];
  if (typeof value !== 'string' || value.includes('{{')) throw new Error(`inventory/lab: ${name} of ${host} is ${JSON.stringify(value)}`);
  return value;
}

let ftvmCli = '';
let agentCtl = '';
let etcdCtl = '';
let etcdEnvFile = '';
let etcdEndpoint = '';
let provisioned = false;

async function agentStatus(host: LabHostName): Promise<AgentStatus> {
  const result = await ssh(host, `${ftvmCli} status --json`);
  if (result.code !== 0) throw new Error(`ftvm status on ${host} exited ${result.code}: ${result.stderr}${result.stdout}`);
  return JSON.parse(result.stdout) as AgentStatus;
}

describe('provisioning: ansible/ and vagrant/', () => {
  beforeAll(async () => {
    await labUp();
  });

  afterAll(async () => {
    if (!provisioned) return;
    // Leave the lab hosts as the playbook found them: no VM, no agents, no etcd, no hook.
    await ssh('primary', `${ftvmCli} unprotect ${VM} --json`, 60_000);
    await Promise.all([
      ...KVM_HOSTS.map((host) =>
        ssh(host, `virsh destroy ${VM}; virsh undefine ${VM}; ${agentCtl} stop; node ${REPO}/packages/libvirt/dist/hook/cli.js uninstall --reload`, 60_000),
      ),
      ssh('witness', `${etcdCtl} stop`, 60_000),
    ]);
  }, 240_000);

  it('passes ansible-lint (production profile, offline) and the syntax check of every inventory', async () => {
    const lint = await run(['ansible-lint', '--nocolor'], { cwd: ANSIBLE, env: ansibleEnv, timeoutMs: 300_000 });
    expect(lint.code, `${lint.stdout}\n${lint.stderr}`).toBe(0);
    expect(lint.stdout + lint.stderr).toMatch(/Passed with production profile/);
    for (const inventory of ['lab', 'vagrant', 'production.example']) {
      const check = await run(['ansible-playbook', '-i', `inventory/${inventory}`, 'site.yml', '--syntax-check'], { cwd: ANSIBLE, env: ansibleEnv, timeoutMs: 120_000 });
      expect(check.code, `${inventory}: ${check.stdout}\n${check.stderr}`).toBe(0);
    }
  });

  it('has a Vagrantfile that vagrant validates (no VM is started)', async () => {
    const validate = await run(['vagrant', 'validate'], {
      cwd: VAGRANT,
      env: { ...process.env, VAGRANT_CHECKPOINT_DISABLE: '1', VAGRANT_NO_COLOR: '1' },
      timeoutMs: 120_000,
    });
    expect(validate.code, `${validate.stdout}\n${validate.stderr}`).toBe(0);
    expect(validate.stdout).toMatch(/Vagrantfile validated successfully/);
    // What validate does not look at: the files the ansible provisioner is pointed at.
    const vagrantfile = fs.readFileSync(path.join(VAGRANT, 'Vagrantfile'), 'utf8');
    expect(vagrantfile).toMatch(/libvirt\.nested = true/);
    expect(vagrantfile).toMatch(/cpu_mode = "host-passthrough"/);
    for (const file of ['ansible/site.yml', 'ansible/ansible.cfg', 'ansible/inventory/vagrant/hosts.yml']) expect(fs.existsSync(path.join(REPO, file)), file).toBe(true);
  });

  it('provisions the lab hosts over SSH, and a second run changes nothing', async () => {
    [ftvmCli, agentCtl] = await Promise.all([inventoryVar('primary', 'ftvm_cli'), inventoryVar('primary', 'ftvm_prefix').then((p) => `${p}/sbin/ftvm-agent-ctl`)]);
    etcdCtl = `${await inventoryVar('witness', 'ftvm_prefix')}/sbin/ftvm-etcd-ctl`;
    etcdEnvFile = await inventoryVar('witness', 'ftvm_etcd_env_file');
    provisioned = true;

    const first = await playbook();
    for (const host of ['primary', 'backup', 'witness']) {
      expect(first.recap[host], `${host} in the first run's recap`).toMatchObject({ failed: 0, unreachable: 0 });
    }
    const second = await playbook();
    for (const host of ['primary', 'backup', 'witness']) {
      expect(second.recap[host], `${host} in the second run's recap`).toMatchObject({ failed: 0, unreachable: 0 });
    }
    expect(changedTasks(second.run.stdout), 'tasks changed in the second run').toEqual([]);
    for (const host of ['primary', 'backup', 'witness']) expect(second.recap[host]!.changed, host).toBe(0);
    console.log(`playbook: first run ${first.run.ms} ms, second ${second.run.ms} ms`);
  }, 1_800_000); // two runs of about a minute each on a quiet 2-core machine; far more on a busy one

  it('left an agent running on each KVM host that answers `ftvm status --json` on its control socket', async () => {
    expect(provisioned).toBe(true);
    for (const host of KVM_HOSTS) {
      const ctl = await ssh(host, `${agentCtl} status`);
      expect(ctl.code, `${host}: ${ctl.stdout}${ctl.stderr}`).toBe(0);
      const status = await agentStatus(host);
      expect(status.host).toBe(host);
      expect(status.lease.healthy, `${host}'s lease (etcd on the witness, from the etcd_witness role)`).toBe(true);
    }
    // The witness's etcd is the role's (not the lab's own on 2379), with the raft timing it sets.
    const etcdEnv = await ssh('witness', `grep -E '^ETCD_(ADVERTISE_CLIENT_URLS|HEARTBEAT_INTERVAL|ELECTION_TIMEOUT)=' ${etcdEnvFile}`);
    expect(etcdEnv.stdout).toMatch(/ETCD_HEARTBEAT_INTERVAL=20\n/);
    expect(etcdEnv.stdout).toMatch(/ETCD_ELECTION_TIMEOUT=200\n/);
    etcdEndpoint = /ETCD_ADVERTISE_CLIENT_URLS=(\S+)/.exec(etcdEnv.stdout)![1]!;
    // The hook is installed where the lab host's libvirtd looks.
    for (const host of KVM_HOSTS) {
      const hook = await ssh(host, `node ${REPO}/packages/libvirt/dist/hook/cli.js status`);
      expect(hook.code, `${host}: ${hook.stdout}${hook.stderr}`).toBe(0);
    }
  });

  it('the agent it installed protects a VM', async () => {
    expect(etcdEndpoint).not.toBe('');
    // A small FT-ready guest on primary, on the patched QEMU the playbook built and linked.
    const image = await buildGuest();
    const emulator = fs.readlinkSync(path.join(hostInfo('primary').libvirtLibDir, 'ftvm', 'bin', 'qemu-system-x86_64'));
    const ready = ftReadyFromSpec(
      `
name: ${VM}
type: qemu
memoryMiB: 256
boot: { kernel: ${image.kernel}, initrd: ${image.initrd}, cmdline: "${image.cmdline}" }
serialLog: /run/ftvm/${VM}.serial.log
ftvm:
  peer: { host: backup }
  checkpointIntervalMs: 1000
`,
      { emulator: { path: emulator, require: true } },
    );
    const xmlFile = path.join(hostInfo('primary').runDir, `${VM}.xml`);
    fs.writeFileSync(xmlFile, ready.xml);
    for (const host of KVM_HOSTS) await ssh(host, `virsh destroy ${VM}; virsh undefine ${VM}`);
    // No record of this VM left in the role's etcd from an earlier run.
    const etcd = new Etcd3({ hosts: [etcdEndpoint] });
    try {
      await etcd.delete().prefix(`/ftvm/vms/${VM}/`);
    } finally {
      etcd.close();
    }
    const define = await ssh('primary', `virsh define /run/${VM}.xml && virsh start ${VM}`, 120_000);
    expect(define.code, define.stdout + define.stderr).toBe(0);

    const protect = await ssh('primary', `${ftvmCli} protect ${VM} --backup backup --json`, 600_000);
    expect(protect.code, `ftvm protect: ${protect.stdout}${protect.stderr}`).toBe(0);

    const deadline = performance.now() + 120_000;
    let vm: VmStatus | undefined;
    for (;;) {
      vm = (await agentStatus('primary')).vms.find((v) => v.name === VM);
      if (vm?.role === 'primary' && vm.phase === 'protected' && (vm.lastCheckpoint?.epoch ?? 0) >= 2) break;
      if (performance.now() > deadline) throw new Error(`${VM} not protected with committed checkpoints in time: ${JSON.stringify(vm)}`);
      await sleep(500);
    }
    expect(vm?.backupHost).toBe('backup');
    const onBackup = (await agentStatus('backup')).vms.find((v) => v.name === VM);
    expect(onBackup?.role, JSON.stringify(onBackup)).toBe('backup');
  }, 900_000);
});
