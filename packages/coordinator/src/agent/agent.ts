import fs from 'node:fs';
import { DriftLedger } from '@ftvm/kvmclock';
import { LibvirtConnection, readProtection, type PreparedRestore } from '@ftvm/libvirt';
import type { QmpClient } from '@ftvm/qmp';
import { CheckpointStore } from '@ftvm/transport';
import { Etcd3 } from 'etcd3';
import { fenceAfterMs, type AgentConfig } from '../config/agent-config.js';
import { HeartbeatService } from '../heartbeat/index.js';
import { HostLease } from '../lease/index.js';
import {
  ControlError,
  type AgentControl,
  type AgentStatus,
  type CheckpointNowResult,
  type DriftReport,
  type Progress,
  type ProtectRequest,
  type SwitchoverResult,
  type VmRole,
  type VmStatus,
} from './control.js';
import { fenceLocal, fenceRemote } from './fence.js';
import { PrimaryVm } from './primary-vm.js';
import { SshPool, sshEndpointOf } from './ssh-pool.js';
import { NoCheckpointError, StagedRestore, prepareStandby } from './staged-restore.js';
import type { Log, MetricsSink } from './types.js';
import { VmRecords, type VmRecord } from './vm-records.js';

/** What this agent holds for one VM it is a host of. */
interface VmSlot {
  name: string;
  record: VmRecord | undefined;
  owner: string | undefined;
  primary: PrimaryVm | undefined;
  staged: StagedRestore | undefined;
  /** Backup only: the VM's domain started paused, waiting for a checkpoint stream (warm standby). */
  standby: Promise<PreparedRestore> | undefined;
  /** This host stopped the VM because it could not keep its lease or the VM failed: it never restarts it by itself. */
  fenced: boolean;
  phase: string;
  /** Serializes every change of this VM's role. */
  queue: Promise<void>;
  promotionLoop: boolean;
  unwatchOwner: (() => Promise<void>) | undefined;
  log: Log;
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));
const nsToMs = (ns: bigint) => Number(ns) / 1e6;

/**
 * The ftvm agent of one host. Roles follow etcd: the host whose lease holds a VM's owner key runs
 * it (primary); the record's other host keeps its checkpoints (backup) and takes the key when the
 * primary's lease is gone. A primary that cannot renew its lease stops its VMs before the lease
 * can expire; a host that is not the owner never lets a copy of the VM run.
 */
export class Agent implements AgentControl {
  private readonly slots = new Map<string, VmSlot>();
  private readonly ssh: SshPool;
  private sshKeeper: NodeJS.Timeout | undefined;
  private ticks = 0;
  private closed = false;
  private unwatchRecords: (() => Promise<void>) | undefined;

  private constructor(
    private readonly config: AgentConfig,
    private readonly log: Log,
    private readonly metrics: MetricsSink,
    private readonly conn: LibvirtConnection,
    private readonly etcd: Etcd3,
    private readonly records: VmRecords,
    private readonly lease: HostLease,
    private readonly heartbeat: HeartbeatService,
  ) {
    this.ssh = new SshPool(config);
  }

  static async start(config: AgentConfig, options: { log: Log; metrics: MetricsSink }): Promise<Agent> {
    const { log, metrics } = options;
    const self = config.hosts[config.host]!;
    const conn = await LibvirtConnection.connect(self.libvirtUri, { timeoutMs: 30_000 });
    const etcd = new Etcd3({ hosts: config.etcd.endpoints, dialTimeout: config.etcd.requestTimeoutMs });
    const records = new VmRecords(etcd, config.etcd.prefix, config.etcd.requestTimeoutMs * 4);
    const lease = await openLease(config, log);
    let agent: Agent | undefined;
    const heartbeat = await HeartbeatService.start({
      host: config.host,
      listen: { udpAddress: self.address, port: config.heartbeat.port },
      intervalMs: config.heartbeat.intervalMs,
      timeoutMs: config.heartbeat.timeoutMs,
      payload: () => agent?.heartbeatPayload() ?? {},
      log: (level, message, fields) => log[level]({ ...fields }, message),
    });
    agent = new Agent(config, log, metrics, conn, etcd, records, lease, heartbeat);
    await agent.init();
    return agent;
  }

