import fs from 'node:fs';
import path from 'node:path';
import { checkProtectable, describeFindings, type Finding } from './checks.js';
import {
  appendIndented,
  childElement,
  childElementNS,
  childElements,
  DomainXmlError,
  elementsAt,
  ensureNamespace,
  parseDomainXml,
  QEMU_NS,
  removeElement,
  serializeXml,
  textOf,
  type Document,
  type Element,
} from './dom.js';
import { DEFAULT_CLOCK_POLICY, readProtection, writeProtection, type ClockPolicySettings, type Protection } from './protection.js';

export const DEFAULT_RUN_DIR = '/run/ftvm';
export const DEFAULT_CHECKPOINT_INTERVAL_MS = 200;
/** sun_path is 108 bytes including the terminating NUL. */
const MAX_SOCKET_PATH = 107;

export interface ProtectionOptions {
  /** Default true. */
  protected?: boolean;
  peer: { host: string; uri?: string };
  /** Default 200 ms. */
  checkpointIntervalMs?: number;
  /** Hold the guest's network output until its checkpoint is committed. Default off. */
  outputCommit?: boolean;
  clock?: Partial<ClockPolicySettings>;
}

/** What the clock-probe test guest needs on top of a plain domain (see test/guest). */
export interface ProbeOptions {
  /** Host address and UDP port the probe's port is forwarded from (user-mode net hostfwd). */
  listen: { address: string; port: number };
  /** The probe's UDP port inside the guest. Default 5555. */
  guestPort?: number;
  /** Start the probe's memory workload at boot (kernel argument ftvm.workload=). */
  workloadMiBps?: number;
}

export interface FtReadyOptions {
  protection: ProtectionOptions;
  /** Directory of ftvm's sockets on the host, as QEMU sees it. Default /run/ftvm. */
  runDir?: string;
  /**
   * ftvm's patched QEMU. Used when the file exists (checked on this machine, which must then be the
   * host that runs the domain); otherwise libvirt's default emulator stays and an `info` finding
   * says so. `require: true` makes a missing binary an error instead.
   */
  emulator?: { path: string; require?: boolean };
  /** Add ftvm's own guest-agent channel (<runDir>/<name>.qga) for the agent clock actuator. */
  agent?: boolean;
  /** Writable local disks are on storage the peer shares (accepts `shared-storage` findings). */
  sharedStorage?: boolean;
  /** Test guest only: forward the clock probe's UDP port. */
  probe?: ProbeOptions;
  /** Add `-incoming defer` so QEMU starts waiting for a migration stream (restore on the backup). */
  incoming?: boolean;
}

export interface FtReadyResult {
  xml: string;
  name: string;
  protection: Protection;
  /** Everything the checks found; none of severity `refuse` (those throw). */
  findings: Finding[];
}

/** ftvm cannot protect this domain; `findings` says which elements and why. */
export class NotProtectableError extends Error {
  override name = 'NotProtectableError';
  constructor(
    readonly domain: string,
    readonly findings: Finding[],
  ) {
    super(`ftvm cannot protect domain '${domain}':\n${describeFindings(findings)}`);
  }
}

/**
 * Turns a user's libvirt domain XML into the XML ftvm runs: ftvm's metadata, ftvm's own QMP socket
 * (and optionally agent socket) through <qemu:commandline>, the patched emulator when installed,
 * the test guest's probe forwarding when asked. Idempotent: ftvm's previous additions are replaced,
 * everything else in the document is kept as it was (order, comments, other namespaces).
 * Throws NotProtectableError when a device blocks protection.
 */
