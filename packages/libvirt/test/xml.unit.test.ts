import { describe, expect, it } from 'vitest';
import { DOMParser, type Element, type Node } from '@xmldom/xmldom';
import {
  DomainXmlError,
  fixFtvmPaths,
  ftReadyFromSpec,
  makeFtReady,
  NotProtectableError,
  parseDomainSpec,
  parseDomainXml,
  readProtection,
  replicatedDisks,
  standbyDomainXml,
  serializeXml,
  setIncomingDefer,
  SpecError,
  validateDomainXml,
  withSharedRamFile,
  type FtReadyOptions,
} from '@ftvm/libvirt';

/** A domain as a user might write it: comments, entities, another metadata namespace, own QEMU args. */
const USER_XML = `<?xml version="1.0" encoding="UTF-8"?>
<!-- web server, owned by team A -->
<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>web1</name>
  <uuid>5f1b5e0e-8d55-4b5e-9f6a-2f1c7f7c9a01</uuid>
  <title>Web &amp; API &lt;prod&gt;</title>
  <metadata>
    <app:owner xmlns:app="https://example.com/app/1">team-a</app:owner>
  </metadata>
  <memory unit='KiB'>1048576</memory>
  <vcpu placement='static'>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>
    <boot dev='hd'/>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <!-- the root disk lives on the NFS share -->
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/srv/shared/web1.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/srv/iso/tools.iso'/>
      <target dev='hdc' bus='ide'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <source network='default'/>
      <model type='virtio'/>
    </interface>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-global'/>
    <qemu:arg value='kvm-pit.lost_tick_policy=delay'/>
    <qemu:env name='TZ' value='UTC'/>
  </qemu:commandline>
</domain>
`;

const OPTIONS: FtReadyOptions = { protection: { peer: { host: 'backup', uri: 'qemu+ssh://backup/system' }, checkpointIntervalMs: 150 }, sharedStorage: true };

/** The document as a tree of names, attributes, text, comments (whitespace-only text ignored). */
function canonical(xml: string): unknown {
  const doc = new DOMParser().parseFromString(xml, 'text/xml');
  const walk = (n: Node): unknown => {
    if (n.nodeType === 1) {
      const el = n as Element;
      const attrs: Record<string, string> = {};
      for (let i = 0; i < el.attributes.length; i++) {
        const a = el.attributes.item(i)!;
        attrs[`{${a.namespaceURI ?? ''}}${a.localName}`] = a.value;
      }
      const children: unknown[] = [];
      for (let c = el.firstChild; c; c = c.nextSibling) {
        const w = walk(c);
        if (w !== undefined) children.push(w);
      }
      return { el: `{${el.namespaceURI ?? ''}}${el.localName}`, attrs, children };
    }
    if (n.nodeType === 3) return /^\s*$/.test((n as unknown as { data: string }).data) ? undefined : { text: (n as unknown as { data: string }).data };
    if (n.nodeType === 8) return { comment: (n as unknown as { data: string }).data };
    if (n.nodeType === 7) return { pi: (n as unknown as { target: string }).target };
    return undefined;
  };
  const out: unknown[] = [];
  for (let c = doc.firstChild; c; c = c.nextSibling) {
    const w = walk(c);
    if (w !== undefined) out.push(w);
  }
  return out;
}

