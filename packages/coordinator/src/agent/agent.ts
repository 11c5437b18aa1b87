import fs from 'node:fs';
import { DriftLedger } from '@ftvm/kvmclock';
import { deviceSignature, LibvirtConnection, readProtection, setIncomingDefer } from '@ftvm/libvirt';
import type { QmpClient } from '@ftvm/qmp';
import type { HookEvent } from '../api/hook-listener.js';
import { fenceAfterMs, type AgentConfig } from '../config/agent-config.js';
import { HeartbeatService, type Heartbeat } from '../heartbeat/index.js';
import { testIgnoreHostOffset, testRealtimeSkewNs } from '../host-clock.js';
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
import { disksSeeded, dropStandby, keepStandby, newestEpoch, stage, type BackupHost } from './backup-side.js';
import { hasReplicatedDisks } from './staged-restore.js';
import { decide, type Action, type VmSnapshot } from './decide.js';
import { decideFailsafe, FailsafeLedger, mayConfirm } from './failsafe.js';
import { fenceLocal } from './fence.js';
import { keepLease } from './lease-keeper.js';
import { handOver } from './handover.js';
import { pollFor, withTimeout } from './poll.js';
import { PrimaryVm } from './primary-vm.js';
import { SshPool } from './ssh-pool.js';
import type { Log, MetricsSink } from './types.js';
import { takeOver, type TakeOverContext } from './take-over.js';
import { VmRecords, type VmRecord } from './vm-records.js';
import { newSlot, type VmSlot } from './vm-slot.js';

const nsToMs = (ns: bigint) => Number(ns) / 1e6;
/** Decisions executed in one cycle before it yields (each normally changes what the next sees). */
const MAX_STEPS = 12;
/** How often a primary without its lease looks at its failsafe confirmations. */
const FAILSAFE_CHECK_MS = 20;
/** An agent stop hands each VM over within this, or suspends its protection. */
const HANDOVER_TIMEOUT_MS = 20_000;

/**
 * The ftvm agent of one host: the executor of `decide` (decide.ts). Every event (a record or
 * owner key changing, a peer's heartbeat coming or going, the local VM failing or being stopped,
 * a 1 s sweep) runs one cycle per VM: snapshot → decision → action, again until there is nothing
 * to do. Roles follow etcd: the host whose lease holds a VM's owner key runs it; the record's
 * other host keeps its checkpoints and takes the key when the primary is gone.
 */
export class Agent implements AgentControl {
  private readonly slots = new Map<string, VmSlot>();
  private readonly ssh: SshPool;
  private sweeper: NodeJS.Timeout | undefined;
  private failsafeTimer: NodeJS.Timeout | undefined;
  private readonly failsafe: FailsafeLedger;
  private closed = false;
  /** stop() has begun: cycles decide nothing while the VMs are handed over */
  private stopping = false;
  private unwatchRecords: (() => Promise<void>) | undefined;
  private readonly takeOverContext: TakeOverContext;
  private readonly backupHost: BackupHost;
  private readonly startedAt = performance.now();

  private constructor(
    private readonly config: AgentConfig,
    private readonly log: Log,
    private readonly metrics: MetricsSink,
    private readonly conn: LibvirtConnection,
    private readonly records: VmRecords,
    private readonly lease: HostLease,
    private readonly heartbeat: HeartbeatService,
  ) {
    this.ssh = new SshPool(config);
    this.failsafe = new FailsafeLedger(config.failsafe);
    this.backupHost = {
      conn,
      storeDir: config.storeDir,
      peerClock: (record) => {
        const peer = record.primary === config.host ? record.backup : record.primary;
        return { peer, estimate: heartbeat.peer(peer)?.clockOffset };
      },
      standbyRam: config.failover.standbyRam,
      onRamApplied: (vm, applied) => metrics.standbyRamApplied(vm, applied),
    };
    this.takeOverContext = {
      config,
      lease,
      heartbeat,
      conn,
      metrics,
      stage: (slot, kind) => stage(slot, this.backupHost, kind),
      newestEpoch: (slot) => newestEpoch(slot, this.backupHost),
      record: (vm) => this.records.get(vm),
      runningHere: (vm) => this.runningHere(vm),
      finishMove: (slot) => this.finishMove(slot),
      becomePrimary: (slot, handover) => this.becomePrimary(slot, handover),
    };
  }

