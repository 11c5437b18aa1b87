import { Etcd3, type Watcher } from 'etcd3';
import { z } from 'zod';

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
  keep: z.number().int().positive(),
  /** A full checkpoint at least every this many (the others are incremental with ftvm's QEMU). */
  fullEvery: z.number().int().positive().optional(),
  /** Bumped on every change; a writer compares it to avoid lost updates. */
  generation: z.number().int().nonnegative(),
  updatedAt: z.string(),
  /** Why the record last changed (protect, failover, switchover, reprotect, unprotect). */
  reason: z.string(),
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

export class RecordConflictError extends Error {
  override name = 'RecordConflictError';
}

export class VmRecords {
  constructor(
    private readonly client: Etcd3,
    private readonly prefix: string,
    private readonly timeoutMs: number,
  ) {}

  key(vm: string): string {
    return `${this.prefix}/vms/${vm}/spec`;
  }

  async get(vm: string): Promise<VmRecord | undefined> {
    return (await this.getVersioned(vm))?.record;
  }

  /** The record with its etcd mod revision (what update's compare-and-swap checks). */
  private async getVersioned(vm: string): Promise<{ record: VmRecord; modRevision: string } | undefined> {
    const response = await this.client.get(this.key(vm)).options({ deadline: this.deadline() }).exec();
    const kv = response.kvs[0];
    return kv ? { record: parseRecord(kv.value.toString(), this.key(vm)), modRevision: kv.mod_revision } : undefined;
  }

  async list(): Promise<VmRecord[]> {
    const all = await this.client.getAll().prefix(`${this.prefix}/vms/`).options({ deadline: this.deadline() }).strings();
    return Object.entries(all)
      .filter(([key]) => key.endsWith('/spec'))
      .map(([key, text]) => parseRecord(text, key));
  }

  /** Creates the record unless one exists; returns the one that is there afterwards. */
  async create(record: Omit<VmRecord, 'generation' | 'updatedAt'>): Promise<VmRecord> {
    const full: VmRecord = { ...record, generation: 1, updatedAt: new Date().toISOString() };
    const key = this.key(record.name);
    const result = await this.client
      .if(key, 'Create', '==', 0)
      .then(this.client.put(key).value(JSON.stringify(full)))
      .options({ deadline: this.deadline() })
      .commit();
    if (result.succeeded) return full;
    return (await this.get(record.name))!;
  }

  /**
   * Applies `change` to the current record, compare-and-swap on its generation (retried a few
   * times when another writer got there first).
   */
  async update(vm: string, change: (record: VmRecord) => Partial<VmRecord> | undefined): Promise<VmRecord> {
    for (let attempt = 0; attempt < 5; attempt++) {
      const versioned = await this.getVersioned(vm);
      if (!versioned) throw new RecordConflictError(`no record for VM '${vm}' in etcd (${this.key(vm)})`);
      const current = versioned.record;
      const patch = change(current);
      if (!patch) return current;
      const next: VmRecord = { ...current, ...patch, name: current.name, generation: current.generation + 1, updatedAt: new Date().toISOString() };
      const key = this.key(vm);
      const result = await this.client
        .if(key, 'Mod', '==', versioned.modRevision)
        .then(this.client.put(key).value(JSON.stringify(next)))
        .options({ deadline: this.deadline() })
        .commit();
      if (result.succeeded) return next;
    }
    throw new RecordConflictError(`record of '${vm}' kept changing under us`);
  }

  async remove(vm: string): Promise<void> {
    await this.client.delete().key(this.key(vm)).options({ deadline: this.deadline() });
  }

  /** Calls `listener` with every record as it changes (and undefined when one is deleted). */
  async watch(listener: (vm: string, record: VmRecord | undefined) => void, onError: (error: Error) => void): Promise<() => Promise<void>> {
    const watcher: Watcher = await this.client.watch().prefix(`${this.prefix}/vms/`).create();
    watcher.on('put', (kv) => {
      const key = kv.key.toString();
      if (!key.endsWith('/spec')) return;
      try {
        const record = parseRecord(kv.value.toString(), key);
        listener(record.name, record);
      } catch (error) {
        onError(error as Error);
      }
    });
    watcher.on('delete', (kv) => {
      const key = kv.key.toString();
      if (key.endsWith('/spec')) listener(key.slice(`${this.prefix}/vms/`.length, -'/spec'.length), undefined);
    });
    watcher.on('error', onError);
    return () => watcher.cancel();
  }

  private deadline(): Date {
    return new Date(Date.now() + this.timeoutMs);
  }
}

function parseRecord(text: string, key: string): VmRecord {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    throw new Error(`${key}: not JSON`);
  }
  const result = vmRecordSchema.safeParse(value);
  if (!result.success) throw new Error(`${key}: bad VM record: ${result.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`);
  return result.data;
}