export function makeFtReady(inputXml: string, options: FtReadyOptions): FtReadyResult {
  const doc = parseDomainXml(inputXml);
  const root = doc.documentElement!;
  const name = textOf(childElement(root, 'name'));
  if (!name) throw new DomainXmlError('domain XML has no <name>');

  const findings = checkProtectable(root);
  const blocking = findings.filter((f) => f.severity === 'refuse' || (f.severity === 'shared-storage' && !options.sharedStorage));
  if (blocking.length > 0) throw new NotProtectableError(name, blocking);

  const runDir = options.runDir ?? DEFAULT_RUN_DIR;
  if (!path.isAbsolute(runDir)) throw new DomainXmlError(`runDir must be absolute: ${runDir}`);
  const qmpSocket = path.posix.join(runDir, `${name}.qmp`);
  const agentSocket = options.agent ? path.posix.join(runDir, `${name}.qga`) : undefined;
  for (const socket of [qmpSocket, agentSocket]) {
    if (socket && Buffer.byteLength(socket) > MAX_SOCKET_PATH) throw new DomainXmlError(`socket path ${socket} is longer than ${MAX_SOCKET_PATH} bytes: use a shorter runDir or domain name`);
  }

  // emulator
  let emulator: string | undefined;
  if (options.emulator) {
    if (fs.existsSync(options.emulator.path)) {
      emulator = options.emulator.path;
      setEmulator(doc, emulator);
    } else if (options.emulator.require) {
      throw new DomainXmlError(`ftvm's patched QEMU is not installed at ${options.emulator.path}`);
    } else {
      findings.push({ severity: 'info', element: '/domain/devices/emulator', reason: `patched QEMU not installed at ${options.emulator.path}: libvirt's default emulator stays (no in-place clock correction)` });
    }
  }

  if (agentSocket && hasLibvirtAgentChannel(root)) {
    throw new DomainXmlError(`domain '${name}' already has a libvirt-managed guest agent channel (org.qemu.guest_agent.0); ftvm's agent option would add a second one`);
  }

  const clock: ClockPolicySettings = { ...DEFAULT_CLOCK_POLICY, ...options.protection.clock };
  const protection: Protection = {
    protected: options.protection.protected ?? true,
    peer: options.protection.peer,
    checkpointIntervalMs: options.protection.checkpointIntervalMs ?? DEFAULT_CHECKPOINT_INTERVAL_MS,
    ...(options.protection.outputCommit === undefined ? {} : { outputCommit: options.protection.outputCommit }),
    clock,
    qmpSocket,
    ...(agentSocket ? { agentSocket } : {}),
    ...(emulator ? { emulator } : {}),
    sharedStorage: options.sharedStorage ?? false,
    runDir,
  };
  writeProtection(doc, protection);

  const { probeDevice } = setFtvmDevices(doc, { agent: agentSocket !== undefined, probe: options.probe !== undefined });
  setFtvmCommandline(doc, ftvmQemuArgs({ qmpSocket, agentSocket, probe: options.probe, incoming: options.incoming, probeDevice }));
  if (options.probe?.workloadMiBps) setKernelArg(doc, 'ftvm.workload', String(options.probe.workloadMiBps));

  return { xml: serializeXml(doc), name, protection, findings };
}

/** QEMU option values are comma-separated: a literal comma is doubled. */
const qemuValue = (text: string) => text.replace(/,/g, ',,');

/** User aliases (libvirt keeps `ua-` aliases and uses them as QEMU ids) of the devices ftvm adds as native XML. */
export const FTVM_SERIAL_ALIAS = 'ua-ftvm-serial';
const FTVM_PORT_ALIAS = 'ua-ftvm-port';
const FTVM_ALIAS_PREFIX = 'ua-ftvm-';
/** The probe NIC's MAC: QEMU's default, what the raw `-device` of earlier versions got. */
const PROBE_MAC = '52:54:00:12:34:56';

