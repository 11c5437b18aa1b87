import type { LibvirtConnection } from '@ftvm/libvirt';
import type { HostLease } from '../lease/index.js';
import { ControlError, type Progress, type SwitchoverResult } from './control.js';
import { fenceLocal } from './fence.js';
import { pollFor } from './poll.js';
import type { VmRecords } from './vm-records.js';
import type { VmSlot } from './vm-slot.js';

export interface HandOverContext {
  self: string;
  records: VmRecords;
  lease: HostLease;
  conn: LibvirtConnection;
}

const nsToMs = (ns: bigint) => Number(ns) / 1e6;

/**
 * The old primary's half of a switchover, in the VM's queue: the record names `to` primary, the
 * last checkpoint is taken with the VM left stopped, the copy here is stopped for good and the key
 * released; `to` resumes it from that checkpoint. A failed last checkpoint undoes it: the VM runs
 * on here (its checkpoint loop is restarted by the next cycle).
 */
export async function handOver(ctx: HandOverContext, slot: VmSlot, to: string, progress: Progress): Promise<SwitchoverResult> {
  const vm = slot.name;
  progress({ step: `hand ${vm} over to ${to} in etcd`, state: 'start' });
  await ctx.records.update(vm, () => ({ primary: to, backup: ctx.self, reason: 'switchover' }));
  progress({ step: `hand ${vm} over to ${to} in etcd`, state: 'done' });
  progress({ step: 'last checkpoint (VM left stopped)', state: 'start' });
  const primary = slot.primary!;
  const final = await primary.finalCheckpoint().catch(async (error: Error) => {
    await ctx.records.update(vm, () => ({ primary: ctx.self, backup: to, reason: 'switchover aborted' })).catch(() => undefined);
    await primary.qmp.execute('cont').catch(() => undefined);
    slot.primary = undefined; // its loops ended with the last checkpoint: the next cycle starts new ones
    await primary.stop();
    throw new ControlError(`switchover aborted, ${vm} keeps running here: ${error.message}`, 500);
  });
  progress({ step: 'last checkpoint (VM left stopped)', state: 'done', detail: `epoch ${final.epoch}, ${final.bytes} bytes` });
  progress({ step: `stop ${vm} here and release it`, state: 'start' });
  slot.primary = undefined;
  await primary.stop();
  await fenceLocal(ctx.conn, vm);
  slot.running = false;
  await ctx.lease.release(vm);
  slot.owner = undefined;
  slot.phase = 'switching-over';
  progress({ step: `stop ${vm} here and release it`, state: 'done' });
  progress({ step: `${to} resumes ${vm}`, state: 'start' });
  const moved = await pollFor(`${to} resuming '${vm}'`, 60_000, async () => {
    const r = await ctx.records.get(vm).catch(() => undefined);
    return r?.lastMove?.kind === 'switchover' && r.lastMove.epoch === final.epoch ? r : undefined;
  });
  const move = moved.lastMove!;
  progress({ step: `${to} resumes ${vm}`, state: 'done' });
  return { vm, from: ctx.self, to, epoch: final.epoch, downtimeMs: Math.round(nsToMs(BigInt(move.resumeNs) - BigInt(move.stopNs)) * 10) / 10 };
}
