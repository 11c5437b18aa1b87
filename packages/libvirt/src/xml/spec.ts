import { parse } from 'yaml';
import { ON_IMPOSSIBLE, PAUSE_CAUSES, type ClockPolicySettings, type OnImpossible, type PauseCause } from './protection.js';
import { makeFtReady, type FtReadyOptions, type FtReadyResult, type ProbeOptions } from './ft-ready.js';

/** A short description of a domain, for when there is no libvirt XML to start from. */
export interface DomainSpec {
  name: string;
  /** libvirt domain type: `kvm` (hardware) or `qemu` (TCG). Default qemu. */
  type: 'qemu' | 'kvm';
  memoryMiB: number;
  vcpus: number;
  /** Default x86_64 / pc. */
  arch: string;
  machine: string;
  uuid?: string;
  /** Direct kernel boot. */
  boot?: { kernel: string; initrd?: string; cmdline?: string };
  disks: DiskSpec[];
  /** NICs on host bridges, in guest PCI order. */
  nics: NicSpec[];
  /** Serial console to a file (path on the host). */
  serialLog?: string;
}

/**
 * A NIC plugged into a host bridge (`<interface type='bridge'>`). The bridge must exist under the
 * same name on the backup, which starts the same XML. Give a MAC for a guest that finds its NIC by
 * it; libvirt makes one up at define time otherwise (the running domain's XML, which the backup
 * gets, carries it).
 */
export interface NicSpec {
  bridge: string;
  /** Unicast, `52:54:00:…` style; lower case in the XML. */
  mac?: string;
  model: 'virtio';
}

export interface DiskSpec {
  path: string;
  format: 'raw' | 'qcow2';
  /** Guest device name; default vda, vdb, … */
  target?: string;
  bus: 'virtio' | 'sata' | 'scsi' | 'ide';
  device: 'disk' | 'cdrom';
  readonly: boolean;
  /** The image is on storage the peer host shares (adds <shareable/>). */
  shared: boolean;
  /** The guest-visible serial number (`/sys/block/vdX/serial`). */
  serial?: string;
  /** libvirt's cache mode (`none`: O_DIRECT on the host). */
  cache?: 'none' | 'writeback' | 'writethrough' | 'directsync' | 'unsafe';
}

/** The whole YAML file: the domain, ftvm's protection settings and, for the test guest, the probe. */
export interface FtDomainSpec {
  domain: DomainSpec;
  options: FtReadyOptions;
}

/** A YAML spec is wrong; `field` is a dotted path into it. */
export class SpecError extends Error {
  override name = 'SpecError';
  constructor(
    readonly field: string,
    reason: string,
  ) {
    super(`domain spec: ${field}: ${reason}`);
  }
}

type Obj = Record<string, unknown>;

function mapping(value: unknown, field: string, allowed: readonly string[]): Obj {
  if (value === null || typeof value !== 'object' || Array.isArray(value)) throw new SpecError(field, 'must be a mapping');
  for (const key of Object.keys(value)) if (!allowed.includes(key)) throw new SpecError(field === '(root)' ? key : `${field}.${key}`, `unknown field (expected ${allowed.join(', ')})`);
  return value as Obj;
}
function str(o: Obj, key: string, field: string, required: true): string;
function str(o: Obj, key: string, field: string, required?: false): string | undefined;
function str(o: Obj, key: string, field: string, required = false): string | undefined {
  const v = o[key];
  if (v === undefined || v === null) {
    if (required) throw new SpecError(`${field}${key}`, 'is required');
    return undefined;
  }
  if (typeof v !== 'string' || v === '') throw new SpecError(`${field}${key}`, `must be a non-empty string, got ${JSON.stringify(v)}`);
  return v;
}
function num(o: Obj, key: string, field: string, fallback?: number): number {
  const v = o[key];
  if (v === undefined || v === null) {
    if (fallback === undefined) throw new SpecError(`${field}${key}`, 'is required');
    return fallback;
  }
  if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0) throw new SpecError(`${field}${key}`, `must be a positive number, got ${JSON.stringify(v)}`);
  return v;
}
function bool(o: Obj, key: string, field: string, fallback: boolean): boolean {
  const v = o[key];
  if (v === undefined || v === null) return fallback;
  if (typeof v !== 'boolean') throw new SpecError(`${field}${key}`, `must be true or false, got ${JSON.stringify(v)}`);
  return v;
}
function oneOf<T extends string>(o: Obj, key: string, field: string, values: readonly T[], fallback: T): T {
  const v = o[key];
  if (v === undefined || v === null) return fallback;
  if (!values.includes(v as T)) throw new SpecError(`${field}${key}`, `${JSON.stringify(v)} is not one of ${values.join(', ')}`);
  return v as T;
}

