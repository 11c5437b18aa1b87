/**
 * The lab's SSH material, outside the wiped state so that it survives down/up: one client key
 * (authorized on every host), one host key per host, a known_hosts pinning them, and an
 * ssh_config that uses both.
 */
import fs from 'node:fs';
import path from 'node:path';
import { sh } from './sh.js';
import { LAB_HOSTS, LAB_KEYS_ROOT, labHost, labKnownHosts, labSshConfig, labSshKey, type LabHost } from './topology.js';

export const hostKeyPath = (host: LabHost) => path.join(host.hostKeyDir, 'ssh_host_ed25519_key');

/** Creates what is missing; true if any key was (re)generated, which running sshds do not know. */
export async function ensureKeys(): Promise<boolean> {
  // sshd's StrictModes wants the authorized key and host keys in root-owned, non-writable dirs.
  fs.mkdirSync(LAB_KEYS_ROOT, { recursive: true, mode: 0o700 });
  fs.chmodSync(LAB_KEYS_ROOT, 0o700);
  let generated = await ensureKeyPair(labSshKey(), 'ftvm-lab');
  const knownHosts: string[] = [];
  const aliases: string[] = [];
  for (const name of LAB_HOSTS) {
    const host = labHost(name);
    fs.mkdirSync(host.hostKeyDir, { recursive: true, mode: 0o700 });
    generated = (await ensureKeyPair(hostKeyPath(host), `ftvm-lab-${name}`)) || generated;
    const [type, key] = fs.readFileSync(`${hostKeyPath(host)}.pub`, 'utf8').trim().split(/\s+/);
    knownHosts.push(`${host.ip},${name} ${type} ${key}`);
    aliases.push(`Host ${name}\n  HostName ${host.ip}`);
  }
  writeIfChanged(labKnownHosts(), `${knownHosts.join('\n')}\n`);
  writeIfChanged(labSshConfig(), sshConfig(aliases));
  return generated;
}

async function ensureKeyPair(file: string, comment: string): Promise<boolean> {
  if (fs.existsSync(file) && fs.existsSync(`${file}.pub`)) return false;
  fs.rmSync(file, { force: true });
  fs.rmSync(`${file}.pub`, { force: true });
  await sh`ssh-keygen -q -t ed25519 -N ${''} -C ${comment} -f ${file}`;
  return true;
}

function sshConfig(aliases: string[]): string {
  const ips = LAB_HOSTS.map((name) => labHost(name).ip).join(' ');
  return [
    '# ftvm lab: written by test/lab/keys.ts; also /etc/ssh/ssh_config inside every lab host.',
    ...aliases,
    `Host ${LAB_HOSTS.join(' ')} ${ips}`,
    '  User root',
    `  IdentityFile ${labSshKey()}`,
    '  IdentitiesOnly yes',
    `  UserKnownHostsFile ${labKnownHosts()}`,
    '  StrictHostKeyChecking yes',
    '  BatchMode yes',
    '  ConnectTimeout 5',
    '',
  ].join('\n');
}

function writeIfChanged(file: string, text: string): void {
  if (fs.existsSync(file) && fs.readFileSync(file, 'utf8') === text) return;
  fs.writeFileSync(file, text);
}
