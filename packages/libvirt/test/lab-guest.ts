/** The clock-probe test guest as an FT-ready libvirt domain on a lab host, from a YAML spec. */
import fs from 'node:fs';
import path from 'node:path';
import { ftReadyFromSpec, type FtReadyOptions, type FtReadyResult } from '@ftvm/libvirt';
import { probeGuestYaml } from '../../../test/guest/probe-spec.js';
import { hostInfo, type LabHostName } from '../../../test/lab/lab.js';

export interface LabGuest extends FtReadyResult {
  host: LabHostName;
  probe: { host: string; port: number };
  /** A path inside the host (/run/…) as the root namespace sees it. */
  outside: (pathOnHost: string) => string;
}

export async function labProbeGuest(host: LabHostName, name: string, probePort: number, overrides: Partial<FtReadyOptions> = {}): Promise<LabGuest> {
  const info = hostInfo(host);
  const peer = host === 'primary' ? 'backup' : 'primary';
  const yaml = await probeGuestYaml({
    name,
    peer: { host: peer, uri: `qemu+ssh://${peer}/system` },
    checkpointIntervalMs: 200,
    probeListen: { address: info.ip, port: probePort },
  });
  const outside = (p: string) => (p.startsWith('/run/') ? path.join(info.runDir, p.slice('/run/'.length)) : p);
  fs.mkdirSync(outside('/run/ftvm'), { recursive: true });
  return { ...ftReadyFromSpec(yaml, overrides), host, probe: { host: info.ip, port: probePort }, outside };
}
