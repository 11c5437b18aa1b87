import { childElement, childElements, parseDomainXml, removeElement, serializeXml, type Element } from './dom.js';
import { readProtection } from './protection.js';

/** A writable local disk whose contents ftvm replicates to the backup at every checkpoint. */
export interface ReplicatedDisk {
  /** The guest-side name (`<target dev>`), e.g. `vda`: names the disk across hosts. */
  target: string;
  /** The image path (`<source file>` or `<source dev>`) on the host that runs the VM. */
  source: string;
  /** `<driver type>` (qcow2, raw, …); raw when absent. */
  format: string;
  sourceType: 'file' | 'block';
}

const attr = (el: Element, name: string) => el.getAttribute(name) ?? undefined;

function isReplicated(el: Element): boolean {
  const type = attr(el, 'type') ?? 'file';
  const device = attr(el, 'device') ?? 'disk';
  if (device !== 'disk' || (type !== 'file' && type !== 'block')) return false;
  const source = childElement(el, 'source');
  if (!source || !(attr(source, type === 'file' ? 'file' : 'dev'))) return false;
  return !childElement(el, 'readonly') && !childElement(el, 'shareable') && !childElement(el, 'transient');
}

/**
 * The disks ftvm replicates: every writable file or block disk, unless the VM's protection says its
 * storage is shared (the user's explicit opt-in: the backup then uses the same path as it is).
 */
export function replicatedDisks(xml: string): ReplicatedDisk[] {
  if (readProtection(xml)?.sharedStorage) return [];
  const root = parseDomainXml(xml).documentElement!;
  const devices = childElement(root, 'devices');
  if (!devices) return [];
  const disks: ReplicatedDisk[] = [];
  for (const el of childElements(devices, 'disk').filter(isReplicated)) {
    const sourceType = (attr(el, 'type') ?? 'file') as 'file' | 'block';
    const source = attr(childElement(el, 'source')!, sourceType === 'file' ? 'file' : 'dev')!;
    const target = attr(childElement(el, 'target') ?? el, 'dev');
    if (!target) throw new Error(`disk '${source}' has no <target dev>: ftvm names replicated disks by their target`);
    const driver = childElement(el, 'driver');
    disks.push({ target, source, format: (driver && attr(driver, 'type')) ?? 'raw', sourceType });
  }
  return disks;
}

/**
 * The domain XML a backup starts its standby with: each replicated disk points at this host's
 * replica (`image(target)`, a raw file), whatever the primary's format and path. Nothing else
 * changes, so the migration stream (which carries no block-layer state) loads as it is.
 */
export function standbyDomainXml(xml: string, image: (target: string) => string): string {
  const replicated = new Set(replicatedDisks(xml).map((d) => d.target));
  if (replicated.size === 0) return xml;
  const doc = parseDomainXml(xml);
  const devices = childElement(doc.documentElement!, 'devices')!;
  for (const el of childElements(devices, 'disk')) {
    const target = attr(childElement(el, 'target') ?? el, 'dev');
    if (!target || !replicated.has(target) || !isReplicated(el)) continue;
    el.setAttribute('type', 'file');
    const source = childElement(el, 'source')!;
    source.removeAttribute('dev');
    source.setAttribute('file', image(target));
    // the replica has no backing chain: libvirt would otherwise try to open the primary's
    for (const backing of childElements(el, 'backingStore')) removeElement(backing);
    let driver = childElement(el, 'driver');
    if (!driver) {
      driver = doc.createElement('driver');
      driver.setAttribute('name', 'qemu');
      el.insertBefore(driver, el.firstChild);
    }
    driver.setAttribute('type', 'raw');
  }
  return serializeXml(doc);
}
