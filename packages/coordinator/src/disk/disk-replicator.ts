import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';
import type { ReplicatedDisk } from '@ftvm/libvirt';
import type { QmpClient } from '@ftvm/qmp';
import {
  allocatedExtents,
  dirtyExtents,
  NbdClient,
  pauseAfterFirst,
  readExtents,
  type DiskBase,
  type DiskSection,
  type ReplicationSender,
} from '@ftvm/transport';

const run = promisify(execFile);

/** The capability of ftvm's QEMU (patch 0015) that keeps block nodes active across a checkpoint. */
export const KEEP_BLOCK_ACTIVE = 'x-ftvm-keep-block-active';
const ARM_COMMAND = 'x-ftvm-arm-stop-actions';
const BITMAP_PREFIX = 'ftvm-';
const GRANULARITY = 4096;
const QMP_TIMEOUT_MS = 10_000;

interface DiskNode {
  disk: ReplicatedDisk;
  /** The format node the guest's device writes through: bitmaps live here, the fleece backs onto it. */
  node: string;
  sizeBytes: number;
  fleeceNode: string;
  /** The fleece overlay's file as QEMU sees it, and as this process does. */
  fleeceFile: string;
  fleeceFileHere: string;
  template: string;
}

interface BlockInfo {
  device: string;
  qdev?: string;
  inserted?: { 'node-name': string; file: string; image: { filename: string; 'virtual-size': number }; 'dirty-bitmaps'?: { name: string }[] };
}

/** One checkpoint's disk work, from arming to settling. */
interface Pending {
  epoch: number;
  /** The bitmap that recorded this epoch's writes (disabled at the stop instant). */
  closing: string;
  /** The bitmap the stop instant starts. */
  opening: string;
  fleeces: Set<DiskNode>;
  /** A fleece came close to filling its file system: its job was cancelled, its reads are not the stop instant's. */
  overflowed?: string;
  unwatch?: () => void;
}

export class DiskReplicatorError extends Error {
  override name = 'DiskReplicatorError';
}

/**
 * Replicates a protected VM's writable disks with its checkpoints (issue #15's design).
 *
 * Each disk's writes are recorded in a dirty bitmap per epoch. At a checkpoint's stop instant
 * ftvm's QEMU runs the actions arm() returns (one transaction, in the migration thread): the
 * epoch's bitmap is disabled, the next one starts, and a `blockdev-backup sync=none` job makes a
 * fleecing overlay that keeps the disk as it was at that instant while the guest writes on. After
 * the resume the dirty extents are read through the fleece over NBD and sent as the checkpoint's
 * disk sections; the fleece is then torn down. A checkpoint the backup did not commit merges its
 * bitmap into the next one, so its writes go with the next delta.
 */
export class DiskReplicator {
  /** The bitmap recording writes now (since the last stop instant, or since the seed began). */
  private recording: string | undefined;
  /** What the backup's replica holds, as acknowledged: the next delta applies on it. */
  private base: DiskBase | undefined;
  private pending: Pending | undefined;
  private nbdStarted = false;

  private constructor(
    private readonly qmp: QmpClient,
    private readonly vm: string,
    private readonly nodes: DiskNode[],
    private readonly runDir: string,
    /** runDir as this process sees it (the same unless QEMU runs in another mount namespace). */
    private readonly runDirHere: string,
    private readonly log: (message: string, fields?: object) => void,
    /** Test harnesses only: hash each disk's whole fleece (its state at the stop instant) per checkpoint. */
    private readonly audit: ((entry: DiskAudit) => void) | undefined,
  ) {}

