import type { QmpClient } from '@ftvm/qmp';
import { serviceNics } from '@ftvm/libvirt';

/** QOM type of ftvm's guest-output buffer (QEMU patch 0016). */
export const OUTPUT_BUFFER_TYPE = 'x-ftvm-output-buffer';
const QUERY_COMMAND = 'x-ftvm-query-output-buffers';
const RELEASE_COMMAND = 'x-ftvm-output-release';
/** The transaction action that closes the open epoch; armed to run at the checkpoint's stop. */
export const OUTPUT_CLOSE_ACTION = 'x-ftvm-output-close';
const ID_PREFIX = 'ftvm-out-';
const QMP_TIMEOUT_MS = 5_000;

/** What `x-ftvm-query-output-buffers` says of one buffer. */
export interface OutputBufferInfo {
  id: string;
  netdev: string;
  'open-packets': number;
  'open-bytes': number;
  'held-packets': number;
  'held-bytes': number;
  'closed-epochs': number[];
  'last-closed-epoch'?: number;
  /** Released, not passed on yet (the netdev could not take them). */
  'unsent-packets': number;
  'unsent-bytes': number;
  'released-packets': number;
  'released-bytes': number;
  'dropped-packets': number;
  'dropped-bytes': number;
}

/** Output commit cannot be given to this VM (its QEMU, its NICs): protection must not go on without it. */
export class OutputCommitError extends Error {
  override name = 'OutputCommitError';
}

/**
 * Output commit for one VM (Remus's rule): every packet the guest sends on a libvirt-managed NIC
 * is held in QEMU (ftvm's `x-ftvm-output-buffer`, one per NIC, on the netdev's guest-output
 * queue) in the epoch open when it was sent. Each checkpoint closes the epoch at its stop instant
 * (an armed stop action, in the same stopped instant as the memory it captures) and the epoch is
 * released once the backup has acknowledged that checkpoint — never before. A checkpoint that
 * fails is never released by name: the next one's release covers it. What a dead primary still
 * holds dies with it. NICs outside libvirt's `<interface>` (a test probe's raw NIC) are not held.
 */
export class OutputCommit {
  private lastClosed = 0;

  private constructor(
    private readonly qmp: QmpClient,
    private readonly vm: string,
    /** Buffer ids this object added (removed again by detach). */
    readonly buffers: readonly { id: string; netdev: string }[],
  ) {}

  /**
   * Puts a buffer on each of the domain's NICs (or finds the ones an earlier agent left). Throws
   * OutputCommitError when the VM's QEMU lacks ftvm's output buffer or the domain has no NIC.
   */
  static async attach(qmp: QmpClient, vm: string, domainXml: string): Promise<OutputCommit> {
    const existing = await queryBuffers(qmp).catch((error: Error) => {
      if (/CommandNotFound|has not been found/i.test(error.message)) {
        throw new OutputCommitError(`VM '${vm}': its QEMU has no output commit (ftvm's ${OUTPUT_BUFFER_TYPE}, patch 0016): refusing to protect it with output commit; run it on ftvm's QEMU or protect it without output commit`);
      }
      throw error;
    });
    const nics = serviceNics(domainXml);
    if (nics.length === 0) throw new OutputCommitError(`VM '${vm}': output commit holds the output of libvirt <interface> NICs, and the domain has none`);
    const devices = await nicDevices(qmp);
    const buffers: { id: string; netdev: string }[] = [];
    for (const [index, nic] of nics.entries()) {
      // by MAC: a migratable XML has no aliases, and libvirt's netdev ids are its own business
      const device = nic.mac ? devices.find((d) => d.mac === nic.mac) : undefined;
      if (!device) throw new OutputCommitError(`VM '${vm}': <interface> #${index + 1} (MAC ${nic.mac ?? 'none'}) has no NIC in QEMU with that MAC and a netdev: output commit cannot hold its output`);
      const id = `${ID_PREFIX}${device.id}`;
      if (!existing.some((b) => b.id === id)) {
        await qmp
          .execute('object-add', { 'qom-type': OUTPUT_BUFFER_TYPE, id, netdev: device.netdev, queue: 'rx' }, { timeoutMs: QMP_TIMEOUT_MS })
          .catch((error: Error) => {
            throw new OutputCommitError(`VM '${vm}': cannot hold the output of NIC ${device.id} (netdev ${device.netdev}): ${error.message}`);
          });
      }
      buffers.push({ id, netdev: device.netdev });
    }
    const commit = new OutputCommit(qmp, vm, buffers);
    commit.lastClosed = Math.max(0, ...existing.map((b) => b['last-closed-epoch'] ?? 0));
    return commit;
  }

  /** The stop action that closes the epoch `epoch` (armed with the checkpoint's other stop actions). */
  stopActions(epoch: number): object[] {
    if (epoch <= this.lastClosed) throw new OutputCommitError(`VM '${this.vm}': epoch ${epoch} is not after the last closed one (${this.lastClosed})`);
    return [{ type: OUTPUT_CLOSE_ACTION, data: { epoch } }];
  }

  /** The backup acknowledged checkpoint `epoch`: its output (and any unreleased before it) may leave. */
  async release(epoch: number): Promise<{ packets: number; bytes: number }> {
    this.lastClosed = Math.max(this.lastClosed, epoch);
    return this.qmp.execute<{ packets: number; bytes: number }>(RELEASE_COMMAND, { epoch }, { timeoutMs: QMP_TIMEOUT_MS });
  }

  /** What is held now, per buffer. */
  async query(): Promise<OutputBufferInfo[]> {
    const ids = new Set(this.buffers.map((b) => b.id));
    return (await queryBuffers(this.qmp)).filter((b) => ids.has(b.id));
  }

  /**
   * Output commit ends (unprotect, the policy turned off): the buffers go, and with them
   * everything they hold leaves in order — nothing protects the VM any more, so nothing can be lost
   * by a failover.
   */
  async detach(): Promise<void> {
    for (const { id } of this.buffers) await this.qmp.execute('object-del', { id }, { timeoutMs: QMP_TIMEOUT_MS }).catch(() => undefined);
  }
}

/** QEMU's NIC devices (those with a netdev and a MAC) under /machine/peripheral. */
async function nicDevices(qmp: QmpClient): Promise<{ id: string; mac: string; netdev: string }[]> {
  const children = await qmp.execute<{ name: string; type: string }[]>('qom-list', { path: '/machine/peripheral' }, { timeoutMs: QMP_TIMEOUT_MS });
  const nics: { id: string; mac: string; netdev: string }[] = [];
  for (const child of children.filter((c) => c.type.startsWith('child<'))) {
    const path = `/machine/peripheral/${child.name}`;
    const props = await qmp.execute<{ name: string }[]>('qom-list', { path }, { timeoutMs: QMP_TIMEOUT_MS });
    if (!props.some((p) => p.name === 'netdev') || !props.some((p) => p.name === 'mac')) continue;
    const [mac, netdev] = await Promise.all([
      qmp.execute<string>('qom-get', { path, property: 'mac' }, { timeoutMs: QMP_TIMEOUT_MS }),
      qmp.execute<string>('qom-get', { path, property: 'netdev' }, { timeoutMs: QMP_TIMEOUT_MS }),
    ]);
    if (netdev) nics.push({ id: child.name, mac: mac.toLowerCase(), netdev });
  }
  return nics;
}

async function queryBuffers(qmp: QmpClient): Promise<OutputBufferInfo[]> {
  return qmp.execute<OutputBufferInfo[]>(QUERY_COMMAND, undefined, { timeoutMs: QMP_TIMEOUT_MS });
}
