/** The clock-probe test guest as an ftvm domain spec (YAML, as `ftReadyFromSpec` reads it). */
import { stringify } from 'yaml';
import type { ProbeDisk, ProbeDisks } from '../support/disk-check.js';
import { SERVICE_HOST_BRIDGE } from '../lab/topology.js';
import { withClocksource, type ProbeClocksource } from '../support/probe-domain.js';
import { buildGuest } from './boot-qemu.js';

export interface ProbeGuestSpec {
  name: string;
  /** The peer host in the spec's `ftvm` block, and its libvirt URI when the test needs one. */
  peer: { host: string; uri?: string };
  checkpointIntervalMs: number;
  /** Where the guest's probe listens (forwarded from the host, so it follows the VM). */
  probeListen: { address: string; port: number };
  workloadMiBps?: number;
  /** Guest memory (default 256 MiB). */
  memoryMiB?: number;
  /** vCPUs (default 1). */
  vcpus?: number;
  /** The guest kernel's clocksource (default: the image's, tsc). */
  clocksource?: ProbeClocksource;
  /** Give the guest its qemu-ga channel (`virsh shutdown` through the agent, guest-exec). */
  agent?: boolean;
  /**
   * The probe's disks (createProbeDisks()), as the spec's `disks` (ring first), with their serials
   * and cache='none' (the ring's O_DIRECT writes reach the image file, not a host page cache).
   */
  disks?: ProbeDisks;
  /**
   * The probe's service (README "Service"): a second virtio NIC on `bridge` (default the lab's
   * service bridge, `ftvmsvc`), found in the guest by `mac`, with address `ip` (CIDR); the probe sends its counter
   * to `peer` (`addr:port`, UDP) every ms and answers on TCP port 7002.
   */
  service?: ProbeService;
}

export interface ProbeService {
  ip: string;
  peer: string;
  mac: string;
  bridge?: string;
}

/** Kernel arguments that make the guest's init bring the service up (test/guest/init). */
export function serviceCmdline(service: ProbeService): string {
  if (!/^\d+\.\d+\.\d+\.\d+\/\d+$/.test(service.ip)) throw new Error(`service ip must be an IPv4 address with a prefix length (10.214.0.100/24), got ${JSON.stringify(service.ip)}`);
  if (!/^\d+\.\d+\.\d+\.\d+:\d+$/.test(service.peer)) throw new Error(`service peer must be addr:port (10.214.0.13:7001), got ${JSON.stringify(service.peer)}`);
  return `ftvm.svcip=${service.ip} ftvm.svcpeer=${service.peer} ftvm.svcmac=${service.mac.toLowerCase()}`;
}

export async function probeGuestYaml(spec: ProbeGuestSpec): Promise<string> {
  const image = await buildGuest();
  return stringify({
    name: spec.name,
    type: 'qemu',
    memoryMiB: spec.memoryMiB ?? 256,
    ...(spec.vcpus ? { vcpus: spec.vcpus } : {}),
    boot: { kernel: image.kernel, initrd: image.initrd, cmdline: [spec.clocksource ? withClocksource(image.cmdline, spec.clocksource) : image.cmdline, spec.service ? serviceCmdline(spec.service) : ''].filter(Boolean).join(' ') },
    serialLog: `/run/ftvm/${spec.name}.serial.log`,
    ...(spec.disks ? { disks: [spec.disks.ring, spec.disks.fs].filter((d): d is ProbeDisk => d !== undefined).map(({ path, format, serial }) => ({ path, format, serial, cache: 'none' })) } : {}),
    ...(spec.service ? { nics: [{ bridge: spec.service.bridge ?? SERVICE_HOST_BRIDGE, mac: spec.service.mac }] } : {}),
    ftvm: { peer: spec.peer, checkpointIntervalMs: spec.checkpointIntervalMs, ...(spec.agent ? { agent: true } : {}) },
    probe: { listen: spec.probeListen, ...(spec.workloadMiBps ? { workloadMiBps: spec.workloadMiBps } : {}) },
  });
}
