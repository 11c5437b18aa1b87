import { createHash } from 'node:crypto';
import path from 'node:path';

/** The lab's three hosts, their addresses on the lab bridge, and where their state lives. */
export const LAB_HOSTS = ['primary', 'backup', 'witness'] as const;
export type LabHostName = (typeof LAB_HOSTS)[number];

/**
 * `FTVM_LAB_INSTANCE=2` builds a second, disjoint lab (ftvm2-*, 10.213.2.0/24, /var/lib/ftvm-lab2)
 * so the lab itself can be developed and tested while another session uses the default one.
 * Unset, every name is the documented default.
 */
const INSTANCE = parseInstance(process.env.FTVM_LAB_INSTANCE);
const PREFIX = `ftvm${INSTANCE || ''}`;
const SUBNET = `10.213.${INSTANCE}`;

export const LAB_BRIDGE = `${PREFIX}br0`;
export const LAB_SUBNET_PREFIX = 24;
/** The root namespace's own address on the bridge (tests and the demo reach the hosts from it). */
export const LAB_GATEWAY_IP = `${SUBNET}.1`;
const HOST_OCTET: Record<LabHostName, number> = { primary: 11, backup: 12, witness: 13 };

/** Wiped by `down`. */
export const LAB_STATE_ROOT = `/var/lib/ftvm-lab${INSTANCE || ''}`;
/** Kept across down/up, so pinned host keys and the client key stay valid. */
export const LAB_KEYS_ROOT = `/var/lib/ftvm-lab${INSTANCE || ''}-keys`;
/** The hosts' tmpfs for guest RAM files (libvirt's memory_backing_dir): emptied by a host's restart, wiped by `down`. */
export const LAB_RAM_ROOT = `/dev/shm/ftvm-lab${INSTANCE || ''}`;
/** Kept across down/up, safe to delete: libvirt's QEMU capabilities, probed once instead of per up. */
export const LAB_CACHE_ROOT = `/var/cache/ftvm-lab${INSTANCE || ''}`;

export interface LabHost {
  name: LabHostName;
  ip: string;
  netns: string;
  /** The root-namespace end of the host's veth pair (on the lab bridge); the other end is `eth0`. */
  vethOutside: string;
  stateDir: string;
  /** The host's /run, as seen from the root namespace. */
  runDir: string;
  /** libvirt's memory_backing_dir on this host (a tmpfs; the same path inside the host): mapped standbys' RAM files. */
  ramDir: string;
  /** The host's /var/lib/libvirt, /etc/libvirt, /var/cache/libvirt and /var/log, as seen from the root namespace. */
  libvirtLibDir: string;
  libvirtEtcDir: string;
  libvirtCacheDir: string;
  logDir: string;
  /** Reaches this host's own libvirtd from the root namespace (through its bind-mounted /run). */
  libvirtUri: string;
  sshTarget: string;
  hostKeyDir: string;
  /** libvirt's host UUID: distinct per host, or libvirt would take two lab hosts for one machine. */
  hostUuid: string;
  /** The host's link to the service network (see SERVICE_BRIDGE). */
  service: ServiceLink;
}

export function labHost(name: LabHostName): LabHost {
  const stateDir = path.join(LAB_STATE_ROOT, name);
  const runDir = path.join(stateDir, 'run');
  const ip = hostIp(name);
  return {
    name,
    ip,
    netns: `${PREFIX}-${name}`,
    vethOutside: `${PREFIX}-${name}0`, // ≤ 15 chars: "ftvm2-witness0" is 14
    stateDir,
    runDir,
    ramDir: path.join(LAB_RAM_ROOT, name),
    libvirtLibDir: path.join(stateDir, 'lib-libvirt'),
    libvirtEtcDir: path.join(stateDir, 'etc-libvirt'),
    libvirtCacheDir: path.join(stateDir, 'cache-libvirt'),
    logDir: path.join(stateDir, 'log'),
    libvirtUri: `qemu:///system?socket=${path.join(runDir, 'libvirt', 'libvirt-sock')}`,
    sshTarget: `root@${ip}`,
    hostKeyDir: path.join(LAB_KEYS_ROOT, name),
    hostUuid: stableUuid(`ftvm-lab${INSTANCE}:${name}`),
    service: serviceLink(name),
  };
}