  private async init(): Promise<void> {
    this.watchLease(this.lease);
    // keep an SSH connection to every peer: the second heartbeat path and the fencing route
    this.sshKeeper = setInterval(() => {
      for (const host of this.peerHosts()) if (!this.ssh.current(host)) void this.ssh.get(host).catch(() => undefined);
      // a slow sweep catches what no event reported (a standby QEMU that died, a missed watch)
      if (++this.ticks % 5 === 0) for (const slot of this.slots.values()) if (!slot.staged && !slot.promotionLoop) this.reconcileSoon(slot);
    }, 1_000);
    this.heartbeat.onPeerDown((peer) => {
      this.metrics.peerAlive(peer, false);
      this.log.warn({ peer }, 'peer down (no heartbeat on either path)');
      for (const slot of this.slots.values()) if (slot.record?.primary === peer) this.enqueue(slot, () => this.onPrimaryPeerDown(slot));
    });
    this.heartbeat.onPeerUp((peer) => {
      this.metrics.peerAlive(peer, true);
      this.log.info({ peer }, 'peer up');
      for (const slot of this.slots.values()) if (slot.record?.primary === peer || slot.record?.backup === peer) this.reconcileSoon(slot);
    });
    // VMs named in the config are protected the first time any of their hosts starts.
    for (const vm of this.config.vms) {
      if (vm.primary !== this.config.host && vm.backup !== this.config.host) continue;
      const xml = fs.readFileSync(vm.domainXml, 'utf8');
      if (!readProtection(xml)) throw new ControlError(`vms[${vm.name}].domainXml (${vm.domainXml}) has no ftvm metadata: make it FT-ready first`);
      await this.records.create({ name: vm.name, xml, primary: vm.primary, backup: vm.backup, protected: true, checkpointIntervalMs: vm.checkpointIntervalMs, keep: vm.keep, fullEvery: vm.fullEvery, reason: 'config' });
    }
    this.unwatchRecords = await this.records.watch(
      (vm, record) => this.onRecord(vm, record),
      (error) => this.log.error({ err: error.message }, 'watching VM records'),
    );
    for (const record of await this.records.list()) this.onRecord(record.name, record);
  }

  // ---- AgentControl ------------------------------------------------------------------------------

  async status(): Promise<AgentStatus> {
    const now = performance.now();
    const peers = this.peerHosts();
    const vms: VmStatus[] = [];
    for (const slot of this.slots.values()) vms.push(await this.vmStatus(slot));
    const last = this.lease.lastRenewedAt;
    return {
      host: this.config.host,
      lease: { id: this.lease.id, healthy: this.lease.healthy, lastRenewAgeMs: last === undefined ? undefined : Math.round(now - last) },
      peers: [...peers].map((name) => {
        const p = this.heartbeat.peer(name);
        const age = (t: number | undefined) => (t === undefined ? undefined : Math.round(now - t));
        return { name, alive: p?.alive ?? false, lastBeatAgeMs: { udp: age(p?.lastBeatAt.udp), ssh: age(p?.lastBeatAt.ssh) } };
      }),
      vms,
    };
  }

  async protect(request: ProtectRequest, progress: Progress): Promise<VmStatus> {
    const { vm, backup } = request;
    if (!(backup in this.config.hosts)) throw new ControlError(`backup '${backup}' is not one of the configured hosts (${Object.keys(this.config.hosts).join(', ')})`);
    if (backup === this.config.host) throw new ControlError(`backup '${backup}' is this host: pick the other host`);
    progress({ step: `read domain ${vm} from libvirt`, state: 'start' });
    if (!(await this.conn.exists(vm))) throw new ControlError(`no domain '${vm}' on ${this.config.host}`, 404);
    const state = await this.conn.state(vm);
    if (state !== 'running') throw new ControlError(`domain '${vm}' is ${state}: protect a running domain`, 409);
    const xml = await this.conn.xml(vm, { inactive: true });
    if (!readProtection(xml)) throw new ControlError(`domain '${vm}' is not FT-ready (no ftvm metadata and QMP socket): define it through makeFtReady and start it again`);
    progress({ step: `read domain ${vm} from libvirt`, state: 'done' });
    progress({ step: 'record protection in etcd', state: 'start' });
    const existing = await this.records.get(vm);
    if (existing && existing.primary !== this.config.host) throw new ControlError(`VM '${vm}' is already protected with primary ${existing.primary}`, 409);
    const fields = { xml, primary: this.config.host, backup, protected: true, checkpointIntervalMs: request.checkpointIntervalMs ?? existing?.checkpointIntervalMs ?? 1_000, reason: 'protect' };
    if (existing) await this.records.update(vm, () => fields);
    else await this.records.create({ name: vm, keep: 3, ...fields });
    progress({ step: 'record protection in etcd', state: 'done' });
    progress({ step: 'first checkpoint committed on the backup', state: 'start' });
    const slot = await this.waitFor(vm, 30_000, (s) => s.primary?.lastCheckpoint !== undefined, 'a committed checkpoint');
    progress({ step: 'first checkpoint committed on the backup', state: 'done', detail: `epoch ${slot.primary!.lastCheckpoint!.epoch}` });
    return this.vmStatus(slot);
  }