/** Removes what makeFtReady adds, to compare the rest with the input. */
function stripFtvm(xml: string): string {
  const doc = parseDomainXml(xml);
  const root = doc.documentElement!;
  for (const el of Array.from(root.getElementsByTagNameNS('https://ftvm.dev/xmlns/1', 'protection'))) el.parentNode!.removeChild(el);
  const args = Array.from(root.getElementsByTagNameNS('http://libvirt.org/schemas/domain/qemu/1.0', 'arg'));
  const ftvmValue = /(id|chardev|netdev|bus)=ftvm-|"(id|chardev|netdev)":"ftvm-/;
  args.forEach((a, i) => {
    const v = a.getAttribute('value') ?? '';
    const next = args[i + 1]?.getAttribute('value') ?? '';
    if (ftvmValue.test(v) || (/^-/.test(v) && ftvmValue.test(next))) a.parentNode!.removeChild(a);
  });
  // native devices (by their ua-ftvm- alias) and their <qemu:override> entries
  for (const alias of Array.from(root.getElementsByTagName('alias'))) {
    if ((alias.getAttribute('name') ?? '').startsWith('ua-ftvm-')) alias.parentNode!.parentNode!.removeChild(alias.parentNode!);
  }
  for (const d of Array.from(root.getElementsByTagNameNS('http://libvirt.org/schemas/domain/qemu/1.0', 'device'))) {
    if ((d.getAttribute('alias') ?? '').startsWith('ua-ftvm-')) d.parentNode!.removeChild(d);
  }
  for (const o of Array.from(root.getElementsByTagNameNS('http://libvirt.org/schemas/domain/qemu/1.0', 'override'))) {
    if (!Array.from(o.childNodes).some((c) => c.nodeType === 1)) o.parentNode!.removeChild(o);
  }
  return serializeXml(doc);
}

describe('round trips', () => {
  it('parse → serialize keeps everything and is stable', () => {
    const once = serializeXml(parseDomainXml(USER_XML));
    expect(canonical(once)).toEqual(canonical(USER_XML));
    expect(serializeXml(parseDomainXml(once))).toBe(once);
    expect(once).toContain('<!-- the root disk lives on the NFS share -->');
    expect(once).toContain('Web &amp; API &lt;prod&gt;');
  });

  it('makeFtReady adds only ftvm things: without them the document is the input', () => {
    const { xml } = makeFtReady(USER_XML, OPTIONS);
    expect(canonical(stripFtvm(xml))).toEqual(canonical(USER_XML));
    // the other application's metadata and the user's own QEMU arguments and env are still there
    expect(xml).toContain('<app:owner xmlns:app="https://example.com/app/1">team-a</app:owner>');
    expect(xml.indexOf('kvm-pit.lost_tick_policy=delay')).toBeLessThan(xml.indexOf('id=ftvm-qmp'));
    expect(xml.indexOf('id=ftvm-qmp')).toBeLessThan(xml.indexOf("<qemu:env"));
  });

  it('is idempotent', () => {
    const first = makeFtReady(USER_XML, { ...OPTIONS, agent: true, incoming: true }).xml;
    const second = makeFtReady(first, { ...OPTIONS, agent: true, incoming: true }).xml;
    expect(second).toBe(first);
    const changed = makeFtReady(first, { ...OPTIONS, protection: { peer: { host: 'other' } } });
    expect(changed.protection.peer).toEqual({ host: 'other' });
    expect(changed.xml.match(/ftvm:protection /g)).toHaveLength(1);
    expect(changed.xml).not.toContain('ftvm-qga');
    expect(changed.xml).not.toContain('defer');
  });

  it('rejects XML that is not well-formed or not a domain', () => {
    expect(() => parseDomainXml('<domain><name>x</domain>')).toThrow(DomainXmlError);
    expect(() => parseDomainXml('<network><name>x</name></network>')).toThrow(/root element is <network>/);
    expect(() => parseDomainXml("<domain type='kvm'><name>a & b</name></domain>")).toThrow(DomainXmlError);
  });
});