/**
 * ftvm's QEMU arguments. What QEMU sees as a PCI device is native libvirt XML (`setFtvmDevices`), so
 * libvirt allocates its address; only what libvirt cannot express stays here: ftvm's QMP monitor,
 * the agent's chardev and its port on ftvm's virtio-serial controller (a port libvirt does not own,
 * else libvirt would connect to the agent itself), and the probe's user-mode netdev with `hostfwd`.
 * The port is a JSON `-device`: QEMU creates key=value `-device`s before JSON ones, and libvirt's
 * devices (the controller the port sits on) are JSON.
 * `legacyDevices` gives the layout of earlier versions — raw virtio-serial-pci and virtio-net-pci
 * that libvirt knew nothing about — for fixing paths of a domain defined with it (its device set
 * must not change under a migration or restore).
 */
export function ftvmQemuArgs(options: {
  qmpSocket: string;
  agentSocket?: string | undefined;
  probe?: ProbeOptions | undefined;
  incoming?: boolean | undefined;
  legacyDevices?: boolean | undefined;
  /** The probe NIC's `-device` value (with its explicit address; see setFtvmDevices). */
  probeDevice?: string | undefined;
}): string[] {
  const args = ['-chardev', `socket,id=ftvm-qmp,path=${qemuValue(options.qmpSocket)},server=on,wait=off`, '-mon', 'chardev=ftvm-qmp,mode=control'];
  if (options.agentSocket) {
    args.push('-chardev', `socket,id=ftvm-qga,path=${qemuValue(options.agentSocket)},server=on,wait=off`);
    if (options.legacyDevices) {
      args.push('-device', 'virtio-serial-pci,id=ftvm-serial', '-device', 'virtserialport,bus=ftvm-serial.0,chardev=ftvm-qga,name=org.qemu.guest_agent.0');
    } else {
      const port = { driver: 'virtserialport', id: 'ftvm-qga-port', bus: `${FTVM_SERIAL_ALIAS}.0`, nr: 1, chardev: 'ftvm-qga', name: 'org.qemu.guest_agent.0' };
      args.push('-device', JSON.stringify(port));
    }
  }
  if (options.probe) {
    const { address, port } = options.probe.listen;
    args.push('-netdev', `user,id=ftvm-probe,hostfwd=udp:${address}:${port}-:${options.probe.guestPort ?? 5555}`);
    args.push('-device', options.probeDevice ?? 'virtio-net-pci,netdev=ftvm-probe,romfile=');
  }
  if (options.incoming) args.push('-incoming', 'defer');
  return args;
}

/** The probe NIC (test guest only), before its address. */
const probeDevice = (bus: string, addr: string) => JSON.stringify({ driver: 'virtio-net-pci', id: 'ftvm-probe-nic', netdev: 'ftvm-probe', romfile: '', mac: PROBE_MAC, bus, addr });

/** An argument ftvm owns: the value of an option whose QEMU id (or reference) starts with `ftvm-` (key=value or JSON). */
const FTVM_VALUE = /(^|,)(id|chardev|netdev|bus)=ftvm-|"(id|chardev|netdev)":"ftvm-/;

/**
 * ftvm's devices placed so that libvirt never hands out their PCI slots:
 * - `agent`: a native `<controller type='virtio-serial'>` (alias ua-ftvm-serial) for ftvm's agent
 *   port; libvirt allocates its slot;
 * - `probe` (test guest): the returned raw `-device` value for the probe's NIC, at an explicit
 *   address (see below).
 * On q35 each sits on a pcie-root-port of its own (alias ua-ftvm-portN), so ftvm's devices never
 * take the free root ports a user keeps for hot-plug. Earlier additions (by alias) are replaced;
 * nothing else is touched.
 */