  static async start(config: AgentConfig, options: { log: Log; metrics: MetricsSink }): Promise<Agent> {
    const { log, metrics } = options;
    const self = config.hosts[config.host]!;
    const conn = await LibvirtConnection.connect(self.libvirtUri, {
      timeoutMs: 30_000,
      onBroken: (e) => log.warn({ uri: e.uri, reason: e.reason, operation: e.operation }, 'libvirt connection broken: reopening'),
      onReconnect: (e) => log.info({ uri: e.uri, attempts: e.attempts, ms: e.durationMs, reconnects: e.reconnects }, 'libvirt connection reopened'),
    });
    const lease = await openLease(config, log);
    // The records ride on the lease's etcd connection; their writes wait on etcd's disk, so they
    // get a longer deadline than the lease's keepalives.
    const records = VmRecords.onLease(lease, { timeoutMs: config.etcd.requestTimeoutMs * 4 });
    let agent: Agent | undefined;
    const skewNs = testRealtimeSkewNs(); // a bad value stops the agent here, named
    const ignoreOffset = testIgnoreHostOffset();
    if (skewNs !== 0n || ignoreOffset) log.warn({ realtimeSkewMs: nsToMs(skewNs), ignoreHostOffset: ignoreOffset !== undefined }, 'TEST ONLY: this agent reads a skewed host clock or ignores the measured host offset');
    const heartbeat = await HeartbeatService.start({
      host: config.host,
      listen: { udpAddress: self.address, port: config.heartbeat.port },
      intervalMs: config.heartbeat.intervalMs,
      timeoutMs: config.heartbeat.timeoutMs,
      payload: () => agent?.heartbeatPayload() ?? {},
      log: (level, message, fields) => log[level]({ ...fields }, message),
    });
    agent = new Agent(config, log, metrics, conn, records, lease, heartbeat);
    await agent.init();
    return agent;
  }

  private async init(): Promise<void> {
    this.metrics.leaseHealthy(this.lease.healthy);
    keepLease(this.lease, {
      log: this.log,
      metrics: this.metrics,
      closed: () => this.closed,
      fenceAll: (reason) => {
        for (const slot of this.slots.values()) if (slot.primary) this.failsafeCheck(slot, reason);
      },
      renewed: () => {
        for (const slot of this.slots.values()) this.cycleSoon(slot);
      },
    });
    this.sweeper = setInterval(() => {
      // keep an SSH connection to every peer: the second heartbeat path and the fencing route
      for (const host of this.peerHosts()) if (!this.ssh.current(host)) void this.ssh.get(host).catch(() => undefined);
      // a sweep catches what no event reported (a standby QEMU that died, a missed watch)
      for (const slot of this.slots.values()) this.cycleSoon(slot);
    }, 1_000);
    // a primary without its lease runs on only under its backup's fresh confirmation
    this.failsafeTimer = setInterval(() => {
      if (this.lease.state === 'held' && ![...this.slots.values()].some((slot) => slot.failsafe !== undefined)) return;
      for (const slot of this.slots.values()) if (slot.primary || slot.failsafe !== undefined) this.failsafeCheck(slot);
    }, FAILSAFE_CHECK_MS);
    this.heartbeat.onBeat((peer, _path, beat) => {
      const sentAt = beat.echo ? this.heartbeat.sentAt(beat.echo.sentAtNs) : undefined;
      if (sentAt === undefined) return;
      for (const [vm, vmBeat] of Object.entries(beat.vms)) {
        const record = this.slots.get(vm)?.record;
        if (vmBeat.confirmsFailsafe && record?.primary === this.config.host && record.backup === peer) this.failsafe.confirmed(vm, sentAt);
      }
    });
    this.heartbeat.onPeerDown((peer) => {
      this.metrics.peerAlive(peer, false);
      this.log.warn({ peer }, 'peer down (no heartbeat on either path)');
      for (const slot of this.slots.values()) if (slot.record?.primary === peer || slot.record?.backup === peer) this.cycleSoon(slot);
    });
    this.heartbeat.onPeerUp((peer) => {
      this.metrics.peerAlive(peer, true);
      this.log.info({ peer }, 'peer up');
      for (const slot of this.slots.values()) if (slot.record?.primary === peer || slot.record?.backup === peer) this.cycleSoon(slot);
    });
    // VMs named in the config are protected the first time any of their hosts starts.
    for (const vm of this.config.vms) {
      if (vm.primary !== this.config.host && vm.backup !== this.config.host) continue;
      const xml = fs.readFileSync(vm.domainXml, 'utf8');
      if (!readProtection(xml)) throw new ControlError(`vms[${vm.name}].domainXml (${vm.domainXml}) has no ftvm metadata: make it FT-ready first`);
      await this.records.create({ name: vm.name, xml, primary: vm.primary, backup: vm.backup, protected: true, checkpointIntervalMs: vm.checkpointIntervalMs, outputCommit: vm.outputCommit, keep: vm.keep, ...(vm.fullEvery === undefined ? {} : { fullEvery: vm.fullEvery }), checkpointsSince: Date.now(), reason: 'config' });
    }
    this.unwatchRecords = await this.records.watch(
      (vm, record) => this.onRecord(vm, record),
      (error) => this.log.error({ err: error.message }, 'watching VM records'),
    );
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
        const clock = p?.clockOffset;
        return {
          name,
          alive: p?.alive ?? false,
          lastBeatAgeMs: { udp: age(p?.lastBeatAt.udp), ssh: age(p?.lastBeatAt.ssh) },
          ...(clock ? { clockOffset: { offsetMs: nsToMs(clock.offsetNs), errorMs: nsToMs(clock.errorNs), ageMs: Math.round(clock.ageMs), samples: clock.samples } } : {}),
        };
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
    // a protected VM is paused for a few ms at each of its checkpoints: that is running too
    const checkpointPause = state === 'paused' && this.slots.get(vm)?.primary !== undefined;
    if (state !== 'running' && !checkpointPause) throw new ControlError(`domain '${vm}' is ${state}: protect a running domain`, 409);
    // the running configuration (what a restore must match), as libvirt hands it to a migration
    const xml = setIncomingDefer(await this.conn.xml(vm, { migratable: true }), false);
    if (!readProtection(xml)) throw new ControlError(`domain '${vm}' is not FT-ready (no ftvm metadata and QMP socket): define it through makeFtReady and start it again`);
    progress({ step: `read domain ${vm} from libvirt`, state: 'done' });
    progress({ step: 'record protection in etcd', state: 'start' });
    const existing = await this.records.get(vm);
    const since = Date.now();
    if (existing && existing.primary !== this.config.host) throw new ControlError(`VM '${vm}' is already protected with primary ${existing.primary}`, 409);
    const fields = {
      xml,
      primary: this.config.host,
      backup,
      protected: true,
      checkpointIntervalMs: request.checkpointIntervalMs ?? existing?.checkpointIntervalMs ?? 1_000,
      outputCommit: request.outputCommit ?? existing?.outputCommit ?? false,
      ...(request.fullEvery !== undefined ? { fullEvery: request.fullEvery } : {}),
      // a protect of a VM already protected here keeps its run (its backup's checkpoints still count)
      checkpointsSince: existing?.protected && existing.primary === this.config.host && existing.backup === backup && existing.checkpointsSince !== undefined ? existing.checkpointsSince : Date.now(),
      reason: 'protect',
      stopped: undefined,
      suspended: undefined,
    };
    if (existing) await this.records.update(vm, () => fields);
    else await this.records.create({ name: vm, keep: 3, ...fields });
    progress({ step: 'record protection in etcd', state: 'done' });
    progress({ step: 'first checkpoint committed on the backup', state: 'start' });
    // a seed of the VM's disks comes first and takes as long as its data: wait while it copies
    const waitMs = this.config.checkpointTimeoutMs;
    let deadline = performance.now() + waitMs;
    const slot = await pollFor(`a committed checkpoint of '${vm}'`, 60 * 60_000, () => {
      const s = this.slots.get(vm);
      if (s?.primary?.refusal) return s;
      if ((s?.primary?.lastCheckpoint?.at ?? 0) >= since) return s;
      if (s?.primary?.seeding) deadline = performance.now() + waitMs;
      if (performance.now() > deadline) throw new ControlError(`a committed checkpoint of '${vm}': not within ${waitMs} ms (after any disk seed)`, 500);
      return undefined;
    });
    const refusal = slot.primary!.refusal;
    if (refusal) {
      // it keeps running here, unprotected: no backup may think it has its checkpoints
      await this.records.update(vm, () => ({ protected: false, reason: `protect refused: ${refusal}` }));
      throw new ControlError(refusal, 409);
    }
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
    const result = await this.enqueue(slot, () => handOver({ self: this.config.host, records: this.records, lease: this.lease, conn: this.conn }, slot, to, progress)).finally(() => this.cycleSoon(slot));
    return result;
  }

