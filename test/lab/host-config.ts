/**
 * A lab host's files under its state dir: what host-init.sh binds over the machine's /etc/libvirt,
 * /var/lib/libvirt, /var/cache/libvirt, /var/log, /run, /etc/hosts and /etc/ssh/ssh_config.
 */
import fs from 'node:fs';
import path from 'node:path';
import { hostKeyPath } from './keys.js';
import { LAB_CACHE_ROOT, LAB_HOSTS, labHost, labSshKey, type LabHost } from './topology.js';

/** Directories a reboot keeps (disk) and the one it empties (/run). */
export const PERSISTENT_DIRS = ['etc-libvirt', 'lib-libvirt', 'cache-libvirt', 'log'] as const;

/** Bumped when what a host is made of changes, so that `up` rebuilds a lab made the old way. */
const LAYOUT_VERSION = '3';
const layoutFile = (host: LabHost) => path.join(host.stateDir, 'layout');
export const layoutCurrent = (host: LabHost) => fs.existsSync(layoutFile(host)) && fs.readFileSync(layoutFile(host), 'utf8').trim() === LAYOUT_VERSION;

export const sshdConfigPath = (host: LabHost) => path.join(host.stateDir, 'sshd_config');
export const hostsFilePath = (host: LabHost) => path.join(host.stateDir, 'hosts');

/** Lays out a fresh host: the machine's /etc/libvirt, adapted, and empty libvirt/log dirs. */
export function writeHostConfig(host: LabHost): void {
  fs.rmSync(host.stateDir, { recursive: true, force: true });
  for (const dir of [...PERSISTENT_DIRS, 'run']) fs.mkdirSync(path.join(host.stateDir, dir), { recursive: true });
  fs.rmSync(host.ramDir, { recursive: true, force: true });
  fs.mkdirSync(host.ramDir, { recursive: true });
  copyLibvirtConfig(host);
  fs.writeFileSync(sshdConfigPath(host), sshdConfig(host));
  fs.writeFileSync(hostsFilePath(host), hostsFile());
  fs.writeFileSync(layoutFile(host), `${LAYOUT_VERSION}\n`);
}

/** Empties the host's /run and its RAM tmpfs, as a reboot does; everything else of the host stays. */
export function resetRunDir(host: LabHost): void {
  for (const dir of [host.runDir, host.ramDir]) {
    fs.rmSync(dir, { recursive: true, force: true });
    fs.mkdirSync(dir, { recursive: true });
  }
}

/**
 * Probing QEMU's capabilities (two binaries: x86_64 and i386) is most of a libvirtd's start-up:
 * about 8 s here, against under 1 s with a cached probe. libvirt validates a cached probe against
 * the QEMU and libvirt binaries, the kernel and the CPU, and re-probes when stale, so reusing one
 * is safe.
 */
const capabilitiesDir = (host: LabHost) => path.join(host.libvirtCacheDir, 'qemu', 'capabilities');
const CAPABILITIES_CACHE = path.join(LAB_CACHE_ROOT, 'qemu-capabilities');

/** Gives a fresh host the cached probe results; false if there are none yet. */
export function seedQemuCapabilities(host: LabHost): boolean {
  if (!fs.existsSync(CAPABILITIES_CACHE)) return false;
  fs.cpSync(CAPABILITIES_CACHE, capabilitiesDir(host), { recursive: true });
  return true;
}

/** Keeps a host's (fresh or still valid) probe results for the next `up`. */
export function saveQemuCapabilities(host: LabHost): void {
  if (!fs.existsSync(capabilitiesDir(host))) return;
  fs.rmSync(CAPABILITIES_CACHE, { recursive: true, force: true });
  fs.mkdirSync(LAB_CACHE_ROOT, { recursive: true });
  fs.cpSync(capabilitiesDir(host), CAPABILITIES_CACHE, { recursive: true });
}

function copyLibvirtConfig(host: LabHost): void {
  const etc = host.libvirtEtcDir;
  fs.cpSync('/etc/libvirt', etc, { recursive: true, verbatimSymlinks: true });
  // Nothing of the machine's own libvirt comes along: no networks (the default one would create
  // virbr0 and run dnsmasq inside the host), no domains, no pools, nothing autostarted.
  for (const dir of ['qemu/networks', 'qemu/autostart', 'storage']) fs.rmSync(path.join(etc, dir), { recursive: true, force: true });
  for (const file of fs.readdirSync(path.join(etc, 'qemu'))) if (file.endsWith('.xml')) fs.rmSync(path.join(etc, 'qemu', file));
  fs.mkdirSync(path.join(etc, 'qemu', 'networks', 'autostart'), { recursive: true });

  setConf(path.join(etc, 'qemu.conf'), {
    // No AppArmor/SELinux labelling inside a namespace; QEMU runs as root like the daemon.
    security_driver: '"none"',
    user: '"root"',
    group: '"root"',
    dynamic_ownership: '0',
    // Three daemons share the guest images: xattr-based owner tracking would mix up their counts.
    remember_owner: '0',
    // Guest RAM on shared files (a backup's mapped standby) on a tmpfs, as the kvm_host role sets it.
    memory_backing_dir: `"${host.ramDir}"`,
  });
  setConf(path.join(etc, 'libvirtd.conf'), {
    host_uuid: `"${host.hostUuid}"`,
    log_outputs: '"3:file:/var/log/libvirt/libvirtd.log"',
  });
  setConf(path.join(etc, 'virtlogd.conf'), { log_outputs: '"3:file:/var/log/libvirt/virtlogd.log"' });
}

/**
 * Sets keys in a libvirt .conf: libvirt takes the first occurrence of a key, so an active line is
 * commented out before the lab's value is appended.
 */
function setConf(file: string, values: Record<string, string>): void {
  const keys = Object.keys(values);
  const lines = fs
    .readFileSync(file, 'utf8')
    .split('\n')
    .map((line) => (keys.some((key) => new RegExp(`^\\s*${key}\\s*=`).test(line)) ? `#${line}` : line));
  const added = Object.entries(values).map(([key, value]) => `${key} = ${value}`);
  fs.writeFileSync(file, [...lines, '', '# ftvm lab host', ...added, ''].join('\n'));
}

function sshdConfig(host: LabHost): string {
  return [
    `ListenAddress ${host.ip}`,
    'Port 22',
    `HostKey ${hostKeyPath(host)}`,
    'PidFile /run/sshd.pid',
    'PermitRootLogin prohibit-password',
    'PubkeyAuthentication yes',
    'PasswordAuthentication no',
    'KbdInteractiveAuthentication no',
    `AuthorizedKeysFile ${labSshKey()}.pub`,
    // Key-only root login needs none of Debian's PAM session stack (which expects systemd).
    'UsePAM no',
    'UseDNS no',
    // Tests open many short sessions at once; the default 10:30:100 drops some of them.
    'MaxStartups 50:30:100',
    'Subsystem sftp internal-sftp',
    '',
  ].join('\n');
}

/** The machine's /etc/hosts plus the lab's names, so libvirt (migration URIs) and ssh resolve them. */
function hostsFile(): string {
  const machine = fs.existsSync('/etc/hosts') ? fs.readFileSync('/etc/hosts', 'utf8').trimEnd() : '127.0.0.1 localhost';
  const lab = LAB_HOSTS.map((name) => `${labHost(name).ip} ${name}`);
  return `${machine}\n# ftvm lab\n${lab.join('\n')}\n`;
}