describe('makeFtReady', () => {
  it('writes the metadata that readProtection reads back', () => {
    const { xml, protection } = makeFtReady(USER_XML, { ...OPTIONS, agent: true, protection: { ...OPTIONS.protection, clock: { maxStepMs: 5000, onImpossible: 'agent' } } });
    expect(readProtection(xml)).toEqual(protection);
    expect(protection).toMatchObject({
      protected: true,
      peer: { host: 'backup', uri: 'qemu+ssh://backup/system' },
      checkpointIntervalMs: 150,
      clock: { compensate: ['checkpoint', 'migration', 'failover'], maxStepMs: 5000, onImpossible: 'agent' },
      qmpSocket: '/run/ftvm/web1.qmp',
      agentSocket: '/run/ftvm/web1.qga',
      sharedStorage: true,
    });
    expect(xml).toContain('<ftvm:protection xmlns:ftvm="https://ftvm.dev/xmlns/1" version="1">');
    expect(xml).toContain('socket,id=ftvm-qmp,path=/run/ftvm/web1.qmp,server=on,wait=off');
  });

  it('uses the patched emulator only when it is installed', () => {
    const installed = makeFtReady(USER_XML, { ...OPTIONS, emulator: { path: process.execPath } });
    expect(installed.xml).toContain(`<emulator>${process.execPath}</emulator>`);
    expect(installed.protection.emulator).toBe(process.execPath);
    const missing = makeFtReady(USER_XML, { ...OPTIONS, emulator: { path: '/nonexistent/qemu' } });
    expect(missing.xml).toContain('<emulator>/usr/bin/qemu-system-x86_64</emulator>');
    expect(missing.findings).toContainEqual(expect.objectContaining({ severity: 'info', element: '/domain/devices/emulator' }));
    expect(() => makeFtReady(USER_XML, { ...OPTIONS, emulator: { path: '/nonexistent/qemu', require: true } })).toThrow(/not installed/);
  });

  it('doubles commas in socket paths (QEMU option syntax)', () => {
    const { xml } = makeFtReady(USER_XML, { ...OPTIONS, runDir: '/run/a,b' });
    expect(xml).toContain('path=/run/a,,b/web1.qmp,server=on');
  });

  it('refuses a socket path over the unix limit', () => {
    expect(() => makeFtReady(USER_XML, { ...OPTIONS, runDir: `/run/${'x'.repeat(110)}` })).toThrow(/longer than 107 bytes/);
  });

  it('refuses an agent next to a libvirt-managed agent channel', () => {
    const withChannel = USER_XML.replace(
      '</devices>',
      "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel></devices>",
    );
    expect(() => makeFtReady(withChannel, { ...OPTIONS, agent: true })).toThrow(/already has a libvirt-managed guest agent/);
    expect(() => makeFtReady(withChannel, OPTIONS)).not.toThrow();
  });
});