  async reprotect(vm: string, backup: string | undefined, progress: Progress): Promise<VmStatus> {
    const record = await this.records.get(vm);
    if (!record) throw new ControlError(`no VM '${vm}' in the cluster`, 404);
    const target = backup ?? record.backup;
    if (!(target in this.config.hosts)) throw new ControlError(`backup '${target}' is not one of the configured hosts`);
    if (target === record.primary) throw new ControlError(`'${target}' runs the VM: its backup must be another host`);
    if (record.stopped) throw new ControlError(`VM '${vm}' was stopped by the user (${record.stopped.reason}): start it on ${record.primary} first`, 409);
    progress({ step: `make ${target} the backup of ${vm}`, state: 'start' });
    await this.records.update(vm, (r) => ({ backup: target, protected: true, suspended: undefined, ...(r.protected && r.backup === target ? {} : { checkpointsSince: Date.now() }), reason: 'reprotect' }));
    progress({ step: `make ${target} the backup of ${vm}`, state: 'done' });
    if (record.primary === this.config.host) {
      progress({ step: 'first checkpoint committed on the backup', state: 'start' });
      const since = Date.now();
      await pollFor(`a committed checkpoint of '${vm}'`, 60_000, () => ((this.slots.get(vm)?.primary?.lastCheckpoint?.at ?? 0) > since ? true : undefined));
      progress({ step: 'first checkpoint committed on the backup', state: 'done' });
    }
    return this.vmStatus(this.slot(vm));
  }