  async unprotect(vm: string, progress: Progress): Promise<VmStatus> {
    progress({ step: 'stop checkpoints', state: 'start' });
    await this.records.update(vm, (r) => (r.protected ? { protected: false, reason: 'unprotect' } : undefined)).catch((error: Error) => {
      throw new ControlError(error.message, 404);
    });
    progress({ step: 'stop checkpoints', state: 'done' });
    return this.vmStatus(this.slot(vm));
  }

  async switchover(vm: string, progress: Progress): Promise<SwitchoverResult> {
    const slot = this.slot(vm);
    const record = slot.record;
    if (!record || !slot.primary || slot.owner !== this.config.host) throw new ControlError(`VM '${vm}' does not run on ${this.config.host}${record ? ` (primary: ${record.primary})` : ''}: run switchover there`, 409);
    if (!record.protected) throw new ControlError(`VM '${vm}' is not protected (run reprotect first): its backup has no current checkpoint`, 409);
    const to = record.backup;
    if (!this.heartbeat.peer(to)?.alive) throw new ControlError(`backup ${to} is not answering heartbeats`, 503);
    let result!: SwitchoverResult;
    await this.enqueue(slot, async () => {
      progress({ step: `hand ${vm} over to ${to} in etcd`, state: 'start' });
      await this.records.update(vm, () => ({ primary: to, backup: this.config.host, reason: 'switchover' }));
      progress({ step: `hand ${vm} over to ${to} in etcd`, state: 'done' });
      progress({ step: 'last checkpoint (VM left stopped)', state: 'start' });
      const primary = slot.primary!;
      const final = await primary.finalCheckpoint().catch(async (error: Error) => {
        await this.records.update(vm, () => ({ primary: this.config.host, backup: to, reason: 'switchover aborted' })).catch(() => undefined);
        await primary.qmp.execute('cont').catch(() => undefined);
        throw new ControlError(`switchover aborted, ${vm} keeps running here: ${error.message}`, 500);
      });
      progress({ step: 'last checkpoint (VM left stopped)', state: 'done', detail: `epoch ${final.epoch}, ${final.bytes} bytes` });
      progress({ step: `stop ${vm} here and release it`, state: 'start' });
      slot.primary = undefined;
      await primary.stop();
      await fenceLocal(this.conn, vm);
      await this.lease.release(vm);
      slot.phase = 'switching-over';
      progress({ step: `stop ${vm} here and release it`, state: 'done' });
      progress({ step: `${to} resumes ${vm}`, state: 'start' });
      const moved = await this.waitForRecord(vm, 60_000, (r) => r.lastMove?.kind === 'switchover' && r.lastMove.epoch === final.epoch);
      const move = moved.lastMove!;
      progress({ step: `${to} resumes ${vm}`, state: 'done' });
      result = { vm, from: this.config.host, to, epoch: final.epoch, downtimeMs: Math.round(nsToMs(BigInt(move.resumeNs) - BigInt(move.stopNs)) * 10) / 10 };
    });
    this.reconcileSoon(slot);
    return result;
  }

