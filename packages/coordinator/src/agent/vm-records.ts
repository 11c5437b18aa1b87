import { z } from 'zod';
import { normalizePrefix, specKey, vmOfSpecKey, vmsPrefix, type CallDeadline, type ClusterStore, type HostLease } from '../lease/index.js';

/**
 * The cluster's word on each protected VM, kept in etcd beside its owner key: which domain, which
 * two hosts, and whether the backup is being fed. `primary` is the host that last ran it (the
 * owner key says who may run it now).
 */
export const vmRecordSchema = z.object({
  name: z.string().min(1),
  /** FT-ready domain XML (ftvm metadata and QMP socket), the same on both hosts. */
  xml: z.string().min(1),
  primary: z.string().min(1),
  backup: z.string().min(1),
  /** false after a failover until `ftvm reprotect`, and after `ftvm unprotect`. */
  protected: z.boolean(),
  checkpointIntervalMs: z.number().int().positive(),
  /** Hold the guest's output until its checkpoint is committed (absent: off). */
  outputCommit: z.boolean().optional(),
  keep: z.number().int().positive(),
  /** A full checkpoint at least every this many (the others are incremental with ftvm's QEMU). */
  fullEvery: z.number().int().positive().optional(),
  /**
   * When the current run of protection began (ms, the clock that names checkpoint epochs): only
   * checkpoints newer than this may be taken over from. A store can hold checkpoints of an earlier
   * run (from before an unprotect, or from the last time this host was the backup); resuming one
   * would bring back a past state of the VM. Set by protect, reprotect, a resumed protection and
   * every move. Absent in records written before it existed: any checkpoint counts.
   */
  checkpointsSince: z.number().int().nonnegative().optional(),
  /** Bumped on every change; a writer compares it to avoid lost updates. */
  generation: z.number().int().nonnegative(),
  updatedAt: z.string(),
  /** Why the record last changed (protect, failover, switchover, reprotect, unprotect). */
  reason: z.string(),
  /** The user stopped the VM (guest poweroff, `virsh shutdown`, `virsh destroy`): it stays down on both hosts. */
  stopped: z.object({ by: z.string(), reason: z.string(), at: z.string() }).optional(),
  /** An agent stop left the VM running on `by` without protection; that agent's return resumes it. */
  suspended: z
    .object({
      by: z.string(),
      at: z.string(),
      /**
       * agent-stop (absent in older records): that agent's return resumes it; backup-lost: the
       * primary lost its backup with output commit on and runs on unprotected (held output would
       * block the VM) until the backup answers again.
       */
      why: z.enum(['agent-stop', 'backup-lost']).optional(),
    })
    .optional(),
  /** The last move of the VM between hosts, as the host that resumed it measured it. */
  lastMove: z
    .object({
      kind: z.enum(['failover', 'switchover']),
      from: z.string(),
      to: z.string(),
      epoch: z.number(),
      stopNs: z.string(),
      resumeNs: z.string(),
      at: z.string(),
      /** The new host's last heartbeat from the old primary (failover; ns, host realtime). */
      lastBeatNs: z.string().optional(),
    })
    .optional(),
});
export type VmRecord = z.infer<typeof vmRecordSchema>;

/** update() found no record, or another writer changed it on every attempt. */
export class RecordConflictError extends Error {
  override name = 'RecordConflictError';
}