  /**
   * Finds each disk's format node in QEMU (by its image path, else by libvirt's virtio alias) and
   * checks that this QEMU can replicate disks.
   */
  static async create(options: {
    qmp: QmpClient;
    vm: string;
    disks: ReplicatedDisk[];
    runDir: string;
    /** runDir as this process sees it, when QEMU runs in another mount namespace (benchmarks). */
    runDirHere?: string;
    log?: (message: string, fields?: object) => void;
    audit?: (entry: DiskAudit) => void;
  }): Promise<DiskReplicator> {
    const { qmp, vm, disks, runDir } = options;
    const runDirHere = options.runDirHere ?? runDir;
    const capabilities = await qmp.execute<{ capability: string }[]>('query-migrate-capabilities');
    if (!capabilities.some((c) => c.capability === KEEP_BLOCK_ACTIVE)) {
      throw new DiskReplicatorError(
        `VM '${vm}' has writable local disks (${disks.map((d) => d.target).join(', ')}) but its QEMU lacks ${KEEP_BLOCK_ACTIVE}: disk replication needs ftvm's patched QEMU (or declare the storage shared)`,
      );
    }
    const blocks = await qmp.execute<BlockInfo[]>('query-block');
    const nodes: DiskNode[] = disks.map((disk) => {
      const info = findBlock(blocks, disk);
      if (!info?.inserted) throw new DiskReplicatorError(`VM '${vm}': QEMU has no block device for disk ${disk.target} (${disk.source})`);
      const name = `${vm}-${disk.target}`;
      return {
        disk,
        node: info.inserted['node-name'],
        sizeBytes: info.inserted.image['virtual-size'],
        fleeceNode: `ftvm-fleece-${disk.target}`,
        fleeceFile: path.posix.join(runDir, `${name}.fleece.qcow2`),
        fleeceFileHere: path.join(runDirHere, `${name}.fleece.qcow2`),
        template: path.join(runDirHere, `${name}.fleece-template.qcow2`),
      };
    });
    await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: KEEP_BLOCK_ACTIVE, state: true }] });
    const replicator = new DiskReplicator(qmp, vm, nodes, runDir, runDirHere, options.log ?? (() => {}), options.audit);
    await replicator.cleanUpLeftovers();
    return replicator;
  }

  get disks(): { disk: string; sizeBytes: number }[] {
    return this.nodes.map((n) => ({ disk: n.disk.target, sizeBytes: n.sizeBytes }));
  }

  /** No seed acknowledged by the current backup: the next checkpoint must be preceded by one. */
  get needsSeed(): boolean {
    return this.base === undefined;
  }

  /** The backup lost or refused the disk state the deltas apply on. */
  forgetBase(): void {
    this.base = undefined;
  }

  /**
   * Copies every allocated extent of the live disks to the backup's replica. A bitmap started
   * first records every write from then on, so the first checkpoint's delta makes the replica exact
   * whatever the guest wrote while the copy ran.
   */
  async seed(sender: ReplicationSender): Promise<{ bytes: number; ms: number }> {
    const started = performance.now();
    const seed = `s${Date.now()}`;
    const bitmap = `${BITMAP_PREFIX}${seed}`;
    await this.removeBitmaps();
    this.recording = undefined;
    this.base = undefined;
    for (const n of this.nodes) await this.qmp.execute('block-dirty-bitmap-add', { node: n.node, name: bitmap, granularity: GRANULARITY, persistent: false });
    this.recording = bitmap;
    const exports: string[] = [];
    const clients: NbdClient[] = [];
    try {
      const socket = await this.nbdServer();
      const sections: DiskSection[] = [];
      for (const n of this.nodes) {
        const id = `ftvm-seed-${n.disk.target}`;
        await this.qmp.execute('block-export-add', { type: 'nbd', id, 'node-name': n.node, name: id, writable: false });
        exports.push(id);
        const client = await NbdClient.connect({ path: socket }, { exportName: id, metaContexts: ['base:allocation'], timeoutMs: 10_000 });
        clients.push(client);
        sections.push({ disk: n.disk.target, sizeBytes: n.sizeBytes, extents: readExtents(client, allocatedExtents(client, {}), {}) });
      }
      const { bytes } = await sender.sendSeed({ seed, disks: sections });
      this.base = { seed };
      const ms = performance.now() - started;
      this.log('disks seeded', { seed, bytes, ms: Math.round(ms) });
      return { bytes, ms };
    } finally {
      for (const client of clients) await client.close().catch(() => undefined);
      for (const id of exports) await this.qmp.execute('block-export-del', { id, mode: 'hard' }).catch(() => undefined);
    }
  }

  /**
   * Before the checkpoint's `migrate`, VM running: makes the fleecing overlays and returns the stop
   * instant's transaction actions (the Checkpointer arms them with the checkpoint's others) and
   * what the checkpoint's header says of its disks.
   */
  async arm(epoch: number): Promise<{ disks: { disk: string; sizeBytes: number }[]; diskBase: DiskBase; stopActions: object[] }> {
    if (!this.base || !this.recording) throw new DiskReplicatorError(`VM '${this.vm}': disks not seeded`);
    if (this.pending) await this.settle(false);
    const pending: Pending = { epoch, closing: this.recording, opening: `${BITMAP_PREFIX}${epoch}`, fleeces: new Set() };
    this.pending = pending;
    const actions: object[] = [];
    pending.unwatch = this.qmp.onEvent((event) => {
      if (event.event !== 'BLOCK_WRITE_THRESHOLD') return;
      const n = this.nodes.find((d) => `${d.fleeceNode}-file` === (event.data as { 'node-name'?: string })['node-name']);
      if (!n || pending.overflowed) return;
      // the guest's next copy-before-write could fail with an I/O error the guest sees: end the
      // fleece now and let this checkpoint fail (its writes go with the next one)
      pending.overflowed = `the fleecing overlay of ${n.disk.target} passed its write threshold`;
      this.log('fleecing overflow: checkpoint abandoned', { disk: n.disk.target });
      void this.qmp.execute('block-job-cancel', { device: n.fleeceNode, force: true }).catch(() => undefined);
    });
    for (const n of this.nodes) {
      await this.addFleece(n);
      pending.fleeces.add(n);
      actions.push(
        { type: 'block-dirty-bitmap-disable', data: { node: n.node, name: pending.closing } },
        { type: 'block-dirty-bitmap-add', data: { node: n.node, name: pending.opening, granularity: GRANULARITY, persistent: false } },
        { type: 'blockdev-backup', data: { 'job-id': n.fleeceNode, device: n.node, target: n.fleeceNode, sync: 'none', 'auto-finalize': true, 'auto-dismiss': true } },
      );
    }
    return { disks: this.disks, diskBase: this.base, stopActions: actions };
  }

  /**
   * After the stop instant (the VM resumed, or stays stopped after a switchover's last
   * checkpoint): each disk's writes of the epoch, read through its fleece as they were then.
   */
  async *sections(): AsyncGenerator<DiskSection> {
    const pending = this.pending;
    if (!pending) throw new DiskReplicatorError('no checkpoint armed');
    const socket = await this.nbdServer();
    for (const [index, n] of this.nodes.entries()) {
      const id = `ftvm-delta-${n.disk.target}`;
      await this.qmp.execute('block-export-add', { type: 'nbd', id, 'node-name': n.fleeceNode, name: id, writable: false, bitmaps: [pending.closing] });
      const client = await NbdClient.connect({ path: socket }, { exportName: id, metaContexts: ['base:allocation', `qemu:dirty-bitmap:${pending.closing}`], timeoutMs: 10_000 });
      try {
        const extents = readExtents(client, dirtyExtents(client, { bitmap: `qemu:dirty-bitmap:${pending.closing}` }), {});
        yield { disk: n.disk.target, sizeBytes: n.sizeBytes, extents: index === 0 ? pauseAfterFirst(extents, 'delta-read', { epoch: pending.epoch, disk: n.disk.target }) : extents };
        if (pending.overflowed) throw new DiskReplicatorError(pending.overflowed);
        if (this.audit) this.audit({ epoch: pending.epoch, disk: n.disk.target, sha256: await hashExport(client, n.sizeBytes) });
      } finally {
        await client.close().catch(() => undefined);
        await this.qmp.execute('block-export-del', { id, mode: 'hard' }).catch(() => undefined);
      }
    }
  }

  /**
   * Ends the armed checkpoint: the fleeces go; if the stop instant happened, a committed epoch
   * drops its bitmap and one not committed merges it into the next (nothing is lost).
   */
  async settle(committed: boolean): Promise<void> {
    const pending = this.pending;
    if (!pending) return;
    this.pending = undefined;
    pending.unwatch?.();
    if (committed && pending.overflowed) throw new DiskReplicatorError(`${pending.overflowed}, but the checkpoint was committed`);
    await this.qmp.execute(ARM_COMMAND, { actions: [] }).catch(() => undefined);
    for (const n of pending.fleeces) await this.removeFleece(n);
    const bitmaps = await this.bitmapNames();
    const ran = this.nodes.every((n) => bitmaps.get(n.node)?.has(pending.opening));
    if (!ran) {
      // the stop instant never came (migration failed before it): the epoch's bitmap records on
      for (const n of this.nodes) if (bitmaps.get(n.node)?.has(pending.opening)) await this.qmp.execute('block-dirty-bitmap-remove', { node: n.node, name: pending.opening }).catch(() => undefined);
      return;
    }
    for (const n of this.nodes) {
      if (!committed) await this.qmp.execute('block-dirty-bitmap-merge', { node: n.node, target: pending.opening, bitmaps: [pending.closing] });
      await this.qmp.execute('block-dirty-bitmap-remove', { node: n.node, name: pending.closing });
    }
    this.recording = pending.opening;
    if (committed) this.base = { epoch: pending.epoch };
  }

  /** Removes what a checkpoint left armed (the agent stops protecting). Bitmaps stay: cheap, and a reseed replaces them. */
  async close(): Promise<void> {
    await this.settle(false).catch(() => undefined);
  }

  private async addFleece(n: DiskNode): Promise<void> {
    await fs.rm(n.fleeceFileHere, { force: true });
    if (!(await exists(n.template))) {
      await fs.mkdir(path.dirname(n.template), { recursive: true });
      const tmp = `${n.template}.${process.pid}.tmp`;
      await run('qemu-img', ['create', '-q', '-f', 'qcow2', tmp, String(n.sizeBytes)], { timeout: 30_000 });
      await fs.rename(tmp, n.template);
    }
    await fs.copyFile(n.template, n.fleeceFileHere);
    await this.qmp.execute('blockdev-add', {
      driver: 'qcow2',
      'node-name': n.fleeceNode,
      file: { driver: 'file', filename: n.fleeceFile, 'node-name': `${n.fleeceNode}-file` },
      backing: n.node,
    });
    // A full fleece file system would fail the guest's own writes (QEMU 7.2's backup job breaks the
    // guest write when its copy-before-write fails): stop the fleece well before that.
    const { bavail, bsize } = await fs.statfs(path.dirname(n.fleeceFileHere));
    const threshold = Math.floor((bavail * bsize) / (2 * this.nodes.length));
    await this.qmp.execute('block-set-write-threshold', { 'node-name': `${n.fleeceNode}-file`, 'write-threshold': threshold });
  }

  private async removeFleece(n: DiskNode): Promise<void> {
    const jobs = await this.qmp.execute<{ device: string }[]>('query-block-jobs').catch(() => []);
    if (jobs.some((j) => j.device === n.fleeceNode)) {
      const ended = this.qmp.waitForEvent('BLOCK_JOB_CANCELLED', { timeoutMs: 10_000, predicate: (e) => (e.data as { device?: string }).device === n.fleeceNode });
      ended.catch(() => undefined);
      await this.qmp.execute('block-job-cancel', { device: n.fleeceNode, force: true }).catch(() => undefined);
      await ended.catch(() => undefined);
    }
    await this.qmp.execute('blockdev-del', { 'node-name': n.fleeceNode }).catch((error: Error) => {
      if (!/not found|cannot find|failed to find/i.test(error.message)) this.log('cannot remove a fleecing node', { node: n.fleeceNode, err: error.message });
    });
    await fs.rm(n.fleeceFileHere, { force: true });
  }

  /** QEMU's NBD server for this VM; returns its socket as this process reaches it. */
  private async nbdServer(): Promise<string> {
    const socket = path.posix.join(this.runDir, `${this.vm}.nbd`);
    const here = path.join(this.runDirHere, `${this.vm}.nbd`);
    if (!this.nbdStarted) {
      await this.qmp.execute('nbd-server-stop').catch(() => undefined);
      await fs.rm(here, { force: true });
      // 7.2 takes the legacy SocketAddress form here ({type, data})
      await this.qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: socket } } });
      this.nbdStarted = true;
    }
    return here;
  }

  private async bitmapNames(): Promise<Map<string, Set<string>>> {
    const blocks = await this.qmp.execute<BlockInfo[]>('query-block');
    const names = new Map<string, Set<string>>();
    for (const b of blocks) if (b.inserted) names.set(b.inserted['node-name'], new Set((b.inserted['dirty-bitmaps'] ?? []).map((m) => m.name)));
    return names;
  }

  private async removeBitmaps(): Promise<void> {
    const names = await this.bitmapNames();
    for (const n of this.nodes) {
      for (const name of names.get(n.node) ?? []) {
        if (name.startsWith(BITMAP_PREFIX)) await this.qmp.execute('block-dirty-bitmap-remove', { node: n.node, name });
      }
    }
  }

  /** A previous agent's fleeces and exports (it died mid-checkpoint). */
  private async cleanUpLeftovers(): Promise<void> {
    await this.qmp.execute(ARM_COMMAND, { actions: [] }).catch(() => undefined);
    for (const n of this.nodes) await this.removeFleece(n);
  }
}