/**
 * Parses and validates a YAML spec. Unknown fields are errors (a typo must not pass silently).
 *
 * ```yaml
 * name: web1
 * type: kvm                 # or qemu (TCG); default qemu
 * memoryMiB: 2048
 * vcpus: 2
 * boot: { kernel: /boot/vmlinuz, initrd: /boot/initrd.img, cmdline: "console=ttyS0" }
 * disks:
 *   - { path: /var/lib/libvirt/images/web1.qcow2, format: qcow2 }   # replicated by ftvm
 *   - { path: /srv/shared/data.qcow2, format: qcow2, shared: true, serial: data1, cache: none }
 * nics:                      # on host bridges (the same bridge name on the backup)
 *   - { bridge: br0, mac: "52:54:00:12:34:57", model: virtio }   # mac optional, model virtio (default)
 * serialLog: /run/ftvm/web1.serial.log
 * ftvm:
 *   peer: { host: backup, uri: "qemu+ssh://backup/system" }
 *   checkpointIntervalMs: 200
 *   outputCommit: true       # hold network output until its checkpoint is committed
 *   clock: { compensate: [checkpoint, migration, failover], maxStepMs: 60000, onImpossible: record }
 *   emulator: /opt/ftvm/bin/qemu-system-x86_64   # used when installed
 *   agent: false
 * probe:                     # the clock-probe test guest only
 *   listen: { address: 10.213.0.11, port: 5555 }
 * ```
 */