  async reprotect(vm: string, backup: string | undefined, progress: Progress): Promise<VmStatus> {
    const record = await this.records.get(vm);
    if (!record) throw new ControlError(`no VM '${vm}' in the cluster`, 404);
    const target = backup ?? record.backup;
    if (!(target in this.config.hosts)) throw new ControlError(`backup '${target}' is not one of the configured hosts`);
    if (target === record.primary) throw new ControlError(`'${target}' runs the VM: its backup must be another host`);
    progress({ step: `make ${target} the backup of ${vm}`, state: 'start' });
    await this.records.update(vm, () => ({ backup: target, protected: true, reason: 'reprotect' }));
    progress({ step: `make ${target} the backup of ${vm}`, state: 'done' });
    if (record.primary === this.config.host) {
      progress({ step: 'first checkpoint committed on the backup', state: 'start' });
      const since = Date.now();
      await this.waitFor(vm, 60_000, (s) => (s.primary?.lastCheckpoint?.at ?? 0) > since, 'a committed checkpoint');
      progress({ step: 'first checkpoint committed on the backup', state: 'done' });
    }
    return this.vmStatus(this.slot(vm));
  }

  async checkpointNow(vm: string): Promise<CheckpointNowResult> {
    const slot = this.slot(vm);
    if (!slot.primary) throw new ControlError(`VM '${vm}' does not run on ${this.config.host}${slot.record ? ` (primary: ${slot.record.primary})` : ''}`, 409);
    if (!slot.record?.protected) throw new ControlError(`VM '${vm}' is not protected: no backup to send a checkpoint to`, 409);
    const result = await slot.primary.checkpointNow();
    return {
      vm,
      epoch: result.epoch,
      bytes: result.bytes,
      pauseMs: Math.round(nsToMs(result.resumeNs - result.stopNs) * 100) / 100,
      ...(result.base === undefined ? {} : { base: result.base }),
    };
  }

  async drift(vm: string): Promise<DriftReport> {
    const slot = this.slot(vm);
    if (!slot.primary) throw new ControlError(`VM '${vm}' does not run on ${this.config.host}: its drift ledger is on ${slot.record?.primary ?? 'its primary'}`, 409);
    const ledger = slot.primary.ledger;
    return { vm, ledger: ledger.summary(), predictedLagMs: nsToMs(ledger.predictedLagNs) };
  }

  async stop(): Promise<void> {
    this.closed = true;
    clearInterval(this.sshKeeper);
    await this.unwatchRecords?.().catch(() => undefined);
    for (const slot of this.slots.values()) {
      await slot.unwatchOwner?.().catch(() => undefined);
      await slot.staged?.abort('agent stopping').catch(() => undefined);
      await this.dropStandby(slot).catch(() => undefined);
      await slot.primary?.stop().catch(() => undefined);
    }
    await this.heartbeat.close().catch(() => undefined);
    // Revoking the lease hands every VM this host owns to its backup: stopping the agent stops
    // protection, not the VMs — so leave the lease to expire only if we still run VMs.
    await this.lease.close().catch(() => undefined);
    this.ssh.close();
    this.etcd.close();
    await this.conn.close().catch(() => undefined);
  }

  // ---- roles -------------------------------------------------------------------------------------

  private onRecord(vm: string, record: VmRecord | undefined): void {
    const involved = record && (record.primary === this.config.host || record.backup === this.config.host);
    let slot = this.slots.get(vm);
    if (!slot && !involved) return;
    if (!slot) {
      slot = { name: vm, record, owner: undefined, primary: undefined, staged: undefined, standby: undefined, fenced: false, phase: 'starting', queue: Promise.resolve(), promotionLoop: false, unwatchOwner: undefined, log: this.log.child({ vm }) };
      this.slots.set(vm, slot);
      const s = slot;
      void this.lease
        .watchOwner(vm, (owner) => {
          s.owner = owner;
          this.reconcileSoon(s);
        })
        .then((unwatch) => (s.unwatchOwner = unwatch))
        .catch((error: Error) => s.log.error({ err: error.message }, 'cannot watch the owner key'));
    }
    slot.record = record;
    if (record) {
      for (const host of [record.primary, record.backup]) {
        if (host === this.config.host || !this.config.hosts[host]) continue;
        this.heartbeat.addPeer({ name: host, address: this.config.hosts[host]!.address, port: this.config.heartbeat.port, ssh: () => this.ssh.current(host) });
        // the SSH path needs a connection even on a host that sends no checkpoints
        void this.ssh.get(host).catch(() => undefined);
      }
    }
    this.reconcileSoon(slot);
  }

  private reconcileSoon(slot: VmSlot): void {
    void this.enqueue(slot, () => this.reconcile(slot));
  }

  private enqueue(slot: VmSlot, work: () => Promise<void>): Promise<void> {
    const next = slot.queue.then(work).catch((error: Error) => slot.log.error({ err: error.message, stack: error.stack }, 'VM task failed'));
    slot.queue = next;
    return next;
  }

