import type { Duplex, Readable } from 'node:stream';
import {
  encodeFrameHeader,
  encodeJsonFrame,
  FrameType,
  MAX_FRAME_PAYLOAD,
  type CheckpointHeader,
  type CheckpointTrailer,
  type ReceiverReply,
} from './frames.js';

export class ReplicationError extends Error {
  override name = 'ReplicationError';
  constructor(
    message: string,
    readonly epoch: number,
    /** The receiver's error code on a nack (no-space, permission, verify, …), or the local cause. */
    readonly code: string,
  ) {
    super(`checkpoint ${epoch}: ${message}`);
  }
}

export interface SendOptions {
  header: CheckpointHeader;
  /** The migration stream, as QEMU writes it. */
  data: Readable;
  /** Resolves after the stream with the STOP/RESUME stamps of this checkpoint. */
  trailer: () => Promise<CheckpointTrailer>;
  /** From the end of the data to the receiver's ack (fsync included). */
  ackTimeoutMs?: number;
  /**
   * Once this settles, the send buffer is unbounded for the rest of the checkpoint: the source
   * VM is stopped (QEMU's final phase), and every moment QEMU waits to write is guest-visible pause.
   */
  unthrottle?: Promise<unknown>;
}

/**
 * The primary's side of replication over one channel to the receiver (an SSH exec channel in
 * production, any duplex in tests).
 *
 * Reading from QEMU waits for the link once `maxBufferedBytes` are queued. A deep queue is costly:
 * with up to 256 MiB queued, the sending process spent about twice the CPU per byte (queued data
 * falls out of the cache before ssh2 copies and encrypts it, and its buffers outlive the young
 * generation); on the lab's 2-core host full checkpoints went from ~110 to ~150 MB/s with 4 MiB.
 * QEMU's final, stopped phase must not wait for the link, though — that time is guest-visible
 * pause — so `unthrottle` lifts the limit for the rest of a checkpoint.
 */
export class ReplicationSender {
  private lineBuffer = '';
  private readonly waiters = new Map<number, { resolve: (r: ReceiverReply) => void; reject: (e: Error) => void }>();
  private closedReason: string | undefined;
  /** The stream being sent, so a dead link can stop reading it (QEMU then fails the migration). */
  private currentData: Readable | undefined;

  constructor(
    private readonly channel: Duplex,
    private readonly maxBufferedBytes = 4 * 1024 * 1024,
  ) {
    channel.on('data', (chunk: Buffer) => this.onReplyData(chunk));
    channel.on('error', (error: Error) => this.fail(`channel error: ${error.message}`));
    channel.on('close', () => this.fail('receiver channel closed'));
  }

  get isOpen(): boolean {
    return this.closedReason === undefined;
  }

  async send({ header, data, trailer, ackTimeoutMs = 30_000, unthrottle }: SendOptions): Promise<ReceiverReply & { type: 'ack' }> {
    const { epoch } = header;
    if (this.closedReason !== undefined) throw new ReplicationError(this.closedReason, epoch, 'closed');
    const reply = new Promise<ReceiverReply>((resolve, reject) => this.waiters.set(epoch, { resolve, reject }));
    reply.catch(() => undefined);
    this.channel.write(encodeJsonFrame(FrameType.Header, header));
    this.currentData = data;
    let throttled = true;
    const lifted = unthrottle?.then(
      () => void (throttled = false),
      () => void (throttled = false),
    );
    try {
      for await (const chunk of data as AsyncIterable<Buffer>) {
        for (let offset = 0; offset < chunk.length; offset += MAX_FRAME_PAYLOAD) {
          const slice = chunk.subarray(offset, offset + MAX_FRAME_PAYLOAD);
          // two writes, not a joined copy: ssh2 copies both into its packets anyway
          this.channel.write(encodeFrameHeader(FrameType.Data, slice.length));
          this.channel.write(slice);
        }
        if (throttled && this.channel.writableLength > this.maxBufferedBytes) await this.drained(epoch, data, lifted);
        if (this.closedReason !== undefined) throw new ReplicationError(this.closedReason, epoch, 'closed');
      }
    } catch (error) {
      if (this.closedReason === undefined) this.channel.write(encodeJsonFrame(FrameType.Abort, {}));
      this.waiters.delete(epoch);
      if (error instanceof ReplicationError) throw error;
      if (this.closedReason !== undefined) throw new ReplicationError(this.closedReason, epoch, 'closed');
      throw new ReplicationError(`stream failed: ${(error as Error).message}`, epoch, 'source');
    } finally {
      this.currentData = undefined;
    }
    this.channel.write(encodeJsonFrame(FrameType.Trailer, await trailer()));
    const answer = await withTimeout(reply, ackTimeoutMs, () => {
      this.waiters.delete(epoch);
      return new ReplicationError(`no acknowledgement within ${ackTimeoutMs} ms`, epoch, 'timeout');
    });
    if (answer.type === 'nack') throw new ReplicationError(`backup refused it: ${answer.message}`, epoch, answer.code);
    return answer;
  }

  close(): void {
    this.channel.end();
  }

  /**
   * Waits for the channel's queue to empty, until `lifted` settles, or until the source is
   * destroyed: a checkpoint given up (its deadline, a failed migration) must not stay parked here
   * behind a channel that is open but no longer drains (a stalled receiver).
   */
  private drained(epoch: number, source: Readable, lifted: Promise<void> | undefined): Promise<void> {
    return new Promise((resolve, reject) => {
      const cleanup = () => {
        this.channel.off('drain', done);
        this.channel.off('close', onClose);
        source.off('close', done);
      };
      const done = () => (cleanup(), resolve());
      const onClose = () => (cleanup(), reject(new ReplicationError('receiver channel closed', epoch, 'closed')));
      this.channel.once('drain', done);
      this.channel.once('close', onClose);
      source.once('close', done);
      void lifted?.then(done);
    });
  }

  private onReplyData(chunk: Buffer): void {
    this.lineBuffer += chunk.toString('utf8');
    let newline: number;
    while ((newline = this.lineBuffer.indexOf('\n')) >= 0) {
      const line = this.lineBuffer.slice(0, newline);
      this.lineBuffer = this.lineBuffer.slice(newline + 1);
      let reply: ReceiverReply;
      try {
        reply = JSON.parse(line) as ReceiverReply;
      } catch {
        this.fail(`receiver sent a line that is not JSON: ${JSON.stringify(line.slice(0, 120))}`);
        return;
      }
      const waiter = this.waiters.get(reply.epoch);
      this.waiters.delete(reply.epoch);
      waiter?.resolve(reply);
    }
  }

  private fail(reason: string): void {
    if (this.closedReason !== undefined) return;
    this.closedReason = reason;
    this.currentData?.destroy(new Error(reason));
    for (const [epoch, waiter] of this.waiters) waiter.reject(new ReplicationError(reason, epoch, 'closed'));
    this.waiters.clear();
  }
}

function withTimeout<T>(promise: Promise<T>, ms: number, onTimeout: () => Error): Promise<T> {
  let timer: NodeJS.Timeout;
  return Promise.race([
    promise,
    new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(onTimeout()), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}
