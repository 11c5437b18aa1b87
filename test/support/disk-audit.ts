/**
 * What a failover did to a VM's disks, from the agents' audit mode (FTVM_TEST_DISK_AUDIT=<dir>:
 * the primary logs each disk's sha256 at every checkpoint's stop instant, the backup logs the
 * replicas' sha256 at a failover and copies them into <dir>) and from the guest's own ring checks.
 */
import path from 'node:path';
import { fsckCopy, readRing, type FsckResult, type RingState } from './disk-check.js';
import { agentLogEntries, CLUSTER_DIR, probeOn, untilAgents, type AgentHost } from './ft-cluster.js';
import { diskCounters, type DiskCounters } from './probe-client.js';

export const AUDIT_DIR = path.join(CLUSTER_DIR, 'disk-audit');

interface AuditEntry {
  role: 'fleece' | 'replica';
  epoch: number;
  disk: string;
  sha256: string;
  copy?: string;
}

export interface DiskFailoverCheck {
  epoch: number;
  /** Per disk: the replica the VM resumed on hashes as the primary's disk did at that stop instant. */
  disks: { disk: string; replica: string; fleece: string | undefined; equal: boolean }[];
  /** Every disk equal. */
  equal: boolean;
  /** The guest's ring read-back after the resume (its own disk/RAM consistency check). */
  ring: DiskCounters['ring'];
  fs: DiskCounters['fs'];
  /** A copy of the replicated file system, journal replayed, e2fsck -fn. */
  fsck: FsckResult;
  /** The ring as the replica held it. */
  ringOnDisk: RingState;
}

export function auditEntries(host: AgentHost, role: AuditEntry['role']): AuditEntry[] {
  return (agentLogEntries(host, 'disk audit') as unknown as AuditEntry[]).filter((a) => a.role === role);
}

/**
 * After a failover of the probe VM (ring on vda, ext4 on vdb) from `from` to `to` at `epoch`:
 * compares the hashes, waits for the guest's first ring check after the resume (`checksBefore` is
 * the count seen before the fault), checks the file system and reads the ring of the replica copies.
 */
export async function checkDisksAfterFailover(options: { from: AgentHost; to: AgentHost; epoch: number; bootId: bigint; checksBefore: number; probePort?: number }): Promise<DiskFailoverCheck> {
  const { from, to, epoch } = options;
  const replicas = await untilAgents(`${to} audits its replicas of epoch ${epoch}`, async () => {
    const found = auditEntries(to, 'replica').filter((a) => a.epoch === epoch);
    return found.length >= 2 ? found : undefined;
  });
  const fleeces = auditEntries(from, 'fleece').filter((a) => a.epoch === epoch);
  const disks = replicas.map((r) => {
    const fleece = fleeces.find((f) => f.disk === r.disk)?.sha256;
    return { disk: r.disk, replica: r.sha256, fleece, equal: fleece === r.sha256 };
  });
  const probe = probeOn(to, options.probePort);
  const after = await untilAgents(`the guest on ${to} checks its ring after the resume`, async () => {
    const d = await diskCounters(probe);
    return d.bootId === options.bootId && d.ring.checks > options.checksBefore ? d : undefined;
  });
  const copyOf = (disk: string) => path.join(AUDIT_DIR, path.basename(replicas.find((r) => r.disk === disk)!.copy!));
  const fsck = await fsckCopy(copyOf('vdb'), 'raw');
  const ringOnDisk = await readRing(copyOf('vda'), 'raw', { bootId: options.bootId });
  return { epoch, disks, equal: disks.length > 0 && disks.every((d) => d.equal), ring: after.ring, fs: after.fs, fsck, ringOnDisk };
}
