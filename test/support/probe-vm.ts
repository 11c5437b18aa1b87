import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { QmpClient } from '@ftvm/qmp';
import { buildGuest, type GuestImage } from '../guest/boot-qemu.js';
import { hostInfo, type LabHostName } from '../lab/lab.js';
import { waitForProbe, syncGuestClock, type ProbeTarget } from './probe-client.js';
import { probeDomainXml } from './probe-domain.js';

const run = promisify(execFile);

export interface ProbeVm {
  name: string;
  host: LabHostName;
  image: GuestImage;
  qmp: QmpClient;
  probe: ProbeTarget;
  /** Root-namespace paths of the VM's sockets and console log. */
  qmpPath: string;
  agentPath: string;
  serialLogPath: string;
  xml: string;
  virsh(...args: string[]): Promise<string>;
  destroy(): Promise<void>;
}

export interface ProbeVmOptions {
  host: LabHostName;
  name?: string;
  memoryMiB?: number;
  probePort?: number;
  workloadMiBps?: number;
  bootTimeoutMs?: number;
}

/**
 * Defines and starts the clock-probe guest as a libvirt domain on a lab host's own libvirtd,
 * connects QMP, waits for the probe to answer and syncs the guest clock to the host's.
 */
export async function startProbeVm(options: ProbeVmOptions): Promise<ProbeVm> {
  const host = hostInfo(options.host);
  const name = options.name ?? 'ftvm-probe';
  const image = await buildGuest();
  const probePort = options.probePort ?? 5555;
  const inHost = (rel: string) => ({ inside: `/run/ftvm/${rel}`, outside: path.join(host.runDir, 'ftvm', rel) });
  fs.mkdirSync(path.join(host.runDir, 'ftvm'), { recursive: true });
  const qmpSock = inHost(`${name}.qmp`);
  const agentSock = inHost(`${name}.qga`);
  const serialLog = inHost(`${name}.serial.log`);
  const xml = probeDomainXml({
    name,
    kernel: image.kernel,
    initrd: image.initrd,
    cmdline: image.cmdline,
    memoryMiB: options.memoryMiB ?? 256,
    probeListen: { address: host.ip, port: probePort },
    qmpSocket: qmpSock.inside,
    agentSocket: agentSock.inside,
    serialLog: serialLog.inside,
    ...(options.workloadMiBps ? { workloadMiBps: options.workloadMiBps } : {}),
  });
  const virsh = async (...args: string[]) =>
    (await run('virsh', ['-c', host.libvirtUri, ...args], { timeout: 60_000 })).stdout;

  await virsh('destroy', name).catch(() => undefined);
  await virsh('undefine', name).catch(() => undefined);
  const xmlFile = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'ftvm-domain-')), `${name}.xml`);
  fs.writeFileSync(xmlFile, xml);
  await virsh('define', xmlFile);
  await virsh('start', name);

  const qmp = await connectWhenReady(qmpSock.outside, 30_000);
  const probe = { host: host.ip, port: probePort };
  try {
    await waitForProbe(probe, options.bootTimeoutMs ?? 60_000);
    await syncGuestClock(probe);
  } catch (error) {
    const console = fs.existsSync(serialLog.outside) ? fs.readFileSync(serialLog.outside, 'utf8').slice(-2000) : '(no console log)';
    throw new Error(`probe guest ${name} on ${options.host} did not come up: ${(error as Error).message}\nconsole:\n${console}`);
  }
  return {
    name,
    host: options.host,
    image,
    qmp,
    probe,
    qmpPath: qmpSock.outside,
    agentPath: agentSock.outside,
    serialLogPath: serialLog.outside,
    xml,
    virsh,
    destroy: async () => {
      await qmp.close().catch(() => undefined);
      await virsh('destroy', name).catch(() => undefined);
      await virsh('undefine', name).catch(() => undefined);
    },
  };
}

async function connectWhenReady(socketPath: string, timeoutMs: number): Promise<QmpClient> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      return await QmpClient.connect({ path: socketPath }, { connectTimeoutMs: 2_000 });
    } catch (error) {
      if (Date.now() > deadline) throw new Error(`no QMP on ${socketPath} within ${timeoutMs} ms: ${(error as Error).message}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}
