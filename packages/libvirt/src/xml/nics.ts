import { childElement, childElements, parseDomainXml } from './dom.js';

/** A libvirt-managed NIC of a domain. */
export interface DomainNic {
  /** libvirt's device alias (`net0`, `ua-service`), when the XML carries one (a migratable XML drops libvirt's own). */
  alias: string | undefined;
  /** The guest-visible MAC address (libvirt always fills it in once the domain is defined). */
  mac: string | undefined;
  /** `<interface type>`: bridge, network, direct, user, … */
  type: string;
}

/**
 * The domain's `<interface>` NICs. NICs outside libvirt (`<qemu:commandline>` netdevs) are not
 * listed: ftvm leaves those alone.
 */
export function serviceNics(xml: string): DomainNic[] {
  const devices = childElement(parseDomainXml(xml).documentElement!, 'devices');
  if (!devices) return [];
  return childElements(devices, 'interface').map((el) => ({
    alias: childElement(el, 'alias')?.getAttribute('name') ?? undefined,
    mac: childElement(el, 'mac')?.getAttribute('address')?.toLowerCase() ?? undefined,
    type: el.getAttribute('type') ?? 'unknown',
  }));
}