  private async reconcile(slot: VmSlot): Promise<void> {
    if (this.closed) return;
    const record = slot.record;
    const self = this.config.host;
    const owner = (slot.owner = await this.lease.owner(slot.name));
    if (!record || (record.primary !== self && record.backup !== self)) {
      if (owner === self) await this.lease.release(slot.name);
      await this.stopPrimary(slot, 'no longer a host of this VM');
      slot.phase = 'unprotected';
      return;
    }
    if (owner === self) {
      await this.dropStandby(slot);
      if (!slot.primary) {
        if (await this.runningHere(slot.name)) await this.becomePrimary(slot);
        else {
          slot.log.error('this host owns the VM but does not run it: releasing it to the backup');
          await this.lease.release(slot.name);
          return;
        }
      }
      slot.primary!.update(record);
      slot.phase = record.protected ? 'protected' : 'degraded';
      this.metrics.role(slot.name, 'primary');
      return;
    }
    if (owner !== undefined) {
      // Another host may run it: this one must not.
      await this.stopPrimary(slot, `owner is ${owner}`);
      if (await this.runningHere(slot.name)) {
        slot.log.warn({ owner }, 'a copy runs here while another host owns the VM: fencing it');
        await fenceLocal(this.conn, slot.name);
      }
      if (slot.staged && this.heartbeat.peer(owner)?.alive) {
        await slot.staged.abort(`${owner} still owns the VM`);
        slot.staged = undefined;
      }
      slot.phase = record.protected ? (record.backup === self ? 'protected' : 'degraded') : 'unprotected';
      this.metrics.role(slot.name, record.backup === self ? 'backup' : 'none');
      if (record.backup === self && record.protected && !slot.staged) await this.keepStandby(slot);
      else await this.dropStandby(slot);
      return;
    }
    // Nobody owns it.
    if (record.primary === self && !slot.fenced && (await this.runningHere(slot.name))) {
      if (await this.lease.claim(slot.name)) {
        slot.owner = self;
        await this.reconcile(slot);
      }
      return;
    }
    this.startPromotionLoop(slot);
  }

  /** A backup keeps the VM's domain started paused, waiting for a stream: a failover then only sends it. */
  private async keepStandby(slot: VmSlot): Promise<void> {
    const current = await slot.standby?.catch(() => undefined);
    if (current?.usable) return;
    await current?.discard();
    const record = slot.record!;
    slot.standby = prepareStandby(record, this.conn, slot.log);
    slot.standby.then(
      () => slot.log.info('warm standby ready (domain paused, waiting for a checkpoint stream)'),
      (error: Error) => {
        slot.log.warn({ err: error.message }, 'cannot prepare the warm standby');
        slot.standby = undefined;
      },
    );
  }

  private async dropStandby(slot: VmSlot): Promise<void> {
    const standby = slot.standby;
    slot.standby = undefined;
    const prepared = await standby?.catch(() => undefined);
    await prepared?.discard();
  }

  private async runningHere(vm: string): Promise<boolean> {
    return (await this.conn.exists(vm)) && (await this.conn.state(vm)) === 'running';
  }

  private async becomePrimary(slot: VmSlot, handover?: { qmp: QmpClient; ledger: DriftLedger }): Promise<void> {
    const record = slot.record!;
    slot.primary = await PrimaryVm.start({
      record,
      storeDir: this.config.storeDir,
      ssh: (host) => this.ssh.get(host),
      log: slot.log,
      metrics: this.metrics,
      health: this.config.health,
      onFailure: (reason) => void this.enqueue(slot, () => this.onVmFailure(slot, reason)),
      ...(handover?.qmp ? { qmp: handover.qmp } : {}),
      ...(handover?.ledger ? { ledger: handover.ledger } : {}),
    });
    slot.fenced = false;
  }

  private async stopPrimary(slot: VmSlot, why: string): Promise<void> {
    if (!slot.primary) return;
    slot.log.info({ why }, 'no longer primary');
    const primary = slot.primary;
    slot.primary = undefined;
    await primary.stop();
  }

