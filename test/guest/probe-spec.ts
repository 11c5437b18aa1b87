/** The clock-probe test guest as an ftvm domain spec (YAML, as `ftReadyFromSpec` reads it). */
import { stringify } from 'yaml';
import type { ProbeDisk, ProbeDisks } from '../support/disk-check.js';
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
  /** Give the guest its qemu-ga channel (`virsh shutdown` through the agent, guest-exec). */
  agent?: boolean;
  /**
   * The probe's disks (createProbeDisks()), as the spec's `disks` (ring first), with their serials
   * and cache='none' (the ring's O_DIRECT writes reach the image file, not a host page cache).
   */
  disks?: ProbeDisks;
}

export async function probeGuestYaml(spec: ProbeGuestSpec): Promise<string> {
  const image = await buildGuest();
  return stringify({
    name: spec.name,
    type: 'qemu',
    memoryMiB: spec.memoryMiB ?? 256,
    boot: { kernel: image.kernel, initrd: image.initrd, cmdline: image.cmdline },
    serialLog: `/run/ftvm/${spec.name}.serial.log`,
    ...(spec.disks ? { disks: [spec.disks.ring, spec.disks.fs].filter((d): d is ProbeDisk => d !== undefined).map(({ path, format, serial }) => ({ path, format, serial, cache: 'none' })) } : {}),
    ftvm: { peer: spec.peer, checkpointIntervalMs: spec.checkpointIntervalMs, ...(spec.agent ? { agent: true } : {}) },
    probe: { listen: spec.probeListen, ...(spec.workloadMiBps ? { workloadMiBps: spec.workloadMiBps } : {}) },
  });
}
