import fs from 'node:fs';
import { readProtection, type LibvirtConnection, type PreparedRestore } from '@ftvm/libvirt';
import { CheckpointStore, StandbyRam, type StandbyRamApplied } from '@ftvm/transport';
import type { ClockOffsetEstimate } from '../heartbeat/index.js';
import { NoCheckpointError, StagedRestore, prepareStandby, vmStoreDir } from './staged-restore.js';
import { StandbyRamFollower } from './standby-ram-follower.js';
import type { VmSlot } from './vm-slot.js';
import type { VmRecord } from './vm-records.js';

/** What the backup's steps need of its host. */
export interface BackupHost {
  conn: LibvirtConnection;
  storeDir: string;
  /** The VM's other host (whose checkpoints these are) and its clock's offset to ours, measured now. */
  peerClock?: (record: VmRecord) => { peer: string; estimate: ClockOffsetEstimate | undefined };
  /** Standbys map their RAM from a file kept at the newest checkpoint (`mapped`), or load it all at failover (`loaded`). */
  standbyRam: 'mapped' | 'loaded';
  /** Each checkpoint applied to a standby's RAM file. */
  onRamApplied?: (vm: string, applied: StandbyRamApplied) => void;
}

/** A backup keeps the VM's domain started paused, waiting for a stream: a failover then only sends it. */
export async function keepStandby(slot: VmSlot, host: BackupHost): Promise<void> {
  const record = slot.record; // read before the awaits: the VM may be removed meanwhile
  if (!record) return;
  const current = await slot.standby?.catch(() => undefined);
  if (current?.usable) return;
  await current?.discard();
  await slot.standbyRam?.stop();
  slot.standbyRam = undefined;
  const mapped = host.standbyRam === 'mapped';
  const standby = prepareStandby(record, host.conn, slot.log, host.storeDir, mapped);
  slot.standby = standby;
  slot.standbyXml = record.xml;
  standby.then(
    async (prepared) => {
      slot.log.info('warm standby ready (domain paused, waiting for a checkpoint stream)');
      if (slot.standby === standby) slot.standbyReady = standby;
      if (mapped && slot.standby === standby) {
        await followStandbyRam(slot, host, record, prepared).catch((error: Error) => slot.log.warn({ err: error.message }, "cannot keep the standby's RAM file (a failover loads the whole checkpoint)"));
      }
    },
    (error: Error) => {
      slot.log.warn({ err: error.message }, 'cannot prepare the warm standby');
      if (slot.standby === standby) slot.standby = undefined;
    },
  );
}

/** Starts keeping the standby's RAM file at the newest checkpoint, if libvirt put its RAM on one. */
async function followStandbyRam(slot: VmSlot, host: BackupHost, record: VmRecord, prepared: PreparedRestore): Promise<void> {
  const file = await prepared.sharedRamFile().catch((error: Error) => {
    slot.log.warn({ err: error.message }, 'cannot ask the standby where its RAM is');
    return undefined;
  });
  if (!file) {
    slot.log.info("the standby's RAM is not on a shared file (the domain has its own memory backing or NUMA cells): a failover loads the whole checkpoint");
    return;
  }
  const dir = vmStoreDir(host.storeDir, record);
  const ram = new StandbyRam(new CheckpointStore(dir, record.keep), file, {
    accept: (epoch) => !slot.badEpochs.has(epoch) && ofThisRun(slot.record ?? record, epoch),
    onCorrupt: (error) => {
      if (error.epoch !== undefined) slot.badEpochs.add(error.epoch);
      slot.log.warn({ err: error.message }, 'a checkpoint does not verify: the standby RAM stays at the one before');
    },
    ...testApplyGate(),
  });
  const follower = new StandbyRamFollower(ram, dir, slot.log, (applied) => host.onRamApplied?.(slot.name, applied));
  slot.standbyRam = follower;
  follower.start();
}

/**
 * Test harnesses only (FTVM_TEST_RAM_APPLY_GATE=<file>): while the file exists, no checkpoint is
 * applied to a standby's RAM file (at most 60 s each), so a test can act between a commit and its
 * apply (corrupt it first, fail over before it is applied).
 */
function testApplyGate(): { beforeApply?: () => Promise<void> } {
  const gate = process.env['FTVM_TEST_RAM_APPLY_GATE'];
  if (!gate) return {};
  return {
    beforeApply: async () => {
      const deadline = Date.now() + 60_000;
      while (fs.existsSync(gate) && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 20));
    },
  };
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
  const follower = slot.standbyRam;
  slot.standbyRam = undefined;
  await follower?.stop();
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
  const follower = slot.standbyRam;
  slot.standbyRam = undefined;
  const record = slot.record!;
  const peerClock = host.peerClock;
  const options = {
    record,
    conn: host.conn,
    storeDir: host.storeDir,
    log: slot.log,
    standby,
    correctClock: compensates(slot, kind),
    onCorrupt: (epoch: number) => slot.badEpochs.add(epoch),
    ...(peerClock ? { peerClock: () => peerClock(record) } : {}),
  };
  const usable = await standby?.then(
    (prepared) => prepared.usable,
    () => false,
  );
  if (follower && standby && usable) {
    // the file at the newest checkpoint (what is committed now applied, a half-done apply finished)
    await follower.settle();
    const newest = await newestEpoch(slot, host);
    const held = follower.ram.epoch;
    if (held !== undefined && held === newest) {
      try {
        return await StagedRestore.beginMapped({
          ...options,
          standby,
          ram: follower.ram,
          giveBack: () => {
            // a staged failover given up: the standby stays, and its RAM follows the store again
            if (!slot.record || slot.standby !== undefined) return void standby.then((p) => p.discard(), () => undefined);
            slot.standby = standby;
            slot.standbyRam = follower;
            follower.start();
          },
        });
      } catch (error) {
        slot.log.warn({ err: (error as Error).message, epoch: held }, 'cannot stage onto the mapped standby: loading the whole checkpoint');
      }
    } else {
      slot.log.warn({ held, newest, lastError: follower.lastError }, 'the standby RAM is not at the newest checkpoint: loading the whole checkpoint');
    }
  } else if (follower) {
    await follower.stop();
  }
  try {
    return await StagedRestore.begin(options);
  } catch (error) {
    if (!(error instanceof NoCheckpointError)) throw error;
    slot.log.info({ err: error.message }, 'nothing to stage');
    return undefined;
  }
}