  async checkpointNow(vm: string): Promise<CheckpointNowResult> {
    const slot = this.slot(vm);
    if (!slot.primary) throw new ControlError(`VM '${vm}' does not run on ${this.config.host}${slot.record ? ` (primary: ${slot.record.primary})` : ''}`, 409);
    if (!this.checkpointing(slot.record)) throw new ControlError(`VM '${vm}' is not protected: no backup to send a checkpoint to`, 409);
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
    return { vm, ledger: ledger.summaryJson(), predictedLagMs: nsToMs(ledger.predictedLagNs) };
  }

  /**
   * The libvirt hook saw an ftvm domain start or stop on this host. A VM the cluster knows gets a
   * cycle at once (the decision tells a user's restart from a stop); a new one whose metadata
   * names a configured peer is protected with that peer as its backup once it runs.
   */
  hookEvent(event: HookEvent): void {
    const slot = this.slots.get(event.domain);
    if (slot) return this.cycleSoon(slot);
    if (event.op !== 'protect' || this.stopping) return;
    const protection = event.protection as { peer?: { host?: string }; checkpointIntervalMs?: number; outputCommit?: boolean } | undefined;
    const backup = protection?.peer?.host;
    const log = this.log.child({ vm: event.domain });
    if (!backup || !(backup in this.config.hosts) || backup === this.config.host) {
      log.warn({ peer: backup }, `libvirt hook: not protecting ${event.domain}: its metadata's peer is not another configured host (${Object.keys(this.config.hosts).join(', ')})`);
      return;
    }
    void (async () => {
      await pollFor(`domain ${event.domain} running`, 30_000, async () => ((await this.conn.state(event.domain).catch(() => 'absent')) === 'running' ? true : undefined), 100);
      const request = {
        vm: event.domain,
        backup,
        ...(protection?.checkpointIntervalMs ? { checkpointIntervalMs: protection.checkpointIntervalMs } : {}),
        ...(protection?.outputCommit !== undefined ? { outputCommit: protection.outputCommit } : {}),
      };
      await this.protect(request, (e) => log.debug({ step: e.step, state: e.state }, 'protect'));
      log.info({ backup }, 'libvirt hook: protected');
    })().catch((error: Error) => log.error({ err: error.message }, 'libvirt hook: cannot protect'));
  }

  /**
   * Stops the agent without a failover and without leaving a copy that nobody guards. A VM that
   * runs here is handed to its backup by switchover when the backup answers; otherwise it keeps
   * running here with its protection suspended in the record (so no host takes it over while
   * this agent is away) and the restarted agent resumes it. Only then is the lease revoked. When
   * even the suspension cannot be written, the VM is stopped: the lease is about to go, and a copy
   * must never run where no key is held.
   */
  async stop(): Promise<void> {
    this.stopping = true;
    const running = [...this.slots.values()].filter((slot) => slot.primary && slot.owner === this.config.host);
    await Promise.all(running.map((slot) => this.leaveVm(slot)));
    this.closed = true;
    clearInterval(this.sweeper);
    clearInterval(this.failsafeTimer);
    await this.unwatchRecords?.().catch(() => undefined);
    for (const slot of this.slots.values()) {
      clearTimeout(slot.recheck);
      await slot.queue.catch(() => undefined);
      await slot.unwatchOwner?.().catch(() => undefined);
      await slot.staged?.abort('agent stopping').catch(() => undefined);
      await dropStandby(slot).catch(() => undefined);
      await slot.primary?.stop().catch(() => undefined);
    }
    await this.heartbeat.close().catch(() => undefined);
    await this.lease.close().catch(() => undefined);
    this.ssh.close();
    await this.conn.close().catch(() => undefined);
  }

  private async leaveVm(slot: VmSlot): Promise<void> {
    const record = slot.record;
    if (record && record.protected && !record.stopped && this.heartbeat.peer(record.backup)?.alive) {
      try {
        const handed = await withTimeout(this.switchover(slot.name, (e) => slot.log.info({ step: e.step, state: e.state }, 'agent stop: switchover')), HANDOVER_TIMEOUT_MS, 'switchover');
        slot.log.warn({ to: handed.to, downtimeMs: handed.downtimeMs }, 'agent stop: VM handed over to its backup');
        return;
      } catch (error) {
        slot.log.error({ err: (error as Error).message }, 'agent stop: cannot hand the VM over');
        if (!slot.primary) return; // the switchover got past stopping it here: the backup resumes it
      }
    }
    if (!record?.protected || record.stopped) return; // nobody takes an unprotected VM over: nothing to suspend
    try {
      await this.records.update(slot.name, () => ({ protected: false, suspended: { by: this.config.host, at: new Date().toISOString(), why: 'agent-stop' }, reason: 'agent-stop' }));
      slot.log.warn('agent stop: VM keeps running here, protection suspended until the agent is back');
      // nobody can take it over now: output commit has nothing left to protect
      await slot.primary?.releaseOutput().catch((error: Error) => slot.log.warn({ err: error.message }, 'agent stop: releasing held output'));
    } catch (error) {
      slot.log.error({ err: (error as Error).message }, 'agent stop: cannot suspend protection in etcd: stopping the VM before the lease goes');
      await this.fenceOwn(slot, 'agent stop without etcd', 2_000);
    }
  }

