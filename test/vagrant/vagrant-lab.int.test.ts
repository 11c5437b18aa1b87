/**
 * The Vagrant lab, the part that fits CI (issue 19): `bash vagrant/lab.sh --ci` builds the box
 * from Debian's packages (or finds it in the cache), brings `primary` up alone under TCG on the
 * lab's own libvirt networks (no NAT), provisions it with ansible/site.yml in systemd mode (its own
 * single-member etcd), provisions it again (must change nothing), and checks that the agent's
 * systemd unit and etcd are active; then `vagrant destroy -f`. The three-VM failover story
 * (`bash vagrant/lab.sh`) takes longer under nested TCG than CI allows; its figures are in
 * bench/results/vagrant-lab.json.
 */
import { spawn } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

const REPO = path.resolve(fileURLToPath(new URL('../..', import.meta.url)));
const DEADLINE_MS = 45 * 60_000;

function runLab(args: string[]): Promise<{ code: number | null; output: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn('bash', [path.join(REPO, 'vagrant', 'lab.sh'), ...args], { cwd: REPO, stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    const keep = (d: Buffer) => {
      output += d.toString();
    };
    child.stdout.on('data', keep);
    child.stderr.on('data', keep);
    // lab.sh bounds each of its steps; this is the backstop (SIGTERM lets its trap destroy the VMs)
    const timer = setTimeout(() => child.kill('SIGTERM'), DEADLINE_MS - 60_000);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, output });
    });
  });
}

describe('vagrant lab (TCG, offline)', () => {
  it(
    'boots primary from the local box, provisions it in systemd mode with the agent active, and a second provision changes nothing',
    async () => {
      const { code, output } = await runLab(['--ci']);
      const plain = output.replace(/\x1b\[[0-9;]*m/g, '');
      expect(code, plain.slice(-4000)).toBe(0);
      expect(plain).toMatch(/box ready in [\d.]+s/);
      expect(plain).toMatch(/1 VM\(s\) up in [\d.]+s/);
      expect(plain).toMatch(/second provision in [\d.]+s: changed=0\b/);
      expect(plain).toMatch(/agent active on primary \(systemd units\), etcd on primary/);
    },
    DEADLINE_MS,
  );
});
