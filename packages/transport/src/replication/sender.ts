import type { Duplex, Readable } from 'node:stream';
import { invalidExtent, MAX_EXTENT_DATA, type DiskExtent, type DiskGeometry, type DiskSection } from '../store/disk-delta.js';
import {
  encodeDiskExtentFrame,
  encodeFrameHeader,
  encodeJsonFrame,
  FrameType,
  MAX_FRAME_PAYLOAD,
  type CheckpointHeader,
  type CheckpointTrailer,
  type DiskEndFrame,
  type ReceiverReply,
  type SeedBeginFrame,
} from './frames.js';

/** A ZERO extent longer than this goes as several (the wire's length is be32). */
const MAX_ZERO_FRAME = 1024 * 1024 * 1024;

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

/** A seed was not taken: the receiver's nack (its store's code), or the local cause. */
export class SeedError extends Error {
  override name = 'SeedError';
  constructor(
    message: string,
    readonly seed: string,
    /** The receiver's code on a seed-nack (no-space, verify, …), or source, closed, timeout, busy. */
    readonly code: string,
  ) {
    super(`seed ${seed}: ${message}`);
  }
}

export interface SeedOptions {
  seed: string;
  /** One section per disk; an iterable is read for its sections (not their extents) before anything is sent. */
  disks: DiskSection[] | AsyncIterable<DiskSection>;
  /** From SEED_END to the receiver's reply (its fsync of the images included); also bounds each wait for the link to drain. */
  ackTimeoutMs?: number;
}

export interface SendOptions {
  header: CheckpointHeader;
  /** The migration stream, as QEMU writes it. */
  data: Readable;
  /** Resolves after the stream with the STOP/RESUME stamps of this checkpoint. */
  trailer: () => Promise<CheckpointTrailer>;
  /**
   * Called once the data has ended, when the header lists disks: their sections, in the
   * header's order. A failure producing them aborts the checkpoint.
   */
  disks?: () => AsyncIterable<DiskSection>;
  /** From the end of the data to the receiver's ack (fsync included); also bounds each wait for the link to drain while disks are sent. */
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
  /** The seed awaiting its reply (one at a time). */
  private seedWaiter: { seed: string; resolve: (r: ReceiverReply) => void; reject: (e: Error) => void } | undefined;
  /** A checkpoint's or seed's frames are being written: another must not interleave with them. */
  private writing: string | undefined;
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