describe('what ftvm cannot protect', () => {
  const domain = (devices: string, extra = '') =>
    `<domain type='kvm'><name>vm</name><memory>1024</memory>${extra}<os><type>hvm</type></os><devices>${devices}</devices></domain>`;
  const refusal = (xml: string, options: Partial<FtReadyOptions> = {}) => {
    try {
      makeFtReady(xml, { ...OPTIONS, sharedStorage: false, ...options });
    } catch (error) {
      expect(error).toBeInstanceOf(NotProtectableError);
      return (error as NotProtectableError).findings;
    }
    return [];
  };

  it('host PCI passthrough, naming the element', () => {
    const findings = refusal(
      domain("<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0x0000' bus='0x03' slot='0x00' function='0x0'/></source></hostdev>"),
    );
    expect(findings).toEqual([{ severity: 'refuse', element: '/domain/devices/hostdev', reason: expect.stringMatching(/^host pci passthrough \(0x0000:0x03:0x00:0x0\)/) }]);
  });

  it('virtiofs and 9p filesystems', () => {
    const findings = refusal(
      domain(
        "<filesystem type='mount' accessmode='passthrough'><driver type='virtiofs'/><source dir='/srv/a'/><target dir='a'/></filesystem>" +
          "<filesystem type='mount' accessmode='mapped'><source dir='/srv/b'/><target dir='b'/></filesystem>",
      ),
    );
    expect(findings.map((f) => [f.element, f.severity])).toEqual([
      ['/domain/devices/filesystem[1]', 'refuse'],
      ['/domain/devices/filesystem[2]', 'refuse'],
    ]);
    expect(findings[0]!.reason).toMatch(/virtiofs/);
    expect(findings[1]!.reason).toMatch(/9p/);
  });

  it('vhost-user without shared memory; with it, a warning', () => {
    const nic = "<interface type='vhostuser'><source type='unix' path='/run/vu.sock' mode='client'/><model type='virtio'/></interface>";
    expect(refusal(domain(nic))).toEqual([expect.objectContaining({ element: '/domain/devices/interface', reason: expect.stringMatching(/without shared guest memory/) })]);
    const ok = makeFtReady(domain(nic, "<memoryBacking><access mode='shared'/></memoryBacking>"), OPTIONS);
    expect(ok.findings).toEqual([expect.objectContaining({ severity: 'warning', element: '/domain/devices/interface' })]);
  });

  it('writable file disks are replicated; other writable storage needs shared storage', () => {
    const disks =
      "<disk type='file' device='disk'><source file='/var/lib/libvirt/images/vm.qcow2'/><target dev='vda'/></disk>" +
      "<disk type='file' device='cdrom'><source file='/iso/a.iso'/><target dev='hdc'/><readonly/></disk>" +
      "<disk type='network' device='disk'><source protocol='rbd' name='pool/vm'/><target dev='vdb'/></disk>" +
      "<disk type='volume' device='disk'><source pool='p' volume='v'/><target dev='vdc'/></disk>";
    expect(refusal(domain(disks))).toEqual([
      { severity: 'shared-storage', element: '/domain/devices/disk[4]', reason: expect.stringMatching(/^disk 'v': writable volume disk: ftvm replicates file and block disks only/) },
    ]);
    const accepted = makeFtReady(domain(disks), OPTIONS);
    expect(accepted.findings.map((f) => f.severity)).toEqual(['info', 'info', 'info', 'shared-storage']);
    expect(accepted.findings[0]?.reason).toMatch(/replicated to the backup with every checkpoint/);
  });

  it('replicatedDisks lists writable file and block disks by target, none with shared storage', () => {
    const disks =
      "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/img/a.qcow2'/><target dev='vda' bus='virtio'/></disk>" +
      "<disk type='block' device='disk'><source dev='/dev/vg/b'/><target dev='vdb' bus='virtio'/></disk>" +
      "<disk type='file' device='disk'><source file='/img/ro.raw'/><target dev='vdc'/><readonly/></disk>" +
      "<disk type='file' device='disk'><source file='/img/shared.raw'/><target dev='vdd'/><shareable/></disk>" +
      "<disk type='file' device='cdrom'><source file='/iso/a.iso'/><target dev='hdc'/><readonly/></disk>";
    const { xml } = makeFtReady(domain(disks), { ...OPTIONS, sharedStorage: false });
    expect(replicatedDisks(xml)).toEqual([
      { target: 'vda', source: '/img/a.qcow2', format: 'qcow2', sourceType: 'file' },
      { target: 'vdb', source: '/dev/vg/b', format: 'raw', sourceType: 'block' },
    ]);
    expect(replicatedDisks(makeFtReady(domain(disks), OPTIONS).xml)).toEqual([]); // sharedStorage: true
  });

  it('standbyDomainXml points each replicated disk at a raw replica and keeps the rest', () => {
    const disks =
      "<disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='none'/><source file='/img/a.qcow2'/><backingStore type='file'><format type='raw'/><source file='/img/base.raw'/></backingStore><target dev='vda' bus='virtio'/><serial>s1</serial></disk>" +
      "<disk type='block' device='disk'><source dev='/dev/vg/b'/><target dev='vdb' bus='virtio'/></disk>" +
      "<disk type='file' device='cdrom'><source file='/iso/a.iso'/><target dev='hdc'/><readonly/></disk>";
    const { xml } = makeFtReady(domain(disks), { ...OPTIONS, sharedStorage: false });
    const standby = standbyDomainXml(xml, (target) => `/store/vm/disks/${target}.img`);
    expect(replicatedDisks(standby)).toEqual([
      { target: 'vda', source: '/store/vm/disks/vda.img', format: 'raw', sourceType: 'file' },
      { target: 'vdb', source: '/store/vm/disks/vdb.img', format: 'raw', sourceType: 'file' },
    ]);
    expect(standby).toContain("cache=\"none\"");
    expect(standby).toContain('<serial>s1</serial>');
    expect(standby).not.toContain('backingStore');
    expect(standby).toContain("/iso/a.iso");
    expect(standbyDomainXml(makeFtReady(domain(disks), OPTIONS).xml, () => '/x')).toBe(makeFtReady(domain(disks), OPTIONS).xml);
  });

  it('withSharedRamFile puts the RAM on a shared file, unless the domain has its own backing or NUMA cells', () => {
    const { xml } = makeFtReady(domain(''), OPTIONS);
    const shared = withSharedRamFile(xml);
    expect(shared.mapped).toBe(true);
    const backing = parseDomainXml(shared.xml).getElementsByTagName('memoryBacking');
    expect(backing.length).toBe(1);
    expect(backing[0]!.getElementsByTagName('source')[0]!.getAttribute('type')).toBe('file');
    expect(backing[0]!.getElementsByTagName('access')[0]!.getAttribute('mode')).toBe('shared');
    expect(readProtection(shared.xml)).toEqual(readProtection(xml));
    expect(withSharedRamFile(shared.xml)).toMatchObject({ mapped: false, reason: expect.stringContaining('its own <memoryBacking>') });
    const numa = xml.replace('</domain>', "<cpu><numa><cell id='0' cpus='0' memory='262144' unit='KiB'/></numa></cpu></domain>");
    expect(withSharedRamFile(numa)).toMatchObject({ mapped: false, xml: numa, reason: expect.stringContaining('NUMA') });
  });

  it('transient disks, TPM passthrough, host input devices, non-QEMU domains', () => {
    expect(refusal(domain("<disk type='file' device='disk'><source file='/a.img'/><target dev='vda'/><transient/></disk>"), { sharedStorage: true })[0]?.reason).toMatch(/transient/);
    expect(refusal(domain("<tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>"))[0]?.element).toBe('/domain/devices/tpm');
    expect(refusal(domain("<input type='passthrough' bus='virtio'><source evdev='/dev/input/event1'/></input>"))[0]?.element).toBe('/domain/devices/input');
    expect(refusal("<domain type='xen'><name>x</name><memory>1</memory><os><type>hvm</type></os></domain>")[0]?.reason).toMatch(/QEMU domains only/);
  });
});

