/** The clock-probe test guest as an FT-ready libvirt domain on a lab host, from a YAML spec. */
import fs from 'node:fs';
import path from 'node:path';
import { ftReadyFromSpec, type FtReadyOptions, type FtReadyResult } from '@ftvm/libvirt';
import { buildGuest } from '../../../test/guest/boot-qemu.js';
import { hostInfo, type LabHostName } from '../../../test/lab/lab.js';

export interface LabGuest extends FtReadyResult {
  host: LabHostName;
  probe: { host: string; port: number };
  /** A path inside the host (/run/…) as the root namespace sees it. */
  outside: (pathOnHost: string) => string;
}

export async function labProbeGuest(host: LabHostName, name: string, probePort: number, overrides: Partial<FtReadyOptions> = {}): Promise<LabGuest> {
  const image = await buildGuest();
  const info = hostInfo(host);
  const peer = host === 'primary' ? 'backup' : 'primary';
  const yaml = `
name: ${name}
type: qemu
memoryMiB: 256
boot:
  kernel: ${image.kernel}
  initrd: ${image.initrd}
  cmdline: "${image.cmdline}"
serialLog: /run/ftvm/${name}.serial.log
ftvm:
  peer: { host: ${peer}, uri: "qemu+ssh://${peer}/system" }
  checkpointIntervalMs: 200
probe:
  listen: { address: ${info.ip}, port: ${probePort} }
`;
  const outside = (p: string) => (p.startsWith('/run/') ? path.join(info.runDir, p.slice('/run/'.length)) : p);
  fs.mkdirSync(outside('/run/ftvm'), { recursive: true });
  return { ...ftReadyFromSpec(yaml, overrides), host, probe: { host: info.ip, port: probePort }, outside };
}