  async send({ header, data, trailer, disks, ackTimeoutMs = 30_000, unthrottle }: SendOptions): Promise<ReceiverReply & { type: 'ack' }> {
    const { epoch } = header;
    if (this.closedReason !== undefined) throw new ReplicationError(this.closedReason, epoch, 'closed');
    if (this.writing !== undefined) throw new ReplicationError(`${this.writing} is still being sent`, epoch, 'busy');
    if (header.disks && !disks) throw new ReplicationError('the header lists disks but no disk sections are given', epoch, 'source');
    const headerFrame = encodeJsonFrame(FrameType.Header, header);
    this.writing = `checkpoint ${epoch}`;
    const reply = new Promise<ReceiverReply>((resolve, reject) => this.waiters.set(epoch, { resolve, reject }));
    reply.catch(() => undefined);
    this.channel.write(headerFrame);
    this.currentData = data;
    let throttled = true;
    const lifted = unthrottle?.then(
      () => void (throttled = false),
      () => void (throttled = false),
    );
    let phase = 'stream';
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
      this.currentData = undefined;
      if (disks) {
        phase = 'disks';
        const listed = header.disks ?? [];
        let next = 0;
        for await (const section of disks()) {
          const expected = listed[next++];
          if (!expected || expected.disk !== section.disk || expected.sizeBytes !== section.sizeBytes) {
            throw new Error(`disk '${section.disk}' of ${section.sizeBytes} bytes came where the header lists ${expected ? `'${expected.disk}' of ${expected.sizeBytes} bytes` : 'no more disks'}`);
          }
          phase = `disk '${section.disk}'`;
          await this.writeSection(section, ackTimeoutMs, (message, code) => new ReplicationError(message, epoch, code));
          phase = 'disks';
        }
        if (next < listed.length) throw new Error(`no section for disk ${listed.slice(next).map((d) => `'${d.disk}'`).join(', ')} listed in the header`);
      }
      phase = 'trailer';
      this.channel.write(encodeJsonFrame(FrameType.Trailer, await trailer()));
    } catch (error) {
      if (this.closedReason === undefined) this.channel.write(encodeJsonFrame(FrameType.Abort, {}));
      this.waiters.delete(epoch);
      if (error instanceof ReplicationError) throw error;
      if (this.closedReason !== undefined) throw new ReplicationError(this.closedReason, epoch, 'closed');
      throw new ReplicationError(`${phase} failed: ${(error as Error).message}`, epoch, 'source');
    } finally {
      this.currentData = undefined;
      this.writing = undefined;
    }
    const answer = await withTimeout(reply, ackTimeoutMs, () => {
      this.waiters.delete(epoch);
      return new ReplicationError(`no acknowledgement within ${ackTimeoutMs} ms`, epoch, 'timeout');
    });
    if (answer.type === 'nack') throw new ReplicationError(`backup refused it: ${answer.message}`, epoch, answer.code);
    if (answer.type !== 'ack') throw new ReplicationError(`the receiver answered a checkpoint with ${answer.type}`, epoch, 'protocol');
    return answer;
  }

  /**
   * Sends a seed (every allocated extent of each disk, outside any checkpoint) and resolves with
   * the receiver's seed-ack once its replica is complete and durable. One seed at a time; a
   * failure producing the extents aborts it (the backup's replica stays incomplete).
   */
  async sendSeed({ seed, disks, ackTimeoutMs = 30_000 }: SeedOptions): Promise<{ bytes: number }> {
    if (this.closedReason !== undefined) throw new SeedError(this.closedReason, seed, 'closed');
    if (this.seedWaiter) throw new SeedError(`seed ${this.seedWaiter.seed} is still in flight`, seed, 'busy');
    if (this.writing !== undefined) throw new SeedError(`${this.writing} is still being sent`, seed, 'busy');
    this.writing = `seed ${seed}`;
    const reply = new Promise<ReceiverReply>((resolve, reject) => (this.seedWaiter = { seed, resolve, reject }));
    reply.catch(() => undefined);
    const fail = (message: string, code: string) => new SeedError(message, seed, code);
    let phase = 'disks';
    let begun = false;
    try {
      const sections: DiskSection[] = [];
      for await (const section of disks) sections.push(section);
      const begin: SeedBeginFrame = { seed, disks: sections.map(({ disk, sizeBytes }): DiskGeometry => ({ disk, sizeBytes })) };
      this.channel.write(encodeJsonFrame(FrameType.SeedBegin, begin));
      begun = true;
      for (const section of sections) {
        phase = `disk '${section.disk}'`;
        await this.writeSection(section, ackTimeoutMs, fail);
      }
      this.channel.write(encodeJsonFrame(FrameType.SeedEnd, {}));
    } catch (error) {
      if (begun && this.closedReason === undefined) this.channel.write(encodeJsonFrame(FrameType.Abort, {}));
      this.seedWaiter = undefined;
      if (error instanceof SeedError) throw error;
      if (this.closedReason !== undefined) throw fail(this.closedReason, 'closed');
      throw fail(`${phase} failed: ${(error as Error).message}`, 'source');
    } finally {
      this.writing = undefined;
    }
    const answer = await withTimeout(reply, ackTimeoutMs, () => {
      this.seedWaiter = undefined;
      return fail(`no acknowledgement within ${ackTimeoutMs} ms`, 'timeout');
    });
    if (answer.type === 'seed-nack') throw fail(`backup refused it: ${answer.message}`, answer.code);
    if (answer.type !== 'seed-ack') throw fail(`the receiver answered a seed with ${answer.type}`, 'protocol');
    return { bytes: answer.bytes };
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

  /**
   * DISK_BEGIN, the section's extents (long ones split to the wire's limits), DISK_END. Waits for
   * the link to drain whenever maxBufferedBytes are queued, each wait bounded by `drainTimeoutMs`.
   */
  private async writeSection(section: DiskSection, drainTimeoutMs: number, fail: (message: string, code: string) => Error): Promise<void> {
    const { disk, sizeBytes } = section;
    this.channel.write(encodeJsonFrame(FrameType.DiskBegin, { disk, sizeBytes }));
    const end: DiskEndFrame = { extents: 0, dataBytes: 0 };
    for await (const extent of section.extents) {
      const bad = invalidExtent(extent, sizeBytes, false);
      if (bad) throw new Error(bad);
      const step = extent.data ? MAX_EXTENT_DATA : MAX_ZERO_FRAME;
      for (let done = 0; done < extent.length; done += step) {
        const length = Math.min(step, extent.length - done);
        const piece: DiskExtent = extent.data
          ? { offset: extent.offset + done, length, data: extent.data.subarray(done, done + length) }
          : { offset: extent.offset + done, length };
        for (const buffer of encodeDiskExtentFrame(piece)) this.channel.write(buffer);
        end.extents++;
        if (piece.data) end.dataBytes += length;
      }
      if (this.channel.writableLength > this.maxBufferedBytes) await this.drainedWithin(drainTimeoutMs, fail);
      if (this.closedReason !== undefined) throw fail(this.closedReason, 'closed');
    }
    this.channel.write(encodeJsonFrame(FrameType.DiskEnd, end));
  }

  /** Waits for the channel's queue to empty, at most `ms` (a receiver that stopped reading). */
  private drainedWithin(ms: number, fail: (message: string, code: string) => Error): Promise<void> {
    return new Promise((resolve, reject) => {
      const cleanup = () => {
        clearTimeout(timer);
        this.channel.off('drain', done);
        this.channel.off('close', onClose);
      };
      const done = () => (cleanup(), resolve());
      const onClose = () => (cleanup(), reject(fail('receiver channel closed', 'closed')));
      const timer = setTimeout(() => (cleanup(), reject(fail(`the link did not drain within ${ms} ms`, 'timeout'))), ms);
      this.channel.once('drain', done);
      this.channel.once('close', onClose);
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
      if (reply.type === 'seed-ack' || reply.type === 'seed-nack') {
        const waiter = this.seedWaiter;
        if (waiter?.seed !== reply.seed) continue; // a seed given up (its deadline)
        this.seedWaiter = undefined;
        waiter.resolve(reply);
        continue;
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
    this.seedWaiter?.reject(new SeedError(reason, this.seedWaiter.seed, 'closed'));
    this.seedWaiter = undefined;
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