export function parseDomainSpec(yamlText: string): FtDomainSpec {
  let raw: unknown;
  try {
    raw = parse(yamlText);
  } catch (error) {
    throw new SpecError('(yaml)', (error as Error).message);
  }
  const root = mapping(raw, '(root)', ['name', 'type', 'memoryMiB', 'vcpus', 'arch', 'machine', 'uuid', 'boot', 'disks', 'nics', 'serialLog', 'ftvm', 'probe']);
  const name = str(root, 'name', '', true);
  if (!/^[A-Za-z0-9][A-Za-z0-9._+-]*$/.test(name)) throw new SpecError('name', `${JSON.stringify(name)}: use letters, digits, '.', '_', '+', '-'`);

  let boot: DomainSpec['boot'];
  if (root['boot'] !== undefined) {
    const b = mapping(root['boot'], 'boot', ['kernel', 'initrd', 'cmdline']);
    const initrd = str(b, 'initrd', 'boot.');
    const cmdline = typeof b['cmdline'] === 'string' ? b['cmdline'] : str(b, 'cmdline', 'boot.');
    boot = { kernel: str(b, 'kernel', 'boot.', true), ...(initrd ? { initrd } : {}), ...(cmdline !== undefined ? { cmdline } : {}) };
  }
  const disksRaw = root['disks'] ?? [];
  if (!Array.isArray(disksRaw)) throw new SpecError('disks', 'must be a list');
  const disks = disksRaw.map((d, i): DiskSpec => {
    const f = `disks[${i}].`;
    const o = mapping(d, `disks[${i}]`, ['path', 'format', 'target', 'bus', 'device', 'readonly', 'shared', 'serial', 'cache']);
    const target = str(o, 'target', f);
    const serial = str(o, 'serial', f);
    const cache = o['cache'] === undefined ? undefined : oneOf(o, 'cache', f, ['none', 'writeback', 'writethrough', 'directsync', 'unsafe'] as const, 'writeback');
    return {
      path: str(o, 'path', f, true),
      format: oneOf(o, 'format', f, ['raw', 'qcow2'] as const, 'qcow2'),
      ...(target ? { target } : {}),
      bus: oneOf(o, 'bus', f, ['virtio', 'sata', 'scsi', 'ide'] as const, 'virtio'),
      device: oneOf(o, 'device', f, ['disk', 'cdrom'] as const, 'disk'),
      readonly: bool(o, 'readonly', f, false),
      shared: bool(o, 'shared', f, false),
      ...(serial ? { serial } : {}),
      ...(cache ? { cache } : {}),
    };
  });
  if (!boot && disks.length === 0) throw new SpecError('boot', 'a domain needs a kernel (boot) or a disk to boot from');
  const nics = parseNics(root['nics']);

  const uuid = str(root, 'uuid', '');
  const serialLog = str(root, 'serialLog', '');
  const domain: DomainSpec = {
    name,
    type: oneOf(root, 'type', '', ['qemu', 'kvm'] as const, 'qemu'),
    memoryMiB: num(root, 'memoryMiB', ''),
    vcpus: num(root, 'vcpus', '', 1),
    arch: str(root, 'arch', '') ?? 'x86_64',
    machine: str(root, 'machine', '') ?? 'pc',
    ...(uuid ? { uuid } : {}),
    ...(boot ? { boot } : {}),
    disks,
    nics,
    ...(serialLog ? { serialLog } : {}),
  };

  const ftvm = mapping(root['ftvm'] ?? null, 'ftvm', ['protected', 'peer', 'checkpointIntervalMs', 'outputCommit', 'clock', 'emulator', 'agent', 'sharedStorage', 'runDir', 'incoming']);
  const peerRaw = ftvm['peer'];
  let peer: { host: string; uri?: string };
  if (typeof peerRaw === 'string' && peerRaw) peer = { host: peerRaw };
  else {
    const p = mapping(peerRaw ?? null, 'ftvm.peer', ['host', 'uri']);
    const uri = str(p, 'uri', 'ftvm.peer.');
    peer = { host: str(p, 'host', 'ftvm.peer.', true), ...(uri ? { uri } : {}) };
  }
  let clock: Partial<ClockPolicySettings> | undefined;
  if (ftvm['clock'] !== undefined) {
    const c = mapping(ftvm['clock'], 'ftvm.clock', ['compensate', 'maxStepMs', 'onImpossible']);
    clock = {};
    if (c['compensate'] !== undefined) {
      const list = c['compensate'];
      if (!Array.isArray(list)) throw new SpecError('ftvm.clock.compensate', `must be a list of ${PAUSE_CAUSES.join(', ')}`);
      list.forEach((cause, i) => {
        if (!PAUSE_CAUSES.includes(cause as PauseCause)) throw new SpecError(`ftvm.clock.compensate[${i}]`, `${JSON.stringify(cause)} is not one of ${PAUSE_CAUSES.join(', ')}`);
      });
      clock.compensate = [...new Set(list as PauseCause[])];
    }
    if (c['maxStepMs'] !== undefined) clock.maxStepMs = num(c, 'maxStepMs', 'ftvm.clock.');
    if (c['onImpossible'] !== undefined) clock.onImpossible = oneOf<OnImpossible>(c, 'onImpossible', 'ftvm.clock.', ON_IMPOSSIBLE, 'record');
  }
  const emulator = str(ftvm, 'emulator', 'ftvm.');
  const runDir = str(ftvm, 'runDir', 'ftvm.');
  let probe: ProbeOptions | undefined;
  if (root['probe'] !== undefined) {
    const p = mapping(root['probe'], 'probe', ['listen', 'guestPort', 'workloadMiBps']);
    const l = mapping(p['listen'] ?? null, 'probe.listen', ['address', 'port']);
    probe = {
      listen: { address: str(l, 'address', 'probe.listen.', true), port: num(l, 'port', 'probe.listen.') },
      guestPort: num(p, 'guestPort', 'probe.', 5555),
      ...(p['workloadMiBps'] !== undefined ? { workloadMiBps: num(p, 'workloadMiBps', 'probe.') } : {}),
    };
  }
  const options: FtReadyOptions = {
    protection: {
      protected: bool(ftvm, 'protected', 'ftvm.', true),
      peer,
      ...(ftvm['checkpointIntervalMs'] !== undefined ? { checkpointIntervalMs: num(ftvm, 'checkpointIntervalMs', 'ftvm.') } : {}),
      ...(ftvm['outputCommit'] !== undefined ? { outputCommit: bool(ftvm, 'outputCommit', 'ftvm.', false) } : {}),
      ...(clock ? { clock } : {}),
    },
    ...(runDir ? { runDir } : {}),
    ...(emulator ? { emulator: { path: emulator } } : {}),
    agent: bool(ftvm, 'agent', 'ftvm.', false),
    sharedStorage: bool(ftvm, 'sharedStorage', 'ftvm.', false),
    incoming: bool(ftvm, 'incoming', 'ftvm.', false),
    ...(probe ? { probe } : {}),
  };
  return { domain, options };
}

const MAC = /^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/i;
/** Linux interface names: at most 15 bytes, no '/', ':' or white space (dev_valid_name, and ':' for aliases). */
const IFNAME = /^[^\s/:]{1,15}$/;

function parseNics(value: unknown): NicSpec[] {
  if (value === undefined || value === null) return [];
  if (!Array.isArray(value)) throw new SpecError('nics', 'must be a list');
  const seen = new Map<string, number>();
  return value.map((n, i): NicSpec => {
    const f = `nics[${i}].`;
    const o = mapping(n, `nics[${i}]`, ['bridge', 'mac', 'model']);
    const bridge = str(o, 'bridge', f, true);
    if (!IFNAME.test(bridge) || bridge === '.' || bridge === '..') throw new SpecError(`${f}bridge`, `${JSON.stringify(bridge)} is not a Linux interface name (1-15 characters, no '/', ':' or spaces)`);
    const rawMac = str(o, 'mac', f);
    let mac: string | undefined;
    if (rawMac !== undefined) {
      if (!MAC.test(rawMac)) throw new SpecError(`${f}mac`, `${JSON.stringify(rawMac)} is not a MAC address (six hex pairs separated by ':', e.g. 52:54:00:12:34:57)`);
      mac = rawMac.toLowerCase();
      // the low bit of the first octet marks a group address, which libvirt refuses for a NIC
      if (parseInt(mac.slice(0, 2), 16) & 1) throw new SpecError(`${f}mac`, `${mac} is a multicast address; a NIC needs a unicast one (even first octet)`);
      const earlier = seen.get(mac);
      if (earlier !== undefined) throw new SpecError(`${f}mac`, `${mac} is also nics[${earlier}]'s`);
      seen.set(mac, i);
    }
    return { bridge, ...(mac ? { mac } : {}), model: oneOf(o, 'model', f, ['virtio'] as const, 'virtio') };
  });
}

