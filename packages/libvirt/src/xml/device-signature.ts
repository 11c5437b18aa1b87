import { childElement, childElements, parseDomainXml } from './dom.js';

/**
 * What identifies a domain's devices for a migration stream: each device under `<devices>` by its
 * kind and guest address (PCI slot, drive unit, …), sorted. A device hot-plugged or unplugged
 * changes it; libvirt's runtime details (aliases, tap names, ports) do not.
 */
export function deviceSignature(xml: string): string {
  const root = parseDomainXml(xml).documentElement!;
  const devices = childElement(root, 'devices');
  if (!devices) return '';
  const entries = childElements(devices).map((device) => {
    const address = childElement(device, 'address');
    const attrs: string[] = [];
    for (let i = 0; address && i < address.attributes.length; i++) {
      const a = address.attributes.item(i)!;
      attrs.push(`${a.name}=${a.value}`);
    }
    const type = device.getAttribute('type') ?? device.getAttribute('model') ?? '';
    return `${device.tagName}:${type}@${attrs.sort().join(',')}`;
  });
  return entries.sort().join(';');
}
