/**
 * The lab's wiring in the root namespace: the bridge with the root side's address, and per host a
 * network namespace joined to the bridge by a veth pair. No forwarding, no NAT: lab traffic stays
 * on the lab subnet.
 */
import fs from 'node:fs';
import path from 'node:path';
import { sh } from './sh.js';
import {
  LAB_BRIDGE,
  LAB_GATEWAY_IP,
  LAB_SUBNET_PREFIX,
  SERVICE_BRIDGE,
  SERVICE_HOST_LINK,
  SERVICE_SUBNET_PREFIX,
  type LabHost,
} from './topology.js';

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
  await deleteServiceLink(host);
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

interface LinkState {
  /** Administratively up (the UP flag), whatever the carrier. */
  up: boolean;
  master: string | undefined;
}

/**
 * Every link of a namespace (the root one, or a host's netns) in one `ip` call: health checks run
 * on every `labUp`, and each spawned `ip` costs tens of ms on a loaded machine.
 */
async function links(netns?: string): Promise<Map<string, LinkState>> {
  const out = await (netns ? sh`ip -n ${netns} -o link show` : sh`ip -o link show`).nothrow();
  const map = new Map<string, LinkState>();
  if (!out.ok) return map;
  for (const line of out.stdout.split('\n')) {
    // "12: ftvm-primary0@if2: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 … master ftvmbr0 state UP …"
    const m = /^\d+: ([^:@\s]+)(?:@\S+)?: <([^>]*)>(.*)$/.exec(line.trim());
    if (m) map.set(m[1]!, { up: m[2]!.split(',').includes('UP'), master: / master (\S+)/.exec(m[3]!)?.[1] });
  }
  return map;
}

/** The host's cable is plugged: its lab veth is up, and its service veth too where there is one. */
export async function linkUp(host: LabHost): Promise<boolean> {
  const root = await links();
  return root.get(host.vethOutside)?.up === true && root.get(host.service.vethOutside)?.up !== false;
}

/** The host's lab veth alone (linkUp also asks for the service uplink). */
export async function labLinkUp(host: LabHost): Promise<boolean> {
  return (await links()).get(host.vethOutside)?.up === true;
}

/**
 * Unplugs (or replugs) the host's cable: the bridge side of its veth goes down, eth0 loses carrier;
 * so does its service uplink (one cable: a host cut off loses both networks).
 */
export async function setLink(host: LabHost, up: boolean): Promise<void> {
  await sh`ip link set ${host.vethOutside} ${up ? 'up' : 'down'}`;
  if (await linkExists(host.service.vethOutside)) await sh`ip link set ${host.service.vethOutside} ${up ? 'up' : 'down'}`;
}

// ---- the service network (topology.ts, SERVICE_BRIDGE) ------------------------------------------

/** The root namespace's service bridge, up, without an address. */
export async function ensureServiceBridge(): Promise<void> {
  if (!(await linkExists(SERVICE_BRIDGE))) {
    await sh`ip link add ${SERVICE_BRIDGE} type bridge stp_state 0 forward_delay 0`;
    await sh`sysctl -qw net.ipv6.conf.${SERVICE_BRIDGE}.disable_ipv6=1`.nothrow();
  }
  await sh`ip link set ${SERVICE_BRIDGE} up`;
}

export async function serviceBridgeHealthy(): Promise<boolean> {
  return (await links()).get(SERVICE_BRIDGE)?.up === true;
}

export async function deleteServiceBridge(): Promise<void> {
  if (await linkExists(SERVICE_BRIDGE)) await sh`ip link del ${SERVICE_BRIDGE}`;
}

/**
 * The host's service uplink: a veth from SERVICE_BRIDGE to SERVICE_HOST_LINK in the host, which is
 * a port of the host's bridge (primary, backup: where libvirt plugs guest taps) or carries the
 * host's service address (witness). Up or down as `up` says (a cut host stays cut).
 */
export async function createServiceLink(host: LabHost, up = true): Promise<void> {
  const { vethOutside, hostBridge, ip } = host.service;
  const inNetns = (argv: string[]) => sh`nsenter ${`--net=${netnsFile(host)}`} -- ${argv}`;
  await sh`ip link add ${vethOutside} type veth peer name ${SERVICE_HOST_LINK} netns ${host.netns}`;
  await sh`sysctl -qw net.ipv6.conf.${vethOutside}.disable_ipv6=1`.nothrow();
  await sh`ip link set ${vethOutside} master ${SERVICE_BRIDGE} ${up ? 'up' : 'down'}`;
  // No IPv6 chatter from the host's side of the segment (the guests' own traffic is what counts).
  await inNetns(['sysctl', '-qw', `net.ipv6.conf.${SERVICE_HOST_LINK}.disable_ipv6=1`]).nothrow();
  if (hostBridge) {
    if (!(await sh`ip -n ${host.netns} link show dev ${hostBridge}`.nothrow()).ok) {
      await sh`ip -n ${host.netns} link add ${hostBridge} type bridge stp_state 0 forward_delay 0`;
      await inNetns(['sysctl', '-qw', `net.ipv6.conf.${hostBridge}.disable_ipv6=1`]).nothrow();
    }
    await sh`ip -n ${host.netns} link set ${SERVICE_HOST_LINK} master ${hostBridge}`;
    await sh`ip -n ${host.netns} link set ${hostBridge} up`;
  }
  if (ip) await sh`ip -n ${host.netns} addr add ${ip}/${SERVICE_SUBNET_PREFIX} dev ${SERVICE_HOST_LINK}`;
  await sh`ip -n ${host.netns} link set ${SERVICE_HOST_LINK} up`;
}

/** Deletes the host's service veth (both ends); its bridge goes with its netns. */
export async function deleteServiceLink(host: LabHost): Promise<void> {
  if (await linkExists(host.service.vethOutside)) await sh`ip link del ${host.service.vethOutside}`;
}

/** Whether the host's service uplink is as createServiceLink left it (up or cut). */
export async function serviceLinkPresent(host: LabHost): Promise<boolean> {
  if (!(await netnsExists(host))) return false;
  const { vethOutside, hostBridge, ip } = host.service;
  if ((await links()).get(vethOutside)?.master !== SERVICE_BRIDGE) return false;
  const inside = await links(host.netns);
  const uplink = inside.get(SERVICE_HOST_LINK);
  if (!uplink?.up) return false;
  if (hostBridge && (uplink.master !== hostBridge || !inside.get(hostBridge)?.up)) return false;
  if (ip) {
    const addr = await sh`ip -n ${host.netns} -o -4 addr show dev ${SERVICE_HOST_LINK}`.nothrow();
    if (!addr.ok || !addr.stdout.includes(` ${ip}/${SERVICE_SUBNET_PREFIX} `)) return false;
  }
  return true;
}