export const hostIp = (name: LabHostName) => `${SUBNET}.${HOST_OCTET[name]}`;

/**
 * The service network: the guests' own L2 segment, the one their clients use (and whose packets
 * output commit holds back), apart from the lab network that carries checkpoints, SSH and etcd.
 * primary and backup each have a bridge SERVICE_HOST_BRIDGE (a guest's `<interface type='bridge'>`
 * names it; the same name on both hosts, so one domain XML runs on either) whose uplink is a veth
 * into the root namespace's SERVICE_BRIDGE; witness sits on that bridge with SERVICE_WITNESS_IP, as
 * a client of the guests would. No addresses on the bridges: the hosts themselves are not on it.
 */
export const SERVICE_BRIDGE = `${PREFIX}svc0`;
/** Inside primary and backup (their own netns: one name in every lab instance). */
export const SERVICE_HOST_BRIDGE = 'ftvmsvc';
/** A host's end of its service veth (enslaved to SERVICE_HOST_BRIDGE, or witness's address). */
export const SERVICE_HOST_LINK = 'svc0';
export const SERVICE_SUBNET_PREFIX = 24;
const SERVICE_SUBNET = `10.214.${INSTANCE}`;
export const SERVICE_WITNESS_IP = `${SERVICE_SUBNET}.13`;
/** A guest's address on the service network: .100 upwards (`index` 0..99). */
export function serviceGuestIp(index: number): string {
  if (!Number.isInteger(index) || index < 0 || index > 99) throw new Error(`service guest index must be 0..99, got ${index}`);
  return `${SERVICE_SUBNET}.${100 + index}`;
}

export interface ServiceLink {
  /** The root-namespace end, a port of SERVICE_BRIDGE; the host's end is SERVICE_HOST_LINK. */
  vethOutside: string;
  /** primary, backup: the bridge guests' taps join. witness: none (it has an address instead). */
  hostBridge: string | undefined;
  /** witness only. */
  ip: string | undefined;
}

export function serviceLink(name: LabHostName): ServiceLink {
  return {
    vethOutside: `${PREFIX}s-${name}`, // ≤ 15 chars: "ftvm2s-witness" is 14
    hostBridge: name === 'witness' ? undefined : SERVICE_HOST_BRIDGE,
    ip: name === 'witness' ? SERVICE_WITNESS_IP : undefined,
  };
}

export const labSshKey = () => path.join(LAB_KEYS_ROOT, 'id_ed25519');
export const labKnownHosts = () => path.join(LAB_KEYS_ROOT, 'known_hosts');
/** An ssh_config for the lab (`ssh -F <it> backup`); lab hosts use it as their /etc/ssh/ssh_config. */
export const labSshConfig = () => path.join(LAB_KEYS_ROOT, 'ssh_config');

/** A libvirt URI for `to`'s libvirtd over SSH (libssh transport: the lab key, the pinned host key). */
export function labRemoteLibvirtUri(to: LabHostName): string {
  return `qemu+libssh://root@${hostIp(to)}/system?keyfile=${labSshKey()}&known_hosts=${labKnownHosts()}&sshauth=privkey`;
}

function parseInstance(value: string | undefined): number {
  if (value === undefined || value === '' || value === '0') return 0;
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1 || n > 9) throw new Error(`FTVM_LAB_INSTANCE must be 1..9, got ${JSON.stringify(value)}`);
  return n;
}

function stableUuid(seed: string): string {
  const h = createHash('sha256').update(seed).digest('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-4${h.slice(13, 16)}-8${h.slice(17, 20)}-${h.slice(20, 32)}`;
}