/** A value at a record's key that is not a valid VmRecord (or a record refused before writing it). */
export class InvalidRecordError extends Error {
  override name = 'InvalidRecordError';
  constructor(
    readonly key: string,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

export interface VmRecordsOptions {
  /**
   * The deadline of each etcd call (a get, a list, the create, each read and write of an update,
   * a remove). Default: the store's requestTimeoutMs.
   */
  timeoutMs?: number;
}

/** Besides onError (passed on its own): what a records watch reports. */
export interface RecordWatchOptions {
  /** The watch is established again after an outage; what changed meanwhile was reported just before. */
  onResumed?: () => void;
  /** Between attempts to re-establish it. Default: the store's requestTimeoutMs (at least 100 ms). */
  retryMs?: number;
}

/** How many times update() re-reads and re-applies its change when another writer got in first. */
const UPDATE_ATTEMPTS = 5;

/**
 * The VM records in etcd (`<prefix>/vms/<vm>/spec`), on a ClusterStore — in the agent, the one of
 * its HostLease (`VmRecords.onLease`), so records, owner keys and the lease share one connection,
 * its reconnects and its no-hidden-retries policy. Every call has a deadline and fails with
 * EtcdCallError when etcd does not answer in time; a value that is not a valid record is refused with an error naming the
 * key and each bad field, both when read and before a write.
 */
export class VmRecords {
  readonly prefix: string;
  private readonly deadline: CallDeadline;

  constructor(
    private readonly store: ClusterStore,
    prefix: string,
    options: VmRecordsOptions = {},
  ) {
    this.prefix = normalizePrefix(prefix);
    if (options.timeoutMs !== undefined && !(options.timeoutMs > 0)) throw new Error(`VmRecords: timeoutMs must be positive, got ${options.timeoutMs}`);
    this.deadline = options.timeoutMs === undefined ? {} : { timeoutMs: options.timeoutMs };
  }

  /** The records under the lease's prefix, on the lease's connection (closed with the lease). */
  static onLease(lease: HostLease, options: VmRecordsOptions = {}): VmRecords {
    return new VmRecords(lease.store, lease.prefix, options);
  }

  /** The record's key; throws for a name that cannot be a VM's (letters, digits, _ . -). */
  key(vm: string): string {
    return specKey(this.prefix, vm);
  }

  async get(vm: string): Promise<VmRecord | undefined> {
    return (await this.getEntry(vm))?.record;
  }

  /** The record with its etcd mod revision (what update's compare-and-swap checks). */
  async getEntry(vm: string): Promise<{ record: VmRecord; modRevision: string } | undefined> {
    const key = this.key(vm);
    const entry = await this.store.getJsonEntry(key, this.deadline);
    return entry && { record: checkRecord(key, entry.value, vm), modRevision: entry.modRevision };
  }

  /** Every record, in key order. Throws (naming the key) if one of them is not a valid record. */
  async list(): Promise<VmRecord[]> {
    const all = await this.store.listJson(vmsPrefix(this.prefix), (key) => vmOfSpecKey(this.prefix, key) !== undefined, this.deadline);
    return [...all].map(([key, value]) => checkRecord(key, value, vmOfSpecKey(this.prefix, key)));
  }

  /**
   * Creates the record unless one exists (one transaction); returns the one that is there
   * afterwards — this one with generation 1, or the existing one untouched.
   */
  async create(record: Omit<VmRecord, 'generation' | 'updatedAt'>): Promise<VmRecord> {
    const key = this.key(record.name);
    const full = checkRecord(key, { ...record, generation: 1, updatedAt: new Date().toISOString() }, record.name);
    const { created, entry } = await this.store.createJson(key, full, this.deadline);
    return created ? full : checkRecord(key, entry.value, record.name);
  }

  /**
   * Applies `change` to the current record (undefined: nothing to change) and writes the result,
   * generation + 1, by compare-and-swap on the record's mod revision. When another writer got
   * there first the record is read again and `change` applied again, up to 5 times; then
   * RecordConflictError. RecordConflictError too when there is no record.
   */
  async update(vm: string, change: (record: VmRecord) => Partial<VmRecord> | undefined | Promise<Partial<VmRecord> | undefined>): Promise<VmRecord> {
    const key = this.key(vm);
    for (let attempt = 1; attempt <= UPDATE_ATTEMPTS; attempt++) {
      const current = await this.getEntry(vm);
      if (!current) throw new RecordConflictError(`no record for VM '${vm}' in etcd (${key})`);
      const patch = await change(current.record);
      if (!patch) return current.record;
      const next = checkRecord(key, { ...current.record, ...patch, name: current.record.name, generation: current.record.generation + 1, updatedAt: new Date().toISOString() }, vm);
      if (await this.store.putJson(key, next, { ...this.deadline, ifModRevision: current.modRevision })) return next;
    }
    throw new RecordConflictError(`record of '${vm}' (${key}) was changed by another writer on each of ${UPDATE_ATTEMPTS} attempts`);
  }

  /** Deletes the record; true if there was one. */
  async remove(vm: string): Promise<boolean> {
    return this.store.delete(this.key(vm), this.deadline);
  }

  /**
   * Calls `listener` with every record there is, then with every change (undefined when a record
   * is deleted). It is a RangeWatch on the store's connection: when the watch breaks (etcd
   * unreachable, the connection redialled, a compaction) `onError` gets an EtcdCallError once per
   * outage, the watch re-establishes itself, reports what changed meanwhile (final values only)
   * and calls `options.onResumed`. A value that is not a valid record goes to `onError` as an
   * InvalidRecordError and is otherwise skipped. Resolves with the function that stops watching;
   * rejects (EtcdCallError) when etcd cannot be reached to start it.
   */
  async watch(
    listener: (vm: string, record: VmRecord | undefined) => void,
    onError: (error: Error) => void,
    options: RecordWatchOptions = {},
  ): Promise<() => Promise<void>> {
    return this.store.watchPrefix<unknown>(
      vmsPrefix(this.prefix),
      (key, value) => {
        const vm = vmOfSpecKey(this.prefix, key)!;
        if (value === undefined) return listener(vm, undefined);
        let record: VmRecord;
        try {
          record = checkRecord(key, value, vm);
        } catch (error) {
          onError(error as Error);
          return;
        }
        listener(vm, record);
      },
      {
        ...options,
        // Owner keys (a plain host name) and anything else under vms/ are not records.
        filter: (key) => vmOfSpecKey(this.prefix, key) !== undefined,
        onInvalid: (key, error) => onError(new InvalidRecordError(key, error.message, { cause: error })),
        onError,
      },
    );
  }
}

/**
 * `value` as a VmRecord (unknown fields dropped), or InvalidRecordError naming `key` and each bad
 * field; also when its name is not `vm`, the VM its key is for.
 */
export function checkRecord(key: string, value: unknown, vm?: string): VmRecord {
  const result = vmRecordSchema.safeParse(value);
  if (!result.success) {
    throw new InvalidRecordError(key, `${key}: bad VM record: ${result.error.issues.map((i) => `${i.path.join('.') || '(the record)'}: ${i.message}`).join('; ')}`);
  }
  if (vm !== undefined && result.data.name !== vm) throw new InvalidRecordError(key, `${key}: bad VM record: name: ${JSON.stringify(result.data.name)} is not the VM of its key (${vm})`);
  return result.data;
}
