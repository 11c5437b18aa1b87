import { describe, expect, it } from 'vitest';
import { checkProtectable, ftReadyFromSpec, parseDomainSpec, parseDomainXml, serviceNics, SpecError, standbyDomainXml, validateDomainXml } from '@ftvm/libvirt';

/** The spec's `nics:` list: bridged NICs (the guest's service network), beside the probe's own NIC. */
const base = (nics: string) => `
name: svc-guest
memoryMiB: 256
boot: { kernel: /boot/vmlinuz, initrd: /boot/initrd.img, cmdline: "console=ttyS0" }
disks:
  - { path: /var/lib/libvirt/images/svc-guest/ring.img, format: raw }
${nics}
ftvm:
  peer: backup
probe:
  listen: { address: 0.0.0.0, port: 5555 }
`;
const interfaces = (xml: string) => [...xml.matchAll(/<interface[\s\S]*?<\/interface>/g)].map((m) => m[0].replace(/\s+/g, ' '));

describe('YAML spec: nics', () => {
  it('has none unless asked', () => {
    expect(parseDomainSpec(base('')).domain.nics).toEqual([]);
    expect(interfaces(ftReadyFromSpec(base('')).xml)).toEqual([]);
  });

  it('becomes bridged virtio <interface>s, in order, MAC lower-cased, with user aliases', () => {
    const spec = base(`nics:\n  - { bridge: ftvmsvc, mac: "52:54:00:AB:00:01" }\n  - { bridge: br-data, model: virtio }`);
    expect(parseDomainSpec(spec).domain.nics).toEqual([
      { bridge: 'ftvmsvc', mac: '52:54:00:ab:00:01', model: 'virtio' },
      { bridge: 'br-data', model: 'virtio' },
    ]);
    expect(interfaces(ftReadyFromSpec(spec).xml)).toEqual([
      '<interface type="bridge"> <mac address="52:54:00:ab:00:01"/> <source bridge="ftvmsvc"/> <model type="virtio"/> <alias name="ua-net0"/> </interface>',
      '<interface type="bridge"> <source bridge="br-data"/> <model type="virtio"/> <alias name="ua-net1"/> </interface>',
    ]);
  });

  it('leaves the probe NIC where it was (raw -device at pci.0 slot 0x1f, libvirt picks the others)', () => {
    const { xml } = ftReadyFromSpec(base(`nics:\n  - { bridge: ftvmsvc, mac: "52:54:00:ab:00:01" }`));
    expect(xml).toContain('&quot;bus&quot;:&quot;pci.0&quot;,&quot;addr&quot;:&quot;0x1f&quot;');
    expect(xml).toContain('hostfwd=udp:0.0.0.0:5555-:5555');
    expect(interfaces(xml)[0]).not.toContain('<address');
  });

  it('is protectable and goes unchanged into the standby XML (same bridge name on the backup)', () => {
    const { xml } = ftReadyFromSpec(base(`nics:\n  - { bridge: ftvmsvc, mac: "52:54:00:ab:00:01" }`));
    expect(checkProtectable(parseDomainXml(xml).documentElement!).filter((f) => f.element.includes('interface'))).toEqual([]);
    const standby = standbyDomainXml(xml, (target) => `/var/lib/ftvm/replica/${target}.raw`);
    expect(standby).toContain('/var/lib/ftvm/replica/vda.raw');
    expect(interfaces(standby)).toEqual(interfaces(xml));
    // ftvm's output commit finds the NIC by this MAC in QEMU (a migratable XML keeps no aliases)
    expect(serviceNics(xml)).toEqual([{ alias: 'ua-net0', mac: '52:54:00:ab:00:01', type: 'bridge' }]);
  });

  it('rejects bad input, naming the field', () => {
    const bad = (nics: string) => () => parseDomainSpec(base(`nics:\n  - ${nics}`));
    expect(() => parseDomainSpec(base('nics: { bridge: br0 }'))).toThrow(new SpecError('nics', 'must be a list'));
    expect(bad('{ mac: "52:54:00:00:00:01" }')).toThrow(new SpecError('nics[0].bridge', 'is required'));
    expect(bad('{ bridge: "" }')).toThrow(/nics\[0\]\.bridge: must be a non-empty string/);
    expect(bad('{ bridge: a-bridge-name-too-long }')).toThrow(/nics\[0\]\.bridge: "a-bridge-name-too-long" is not a Linux interface name/);
    expect(bad('{ bridge: "br 0" }')).toThrow(/nics\[0\]\.bridge: "br 0" is not a Linux interface name/);
    expect(bad('{ bridge: br0, mac: "52:54:00:00:01" }')).toThrow(/nics\[0\]\.mac: "52:54:00:00:01" is not a MAC address/);
    expect(bad('{ bridge: br0, mac: "52-54-00-00-00-01" }')).toThrow(/nics\[0\]\.mac: .* is not a MAC address/);
    expect(bad('{ bridge: br0, mac: "01:00:5e:00:00:01" }')).toThrow(/nics\[0\]\.mac: 01:00:5e:00:00:01 is a multicast address/);
    expect(bad('{ bridge: br0, model: e1000 }')).toThrow(/nics\[0\]\.model: "e1000" is not one of virtio/);
    expect(bad('{ bridge: br0, type: network }')).toThrow(/nics\[0\]\.type: unknown field \(expected bridge, mac, model\)/);
    expect(bad('br0')).toThrow(/nics\[0\]: must be a mapping/);
    expect(() => parseDomainSpec(base(`nics:\n  - { bridge: a, mac: "52:54:00:00:00:01" }\n  - { bridge: b, mac: "52:54:00:00:00:01" }`))).toThrow(
      new SpecError('nics[1].mac', "52:54:00:00:00:01 is also nics[0]'s"),
    );
  });

  // scripts/bootstrap.sh installs virt-xml-validate; a missing validator must fail, not skip
  it("passes libvirt's schema", async () => {
    const { xml } = ftReadyFromSpec(base(`nics:\n  - { bridge: ftvmsvc, mac: "52:54:00:ab:00:01" }\n  - { bridge: br1 }`));
    const result = await validateDomainXml(xml);
    expect(result, result.output).toMatchObject({ valid: true });
  });
});
