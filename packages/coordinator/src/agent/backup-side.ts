import { readProtection, type LibvirtConnection } from '@ftvm/libvirt';
import { CheckpointStore } from '@ftvm/transport';
import type { ClockOffsetEstimate } from '../heartbeat/index.js';
import { NoCheckpointError, StagedRestore, prepareStandby, vmStoreDir } from './staged-restore.js';
import type { VmSlot } from './vm-slot.js';
import type { VmRecord } from './vm-records.js';

/** What the backup's steps need of its host. */
export interface BackupHost {
  conn: LibvirtConnection;
  storeDir: string;
  /** The VM's other host (whose checkpoints these are) and its clock's offset to ours, measured now. */
  peerClock?: (record: VmRecord) => { peer: string; estimate: ClockOffsetEstimate | undefined };
}

/** A backup keeps the VM's domain started paused, waiting for a stream: a failover then only sends it. */
export async function keepStandby(slot: VmSlot, host: BackupHost): Promise<void> {
  const record = slot.record; // read before the awaits: the VM may be removed meanwhile
  if (!record) return;
  const current = await slot.standby?.catch(() => undefined);
  if (current?.usable) return;
  await current?.discard();
  const standby = prepareStandby(record, host.conn, slot.log, host.storeDir);
  slot.standby = standby;
  slot.standbyXml = record.xml;
  standby.then(
    () => slot.log.info('warm standby ready (domain paused, waiting for a checkpoint stream)'),
    (error: Error) => {
      slot.log.warn({ err: error.message }, 'cannot prepare the warm standby');
      if (slot.standby === standby) slot.standby = undefined;
    },
  );
}

/** The primary's seed has filled this host's replicas of the VM's disks (a standby runs on them). */
export async function disksSeeded(slot: VmSlot, host: BackupHost): Promise<boolean> {
  const record = slot.record;
  if (!record) return false;
  const replica = await new CheckpointStore(vmStoreDir(host.storeDir, record), record.keep).replicaState().catch(() => undefined);
  return replica?.complete === true;
}

export async function dropStandby(slot: VmSlot): Promise<void> {
  const standby = slot.standby;
  slot.standby = undefined;
  const prepared = await standby?.catch(() => undefined);
  await prepared?.discard();
}

/** Newest committed checkpoint here that is not known to be corrupt (a directory listing, no reads). */
export async function newestEpoch(slot: VmSlot, host: BackupHost): Promise<number | undefined> {
  const record = slot.record;
  if (!record) return undefined;
  const epochs = await new CheckpointStore(vmStoreDir(host.storeDir, record), record.keep).epochs().catch(() => [] as number[]);
  return epochs.filter((e) => !slot.badEpochs.has(e) && ofThisRun(record, e)).at(-1);
}

/** A checkpoint of the current run of protection (see VmRecord.checkpointsSince), not of the VM's past. */
export function ofThisRun(record: Pick<VmRecord, 'checkpointsSince'>, epoch: number): boolean {
  return epoch > (record.checkpointsSince ?? 0);
}

/** Whether the VM's clock policy (its domain metadata) compensates the outage of this move. */
export function compensates(slot: VmSlot, kind: 'failover' | 'switchover'): boolean {
  const policy = readProtection(slot.record!.xml)?.clock;
  return policy ? policy.compensate.includes(kind === 'failover' ? 'failover' : 'migration') : true;
}

/** Starts loading the newest verified checkpoint into the standby (or a fresh domain). */
export async function stage(slot: VmSlot, host: BackupHost, kind: 'failover' | 'switchover' = 'failover'): Promise<StagedRestore | undefined> {
  const standby = slot.standby;
  slot.standby = undefined;
  const record = slot.record!;
  const peerClock = host.peerClock;
  try {
    return await StagedRestore.begin({
      record,
      conn: host.conn,
      storeDir: host.storeDir,
      log: slot.log,
      standby,
      correctClock: compensates(slot, kind),
      onCorrupt: (epoch) => slot.badEpochs.add(epoch),
      ...(peerClock ? { peerClock: () => peerClock(record) } : {}),
    });
  } catch (error) {
    if (!(error instanceof NoCheckpointError)) throw error;
    slot.log.info({ err: error.message }, 'nothing to stage');
    return undefined;
  }
}