  /**
   * Stops this host's running copy for good: QMP `stop` first when QEMU still answers (its STOP
   * stamp dates the fence), then SIGKILL and libvirt's destroy. Logged as `fenced`.
   */
  private async fenceOwn(slot: VmSlot, reason: string, pauseTimeoutMs: number): Promise<void> {
    slot.fenced = true;
    slot.phase = 'fenced';
    const primary = slot.primary;
    slot.primary = undefined;
    const stopNs = primary ? await primary.pauseNow(pauseTimeoutMs) : undefined;
    const { killed, atNs } = await fenceLocal(this.conn, slot.name);
    slot.log.warn({ reason, stopNs: stopNs?.toString(), killed, killedNs: atNs.toString() }, 'fenced');
    // its loops wind down on their own (a checkpoint in flight fails with the QEMU gone); the
    // fence must not wait for them
    void primary?.stop().catch(() => undefined);
  }

  /** The primary's own VM failed (hung QEMU, crash): stop it for good and hand the VM to the backup. */
  private async onVmFailure(slot: VmSlot, reason: string): Promise<void> {
    if (!slot.primary) return; // already fenced (its QMP closing when we killed it reports here too)
    slot.log.error({ reason }, 'fencing the failed VM and handing it to the backup');
    await this.fenceOwn(slot, reason, 50);
    await this.lease.release(slot.name).catch((error: Error) => slot.log.error({ err: error.message }, 'cannot release the owner key (the lease will expire)'));
    slot.phase = 'fenced';
  }

  /** Lease trouble: stop every VM this host runs before the lease can expire on etcd. */
  private watchLease(lease: HostLease): void {
    lease.onFence((reason) => {
      this.metrics.leaseHealthy(false);
      this.log.error({ reason }, 'lease not renewed in time: fencing every VM this host runs');
      for (const slot of this.slots.values()) {
        if (slot.primary) void this.fenceOwn(slot, `lease: ${reason}`, 50);
      }
      void this.renewLease();
    });
    lease.onLost((reason) => {
      this.log.error({ reason }, 'lease lost');
      void this.renewLease();
    });
  }

  private renewing = false;
  /** After a fence: a fresh lease once etcd answers again (the owner watches stay on). */
  private async renewLease(): Promise<void> {
    if (this.renewing || this.closed) return;
    this.renewing = true;
    try {
      for (let attempt = 0; !this.closed && this.lease.state !== 'held'; attempt++) {
        try {
          const id = await this.lease.renew();
          this.metrics.leaseHealthy(true);
          this.log.info({ lease: id }, 'new lease granted');
          for (const slot of this.slots.values()) this.reconcileSoon(slot);
        } catch (error) {
          if (attempt % 20 === 0) this.log.warn({ err: (error as Error).message }, 'cannot get a new lease yet');
          await sleep(250);
        }
      }
    } finally {
      this.renewing = false;
    }
  }

  // ---- failover ----------------------------------------------------------------------------------

  /** The primary went quiet: load the newest checkpoint's RAM now, while its lease runs out. */
  private async onPrimaryPeerDown(slot: VmSlot): Promise<void> {
    const record = slot.record;
    if (!record || record.backup !== this.config.host || !record.protected || slot.staged || slot.primary) return;
    try {
      const standby = slot.standby;
      slot.standby = undefined;
      slot.staged = await StagedRestore.begin({ record, conn: this.conn, storeDir: this.config.storeDir, log: slot.log, standby });
      slot.phase = 'failing-over';
    } catch (error) {
      slot.log.error({ err: (error as Error).message }, 'cannot stage a restore');
    }
  }

  private startPromotionLoop(slot: VmSlot): void {
    if (slot.promotionLoop) return;
    slot.promotionLoop = true;
    void (async () => {
      try {
        while (!this.closed) {
          const record = slot.record;
          if (!record || slot.primary || slot.owner !== undefined) return;
          const self = this.config.host;
          const other = record.primary === self ? record.backup : record.primary;
          const peer = this.heartbeat.peer(other);
          const otherRuns = peer?.alive === true && peer.last?.vms[slot.name]?.running === true;
          // A switchover names this host primary before the old one stops; a failover needs the
          // primary gone (no heartbeat, or it says it no longer runs the VM).
          const mayPromote = record.protected && !otherRuns && (record.backup === self || (record.primary === self && record.reason === 'switchover'));
          if (mayPromote) {
            await this.enqueue(slot, () => this.promote(slot));
            if (slot.primary) return;
            await sleep(500); // no checkpoint yet, or the take-over failed: not in a tight loop
          }
          await sleep(20);
        }
      } finally {
        slot.promotionLoop = false;
      }
    })();
  }

