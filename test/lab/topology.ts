import path from 'node:path';

/** The lab's three hosts, their addresses on the lab bridge, and where their state lives. */
export const LAB_HOSTS = ['primary', 'backup', 'witness'] as const;
export type LabHostName = (typeof LAB_HOSTS)[number];

export const LAB_BRIDGE = 'ftvmbr0';
export const LAB_SUBNET_PREFIX = 24;
/** The root namespace's own address on the bridge (tests and the demo reach the hosts from it). */
export const LAB_GATEWAY_IP = '10.213.0.1';
const HOST_IPS: Record<LabHostName, string> = { primary: '10.213.0.11', backup: '10.213.0.12', witness: '10.213.0.13' };

/** Wiped by `down`. */
export const LAB_STATE_ROOT = '/var/lib/ftvm-lab';
/** Kept across down/up, so pinned host keys and the client key stay valid. */
export const LAB_KEYS_ROOT = '/var/lib/ftvm-lab-keys';

export interface LabHost {
  name: LabHostName;
  ip: string;
  netns: string;
  /** The root-namespace end of the host's veth pair (on the lab bridge). */
  vethOutside: string;
  stateDir: string;
  /** The host's /run, as seen from the root namespace. */
  runDir: string;
  /** The host's /var/lib/libvirt, /etc/libvirt and /var/log, as seen from the root namespace. */
  libvirtLibDir: string;
  libvirtEtcDir: string;
  logDir: string;
  /** Reaches this host's own libvirtd from the root namespace (through its bind-mounted /run). */
  libvirtUri: string;
  sshTarget: string;
  hostKeyDir: string;
}

export function labHost(name: LabHostName): LabHost {
  const stateDir = path.join(LAB_STATE_ROOT, name);
  const runDir = path.join(stateDir, 'run');
  return {
    name,
    ip: HOST_IPS[name],
    netns: `ftvm-${name}`,
    vethOutside: `ftvm-${name}0`,
    stateDir,
    runDir,
    libvirtLibDir: path.join(stateDir, 'lib-libvirt'),
    libvirtEtcDir: path.join(stateDir, 'etc-libvirt'),
    logDir: path.join(stateDir, 'log'),
    libvirtUri: `qemu:///system?socket=${path.join(runDir, 'libvirt', 'libvirt-sock')}`,
    sshTarget: `root@${HOST_IPS[name]}`,
    hostKeyDir: path.join(LAB_KEYS_ROOT, name),
  };
}

export const labSshKey = () => path.join(LAB_KEYS_ROOT, 'id_ed25519');
export const labKnownHosts = () => path.join(LAB_KEYS_ROOT, 'known_hosts');

/** A libvirt URI for `to`'s libvirtd over SSH (libssh transport: the lab key, the pinned host key). */
export function labRemoteLibvirtUri(to: LabHostName): string {
  const keys = LAB_KEYS_ROOT;
  return `qemu+libssh://root@${HOST_IPS[to]}/system?keyfile=${keys}/id_ed25519&known_hosts=${keys}/known_hosts&sshauth=privkey`;
}