export function setFtvmDevices(doc: Document, wanted: { agent: boolean; probe: boolean }): { probeDevice?: string } {
  const root = doc.documentElement!;
  let devices = childElement(root, 'devices');
  if (devices) {
    for (const el of childElements(devices)) if (isFtvmDevice(el)) removeElement(el);
  }
  if (!wanted.agent && !wanted.probe) return {};
  if (!devices) {
    devices = doc.createElement('devices');
    appendIndented(root, devices);
  }
  const machine = elementsAt(root, 'os/type')[0]?.getAttribute('machine') ?? '';
  const q35 = /q35/.test(machine);
  const pciIndexes = childElements(devices, 'controller')
    .filter((c) => c.getAttribute('type') === 'pci')
    .map((c) => Number(c.getAttribute('index')))
    .filter(Number.isInteger);
  let nextPciIndex = Math.max(0, ...pciIndexes) + 1;
  let ports = 0;
  type Spec = [name: string, attrs: Record<string, string>];
  /** Appends <name attrs> to `parent` and its (empty) children into it: attached first, so indentation follows. */
  const add = (parent: Element, [name, attrs]: Spec, children: Spec[] = []): Element => {
    const e = appendIndented(parent, doc.createElement(name));
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    for (const child of children) add(e, child);
    return e;
  };
  /** q35: a root port of ftvm's own (added now), and the device's address on it. */
  const placement = (): Spec[] => {
    if (!q35) return [];
    const index = nextPciIndex++;
    add(devices, ['controller', { type: 'pci', index: String(index), model: 'pcie-root-port' }], [['alias', { name: `${FTVM_PORT_ALIAS}${ports++}` }]]);
    return [['address', { type: 'pci', domain: '0x0000', bus: `0x${index.toString(16).padStart(2, '0')}`, slot: '0x00', function: '0x0' }]];
  };
  if (wanted.agent) {
    const serialIndexes = childElements(devices, 'controller')
      .filter((c) => c.getAttribute('type') === 'virtio-serial')
      .map((c) => Number(c.getAttribute('index')))
      .filter(Number.isInteger);
    // above the user's (and libvirt's implicit index 0): libvirt puts its own channels on the lowest
    const index = String(Math.max(0, ...serialIndexes) + 1);
    const address = placement();
    add(devices, ['controller', { type: 'virtio-serial', index }], [['alias', { name: FTVM_SERIAL_ALIAS }], ...address]);
  }
  if (!wanted.probe) return {};
  // The probe's NIC stays a raw -device (libvirt has no hostfwd for slirp, and a native
  // <interface> pointed at ftvm's netdev left libvirt's own netdev without a peer, which put the
  // stock-QEMU ledger off by 3-8 ms over 20 checkpoints), at an address libvirt is kept from:
  // q35 on a root port of ftvm's own, pc on pci.0's last slot (hot-plug fills from the lowest).
  // JSON, like the agent's port: QEMU creates it after libvirt's (JSON) root port.
  if (q35) {
    placement();
    return { probeDevice: probeDevice(`${FTVM_PORT_ALIAS}${ports - 1}`, '0x0') };
  }
  return { probeDevice: probeDevice('pci.0', '0x1f') };
}

function isFtvmDevice(el: Element): boolean {
  return el.localName === 'controller' && childElements(el, 'alias').some((a) => (a.getAttribute('name') ?? '').startsWith(FTVM_ALIAS_PREFIX));
}

/**
 * Replaces ftvm's arguments in <qemu:commandline> with `args`, keeping the user's own arguments and
 * environment entries in place. ftvm's are recognised by their `ftvm-` ids, plus `-incoming defer`.
 */
export function setFtvmCommandline(doc: Document, args: string[]): void {
  const root = doc.documentElement!;
  const prefix = ensureNamespace(doc, QEMU_NS, 'qemu');
  let cmdline = childElementNS(root, QEMU_NS, 'commandline');
  if (cmdline) removeFtvmArgs(cmdline);
  if (args.length === 0) {
    if (cmdline && childElements(cmdline).length === 0) removeElement(cmdline);
    return;
  }
  if (!cmdline) {
    cmdline = doc.createElementNS(QEMU_NS, `${prefix}:commandline`);
    appendIndented(root, cmdline);
  }
  // ftvm's arguments go before any <qemu:env> (the schema wants args first)
  const firstEnv = childElements(cmdline).find((c) => c.namespaceURI === QEMU_NS && c.localName === 'env');
  for (const value of args) {
    const arg = doc.createElementNS(QEMU_NS, `${prefix}:arg`);
    arg.setAttribute('value', value);
    appendIndented(cmdline, arg, firstEnv);
  }
}

