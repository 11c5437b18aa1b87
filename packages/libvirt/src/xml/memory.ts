/**
 * A standby's main RAM on a shared file (libvirt `<memoryBacking><source type='file'/><access
 * mode='shared'/>`): QEMU maps `<memory_backing_dir>/<domid>-<name>/pc.ram` MAP_SHARED, so what
 * the backup writes into that file is the standby's memory (see @ftvm/transport's StandbyRam).
 * libvirt creates the file at the domain's start and deletes it at its stop.
 */
import { appendIndented, childElement, elementsAt, parseDomainXml, serializeXml } from './dom.js';

export interface SharedRamXml {
  xml: string;
  /** The RAM is now on a shared file; false when the domain's own settings rule it out (`reason`). */
  mapped: boolean;
  reason?: string;
}

/**
 * The domain XML with its RAM on a shared file, when nothing in it rules that out: a domain that
 * has its own memory backing (hugepages, memfd…) or NUMA cells (one RAM block per node, not
 * `pc.ram`) is left as it is.
 */
export function withSharedRamFile(xml: string): SharedRamXml {
  const doc = parseDomainXml(xml);
  const domain = doc.documentElement!;
  if (childElement(domain, 'memoryBacking')) return { xml, mapped: false, reason: 'the domain has its own <memoryBacking>' };
  if (elementsAt(domain, 'cpu/numa/cell').length > 0) return { xml, mapped: false, reason: 'the domain has NUMA cells (one RAM block per node)' };
  const backing = doc.createElement('memoryBacking');
  const source = doc.createElement('source');
  source.setAttribute('type', 'file');
  const access = doc.createElement('access');
  access.setAttribute('mode', 'shared');
  appendIndented(backing, source);
  appendIndented(backing, access);
  appendIndented(domain, backing); // the schema takes the domain's children in any order
  return { xml: serializeXml(doc), mapped: true };
}
