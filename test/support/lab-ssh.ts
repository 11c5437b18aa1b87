import fs from 'node:fs';
import { fingerprintOfPublicKeyLine, SshConnection, type SshEndpoint } from '@ftvm/transport';
import { hostInfo, labKnownHosts, labSshKey, type LabHostName } from '../lab/lab.js';

/** The ssh2 endpoint of a lab host: the lab's key, and the host key pinned from the lab's known_hosts. */
export function labSshEndpoint(host: LabHostName): SshEndpoint {
  const info = hostInfo(host);
  const line = fs
    .readFileSync(labKnownHosts(), 'utf8')
    .split('\n')
    .find((l) => l.split(/\s+/)[0]?.split(',').includes(info.ip) && l.includes('ssh-ed25519'));
  if (!line) throw new Error(`no ed25519 host key for ${host} (${info.ip}) in ${labKnownHosts()}`);
  return {
    host: info.ip,
    username: 'root',
    privateKey: fs.readFileSync(labSshKey()),
    hostKeyFingerprint: fingerprintOfPublicKeyLine(line),
  };
}

export function connectLabSsh(host: LabHostName): Promise<SshConnection> {
  return SshConnection.connect(labSshEndpoint(host), { readyTimeoutMs: 10_000, keepaliveIntervalMs: 1_000 });
}