  // ---- the cycle ---------------------------------------------------------------------------------

  private onRecord(vm: string, record: VmRecord | undefined): void {
    const involved = record && (record.primary === this.config.host || record.backup === this.config.host);
    let slot = this.slots.get(vm);
    if (!slot && !involved) return;
    if (!slot) {
      slot = newSlot(vm, record, this.log.child({ vm }));
      this.slots.set(vm, slot);
      const s = slot;
      void this.lease
        .watchOwner(vm, (owner) => {
          s.owner = owner;
          this.cycleSoon(s);
        })
        .then((unwatch) => (s.unwatchOwner = unwatch))
        .catch((error: Error) => s.log.error({ err: error.message }, 'cannot watch the owner key'));
    }
    // a changed domain is a new chance for a take-over that QEMU refused
    if (record?.xml !== slot.record?.xml) slot.takeOverFailures = undefined;
    slot.record = record;
    if (record) {
      for (const host of [record.primary, record.backup]) {
        if (host === this.config.host || !this.config.hosts[host]) continue;
        this.heartbeat.addPeer({ name: host, address: this.config.hosts[host]!.address, port: this.config.heartbeat.port, ssh: () => this.ssh.current(host) });
        // the SSH path needs a connection even on a host that sends no checkpoints
        void this.ssh.get(host).catch(() => undefined);
      }
    }
    this.cycleSoon(slot);
  }

  /** Runs one cycle of this VM soon (coalesced: one queued at a time). */
  private cycleSoon(slot: VmSlot): void {
    if (slot.cycleQueued || this.closed) return;
    slot.cycleQueued = true;
    this.enqueue(slot, async () => {
      slot.cycleQueued = false;
      await this.cycle(slot);
    }).catch(() => undefined); // logged by the queue
  }

  /** Runs `work` after every earlier change of this VM's role; its failure is logged and returned to the caller. */
  private enqueue<T>(slot: VmSlot, work: () => Promise<T>): Promise<T> {
    const run = slot.queue.then(work);
    slot.queue = run.then(
      () => undefined,
      (error: Error) => slot.log.error({ err: error.message, stack: error.stack }, 'VM task failed'),
    );
    return run;
  }

  private async cycle(slot: VmSlot): Promise<void> {
    for (let step = 0; step < MAX_STEPS && !this.closed; step++) {
      const action = decide(await this.snapshot(slot));
      this.metrics.role(slot.name, slot.primary ? 'primary' : slot.record?.backup === this.config.host ? 'backup' : 'none');
      slot.phase = action.phase;
      slot.reason = action.reason;
      this.logDecision(slot, action);
      if (action.do === 'none') return;
      if (action.do === 'wait') {
        clearTimeout(slot.recheck);
        slot.recheck = setTimeout(() => this.cycleSoon(slot), action.recheckMs);
        return;
      }
      await this.execute(slot, action);
    }
  }

  private async snapshot(slot: VmSlot): Promise<VmSnapshot> {
    const self = this.config.host;
    const record = slot.record;
    // the checkpoint loop follows the record here, in the VM's queue: never in the middle of a
    // switchover's last checkpoint
    if (record) slot.primary?.update(this.checkpointRecord(record));
    slot.owner = await this.lease.owner(slot.name);
    slot.running = await this.runsHere(slot).catch(() => undefined);
    const other = record ? (record.primary === self ? record.backup : record.primary) : undefined;
    const peer = other ? this.heartbeat.peer(other) : undefined;
    return {
      self,
      closing: this.stopping || this.closed,
      record: record && {
        primary: record.primary,
        backup: record.backup,
        protected: record.protected,
        reason: record.reason,
        stopped: record.stopped,
        suspended: record.suspended,
        outputCommit: record.outputCommit,
      },
      owner: slot.owner,
      leaseHeld: this.lease.state === 'held',
      peer: other
        ? {
            name: other,
            alive: peer?.alive ?? false,
            runsVm: peer?.last?.vms[slot.name]?.running === true,
            downForMs: this.peerSilentForMs(other),
            // a peer this agent has not heard yet, this soon after its start, may well be running
            ...(peer?.last === undefined && performance.now() - this.startedAt <= this.config.heartbeat.timeoutMs ? { unheard: true } : {}),
          }
        : undefined,
      local: {
        running: slot.running,
        primaryActive: slot.primary !== undefined,
        fenced: slot.fenced,
        failed: slot.failed,
        stoppedByUser: slot.stoppedByUser,
        devicesChanged: (slot.changedXml = slot.primary && record ? await this.changedDomainXml(slot.name, record) : undefined) !== undefined,
        unfinishedMove: slot.unfinishedMove !== undefined,
        takeOverFailures: slot.takeOverFailures,
        noTakeOverForMs: this.failsafe.promisedForMs(slot.name, performance.now()),
      },
      staged: slot.staged ? { epoch: slot.staged.epoch } : undefined,
      standby: !slot.standby ? 'none' : slot.standbyXml !== record?.xml ? 'stale' : 'present',
      ...(record?.backup === self && hasReplicatedDisks(record) ? { disksSeeded: await disksSeeded(slot, this.backupHost) } : {}),
      newestEpoch: record?.backup === self || record?.primary === self ? await newestEpoch(slot, this.backupHost) : undefined,
      checkpointFailures: slot.primary?.consecutiveFailures ?? 0,
    };
  }