  private async promote(slot: VmSlot): Promise<void> {
    const record = slot.record;
    if (!record || slot.primary) return;
    const self = this.config.host;
    const from = record.primary === self ? record.backup : record.primary;
    const kind = record.reason === 'switchover' ? 'switchover' : 'failover';
    const lastBeat = this.heartbeat.peer(from)?.lastBeatAt;
    const lastBeatAt = Math.max(lastBeat?.udp ?? 0, lastBeat?.ssh ?? 0);
    const started = performance.now();
    let staged = slot.staged;
    slot.staged = undefined;
    try {
      if (!staged) {
        const standby = slot.standby;
        slot.standby = undefined;
        staged = await StagedRestore.begin({ record, conn: this.conn, storeDir: this.config.storeDir, log: slot.log, standby });
      }
    } catch (error) {
      if (error instanceof NoCheckpointError) slot.log.error({ err: error.message }, `cannot take over: ${error.message}`);
      else throw error;
      return;
    }
    slot.phase = kind === 'switchover' ? 'switching-over' : 'failing-over';
    if (!(await this.lease.claim(slot.name))) {
      slot.log.info('another host took the VM first');
      await staged.abort('owner key taken');
      return;
    }
    slot.owner = self;
    slot.log.warn({ kind, from, epoch: staged.epoch }, 'owner key acquired: taking over');
    try {
      // Fence the old primary through libvirt over SSH when it still answers (bounded); its lease
      // already stopped it if it is cut off.
      const fence = kind === 'failover' ? fenceRemote(sshEndpointOf(this.config, from), slot.name, this.config.hosts[from]!.libvirtUri, this.config.failover.fenceTimeoutMs) : Promise.resolve({ outcome: 'skipped', detail: 'switchover' });
      await staged.ready;
      const newest = await this.newestEpoch(record);
      if (newest !== undefined && newest > staged.epoch) {
        slot.log.warn({ staged: staged.epoch, newest }, 'a newer checkpoint was committed while staging: restaging');
        await staged.abort('newer checkpoint');
        staged = await StagedRestore.begin({ record, conn: this.conn, storeDir: this.config.storeDir, log: slot.log });
        await staged.ready;
      }
      const fenced = await fence;
      slot.log.info({ fence: fenced.outcome, detail: fenced.detail }, 'old primary fenced');
      const done = await staged.complete(this.config.failover.resumeMarginMs);
      const resumeMs = nsToMs(done.resume.resumeNs);
      const lastBeatWall = lastBeatAt ? Date.now() - (performance.now() - lastBeatAt) : undefined;
      const lastBeatNs = lastBeatWall !== undefined ? String(BigInt(Math.round(lastBeatWall * 1e3)) * 1000n) : undefined;
      slot.log.warn(
        {
          kind,
          epoch: done.epoch,
          deltaMs: nsToMs(done.deltaNs),
          resumeLateMs: nsToMs(done.resume.lateNs),
          lateGivenBackMs: done.lateFix ? nsToMs(done.lateFix.lateNs) : 0,
          lastBeatToResumeMs: lastBeatWall ? Math.round(resumeMs - lastBeatWall) : undefined,
          restoreMs: Math.round(performance.now() - started),
        },
        'VM resumed from its last committed checkpoint',
      );
      const ledger = new DriftLedger(slot.name);
      const entry = ledger.recordPause(kind === 'failover' ? 'failover' : 'migration', done.stopNs, done.resume.resumeNs);
      ledger.recordCorrection({ actuator: 'stream-rewrite', appliedNs: done.deltaNs }, entry);
      if (done.lateFix) {
        // the correcting stop/cont: its pause and the lateness, both given back in place
        const fix = ledger.recordPause('failover', done.lateFix.resumeNs - done.lateFix.pauseNs, done.lateFix.resumeNs);
        ledger.recordCorrection({ actuator: 'inplace', appliedNs: done.lateFix.appliedNs, frozenNs: done.lateFix.pauseNs }, fix);
      }
      await this.becomePrimary(slot, { qmp: done.restore.qmp, ledger });
      this.metrics.failover(slot.name, kind, lastBeatWall ? (resumeMs - lastBeatWall) / 1000 : (performance.now() - started) / 1000);
      await this.records.update(slot.name, () => ({
        primary: self,
        backup: from,
        protected: kind === 'switchover',
        reason: kind,
        lastMove: { kind, from, to: self, epoch: done.epoch, stopNs: String(done.stopNs), resumeNs: String(done.resume.resumeNs), at: new Date().toISOString(), ...(lastBeatNs ? { lastBeatNs } : {}) },
      }));
    } catch (error) {
      slot.log.error({ err: (error as Error).message }, 'take-over failed: releasing the VM');
      await staged.abort('take-over failed').catch(() => undefined);
      await fenceLocal(this.conn, slot.name);
      await this.lease.release(slot.name).catch(() => undefined);
      throw error;
    }
  }