const PROBE = { listen: { address: '10.0.0.5', port: 6000 } };
const Q35_XML = USER_XML.replace("machine='pc-i440fx-7.2'", "machine='pc-q35-7.2'").replace(
  '  </devices>',
  `    <controller type='pci' index='0' model='pcie-root'/>
    <controller type='pci' index='1' model='pcie-root-port'/>
    <controller type='pci' index='2' model='pcie-root-port'/>
  </devices>`,
);

/** The elements of <devices> as "name type index alias bus" strings (for what ftvm added). */
function devicesOf(xml: string): string[] {
  const devices = parseDomainXml(xml).documentElement!.getElementsByTagName('devices')[0]!;
  return Array.from(devices.childNodes)
    .filter((n): n is Element => n.nodeType === 1)
    .map((e) => {
      const alias = e.getElementsByTagName('alias')[0]?.getAttribute('name');
      const address = Array.from(e.childNodes).find((c): c is Element => c.nodeType === 1 && (c as Element).localName === 'address');
      return [e.localName, e.getAttribute('type'), e.getAttribute('index') && `index=${e.getAttribute('index')}`, e.getAttribute('model'), alias, address && `bus=${address.getAttribute('bus')},slot=${address.getAttribute('slot')}`]
        .filter(Boolean)
        .join(' ');
    });
}

const qemuArgs = (xml: string) => Array.from(parseDomainXml(xml).documentElement!.getElementsByTagNameNS('http://libvirt.org/schemas/domain/qemu/1.0', 'arg')).map((a) => a.getAttribute('value'));

const probeNic = (bus: string, addr: string) => JSON.stringify({ driver: 'virtio-net-pci', id: 'ftvm-probe-nic', netdev: 'ftvm-probe', romfile: '', mac: '52:54:00:12:34:56', bus, addr });
const PROBE_PC = probeNic('pci.0', '0x1f');