  private logDecision(slot: VmSlot, action: Action): void {
    const key = `${action.do}|${action.reason}`;
    if (key === slot.lastLogged) return;
    slot.lastLogged = key;
    const level = action.do === 'fence-local' || action.do === 'take-over' || action.do === 'record-stop' ? 'warn' : 'info';
    slot.log[level]({ decision: action.do, phase: action.phase, reason: action.reason }, 'decision');
  }

  private async execute(slot: VmSlot, action: Exclude<Action, { do: 'none' | 'wait' }>): Promise<void> {
    const self = this.config.host;
    switch (action.do) {
      case 'run-primary':
        return this.becomePrimary(slot);
      case 'stop-primary':
        return this.stopPrimary(slot, action.reason);
      case 'claim':
        if (await this.lease.claim(slot.name)) slot.owner = self;
        return;
      case 'release':
        await this.lease.release(slot.name);
        slot.owner = undefined;
        return;
      case 'fence-local':
        return this.fenceOwn(slot, action.reason, 50);
      case 'keep-standby':
        return keepStandby(slot, this.backupHost);
      case 'drop-standby':
        return dropStandby(slot);
      case 'stage':
        slot.staged = await stage(slot, this.backupHost);
        return;
      case 'abort-staged': {
        const staged = slot.staged;
        slot.staged = undefined;
        await staged?.abort(action.reason);
        return;
      }
      case 'take-over':
        return takeOver(this.takeOverContext, slot, action.kind);
      case 'suspend-protection': {
        // The record first: from this write on no host takes the VM over (decide, and mayResume,
        // which reads the record afresh). Only then does the held output go.
        slot.record = await this.records.update(slot.name, (r) =>
          r.primary === self && r.protected && !r.suspended ? { protected: false, suspended: { by: self, at: new Date().toISOString(), why: 'backup-lost' }, reason: 'backup-lost' } : undefined,
        );
        if (slot.record.suspended?.why !== 'backup-lost' || slot.record.primary !== self) return;
        slot.primary?.update(this.checkpointRecord(slot.record));
        await slot.primary?.releaseOutput();
        slot.log.warn({ backup: slot.record.backup }, 'backup lost: the VM runs on unprotected, its output no longer held, until the backup answers again');
        return;
      }
      case 'update-xml': {
        const xml = slot.changedXml;
        if (!xml) return;
        const [was, now] = [deviceSignature(slot.record!.xml).split(';'), deviceSignature(xml).split(';')];
        slot.log.warn({ added: now.filter((d) => !was.includes(d)), removed: was.filter((d) => !now.includes(d)) }, 'devices changed');
        slot.record = await this.records.update(slot.name, () => ({ xml, reason: 'devices changed' }));
        return;
      }
      case 'finish-move':
        return this.finishMove(slot);
      case 'record-stop':
        slot.record = await this.records.update(slot.name, () => ({ stopped: { by: self, reason: action.stopReason, at: new Date().toISOString() }, reason: `stopped: ${action.stopReason}` }));
        return;
      case 'resume-protection':
        slot.record = await this.records.update(slot.name, (r) => ({ protected: true, stopped: undefined, suspended: undefined, checkpointsSince: Date.now(), reason: r.stopped ? 'started again' : r.suspended?.why === 'backup-lost' ? 'backup back' : 'agent back' }));
        slot.stoppedByUser = undefined;
        slot.failed = undefined;
        slot.fenced = false;
        return;
    }
  }

  // ---- primary -----------------------------------------------------------------------------------

  /** The record the checkpoint loop works from: a host never checkpoints into its own store. */
  private checkpointRecord(record: VmRecord): VmRecord {
    return this.checkpointing(record) ? record : { ...record, protected: false };
  }

  private checkpointing(record: VmRecord | undefined): boolean {
    return record !== undefined && record.protected && !record.stopped && record.primary === this.config.host && record.backup !== this.config.host;
  }

