import fs from 'node:fs';
import { fingerprintOfPublicKeyLine, SshConnection, type SshEndpoint } from '@ftvm/transport';
import type { AgentConfig } from '../config/agent-config.js';

/** The pinned SSH endpoint of a cluster host: its fingerprint from the config or from known_hosts. */
export function sshEndpointOf(config: AgentConfig, host: string): SshEndpoint {
  const entry = config.hosts[host];
  if (!entry) throw new Error(`unknown host '${host}'`);
  let fingerprint = entry.sshHostKeyFingerprint;
  if (!fingerprint && config.ssh.knownHosts) {
    const names = new Set([entry.address, host, `[${entry.address}]:${entry.sshPort}`]);
    const line = fs
      .readFileSync(config.ssh.knownHosts, 'utf8')
      .split('\n')
      .find((l) => !l.startsWith('#') && l.split(/\s+/)[0]?.split(',').some((n) => names.has(n)) && l.includes('ssh-ed25519'));
    if (line) fingerprint = fingerprintOfPublicKeyLine(line);
  }
  if (!fingerprint) throw new Error(`no pinned SSH host key for '${host}' (${entry.address}) in the config or ${config.ssh.knownHosts ?? 'known_hosts'}`);
  return { host: entry.address, port: entry.sshPort, username: entry.sshUser, privateKey: fs.readFileSync(config.ssh.privateKey), hostKeyFingerprint: fingerprint };
}

/** One SSH connection per peer host, opened on demand and reopened once it has died. */
export class SshPool {
  private readonly connections = new Map<string, Promise<SshConnection>>();
  private readonly open = new Map<string, SshConnection>();

  constructor(private readonly config: AgentConfig) {}

  get(host: string): Promise<SshConnection> {
    const current = this.open.get(host);
    if (current?.isOpen) return Promise.resolve(current);
    let pending = this.connections.get(host);
    if (!pending) {
      pending = SshConnection.connect(sshEndpointOf(this.config, host), { readyTimeoutMs: this.config.ssh.connectTimeoutMs, keepaliveIntervalMs: 1_000, keepaliveCountMax: 3 })
        .then((ssh) => {
          this.open.set(host, ssh);
          ssh.onClose(() => {
            if (this.open.get(host) === ssh) this.open.delete(host);
          });
          return ssh;
        })
        .finally(() => this.connections.delete(host));
      this.connections.set(host, pending);
    }
    return pending;
  }

  /** The open connection to `host`, if there is one (never connects). */
  current(host: string): SshConnection | undefined {
    const ssh = this.open.get(host);
    return ssh?.isOpen ? ssh : undefined;
  }

  close(): void {
    for (const ssh of this.open.values()) ssh.close();
    this.open.clear();
  }
}