/** Indices of ftvm's arguments: `ftvm-` id values with their option names, and `-incoming defer`. */
function ftvmArgIndices(values: string[]): number[] {
  const drop = new Set<number>();
  values.forEach((value, i) => {
    if (FTVM_VALUE.test(value)) {
      drop.add(i);
      if (i > 0 && /^-/.test(values[i - 1] ?? '')) drop.add(i - 1);
    }
    if (value === '-incoming' && values[i + 1] === 'defer') drop.add(i).add(i + 1);
  });
  return [...drop].sort((a, b) => a - b);
}

function removeFtvmArgs(cmdline: Element): void {
  const args = childElements(cmdline).filter((c) => c.namespaceURI === QEMU_NS && c.localName === 'arg');
  for (const i of ftvmArgIndices(args.map((a) => a.getAttribute('value') ?? ''))) removeElement(args[i]!);
}

/** The `-incoming defer` switch alone (restore wants it, the hook strips it for libvirt's own restore). */
export function setIncomingDefer(xml: string, on: boolean): string {
  const doc = parseDomainXml(xml);
  const root = doc.documentElement!;
  const cmdline = childElementNS(root, QEMU_NS, 'commandline');
  const args = cmdline ? childElements(cmdline).filter((c) => c.namespaceURI === QEMU_NS && c.localName === 'arg') : [];
  const values = args.map((a) => a.getAttribute('value'));
  const at = values.findIndex((v, i) => v === '-incoming' && values[i + 1] === 'defer');
  if (on === at >= 0) return xml;
  if (!on) {
    removeElement(args[at + 1]!);
    removeElement(args[at]!);
    return serializeXml(doc);
  }
  const prefix = ensureNamespace(doc, QEMU_NS, 'qemu');
  let target = cmdline;
  if (!target) {
    target = doc.createElementNS(QEMU_NS, `${prefix}:commandline`);
    appendIndented(root, target);
  }
  const firstEnv = childElements(target).find((c) => c.namespaceURI === QEMU_NS && c.localName === 'env');
  for (const value of ['-incoming', 'defer']) {
    const arg = doc.createElementNS(QEMU_NS, `${prefix}:arg`);
    arg.setAttribute('value', value);
    appendIndented(target, arg, firstEnv);
  }
  return serializeXml(doc);
}

export interface PathFixResult {
  xml: string;
  changed: boolean;
  changes: string[];
}

/**
 * Makes ftvm's paths in a domain's XML right for this host: the QMP and agent sockets become
 * `<runDir>/<name>.qmp|.qga` for the domain's *current* name (a migration may rename it), the
 * metadata follows, and a leftover `-incoming defer` is removed (libvirt's own restore and incoming
 * migration add their own `-incoming`). Domains without ftvm metadata come back unchanged.
 * Used by the libvirt hook on `migrate` and `restore`.
 */
