import { childElement, childElements, parseDomainXml } from './dom.js';

/** A libvirt-managed NIC of a running domain, as QEMU knows it. */
export interface DomainNic {
  /** libvirt's device alias (`net0`, `ua-service`): the `-device` id. */
  alias: string;
  /** QEMU's netdev id for it: libvirt names it `host` + the alias. */
  netdev: string;
  mac: string | undefined;
  /** `<interface type>`: bridge, network, direct, user, … */
  type: string;
}

/**
 * The domain's `<interface>` NICs, from a running domain's XML (libvirt adds the aliases when it
 * starts the domain). NICs outside libvirt (`<qemu:commandline>` netdevs) are not listed: ftvm
 * leaves those alone. Throws if an interface has no alias (the XML of a domain that is not running).
 */
export function serviceNics(xml: string): DomainNic[] {
  const devices = childElement(parseDomainXml(xml).documentElement!, 'devices');
  if (!devices) return [];
  return childElements(devices, 'interface').map((el, index) => {
    const alias = childElement(el, 'alias')?.getAttribute('name') ?? undefined;
    if (!alias) throw new Error(`<interface> #${index + 1} has no <alias>: read the XML of the running domain (libvirt names its NICs when it starts them)`);
    return { alias, netdev: `host${alias}`, mac: childElement(el, 'mac')?.getAttribute('address') ?? undefined, type: el.getAttribute('type') ?? 'unknown' };
  });
}