const esc = (text: string) => text.replace(/[<>&'"]/g, (c) => `&#${c.charCodeAt(0)};`);

/** Plain libvirt domain XML for a spec (no ftvm additions: makeFtReady adds those). */
export function domainSpecToXml(spec: DomainSpec): string {
  const lines: string[] = [`<domain type='${spec.type}'>`, `  <name>${esc(spec.name)}</name>`];
  if (spec.uuid) lines.push(`  <uuid>${esc(spec.uuid)}</uuid>`);
  lines.push(`  <memory unit='MiB'>${spec.memoryMiB}</memory>`, `  <vcpu>${spec.vcpus}</vcpu>`, '  <os>', `    <type arch='${esc(spec.arch)}' machine='${esc(spec.machine)}'>hvm</type>`);
  if (spec.boot) {
    lines.push(`    <kernel>${esc(spec.boot.kernel)}</kernel>`);
    if (spec.boot.initrd) lines.push(`    <initrd>${esc(spec.boot.initrd)}</initrd>`);
    if (spec.boot.cmdline !== undefined) lines.push(`    <cmdline>${esc(spec.boot.cmdline)}</cmdline>`);
  } else lines.push("    <boot dev='hd'/>");
  // ACPI gives the guest an HPET/PM timer to calibrate its TSC against; without it a loaded host can
  // make Linux fall back to counting ticks, a clock that no VMM-level correction moves.
  lines.push('  </os>', '  <features>', '    <acpi/>', '    <apic/>', '  </features>', "  <clock offset='utc'/>", '  <on_poweroff>destroy</on_poweroff>', '  <on_reboot>restart</on_reboot>', '  <on_crash>destroy</on_crash>', '  <devices>');
  const letters = 'abcdefghijklmnopqrstuvwxyz';
  spec.disks.forEach((d, i) => {
    const prefix = d.bus === 'virtio' ? 'vd' : d.bus === 'ide' ? 'hd' : 'sd';
    lines.push(
      `    <disk type='file' device='${d.device}'>`,
      `      <driver name='qemu' type='${d.format}'${d.cache ? ` cache='${d.cache}'` : ''}/>`,
      `      <source file='${esc(d.path)}'/>`,
      `      <target dev='${esc(d.target ?? `${prefix}${letters[i] ?? 'z'}`)}' bus='${d.bus}'/>`,
    );
    if (d.serial) lines.push(`      <serial>${esc(d.serial)}</serial>`);
    if (d.readonly) lines.push('      <readonly/>');
    if (d.shared) lines.push('      <shareable/>');
    lines.push('    </disk>');
  });
  // A user alias (ua-…) names the NIC in QEMU (netdev `hostua-netN`) and, unlike libvirt's own
  // `netN`, stays in the migratable XML the backup gets: the same id on both hosts, for ftvm's
  // per-NIC output buffers.
  spec.nics.forEach((nic, i) => {
    lines.push("    <interface type='bridge'>");
    if (nic.mac) lines.push(`      <mac address='${nic.mac}'/>`);
    lines.push(`      <source bridge='${esc(nic.bridge)}'/>`, `      <model type='${nic.model}'/>`, `      <alias name='ua-net${i}'/>`, '    </interface>');
  });
  if (spec.serialLog) lines.push("    <serial type='file'>", `      <source path='${esc(spec.serialLog)}'/>`, "      <target port='0'/>", '    </serial>');
  lines.push("    <memballoon model='none'/>", '  </devices>', '</domain>', '');
  return lines.join('\n');
}

/** YAML spec → the XML ftvm runs (parse, plain XML, makeFtReady). `overrides` win over the file. */
export function ftReadyFromSpec(yamlText: string, overrides: Partial<FtReadyOptions> = {}): FtReadyResult & { spec: FtDomainSpec } {
  const spec = parseDomainSpec(yamlText);
  const result = makeFtReady(domainSpecToXml(spec.domain), { ...spec.options, ...overrides });
  return { ...result, spec };
}