export function fixFtvmPaths(xml: string, options: { runDir?: string } = {}): PathFixResult {
  const doc = parseDomainXml(xml);
  const protection = readProtection(doc);
  if (!protection) return { xml, changed: false, changes: [] };
  const root = doc.documentElement!;
  const name = textOf(childElement(root, 'name'))!;
  const runDir = options.runDir ?? protection.runDir;
  const qmpSocket = path.posix.join(runDir, `${name}.qmp`);
  const agentSocket = protection.agentSocket ? path.posix.join(runDir, `${name}.qga`) : undefined;
  const changes: string[] = [];
  if (qmpSocket !== protection.qmpSocket) changes.push(`qmp socket ${protection.qmpSocket} -> ${qmpSocket}`);
  if (agentSocket !== protection.agentSocket) changes.push(`agent socket ${protection.agentSocket} -> ${agentSocket}`);
  if (runDir !== protection.runDir) changes.push(`run dir ${protection.runDir} -> ${runDir}`);

  const cmdline = childElementNS(root, QEMU_NS, 'commandline');
  const values = cmdline ? childElements(cmdline).filter((c) => c.localName === 'arg').map((a) => a.getAttribute('value') ?? '') : [];
  const hadIncoming = values.some((v, i) => v === '-incoming' && values[i + 1] === 'defer');
  if (hadIncoming) changes.push('removed -incoming defer');
  // the probe forwarding is kept as it was (its address is the host's, set by whoever defined it)
  const probe = parseProbeArgs(values);
  // keep the device layout the domain was defined with: a migration or restore needs the same devices
  const legacyDevices = values.some((v) => /^virtio-serial-pci,.*id=ftvm-/.test(v) || (/^virtio-net-pci,.*netdev=ftvm-/.test(v) && !/,addr=/.test(v)));
  // the probe NIC keeps its address (and so its -device value) as defined
  const probeDevice = values.find((v) => /^(\{"driver":"virtio-net-pci"|virtio-net-pci,).*netdev(=|":")ftvm-probe/.test(v));
  const expected = ftvmQemuArgs({ qmpSocket, agentSocket, probe, legacyDevices, probeDevice });
  const current = ftvmArgIndices(values).map((i) => values[i]);
  if (changes.length === 0 && JSON.stringify(current) !== JSON.stringify(expected)) changes.push('ftvm arguments rewritten');
  if (changes.length === 0) return { xml, changed: false, changes };

  writeProtection(doc, { ...protection, qmpSocket, ...(agentSocket ? { agentSocket } : {}), runDir });
  setFtvmCommandline(doc, expected);
  return { xml: serializeXml(doc), changed: true, changes };
}

function parseProbeArgs(values: string[]): ProbeOptions | undefined {
  const netdev = values.find((v) => /^user,id=ftvm-probe,/.test(v));
  const m = netdev && /hostfwd=udp:([^:]*):(\d+)-:(\d+)/.exec(netdev);
  if (!m) return undefined;
  return { listen: { address: m[1] ?? '', port: Number(m[2]) }, guestPort: Number(m[3]) };
}

function setEmulator(doc: Document, emulator: string): void {
  const root = doc.documentElement!;
  let devices = childElement(root, 'devices');
  if (!devices) {
    devices = doc.createElement('devices');
    appendIndented(root, devices);
  }
  let el = childElement(devices, 'emulator');
  if (!el) {
    el = doc.createElement('emulator');
    appendIndented(devices, el, childElements(devices)[0]);
  }
  while (el.firstChild) el.removeChild(el.firstChild);
  el.appendChild(doc.createTextNode(emulator));
}

function setKernelArg(doc: Document, key: string, value: string): void {
  const os = childElement(doc.documentElement!, 'os');
  if (!os) throw new DomainXmlError(`the probe's ${key} needs direct kernel boot (<os><cmdline>)`);
  let cmdline = childElement(os, 'cmdline');
  if (!cmdline) {
    cmdline = doc.createElement('cmdline');
    appendIndented(os, cmdline);
  }
  const words = (textOf(cmdline) ?? '').split(/\s+/).filter((w) => w && !w.startsWith(`${key}=`));
  words.push(`${key}=${value}`);
  while (cmdline.firstChild) cmdline.removeChild(cmdline.firstChild);
  cmdline.appendChild(doc.createTextNode(words.join(' ')));
}

function hasLibvirtAgentChannel(root: Element): boolean {
  return elementsAt(root, 'devices/channel').some((c) => childElements(c, 'target').some((t) => t.getAttribute('name') === 'org.qemu.guest_agent.0'));
}