  private async becomePrimary(slot: VmSlot, handover?: { qmp: QmpClient; ledger: DriftLedger }): Promise<void> {
    const record = this.checkpointRecord(slot.record!);
    slot.failed = undefined;
    slot.stoppedByUser = undefined;
    slot.primary = await PrimaryVm.start({
      record,
      storeDir: this.config.storeDir,
      ssh: (host) => this.ssh.get(host),
      log: slot.log,
      metrics: this.metrics,
      health: this.config.health,
      checkpointTimeoutMs: this.config.checkpointTimeoutMs,
      onFailure: (reason) => {
        slot.failed = reason;
        this.cycleSoon(slot);
      },
      onStopped: (reason) => {
        slot.stoppedByUser = reason;
        this.cycleSoon(slot);
      },
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
    slot.failsafe = undefined;
    const primary = slot.primary;
    slot.primary = undefined;
    const stopNs = primary ? await primary.pauseNow(pauseTimeoutMs) : undefined;
    const { killed, atNs } = await fenceLocal(this.conn, slot.name);
    slot.running = false;
    slot.log.warn({ reason, stopNs: stopNs?.toString(), killed, killedNs: atNs.toString() }, 'fenced');
    // its loops wind down on their own (a checkpoint in flight fails with the QEMU gone); the
    // fence must not wait for them
    void primary?.stop().catch(() => undefined);
  }

  /**
   * The failsafe decision for a VM this host runs (failsafe.ts): on a lease fence, and every
   * FAILSAFE_CHECK_MS while the lease is not held or the VM is still in failsafe.
   */
  private failsafeCheck(slot: VmSlot, leaseReason?: string): void {
    const record = slot.record;
    const action = decideFailsafe({
      runs: slot.primary !== undefined,
      leaseHeld: this.lease.state === 'held',
      inFailsafe: slot.failsafe !== undefined,
      confirmedForMs: this.config.failsafe.enabled ? this.failsafe.confirmedForMs(slot.name, performance.now()) : 0,
      backup: record?.backup ?? 'the backup',
    });
    switch (action.do) {
      case 'none':
        if (!slot.primary) slot.failsafe = undefined;
        return;
      case 'failsafe':
        if (slot.failsafe === undefined) {
          slot.failsafe = { since: performance.now(), reclaiming: false };
          slot.log.warn({ lease: leaseReason, reason: action.reason }, 'failsafe: the VM runs on without the lease');
        }
        slot.phase = 'failsafe';
        slot.reason = action.reason;
        return;
      case 'fence':
        void this.fenceOwn(slot, `lease: ${leaseReason ?? this.lease.reason ?? 'not held'}; failsafe: ${action.reason}`, 50);
        return;
      case 'reclaim': {
        const failsafe = slot.failsafe;
        if (!failsafe || failsafe.reclaiming) return;
        failsafe.reclaiming = true;
        void this.enqueue(slot, async () => {
          if (slot.failsafe !== failsafe || !slot.primary) return;
          if (await this.lease.reclaim(slot.name)) {
            slot.owner = this.config.host;
            slot.failsafe = undefined;
            slot.log.warn({ failsafeMs: Math.round(performance.now() - failsafe.since) }, 'failsafe over: etcd answers, the owner key is on the new lease');
            this.cycleSoon(slot);
          } else {
            await this.fenceOwn(slot, 'failsafe: etcd answers again but another host holds the owner key', 50);
          }
        })
          .catch(() => undefined) // logged by the queue; the next check tries again
          .finally(() => (failsafe.reclaiming = false));
        return;
      }
    }
  }

  private async runningHere(vm: string): Promise<boolean> {
    return (await this.conn.exists(vm)) && (await this.conn.state(vm)) === 'running';
  }

  /** The running domain's XML (migratable, as a restore defines it) when its devices differ from the record's. */
  private async changedDomainXml(vm: string, record: VmRecord): Promise<string | undefined> {
    const live = await this.conn.xml(vm, { migratable: true }).catch(() => undefined);
    if (!live || deviceSignature(live) === deviceSignature(record.xml)) return undefined;
    return setIncomingDefer(live, false);
  }

  /** The VM runs here: running, or paused by this agent's own checkpoint (a standby is paused too, and does not run). */
  private async runsHere(slot: VmSlot): Promise<boolean> {
    if (!(await this.conn.exists(slot.name))) return false;
    const state = await this.conn.state(slot.name);
    return state === 'running' || (state === 'paused' && slot.primary !== undefined);
  }

  /** Writes the move into the record (after the resume; retried by the cycle until it holds). */
  private async finishMove(slot: VmSlot): Promise<void> {
    const patch = slot.unfinishedMove;
    if (!patch) return;
    slot.record = await this.records.update(slot.name, () => patch);
    slot.unfinishedMove = undefined;
    slot.primary?.update(this.checkpointRecord(slot.record!));
  }

  // ---- helpers -----------------------------------------------------------------------------------

  /** Since the peer's last heartbeat on either path (or since this agent started, if it never beat). */
  private peerSilentForMs(name: string): number {
    const beats = this.heartbeat.peer(name)?.lastBeatAt;
    const last = Math.max(beats?.udp ?? 0, beats?.ssh ?? 0);
    return Math.round(performance.now() - (last > 0 ? last : this.startedAt));
  }

  private peerHosts(): Set<string> {
    const peers = new Set<string>();
    for (const slot of this.slots.values()) for (const h of [slot.record?.primary, slot.record?.backup]) if (h && h !== this.config.host) peers.add(h);
    return peers;
  }

  /** What the peers learn from each heartbeat; `running` is what libvirt says (unknown counts as running). */
  private heartbeatPayload(): Heartbeat['vms'] {
    const vms: Heartbeat['vms'] = {};
    const now = performance.now();
    // half a keepalive interval past due: the ask and the confirmation must reach the primary
    // before its lease fences (README, "Failsafe": the timing)
    const etcdUnreachable = this.lease.silentForMs(now) > this.config.etcd.keepaliveIntervalMs / 2;
    for (const slot of this.slots.values()) {
      const role: VmRole = slot.primary ? 'primary' : slot.record?.backup === this.config.host ? 'backup' : 'none';
      const epoch = slot.primary?.lastCheckpoint?.epoch;
      const takingOver = slot.staged !== undefined || slot.phase === 'failing-over' || slot.phase === 'switching-over' || slot.phase === 'staging';
      // the promise is made here, before the beat leaves: the primary can count on it from then on
      const primary = slot.record?.primary !== undefined ? this.heartbeat.peer(slot.record.primary) : undefined;
      const primaryAsks = primary?.alive === true && primary.last?.vms[slot.name]?.asksFailsafe === true;
      const confirms = this.config.failsafe.enabled && !slot.primary && mayConfirm({ self: this.config.host, record: slot.record, etcdUnreachable, primaryAsks, running: slot.running, takingOver }).confirm;
      if (confirms) this.failsafe.promise(slot.name, now);
      const asks = this.config.failsafe.enabled && slot.primary !== undefined && etcdUnreachable;
      vms[slot.name] = { role, running: slot.running !== false, ...(epoch !== undefined ? { epoch } : {}), ...(confirms ? { confirmsFailsafe: true } : {}), ...(asks ? { asksFailsafe: true } : {}) };
    }
    return vms;
  }

  private slot(vm: string): VmSlot {
    const slot = this.slots.get(vm);
    if (!slot) throw new ControlError(`VM '${vm}' is not protected with ${this.config.host} as one of its hosts`, 404);
    return slot;
  }

  private async vmStatus(slot: VmSlot): Promise<VmStatus> {
    const domainState = await this.conn
      .exists(slot.name)
      .then((exists) => (exists ? this.conn.state(slot.name) : 'absent'))
      .catch((error: Error) => `unknown (${error.message})`);
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
      reason: slot.reason,
      ...(slot.record?.stopped ? { stopped: { by: slot.record.stopped.by, reason: slot.record.stopped.reason, at: slot.record.stopped.at } } : {}),
      lastCheckpoint: last ? { epoch: last.epoch, bytes: last.bytes, pauseMs: last.pauseMs, ageMs: Date.now() - last.at } : undefined,
      outputCommit: slot.record?.outputCommit ?? false,
      checkpointIntervalMs: slot.record?.checkpointIntervalMs,
      clockResidualMs: slot.primary ? -nsToMs(slot.primary.ledger.predictedLagNs) : undefined,
      ...(role === 'backup' ? { standby: await this.standbyStatus(slot) } : {}),
    };
  }

  private async standbyStatus(slot: VmSlot): Promise<NonNullable<VmStatus['standby']>> {
    const follower = slot.standbyRam;
    const ramEpoch = follower?.ram.epoch;
    const ram = follower ? follower.state(await newestEpoch(slot, this.backupHost)) : 'loaded';
    return { domain: slot.standby !== undefined, ready: slot.standby !== undefined && slot.standbyReady === slot.standby, ram, ...(ramEpoch !== undefined ? { ramEpoch } : {}) };
  }
}


/**
 * A starting agent keeps asking a slow or briefly unreachable etcd for its lease this long rather
 * than exiting on the first late answer.
 */
const LEASE_OPEN_RETRY_MS = 20_000;

async function openLease(config: AgentConfig, log: Log): Promise<HostLease> {
  return HostLease.open({
    endpoints: config.etcd.endpoints,
    prefix: config.etcd.prefix,
    holder: config.host,
    ttlSeconds: config.etcd.leaseTtlSeconds,
    keepaliveIntervalMs: config.etcd.keepaliveIntervalMs,
    fenceAfterMs: fenceAfterMs(config),
    requestTimeoutMs: config.etcd.requestTimeoutMs,
    openRetryMs: LEASE_OPEN_RETRY_MS,
    log: (level, message, fields) => log[level]({ ...fields }, message),
  });
}