describe("ftvm's devices: libvirt knows their PCI slots", () => {
  it("pc (i440fx): a native virtio-serial controller (libvirt picks its slot); the test probe's NIC raw on pci.0's last slot", () => {
    const { xml } = makeFtReady(USER_XML, { ...OPTIONS, agent: true, probe: PROBE });
    expect(devicesOf(xml).at(-1)).toEqual('controller virtio-serial index=1 ua-ftvm-serial');
    expect(xml).not.toContain('<interface type="user">');
    const args = qemuArgs(xml);
    expect(args.filter((a) => /pci/.test(a ?? ''))).toEqual([PROBE_PC]);
    // the agent port on ftvm's controller, as JSON (created after libvirt's JSON devices)
    const port = args[args.indexOf('-device') + 1]!;
    expect(JSON.parse(port)).toEqual({ driver: 'virtserialport', id: 'ftvm-qga-port', bus: 'ua-ftvm-serial.0', nr: 1, chardev: 'ftvm-qga', name: 'org.qemu.guest_agent.0' });
    expect(args).toContain('user,id=ftvm-probe,hostfwd=udp:10.0.0.5:6000-:5555');
    expect(xml).not.toContain('qemu:override');
    expect(xml).not.toContain('pcie-root-port');
  });

  it('q35: each on a root port of its own, above the pci controllers the user has; the user\'s spare root ports stay free', () => {
    const { xml } = makeFtReady(Q35_XML, { ...OPTIONS, agent: true, probe: PROBE });
    expect(devicesOf(xml).slice(-6)).toEqual([
      'controller pci index=0 pcie-root',
      'controller pci index=1 pcie-root-port',
      'controller pci index=2 pcie-root-port',
      'controller pci index=3 pcie-root-port ua-ftvm-port0',
      'controller virtio-serial index=1 ua-ftvm-serial bus=0x03,slot=0x00',
      'controller pci index=4 pcie-root-port ua-ftvm-port1',
    ]);
    expect(qemuArgs(xml)).toContain(probeNic('ua-ftvm-port1', '0x0'));
    // no pci controllers in the input: root ports from index 1 (libvirt adds pcie-root as 0)
    const bare = makeFtReady(USER_XML.replace("machine='pc-i440fx-7.2'", "machine='q35'"), { ...OPTIONS, probe: PROBE }).xml;
    expect(devicesOf(bare).slice(-1)).toEqual(['controller pci index=1 pcie-root-port ua-ftvm-port0']);
    expect(qemuArgs(bare)).toContain(probeNic('ua-ftvm-port0', '0x0'));
  });

  it('the virtio-serial controller goes above the user\'s own (libvirt fills the lowest with its channels)', () => {
    const withSerial = USER_XML.replace('  </devices>', "    <controller type='virtio-serial' index='0'/>\n    <controller type='virtio-serial' index='2'/>\n  </devices>");
    expect(devicesOf(makeFtReady(withSerial, { ...OPTIONS, agent: true }).xml).at(-1)).toBe('controller virtio-serial index=3 ua-ftvm-serial');
  });

  for (const [machine, input] of [['pc', USER_XML], ['q35', Q35_XML]] as const) {
    it(`${machine}: idempotent, removable, and valid`, async () => {
      const options = { ...OPTIONS, agent: true, probe: PROBE, incoming: true };
      const first = makeFtReady(input, options).xml;
      expect(makeFtReady(first, options).xml).toBe(first);
      expect(canonical(stripFtvm(setIncomingDefer(first, false)))).toEqual(canonical(input));
      // without agent and probe again, their devices and the override go
      const plain = makeFtReady(first, OPTIONS).xml;
      expect(plain).not.toMatch(/ua-ftvm-|qemu:override|ftvm-qga|ftvm-probe/);
      expect(canonical(plain)).toEqual(canonical(makeFtReady(input, OPTIONS).xml));
      const result = await validateDomainXml(first);
      expect(result, result.output).toMatchObject({ valid: true });
    });
  }

  it("keeps the user's own <qemu:override> entries", () => {
    const withOverride = USER_XML.replace(
      '</qemu:commandline>',
      "</qemu:commandline>\n  <qemu:override>\n    <qemu:device alias='ua-mine'>\n      <qemu:frontend>\n        <qemu:property name='x' type='bool' value='true'/>\n      </qemu:frontend>\n    </qemu:device>\n  </qemu:override>",
    );
    const { xml } = makeFtReady(withOverride, { ...OPTIONS, probe: PROBE });
    expect(xml).toContain('<qemu:device alias="ua-mine">');
    expect(xml.match(/<qemu:override>/g)).toHaveLength(1);
    expect(canonical(makeFtReady(xml, OPTIONS).xml)).toEqual(canonical(makeFtReady(withOverride, OPTIONS).xml));
  });

  it('fixFtvmPaths keeps the device layout a domain was defined with (a migration needs the same devices)', () => {
    const { xml } = makeFtReady(USER_XML, { ...OPTIONS, agent: true, probe: PROBE });
    const fixed = fixFtvmPaths(xml.replace('<name>web1</name>', '<name>web2</name>')).xml;
    expect(devicesOf(fixed)).toEqual(devicesOf(xml));
    expect(qemuArgs(fixed).filter((a) => /pci/.test(a ?? ''))).toEqual([PROBE_PC]);
    // a domain defined by an earlier version (raw virtio-serial-pci / virtio-net-pci) keeps those
    const legacy = xml
      .replace(/\s*<controller type="virtio-serial"[\s\S]*?<\/controller>/, '')
      .replace(/<qemu:arg value="\{[^"]*"\/>/, '<qemu:arg value="virtio-serial-pci,id=ftvm-serial"/><qemu:arg value="-device"/><qemu:arg value="virtserialport,bus=ftvm-serial.0,chardev=ftvm-qga,name=org.qemu.guest_agent.0"/>')
      .replace(PROBE_PC.replace(/"/g, '&quot;'), 'virtio-net-pci,netdev=ftvm-probe,romfile=');
    const legacyFixed = fixFtvmPaths(legacy.replace('<name>web1</name>', '<name>web2</name>'));
    expect(legacyFixed.changed).toBe(true);
    expect(qemuArgs(legacyFixed.xml).filter((a) => /pci|virtserialport/.test(a ?? ''))).toEqual([
      'virtio-serial-pci,id=ftvm-serial',
      'virtserialport,bus=ftvm-serial.0,chardev=ftvm-qga,name=org.qemu.guest_agent.0',
      'virtio-net-pci,netdev=ftvm-probe,romfile=',
    ]);
    expect(legacyFixed.xml).toContain('path=/run/ftvm/web2.qga');
    expect(fixFtvmPaths(legacyFixed.xml).changed).toBe(false);
  });
});

describe('incoming and path fixes', () => {
  it('setIncomingDefer adds and removes exactly -incoming defer', () => {
    const { xml } = makeFtReady(USER_XML, OPTIONS);
    const on = setIncomingDefer(xml, true);
    expect(on).toContain('<qemu:arg value="-incoming"/>');
    expect(setIncomingDefer(on, true)).toBe(on);
    expect(canonical(setIncomingDefer(on, false))).toEqual(canonical(xml));
  });

  it('fixFtvmPaths follows a rename and drops a leftover -incoming defer', () => {
    const { xml } = makeFtReady(USER_XML, { ...OPTIONS, agent: true, incoming: true, probe: { listen: { address: '10.0.0.5', port: 6000 } } });
    const renamed = xml.replace('<name>web1</name>', '<name>web2</name>');
    const fixed = fixFtvmPaths(renamed);
    expect(fixed.changed).toBe(true);
    expect(fixed.changes).toEqual(['qmp socket /run/ftvm/web1.qmp -> /run/ftvm/web2.qmp', 'agent socket /run/ftvm/web1.qga -> /run/ftvm/web2.qga', 'removed -incoming defer']);
    expect(readProtection(fixed.xml)).toMatchObject({ qmpSocket: '/run/ftvm/web2.qmp', agentSocket: '/run/ftvm/web2.qga' });
    expect(fixed.xml).toContain('path=/run/ftvm/web2.qmp');
    expect(fixed.xml).not.toMatch(/web1\.(qmp|qga)/);
    expect(fixed.xml).not.toContain('defer');
    expect(fixed.xml).toContain('hostfwd=udp:10.0.0.5:6000-:5555'); // the probe forwarding stays
    expect(fixed.xml).toContain('kvm-pit.lost_tick_policy=delay');
    expect(fixFtvmPaths(fixed.xml).changed).toBe(false);
    expect(fixFtvmPaths(fixed.xml, { runDir: '/var/run/ftvm2' }).changes).toContain('run dir /run/ftvm -> /var/run/ftvm2');
  });

  it('leaves domains without ftvm metadata alone', () => {
    expect(fixFtvmPaths(USER_XML)).toEqual({ xml: USER_XML, changed: false, changes: [] });
  });

  it('takes libvirt-formatted XML (single quotes, as libvirt hands it to hooks)', () => {
    const { xml } = makeFtReady(USER_XML, OPTIONS);
    const libvirtStyle = xml.replace(/="([^"]*)"/g, "='$1'");
    expect(readProtection(libvirtStyle)?.qmpSocket).toBe('/run/ftvm/web1.qmp');
  });
});

describe('YAML spec', () => {
  const YAML = `
name: lv-spec
memoryMiB: 256
boot: { kernel: /boot/vmlinuz, initrd: /boot/initrd.img, cmdline: "console=ttyS0" }
serialLog: /run/ftvm/lv-spec.serial.log
ftvm:
  peer: backup
  checkpointIntervalMs: 100
  clock: { compensate: [checkpoint, failover], onImpossible: fail }
  agent: true
probe:
  listen: { address: 10.213.0.11, port: 5601 }
  workloadMiBps: 8
`;

  it('produces a domain libvirt would run', () => {
    const result = ftReadyFromSpec(YAML);
    expect(result.name).toBe('lv-spec');
    expect(result.protection).toMatchObject({ peer: { host: 'backup' }, checkpointIntervalMs: 100, clock: { compensate: ['checkpoint', 'failover'], maxStepMs: 60000, onImpossible: 'fail' } });
    expect(result.xml).toContain('<cmdline>console=ttyS0 ftvm.workload=8</cmdline>');
    expect(result.xml).toContain('hostfwd=udp:10.213.0.11:5601-:5555');
    expect(result.xml).toContain("<source path=\"/run/ftvm/lv-spec.serial.log\"/>");
  });

  it('rejects unknown fields and bad values, naming the field', () => {
    expect(() => parseDomainSpec(YAML.replace('memoryMiB', 'memoryMB'))).toThrow(new SpecError('memoryMB', 'unknown field (expected name, type, memoryMiB, vcpus, arch, machine, uuid, boot, disks, nics, serialLog, ftvm, probe)'));
    expect(() => parseDomainSpec(YAML.replace('[checkpoint, failover]', '[checkpoint, reboot]'))).toThrow(/ftvm.clock.compensate\[1\]: "reboot" is not one of/);
    expect(() => parseDomainSpec(YAML.replace('peer: backup', 'peerHost: backup'))).toThrow(/ftvm.peerHost: unknown field/);
    expect(() => parseDomainSpec(YAML.replace('port: 5601', 'port: -1'))).toThrow(/probe.listen.port: must be a positive number/);
    expect(() => parseDomainSpec('name: [')).toThrow(SpecError);
  });

  it('accepts a local writable disk (replicated), shared storage as an opt-in', () => {
    const withDisk = YAML.replace('serialLog:', 'disks:\n  - { path: /var/lib/vm.qcow2 }\nserialLog:');
    expect(replicatedDisks(ftReadyFromSpec(withDisk).xml).map((d) => d.source)).toEqual(['/var/lib/vm.qcow2']);
    expect(replicatedDisks(ftReadyFromSpec(withDisk, { sharedStorage: true }).xml)).toEqual([]);
  });
});

// scripts/bootstrap.sh installs virt-xml-validate (libvirt-clients); a missing validator must fail, not skip.
describe('virt-xml-validate', () => {
  it('accepts what makeFtReady and the spec produce', async () => {
    for (const xml of [
      makeFtReady(USER_XML, { ...OPTIONS, agent: true, incoming: true }).xml,
      ftReadyFromSpec('name: v\nmemoryMiB: 64\nboot: { kernel: /k }\nftvm: { peer: b }\nprobe: { listen: { address: 127.0.0.1, port: 9 } }').xml,
    ]) {
      const result = await validateDomainXml(xml);
      expect(result, result.output).toMatchObject({ valid: true });
    }
  });

  it('reports schema errors', async () => {
    const result = await validateDomainXml("<domain type='kvm'><name>x</name><memory>1</memory><os><type>hvm</type></os><devices><bogus/></devices></domain>");
    expect(result.valid).toBe(false);
    expect(result.output).toMatch(/fails to validate|Relax-NG validity error/);
  });
});