/** A disk's whole content at a checkpoint's stop instant (test harnesses compare it with the replica's). */
export interface DiskAudit {
  epoch: number;
  disk: string;
  sha256: string;
}

const AUDIT_READ_BYTES = 4 * 1024 * 1024;

async function hashExport(client: NbdClient, sizeBytes: number): Promise<string> {
  const hash = createHash('sha256');
  for (let offset = 0; offset < sizeBytes; offset += AUDIT_READ_BYTES) hash.update(await client.read(offset, Math.min(AUDIT_READ_BYTES, sizeBytes - offset)));
  return hash.digest('hex');
}

/** The block device of a disk: by its image path, else by libvirt's alias for a virtio disk (vdb → virtio-disk1). */
function findBlock(blocks: BlockInfo[], disk: ReplicatedDisk): BlockInfo | undefined {
  const byPath = blocks.find((b) => b.inserted && (b.inserted.image.filename === disk.source || b.inserted.file === disk.source));
  if (byPath) return byPath;
  const m = /^vd([a-z]+)$/.exec(disk.target);
  if (!m) return undefined;
  const index = [...m[1]!].reduce((n, c) => n * 26 + (c.charCodeAt(0) - 96), 0) - 1;
  return blocks.find((b) => b.qdev !== undefined && new RegExp(`(^|/)virtio-disk${index}(/|$)`).test(b.qdev));
}

async function exists(file: string): Promise<boolean> {
  return fs.access(file).then(
    () => true,
    () => false,
  );
}
