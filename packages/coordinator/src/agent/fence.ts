import fs from 'node:fs';
import type { LibvirtConnection } from '@ftvm/libvirt';
import { SshConnection, type SshEndpoint } from '@ftvm/transport';

/** libvirt's pid file for a running QEMU domain (system instance). */
export const qemuPidFile = (vm: string, runDir = '/run/libvirt/qemu') => `${runDir}/${vm}.pid`;

function qemuPid(vm: string): number | undefined {
  try {
    const pid = Number(fs.readFileSync(qemuPidFile(vm), 'utf8').trim());
    return Number.isInteger(pid) && pid > 1 ? pid : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Stops this host's copy of a VM at once and for good: SIGKILL to its QEMU first (a frozen or
 * SIGSTOPped QEMU would make libvirt's destroy wait ~10 s for SIGTERM), then libvirt's destroy to
 * tidy up. Returns whether a QEMU was killed, and when.
 */
export async function fenceLocal(conn: LibvirtConnection | undefined, vm: string, timeoutMs = 5_000): Promise<{ killed: boolean; atNs: bigint }> {
  const pid = qemuPid(vm);
  let killed = false;
  if (pid !== undefined) {
    try {
      process.kill(pid, 'SIGKILL');
      killed = true;
    } catch {
      // already gone
    }
  }
  const atNs = BigInt(Date.now()) * 1_000_000n;
  // the connection reopens itself after a libvirtd restart: the destroy goes through then too
  if (conn) await conn.destroy(vm, { timeoutMs }).catch(() => undefined);
  return { killed, atNs };
}

export type RemoteFenceOutcome = 'fenced' | 'unreachable' | 'failed';

/**
 * Fences a peer's copy of a VM through libvirt over SSH: on the peer, SIGKILL its QEMU and
 * `virsh destroy` it. Bounded by `timeoutMs`; an unreachable peer is reported, not waited for (the
 * lease already keeps it from running: a primary that cannot renew stops its VMs itself).
 */
export async function fenceRemote(endpoint: SshEndpoint, vm: string, libvirtUri: string, timeoutMs: number): Promise<{ outcome: RemoteFenceOutcome; detail: string }> {
  const quoted = (s: string) => `'${s.replace(/'/g, `'\\''`)}'`;
  const command = `pid=$(cat ${quoted(qemuPidFile(vm))} 2>/dev/null) && kill -9 "$pid" 2>/dev/null; virsh -c ${quoted(libvirtUri)} destroy ${quoted(vm)} 2>&1; true`;
  const deadline = Date.now() + timeoutMs;
  let ssh: SshConnection | undefined;
  try {
    ssh = await SshConnection.connect(endpoint, { readyTimeoutMs: timeoutMs, channelTimeoutMs: timeoutMs });
  } catch (error) {
    return { outcome: 'unreachable', detail: (error as Error).message };
  }
  try {
    const channel = await ssh.exec(command);
    let output = '';
    channel.on('data', (chunk: Buffer) => (output += chunk.toString()));
    const code = await new Promise<number | undefined>((resolve) => {
      const timer = setTimeout(() => resolve(undefined), Math.max(1, deadline - Date.now()));
      channel.on('exit', (c: number | null) => {
        clearTimeout(timer);
        resolve(c ?? undefined);
      });
    });
    if (code === undefined) return { outcome: 'failed', detail: `no answer within ${timeoutMs} ms` };
    return { outcome: 'fenced', detail: output.trim() };
  } catch (error) {
    return { outcome: 'failed', detail: (error as Error).message };
  } finally {
    ssh.close();
  }
}
