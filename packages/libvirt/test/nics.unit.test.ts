import { describe, expect, it } from 'vitest';
import { ftReadyFromSpec, readProtection, serviceNics } from '@ftvm/libvirt';

const domain = (devices: string) => `<domain type='qemu'><name>vm</name><devices>${devices}</devices></domain>`;

describe('serviceNics', () => {
  it('lists libvirt-managed NICs with their MACs (and aliases where the XML keeps them)', () => {
    const xml = domain(`
      <interface type='bridge'><mac address='52:54:00:AA:bb:01'/><source bridge='ftvmsvc'/><model type='virtio'/><alias name='net0'/></interface>
      <interface type='network'><source network='default'/></interface>
      <disk type='file' device='disk'><source file='/x.img'/><target dev='vda'/></disk>`);
    expect(serviceNics(xml)).toEqual([
      { alias: 'net0', mac: '52:54:00:aa:bb:01', type: 'bridge' },
      { alias: undefined, mac: undefined, type: 'network' },
    ]);
  });

  it('has none for a domain without <interface> (raw qemu:commandline NICs are not libvirt\'s)', () => {
    expect(serviceNics(domain(''))).toEqual([]);
    expect(serviceNics(`<domain type='qemu'><name>vm</name></domain>`)).toEqual([]);
  });
});

describe('output commit in the protection metadata', () => {
  const spec = (ftvm: string) => `name: web1\nmemoryMiB: 128\nboot: { kernel: /k }\nftvm:\n  peer: { host: backup }\n${ftvm}`;

  it('a spec with outputCommit writes it into the metadata and readProtection reads it back', () => {
    const on = ftReadyFromSpec(spec('  outputCommit: true\n  checkpointIntervalMs: 100\n'));
    expect(on.xml).toMatch(/<ftvm:checkpoint interval-ms="100" output-commit="yes"\/>/);
    expect(readProtection(on.xml)).toMatchObject({ checkpointIntervalMs: 100, outputCommit: true });
    expect(readProtection(ftReadyFromSpec(spec('  outputCommit: false\n')).xml)?.outputCommit).toBe(false);
    // absent: not said (the agent keeps what the VM had; off for a new VM)
    expect(readProtection(ftReadyFromSpec(spec('')).xml)).not.toHaveProperty('outputCommit');
  });

  it('refuses a value that is not a boolean, naming the field', () => {
    expect(() => ftReadyFromSpec(spec('  outputCommit: sometimes\n'))).toThrow(/ftvm\.outputCommit/);
  });
});
