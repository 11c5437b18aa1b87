import { describe, expect, it } from 'vitest';
import { serviceNics } from '@ftvm/libvirt';

const domain = (devices: string) => `<domain type='qemu'><name>vm</name><devices>${devices}</devices></domain>`;

describe('serviceNics', () => {
  it('lists libvirt-managed NICs with the netdev ids libvirt gives them', () => {
    const xml = domain(`
      <interface type='bridge'><mac address='52:54:00:aa:bb:01'/><source bridge='ftvmsvc'/><model type='virtio'/><alias name='net0'/></interface>
      <interface type='network'><source network='default'/><alias name='ua-svc2'/></interface>
      <disk type='file' device='disk'><source file='/x.img'/><target dev='vda'/></disk>`);
    expect(serviceNics(xml)).toEqual([
      { alias: 'net0', netdev: 'hostnet0', mac: '52:54:00:aa:bb:01', type: 'bridge' },
      { alias: 'ua-svc2', netdev: 'hostua-svc2', mac: undefined, type: 'network' },
    ]);
  });

  it('has none for a domain without <interface> (raw qemu:commandline NICs are not libvirt\'s)', () => {
    expect(serviceNics(domain(''))).toEqual([]);
    expect(serviceNics(`<domain type='qemu'><name>vm</name></domain>`)).toEqual([]);
  });

  it('refuses the XML of a domain that is not running (no aliases yet)', () => {
    expect(() => serviceNics(domain(`<interface type='bridge'><source bridge='b'/></interface>`))).toThrow(/<interface> #1 has no <alias>: read the XML of the running domain/);
  });
});
