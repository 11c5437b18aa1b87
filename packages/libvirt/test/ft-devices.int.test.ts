/**
 * ftvm's devices (the agent's virtio-serial controller natively; the test probe's NIC raw at pci.0's
 * last slot, or on a root port of ftvm's own on q35) never take a slot libvirt hands out: an FT-ready domain starts on q35 as on pc (i440fx), and devices
 * hot-plugged without an address (libvirt picks the slot) go in. Lab host primary.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GuestAgentClient } from '@ftvm/qmp';
import { domainSpecToXml, LibvirtConnection, makeFtReady, parseDomainSpec, validateDomainXml } from '@ftvm/libvirt';
import { probeGuestYaml } from '../../../test/guest/probe-spec.js';
import { hostInfo, labUp } from '../../../test/lab/lab.js';
import { waitForProbe } from '../../../test/support/probe-client.js';

const MACHINES = [
  { machine: 'pc', name: 'lv-ftdev-pc', port: 5741 },
  { machine: 'q35', name: 'lv-ftdev-q35', port: 5742 },
] as const;
const diskFile = (name: string) => `/tmp/${name}-${process.pid}.img`;
let conn: LibvirtConnection;

beforeAll(async () => {
  await labUp();
  conn = await LibvirtConnection.connect(hostInfo('primary').libvirtUri);
  for (const m of MACHINES) await conn.remove(m.name);
  fs.mkdirSync(path.join(hostInfo('primary').runDir, 'ftvm'), { recursive: true });
});

afterAll(async () => {
  for (const m of MACHINES) {
    await conn?.remove(m.name).catch(() => undefined);
    for (const suffix of ['', '.nic.xml', '.disk.xml']) fs.rmSync(`${diskFile(m.name)}${suffix}`, { force: true });
  }
  await conn?.close();
});

/** The probe guest as a user would write it for `machine` (q35: with spare root ports for hot-plug), made FT-ready with the agent. */
async function ftReadyGuest(machine: string, name: string, port: number): Promise<string> {
  const info = hostInfo('primary');
  const yaml = await probeGuestYaml({ name, peer: { host: 'backup' }, checkpointIntervalMs: 200, probeListen: { address: info.ip, port } });
  const spec = parseDomainSpec(`${yaml}machine: ${machine}\n`);
  let xml = domainSpecToXml(spec.domain);
  if (machine === 'q35') {
    // libvirt's default USB controller (qemu-xhci, PCIe) takes the first; two stay for hot-plug
    const ports = [1, 2, 3].map((i) => `    <controller type='pci' index='${i}' model='pcie-root-port'/>\n`).join('');
    const spare = `    <controller type='pci' index='0' model='pcie-root'/>\n${ports}`;
    xml = xml.replace('  </devices>', `${spare}  </devices>`);
  }
  return makeFtReady(xml, { ...spec.options, agent: true }).xml;
}

async function agentPing(socket: string, timeoutMs: number): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    try {
      const agent = await GuestAgentClient.connect({ path: socket }, { connectTimeoutMs: 2_000, commandTimeoutMs: 2_000 });
      try {
        await agent.ping();
        return;
      } finally {
        await agent.close();
      }
    } catch (error) {
      if (performance.now() > deadline) throw new Error(`guest agent on ${socket} did not answer within ${timeoutMs} ms: ${String(error)}`);
      await new Promise((r) => setTimeout(r, 500));
    }
  }
}

describe("ftvm's devices have PCI addresses libvirt knows", () => {
  for (const { machine, name, port } of MACHINES) {
    it(`${machine}: the FT-ready domain starts, probe and agent answer, and a NIC and a disk hot-plug without an address`, async () => {
      const xml = await ftReadyGuest(machine, name, port);
      expect((await validateDomainXml(xml)).valid).toBe(true);
      await conn.define(xml);
      await conn.start(name);
      expect(await conn.state(name)).toBe('running');

      // the probe's NIC (raw, at an address libvirt does not hand out first) and the agent's port work
      const info = hostInfo('primary');
      await waitForProbe({ host: info.ip, port }, 90_000);
      await agentPing(path.join(info.runDir, 'ftvm', `${name}.qga`), 60_000);

      const live = await conn.xml(name);
      const slots = [...live.matchAll(/<address type='pci' domain='0x0000' bus='(0x[0-9a-f]+)' slot='(0x[0-9a-f]+)' function='(0x[0-9a-f]+)'\/>/g)].map((m) => `${m[1]}:${m[2]}.${m[3]}`);
      expect(new Set(slots).size).toBe(slots.length); // every PCI device libvirt knows has its own slot
      const element = (tag: string, alias: string) => [...live.matchAll(new RegExp(`<${tag} [^>]*>((?:(?!</${tag}>)[\\s\\S])*)</${tag}>`, 'g'))].map((m) => m[1] ?? '').find((body) => body.includes(`<alias name='${alias}'/>`));
      expect(element('controller', 'ua-ftvm-serial')).toMatch(/<address type='pci'/);

      // hot-plug without an address: libvirt picks a slot it believes free
      const attach = async (file: string, deviceXml: string) => {
        fs.writeFileSync(file, deviceXml);
        await conn.virsh(['attach-device', name, file, '--live']);
      };
      await attach(`${diskFile(name)}.nic.xml`, "<interface type='user'><model type='virtio'/></interface>");
      fs.writeFileSync(diskFile(name), Buffer.alloc(1024 * 1024));
      await attach(`${diskFile(name)}.disk.xml`, `<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='${diskFile(name)}'/><target dev='vdb' bus='virtio'/></disk>`);
      const after = await conn.xml(name);
      expect(after.match(/<interface type='user'>/g)).toHaveLength(1);
      expect(after).toContain("<target dev='vdb' bus='virtio'/>");
      await waitForProbe({ host: info.ip, port }, 10_000); // still answering
      console.log(`${machine}: PCI slots after start ${slots.join(' ')}`);
      await conn.remove(name);
    });
  }
});
