/**
 * libvirt domain XML for the clock-probe test guest: direct kernel boot, domain type `qemu` (TCG),
 * plus an ftvm QMP socket, the guest agent and user-mode networking with the probe's UDP port
 * forwarded to the host's lab address — all through <qemu:commandline>, so libvirt's own monitor
 * and agent handling stay untouched. The probe's disks, when asked for, are ordinary libvirt
 * <disk> elements: libvirt must know them (its block node names, its view of the domain).
 */
import type { ProbeDisk, ProbeDisks } from './disk-check.js';

export interface ProbeDomainSpec {
  name: string;
  kernel: string;
  initrd: string;
  /** The guest image's kernel command line (the probe guest's measured settings). */
  cmdline: string;
  memoryMiB: number;
  /** vCPUs (default 1). */
  vcpus?: number;
  /** Where the host side listens for the probe (the lab host's address). */
  probeListen: { address: string; port: number };
  /** Paths inside the host's mount namespace. */
  qmpSocket: string;
  agentSocket: string;
  serialLog: string;
  workloadMiBps?: number;
  /** KiB the guest's fs workload writes per 50 ms cycle (default 16): the disk write load. */
  fsKiB?: number;
  emulator?: string;
  /** Appended to QEMU's command line, e.g. ['-incoming', 'defer'] to restore a checkpoint. */
  extraQemuArgs?: string[];
  /**
   * The probe's disks (createProbeDisks(); paths as QEMU sees them): virtio, serials ftvm-ring /
   * ftvm-fs, targets vda, vdb in that order. Without it the XML is exactly as before.
   */
  disks?: ProbeDisks;
  /** <driver cache/io> of the disks. Default cache='none' io='native' (works under TCG too). */
  diskDriver?: { cache: 'none' | 'writeback' | 'unsafe' | 'directsync'; io?: 'native' | 'threads' };
}

export const PROBE_GUEST_PORT = 5555;

export type ProbeClocksource = 'tsc' | 'hpet' | 'acpi_pm';

/** The image's command line with its clocksource choice replaced (tsc also gets tsc=reliable: no watchdog). */
export function withClocksource(cmdline: string, clocksource: ProbeClocksource): string {
  const chosen = clocksource === 'tsc' ? 'clocksource=tsc tsc=reliable' : `clocksource=${clocksource}`;
  return `${cmdline.replace(/(^|\s)(clocksource|tsc)=\S+/g, '')} ${chosen}`.replace(/\s+/g, ' ').trim();
}

export function probeDomainXml(spec: ProbeDomainSpec): string {
  const cmdline = [spec.cmdline, spec.workloadMiBps ? `ftvm.workload=${spec.workloadMiBps}` : '', spec.fsKiB ? `ftvm.fskib=${spec.fsKiB}` : '']
    .filter(Boolean)
    .join(' ');
  const qemuArgs = [
    '-qmp', `unix:${spec.qmpSocket},server=on,wait=off`,
    '-netdev', `user,id=ftvmprobe,hostfwd=udp:${spec.probeListen.address}:${spec.probeListen.port}-:${PROBE_GUEST_PORT}`,
    // a fixed slot libvirt never hands out (it numbers its own devices from slot 2 up)
    '-device', `virtio-net-pci,netdev=ftvmprobe,romfile=${spec.disks ? ',bus=pci.0,addr=0x1f' : ''}`,
    '-chardev', `socket,id=ftvmqga,path=${spec.agentSocket},server=on,wait=off`,
    '-device', `virtio-serial-pci,id=ftvmserial${spec.disks ? ',bus=pci.0,addr=0x1e' : ''}`,
    '-device', 'virtserialport,bus=ftvmserial.0,chardev=ftvmqga,name=org.qemu.guest_agent.0',
    ...(spec.extraQemuArgs ?? []),
  ];
  return `<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>${escapeXml(spec.name)}</name>
  <memory unit='MiB'>${spec.memoryMiB}</memory>
  <vcpu>${spec.vcpus ?? 1}</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>${escapeXml(spec.kernel)}</kernel>
    <initrd>${escapeXml(spec.initrd)}</initrd>
    <cmdline>${escapeXml(cmdline)}</cmdline>
  </os>
  <features>
    <!-- Without ACPI (libvirt then passes -no-acpi) the guest has no HPET or PM timer to
         calibrate its TSC against; under host load calibration fails and Linux falls back to
         counting ticks, a clock no VMM-level correction can move. -->
    <acpi/>
    <apic/>
  </features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    ${spec.emulator ? `<emulator>${escapeXml(spec.emulator)}</emulator>` : ''}
    <serial type='file'>
      <source path='${escapeXml(spec.serialLog)}'/>
      <target port='0'/>
    </serial>
${probeDisksXml(spec.disks, spec.diskDriver)}    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
${qemuArgs.map((arg) => `    <qemu:arg value='${escapeXml(arg)}'/>`).join('\n')}
  </qemu:commandline>
</domain>
`;
}

function probeDisksXml(disks: ProbeDisks | undefined, driver: ProbeDomainSpec['diskDriver'] = { cache: 'none', io: 'native' }): string {
  const attached = [disks?.ring, disks?.fs].filter((d): d is ProbeDisk => d !== undefined);
  const io = driver.io ? ` io='${driver.io}'` : '';
  return attached
    .map(
      (disk, i) => `    <disk type='file' device='disk'>
      <driver name='qemu' type='${disk.format}' cache='${driver.cache}'${io}/>
      <source file='${escapeXml(disk.path)}'/>
      <target dev='vd${'ab'[i]}' bus='virtio'/>
      <serial>${escapeXml(disk.serial)}</serial>
    </disk>
`,
    )
    .join('');
}

function escapeXml(text: string): string {
  return text.replace(/[<>&'"]/g, (c) => `&#${c.charCodeAt(0)};`);
}