  private async newestEpoch(record: VmRecord): Promise<number | undefined> {
    return new CheckpointStore(`${this.config.storeDir}/${record.name}`, record.keep).latestEpoch().catch(() => undefined);
  }

  // ---- helpers -----------------------------------------------------------------------------------

  private peerHosts(): Set<string> {
    const peers = new Set<string>();
    for (const slot of this.slots.values()) for (const h of [slot.record?.primary, slot.record?.backup]) if (h && h !== this.config.host) peers.add(h);
    return peers;
  }

  private heartbeatPayload(): Record<string, { role: VmRole; running: boolean; epoch?: number }> {
    const vms: Record<string, { role: VmRole; running: boolean; epoch?: number }> = {};
    for (const slot of this.slots.values()) {
      const role: VmRole = slot.primary ? 'primary' : slot.record?.backup === this.config.host ? 'backup' : 'none';
      const epoch = slot.primary?.lastCheckpoint?.epoch;
      vms[slot.name] = { role, running: slot.primary !== undefined, ...(epoch !== undefined ? { epoch } : {}) };
    }
    return vms;
  }

  private slot(vm: string): VmSlot {
    const slot = this.slots.get(vm);
    if (!slot) throw new ControlError(`VM '${vm}' is not protected with ${this.config.host} as one of its hosts`, 404);
    return slot;
  }

  private async vmStatus(slot: VmSlot): Promise<VmStatus> {
    const domainState = (await this.conn.exists(slot.name).catch(() => false)) ? await this.conn.state(slot.name).catch(() => 'unknown') : 'absent';
    const last = slot.primary?.lastCheckpoint;
    const role: VmRole = slot.primary ? 'primary' : slot.record?.backup === this.config.host ? 'backup' : 'none';
    return {
      name: slot.name,
      role,
      domainState,
      primaryHost: slot.record?.primary,
      backupHost: slot.record?.backup,
      leaseHolder: slot.owner,
      phase: slot.phase,
      lastCheckpoint: last ? { epoch: last.epoch, bytes: last.bytes, pauseMs: last.pauseMs, ageMs: Date.now() - last.at } : undefined,
      clockResidualMs: slot.primary ? -nsToMs(slot.primary.ledger.predictedLagNs) : undefined,
    };
  }

  private async waitFor(vm: string, timeoutMs: number, ready: (slot: VmSlot) => boolean, what: string): Promise<VmSlot> {
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      const slot = this.slots.get(vm);
      if (slot && ready(slot)) return slot;
      if (performance.now() > deadline) throw new ControlError(`no ${what} for '${vm}' within ${timeoutMs} ms`, 500);
      await sleep(50);
    }
  }

  private async waitForRecord(vm: string, timeoutMs: number, ready: (record: VmRecord) => boolean): Promise<VmRecord> {
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      const record = await this.records.get(vm).catch(() => undefined);
      if (record && ready(record)) return record;
      if (performance.now() > deadline) throw new ControlError(`'${vm}' was not resumed by its new host within ${timeoutMs} ms`, 500);
      await sleep(50);
    }
  }
}

async function openLease(config: AgentConfig, log: Log): Promise<HostLease> {
  return HostLease.open({
    endpoints: config.etcd.endpoints,
    prefix: config.etcd.prefix,
    holder: config.host,
    ttlSeconds: config.etcd.leaseTtlSeconds,
    keepaliveIntervalMs: config.etcd.keepaliveIntervalMs,
    fenceAfterMs: fenceAfterMs(config),
    requestTimeoutMs: config.etcd.requestTimeoutMs,
    log: (level, message, fields) => log[level]({ ...fields }, message),
  });
}
