import { childElement, childElements, elementPath, type Element } from './dom.js';

/**
 * What a check found about a device or setting:
 * - `refuse`: ftvm cannot protect a domain with it (QEMU blocks migration, or the state lives on
 *   this host and would not be in a checkpoint);
 * - `shared-storage`: writable storage ftvm does not replicate (not a file or block disk), which
 *   only works if the backup sees the same bytes at the same path — refused unless the caller says
 *   the storage is shared;
 * - `warning`: works, with a caveat the operator should know;
 * - `info`: noted, nothing to do.
 */
export type FindingSeverity = 'refuse' | 'shared-storage' | 'warning' | 'info';

export interface Finding {
  severity: FindingSeverity;
  /** Where, as a path into the domain XML: `/domain/devices/hostdev[1]`. */
  element: string;
  reason: string;
}

const attr = (el: Element, name: string) => el.getAttribute(name) ?? undefined;

/**
 * Checks a domain against what ftvm's checkpoints can carry. A checkpoint is a QEMU migration
 * stream (RAM and device state) plus the writes of each writable file or block disk since the
 * last one, restored on the backup by a QEMU started with the same device set: anything QEMU
 * refuses to migrate, or whose state sits outside QEMU on this host, cannot be protected.
 */
export function checkProtectable(root: Element): Finding[] {
  const findings: Finding[] = [];
  const add = (severity: FindingSeverity, el: Element, reason: string) => findings.push({ severity, element: elementPath(el), reason });

  const type = attr(root, 'type');
  if (type !== 'qemu' && type !== 'kvm') {
    add('refuse', root, `domain type '${type ?? '(none)'}': ftvm protects QEMU domains only (type 'kvm' or 'qemu')`);
  }

  const devices = childElement(root, 'devices');
  const shared = childElements(childElement(root, 'memoryBacking') ?? root, 'access').some((a) => attr(a, 'mode') === 'shared');
  if (devices) {
    for (const el of childElements(devices, 'hostdev')) {
      const source = childElement(el, 'source');
      const address = source && childElement(source, 'address');
      const where = address ? ` (${['domain', 'bus', 'slot', 'function'].map((k) => attr(address, k)).filter(Boolean).join(':')})` : '';
      add('refuse', el, `host ${attr(el, 'type') ?? 'device'} passthrough${where}: QEMU cannot migrate a passed-through device's state (VFIO/USB host devices block migration)`);
    }
    for (const el of childElements(devices, 'interface')) {
      const itype = attr(el, 'type');
      if (itype === 'hostdev') add('refuse', el, 'SR-IOV interface (type hostdev): a passed-through VF blocks migration');
      if (itype === 'vhostuser') {
        if (!shared) add('refuse', el, "vhost-user interface without shared guest memory (<memoryBacking><access mode='shared'/>): QEMU cannot run it, let alone migrate it");
        else add('warning', el, 'vhost-user interface: the backend on both hosts must support migration (dirty log over shared memory) and the socket must exist on the backup');
      }
    }
    for (const el of childElements(devices, 'filesystem')) {
      const driver = childElement(el, 'driver');
      const kind = attr(driver ?? el, 'type') === 'virtiofs' ? 'virtiofs (vhost-user-fs)' : `9p (${attr(driver ?? el, 'type') ?? 'path'} driver)`;
      add('refuse', el, `host filesystem passthrough via ${kind}: QEMU blocks migration while it is in use, and the exported host directory is not part of a checkpoint`);
    }
    for (const el of childElements(devices, 'tpm')) {
      const backend = childElement(el, 'backend');
      if (attr(backend ?? el, 'type') === 'passthrough') add('refuse', el, 'TPM passthrough: the host TPM cannot be moved to the backup');
      else add('warning', el, "emulated TPM: swtpm's state must be available on the backup (shared storage for its state directory)");
    }
    for (const el of childElements(devices, 'smartcard')) {
      const mode = attr(el, 'mode');
      if (mode === 'host' || mode === 'host-certificates' || mode === 'passthrough') add('refuse', el, `smartcard in mode '${mode}': bound to this host's reader or channel`);
    }
    for (const el of childElements(devices, 'input')) {
      const itype = attr(el, 'type');
      if (itype === 'passthrough' || itype === 'evdev') add('refuse', el, `host input device (type '${itype}'): bound to a device node of this host`);
    }
    for (const el of childElements(devices, 'shmem')) {
      const model = attr(childElement(el, 'model') ?? el, 'type');
      const server = childElement(el, 'server');
      const role = attr(el, 'role');
      if (model === 'ivshmem-doorbell' || server) add('refuse', el, 'ivshmem with a doorbell server: QEMU blocks migration');
      else if (role === 'peer') add('refuse', el, "ivshmem in role 'peer': QEMU blocks migration");
      else add('shared-storage', el, 'shared memory region: its contents are host state, the backup must map the same region');
    }
    for (const el of childElements(devices, 'redirdev')) add('warning', el, 'USB redirection: the client must reconnect to the backup');
    for (const el of childElements(devices, 'vsock')) add('warning', el, "vsock: the guest CID must be free on the backup (use <cid auto='yes'/> with care)");
    for (const el of childElements(devices, 'disk')) checkDisk(el, add);
  }

  const cpu = childElement(root, 'cpu');
  if (cpu) {
    const mode = attr(cpu, 'mode');
    if (mode === 'host-passthrough' || mode === 'maximum') add('warning', cpu, `CPU mode '${mode}': the backup must have an identical CPU, or the restored guest may fault`);
  }
  return findings;
}

function checkDisk(el: Element, add: (severity: FindingSeverity, el: Element, reason: string) => void): void {
  const type = attr(el, 'type') ?? 'file';
  const device = attr(el, 'device') ?? 'disk';
  const source = childElement(el, 'source');
  const what = source ? (attr(source, 'file') ?? attr(source, 'dev') ?? attr(source, 'name') ?? attr(source, 'volume') ?? attr(source, 'dir') ?? '') : '';
  const label = `${device} ${what ? `'${what}'` : '(no source)'}`;
  const readonly = childElement(el, 'readonly') !== undefined || device === 'cdrom' || device === 'floppy';
  if (childElement(el, 'transient')) {
    add('refuse', el, `${label}: <transient/> keeps the guest's writes in an overlay on this host, which a checkpoint does not carry`);
    return;
  }
  if (!source && (device === 'cdrom' || device === 'floppy')) return; // empty drive
  if (device === 'lun') {
    add('shared-storage', el, `${label}: SCSI LUN passthrough: the LUN must be reachable from the backup`);
    return;
  }
  if (readonly) {
    add('info', el, `${label}: read-only; the backup needs the same image at the same path`);
    return;
  }
  if (type === 'network') {
    add('info', el, `${label}: network storage (${attr(source ?? el, 'protocol') ?? 'network'}), reachable from the backup`);
    return;
  }
  if (childElement(el, 'shareable')) {
    add('info', el, `${label}: marked <shareable/>, taken to be on shared storage`);
    return;
  }
  if ((type === 'file' || type === 'block') && device === 'disk') {
    add('info', el, `${label}: writable ${type} disk: replicated to the backup with every checkpoint (unless sharedStorage says the backup sees the same disk)`);
    return;
  }
  add(
    'shared-storage',
    el,
    `${label}: writable ${type} disk: ftvm replicates file and block disks only, so the backup must see this one at the same path (shared storage); pass sharedStorage to confirm it does`,
  );
}

/** Summary text for an error message: one line per finding. */
export function describeFindings(findings: Finding[]): string {
  return findings.map((f) => `${f.element}: ${f.reason}`).join('\n');
}

