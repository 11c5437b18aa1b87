/**
 * The lab's wiring in the root namespace: the bridge with the root side's address, and per host a
 * network namespace joined to the bridge by a veth pair. No forwarding, no NAT: lab traffic stays
 * on the lab subnet.
 */
import fs from 'node:fs';
import path from 'node:path';
import { sh } from './sh.js';
import { LAB_BRIDGE, LAB_GATEWAY_IP, LAB_SUBNET_PREFIX, type LabHost } from './topology.js';

export const netnsFile = (host: LabHost) => path.join('/run/netns', host.netns);

export async function linkExists(name: string): Promise<boolean> {
  return (await sh`ip link show dev ${name}`.nothrow()).ok;
}

export async function netnsExists(host: LabHost): Promise<boolean> {
  return fs.existsSync(netnsFile(host));
}

/**
 * ftvm's QEMU asks for a 4 MiB send buffer on checkpoint sockets (patch 0014) so the stopped phase
 * never waits for the agent; the kernel caps it at net.core.wmem_max (Debian's default: 208 KiB).
 * ansible's kvm_host role raises it on a real host; the lab's hosts share this machine's kernel,
 * and a network namespace cannot set it, so the lab does it here. Only ever raised.
 */
export async function ensureSocketBufferLimit(): Promise<void> {
  const current = Number((await sh`sysctl -n net.core.wmem_max`).stdout.trim());
  if (current < CHECKPOINT_SOCKET_BUFFER) await sh`sysctl -qw net.core.wmem_max=${CHECKPOINT_SOCKET_BUFFER}`;
}

const CHECKPOINT_SOCKET_BUFFER = 4 * 1024 * 1024;

/** The bridge, up, with exactly the lab's root-side address. */
export async function ensureBridge(): Promise<void> {
  if (!(await linkExists(LAB_BRIDGE))) {
    await sh`ip link add ${LAB_BRIDGE} type bridge stp_state 0 forward_delay 0`;
    // The root side needs no IPv6 link-local chatter on the lab segment.
    await sh`sysctl -qw net.ipv6.conf.${LAB_BRIDGE}.disable_ipv6=1`.nothrow();
  }
  if (!(await bridgeHasAddress())) await sh`ip addr replace ${LAB_GATEWAY_IP}/${LAB_SUBNET_PREFIX} dev ${LAB_BRIDGE}`;
  await sh`ip link set ${LAB_BRIDGE} up`;
}

export async function bridgeHealthy(): Promise<boolean> {
  const out = await sh`ip -o link show dev ${LAB_BRIDGE}`.nothrow();
  return out.ok && /[<,]UP[,>]/.test(out.stdout) && (await bridgeHasAddress());
}

async function bridgeHasAddress(): Promise<boolean> {
  const out = await sh`ip -o -4 addr show dev ${LAB_BRIDGE}`.nothrow();
  return out.ok && out.stdout.includes(` ${LAB_GATEWAY_IP}/${LAB_SUBNET_PREFIX} `);
}

export async function deleteBridge(): Promise<void> {
  if (await linkExists(LAB_BRIDGE)) await sh`ip link del ${LAB_BRIDGE}`;
}

/** The host's netns with lo, and eth0 (the host's address) paired with `vethOutside` on the bridge. */
export async function createHostNetwork(host: LabHost): Promise<void> {
  await sh`ip netns add ${host.netns}`;
  await sh`ip link add ${host.vethOutside} type veth peer name eth0 netns ${host.netns}`;
  await sh`sysctl -qw net.ipv6.conf.${host.vethOutside}.disable_ipv6=1`.nothrow();
  await sh`ip link set ${host.vethOutside} master ${LAB_BRIDGE} up`;
  await sh`ip -n ${host.netns} addr add ${host.ip}/${LAB_SUBNET_PREFIX} dev eth0`;
  await sh`ip -n ${host.netns} link set eth0 up`;
  await sh`ip -n ${host.netns} link set lo up`;
}

/**
 * Deletes the veth (both ends go with it, at once rather than when the kernel gets round to
 * freeing the namespace) and the netns mount. Call only after the host's processes are gone.
 */
export async function deleteHostNetwork(host: LabHost): Promise<void> {
  if (await linkExists(host.vethOutside)) await sh`ip link del ${host.vethOutside}`;
  if (await netnsExists(host)) await sh`ip netns del ${host.netns}`;
}

/** Whether the host's network is as createHostNetwork left it (bridge port and address present). */
export async function hostNetworkPresent(host: LabHost): Promise<boolean> {
  if (!(await netnsExists(host))) return false;
  const port = await sh`ip -o link show dev ${host.vethOutside}`.nothrow();
  if (!port.ok || !port.stdout.includes(`master ${LAB_BRIDGE}`)) return false;
  const addr = await sh`ip -n ${host.netns} -o -4 addr show dev eth0`.nothrow();
  return addr.ok && addr.stdout.includes(` ${host.ip}/${LAB_SUBNET_PREFIX} `);
}

export async function linkUp(host: LabHost): Promise<boolean> {
  const out = await sh`ip -o link show dev ${host.vethOutside}`.nothrow();
  return out.ok && /[<,]UP[,>]/.test(out.stdout);
}

/** Unplugs (or replugs) the host's cable: the bridge side of its veth goes down, eth0 loses carrier. */
export async function setLink(host: LabHost, up: boolean): Promise<void> {
  await sh`ip link set ${host.vethOutside} ${up ? 'up' : 'down'}`;
}
