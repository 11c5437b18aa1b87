import { PassThrough, type Readable, type Writable } from 'node:stream';
import type { CheckpointStore, DiskGeometry, StreamVerifier } from '../store/index.js';
import { CheckpointStoreError } from '../store/index.js';
import { invalidDiskList } from '../store/disk-delta.js';
import {
  decodeDiskExtent,
  FrameDecoder,
  FrameError,
  FrameType,
  type CheckpointHeader,
  type CheckpointTrailer,
  type DiskBeginFrame,
  type DiskEndFrame,
  type ReceiverReply,
  type SeedBeginFrame,
} from './frames.js';

export interface ReceiverOptions {
  store: CheckpointStore;
  /** A fresh verifier per checkpoint (the migration-stream parser, in production). */
  createVerifier?: () => StreamVerifier;
  log?: (message: string) => void;
}

/**
 * The disk sections of an open checkpoint or seed, checked against what its first frame listed
 * (order, sizes, each DISK_END's counts) as they are handed on to the store.
 */
interface DiskFeed {
  listed: DiskGeometry[];
  next: number;
  /** What the store iterates: one object per section. */
  sections: PassThrough;
  open?: { disk: DiskGeometry; extents: PassThrough; count: number; dataBytes: number };
}

interface InFlight {
  /** "checkpoint 7", "seed s123": what messages name. */
  label: string;
  epoch?: number;
  seed?: string;
  /** Set once the store's work has failed, or the frames were refused: the rest is read and dropped. */
  failed: boolean;
  /** The primary gave it up (ABORT): it is discarded without a reply, which nobody awaits. */
  aborted?: boolean;
  data?: PassThrough;
  dataEnded: boolean;
  disks?: DiskFeed;
  trailer?: (value: CheckpointTrailer) => void;
  /** Fails the store's work with `reason` wherever it waits (data, sections, extents, trailer). */
  abort: (reason: Error) => void;
  done: Promise<void>;
}

/**
 * The backup's side of replication: reads frames from the primary (the SSH channel's stdin),
 * commits every checkpoint through the store, and answers each with an ack only once it is
 * durable; seeds go to the store's seed and get a seed-ack or seed-nack. Backpressure: while the
 * store's disk is slower than the link, the input is paused.
 */
export async function runReceiver(input: Readable, output: Writable, options: ReceiverOptions): Promise<void> {
  const decoder = new FrameDecoder();
  const log = options.log ?? (() => {});
  let current: InFlight | undefined;
  const reply = (message: ReceiverReply) => output.write(`${JSON.stringify(message)}\n`);

  /** Object streams handed to the store: chunks as they came, errors seen by its reads. */
  const objectStream = (highWaterMark: number) => new PassThrough({ objectMode: true, highWaterMark }).on('error', () => undefined);

  const diskFeed = (listed: DiskGeometry[]): DiskFeed => ({ listed, next: 0, sections: objectStream(1) });

  const begin = (header: CheckpointHeader): InFlight => {
    // objectMode: chunks are handed on as they came; a byte-mode read() would join what is buffered (a copy)
    const data = new PassThrough({ objectMode: true, highWaterMark: 64 });
    let trailer!: (value: CheckpointTrailer) => void;
    let rejectTrailer!: (reason: Error) => void;
    const trailerPromise = new Promise<CheckpointTrailer>((resolve, reject) => {
      trailer = resolve;
      rejectTrailer = reject;
    });
    trailerPromise.catch(() => undefined);
    const flight: InFlight = { label: `checkpoint ${header.epoch}`, epoch: header.epoch, data, dataEnded: false, failed: false, trailer, abort: () => {}, done: Promise.resolve() };
    const badDisks = header.disks === undefined ? undefined : invalidDiskList(header.disks);
    if (header.disks !== undefined && !badDisks) flight.disks = diskFeed(header.disks);
    flight.abort = (reason: Error) => {
      rejectTrailer(reason);
      data.destroy(reason);
      flight.disks?.sections.destroy(reason);
      flight.disks?.open?.extents.destroy(reason);
    };
    // a header whose disk list is unusable: refused before the store sees it; its frames are dropped
    const refused = badDisks ? new CheckpointStoreError(`${flight.label}: its header lists an invalid ${badDisks}`, 'verify', header.epoch) : undefined;
    if (refused) flight.failed = true;
    const committing = refused
      ? Promise.reject(refused)
      : options.store.commit({
          vm: header.vm,
          epoch: header.epoch,
          data,
          stopNs: 0n,
          resumeNs: 0n,
          qemuVersion: header.qemuVersion,
          ...(header.domainXml === undefined ? {} : { domainXml: header.domainXml }),
          ...(header.base === undefined ? {} : { base: header.base }),
          ...(flight.disks ? { disks: flight.disks.sections } : {}),
          ...(header.diskBase === undefined ? {} : { diskBase: header.diskBase }),
          ...(options.createVerifier ? { verifier: options.createVerifier() } : {}),
          trailer: async () => {
            const t = await trailerPromise;
            return { stopNs: BigInt(t.stopNs), resumeNs: BigInt(t.resumeNs) };
          },
        });
    flight.done = committing.then(
      (meta) => {
        const disks = meta.disks ? `, disks ${meta.disks.map((d) => `${d.disk} ${d.extents} extents ${d.dataBytes} bytes`).join(', ')}` : '';
        log(`committed epoch ${meta.epoch}: ${meta.bytes} bytes${meta.base === undefined ? '' : ` on epoch ${meta.base}`}${disks}`);
        reply({
          type: 'ack',
          epoch: meta.epoch,
          bytes: meta.bytes,
          sha256: meta.sha256,
          ...(meta.guestClockNs === undefined ? {} : { guestClockNs: meta.guestClockNs }),
        });
      },
      (error: unknown) => {
        flight.failed = true;
        unblock(flight); // nobody reads any more; let writes go through
        const code = error instanceof CheckpointStoreError ? error.code : 'io';
        log(`epoch ${header.epoch} not committed: ${(error as Error).message}`);
        if (!flight.aborted) reply({ type: 'nack', epoch: header.epoch, code, message: (error as Error).message });
      },
    );
    return flight;
  };

  const beginSeed = (frame: SeedBeginFrame): InFlight => {
    const listed = Array.isArray(frame.disks) ? frame.disks : [];
    const flight: InFlight = { label: `seed ${frame.seed}`, seed: frame.seed, dataEnded: true, failed: false, disks: diskFeed(listed), abort: () => {}, done: Promise.resolve() };
    flight.abort = (reason: Error) => {
      flight.disks?.sections.destroy(reason);
      flight.disks?.open?.extents.destroy(reason);
    };
    flight.done = options.store.seed({ seed: frame.seed, disks: listed, sections: flight.disks!.sections }).then(
      ({ bytes }) => {
        log(`seeded ${frame.seed}: ${bytes} bytes of ${listed.map((d) => d.disk).join(', ')}`);
        reply({ type: 'seed-ack', seed: frame.seed, bytes });
      },
      (error: unknown) => {
        flight.failed = true;
        unblock(flight);
        const code = error instanceof CheckpointStoreError ? error.code : 'io';
        log(`seed ${frame.seed} not taken: ${(error as Error).message}`);
        if (!flight.aborted) reply({ type: 'seed-nack', seed: frame.seed, code, message: (error as Error).message });
      },
    );
    return flight;
  };

  /** The frames do not match what the checkpoint or seed announced: its store work fails with `verify`. */
  const refuse = (flight: InFlight, message: string) => {
    if (flight.failed) return;
    flight.failed = true;
    flight.abort(new CheckpointStoreError(`${flight.label}: ${message}`, 'verify', flight.epoch));
  };

  const endData = (flight: InFlight) => {
    if (flight.dataEnded) return;
    flight.dataEnded = true;
    if (flight.data && !flight.data.destroyed) flight.data.end();
  };

  /** Hands one extent on, waiting while the store is behind — unless its work fails meanwhile. */
  const feedExtent = async (flight: InFlight, payload: Buffer) => {
    const feed = flight.disks;
    const open = feed?.open;
    if (!feed || !open) return refuse(flight, 'a disk extent outside a disk section');
    const extent = decodeDiskExtent(payload);
    open.count++;
    if (extent.data) open.dataBytes += extent.length;
    if (extent.offset + extent.length > open.disk.sizeBytes) {
      return refuse(flight, `disk '${open.disk.disk}': extent ${extent.offset}+${extent.length} ends past its ${open.disk.sizeBytes} bytes`);
    }
    if (!open.extents.write(extent)) await Promise.race([onceDrained(open.extents).catch(() => undefined), flight.done]);
  };

  const diskBegin = (flight: InFlight, frame: DiskBeginFrame) => {
    const feed = flight.disks;
    if (!feed) return refuse(flight, `disk '${frame.disk}' came, but its header lists no disks`);
    if (feed.open) return refuse(flight, `disk '${frame.disk}' began before disk '${feed.open.disk.disk}' ended`);
    const expected = feed.listed[feed.next++];
    if (!expected) return refuse(flight, `disk '${frame.disk}' came after the ${feed.listed.length} listed`);
    if (expected.disk !== frame.disk || expected.sizeBytes !== frame.sizeBytes) {
      return refuse(flight, `disk '${frame.disk}' of ${frame.sizeBytes} bytes came where disk '${expected.disk}' of ${expected.sizeBytes} bytes is listed`);
    }
    const extents = objectStream(4);
    feed.open = { disk: expected, extents, count: 0, dataBytes: 0 };
    feed.sections.write({ disk: expected.disk, sizeBytes: expected.sizeBytes, extents });
  };

  const diskEnd = (flight: InFlight, frame: DiskEndFrame) => {
    const open = flight.disks?.open;
    if (!open) return refuse(flight, 'a disk section ended that had not begun');
    if (frame.extents !== open.count || frame.dataBytes !== open.dataBytes) {
      return refuse(
        flight,
        `disk '${open.disk.disk}' ended saying ${frame.extents} extents and ${frame.dataBytes} data bytes, but ${open.count} extents and ${open.dataBytes} data bytes came`,
      );
    }
    open.extents.end();
    flight.disks!.open = undefined;
  };

  /** At the trailer or SEED_END: every listed disk came, whole. */
  const endDisks = (flight: InFlight) => {
    const feed = flight.disks;
    if (!feed) return;
    if (feed.open) return refuse(flight, `disk '${feed.open.disk.disk}' did not end`);
    if (feed.next < feed.listed.length) {
      return refuse(flight, `disk ${feed.listed.slice(feed.next).map((d) => `'${d.disk}'`).join(', ')} is missing (${feed.next} of ${feed.listed.length} listed came)`);
    }
    feed.sections.end();
  };

  const finish = async (flight: InFlight) => {
    await flight.done;
    current = undefined;
  };

  try {
    for await (const chunk of input as AsyncIterable<Buffer>) {
      for (const frame of decoder.push(chunk)) {
        switch (frame.type) {
          case FrameType.Header:
            if (current) throw new Error(`header for a new checkpoint while ${current.label} is open`);
            current = begin(parseJson<CheckpointHeader>(frame.payload, 'header'));
            break;
          case FrameType.Data:
            if (!current?.data) throw new Error('data frame outside a checkpoint');
            if (current.failed) break; // already nacked: drain the sender's remaining data
            if (current.dataEnded) {
              refuse(current, 'migration data after its disk sections');
              break;
            }
            // Honour the store's pace: wait for drain rather than buffering without bound, but
            // stop waiting if the commit fails meanwhile (it will not read again).
            // a view of the input chunk: Node never reuses a stream chunk's memory
            if (!current.data.write(frame.payload)) {
              await Promise.race([onceDrained(current.data).catch(() => undefined), current.done]);
            }
            break;
          case FrameType.DiskBegin:
            if (!current) throw new Error('disk section outside a checkpoint or seed');
            endData(current);
            if (!current.failed) diskBegin(current, parseDiskBegin(frame.payload));
            break;
          case FrameType.DiskExtent:
            if (!current) throw new Error('disk extent outside a checkpoint or seed');
            if (!current.failed) await feedExtent(current, frame.payload);
            break;
          case FrameType.DiskEnd:
            if (!current) throw new Error('disk section end outside a checkpoint or seed');
            if (!current.failed) diskEnd(current, parseDiskEnd(frame.payload));
            break;
          case FrameType.Trailer: {
            if (current?.epoch === undefined) throw new Error('trailer frame outside a checkpoint');
            endData(current);
            if (!current.failed) endDisks(current);
            current.trailer!(parseJson<CheckpointTrailer>(frame.payload, 'trailer'));
            await finish(current);
            break;
          }
          case FrameType.SeedBegin:
            if (current) throw new Error(`seed while ${current.label} is open`);
            current = beginSeed(parseSeedBegin(frame.payload));
            break;
          case FrameType.SeedEnd:
            if (current?.seed === undefined) throw new Error('seed end outside a seed');
            if (!current.failed) endDisks(current);
            await finish(current);
            break;
          case FrameType.Abort:
            if (current) {
              current.aborted = true;
              current.abort(new Error(`the primary aborted this ${current.seed === undefined ? 'checkpoint' : 'seed'}`));
              await finish(current);
            }
            break;
        }
      }
    }
    if (current) throw new Error(`input ended inside ${current.label}`);
  } catch (error) {
    // The link broke or the primary sent garbage: the open checkpoint or seed must not be committed.
    current?.abort(error as Error);
    await current?.done;
    throw error;
  }
}

/** After the store's work failed: streams nobody reads any more must not hold writes back. */
function unblock(flight: InFlight): void {
  flight.data?.resume();
  flight.disks?.sections.resume();
  flight.disks?.open?.extents.resume();
}

function parseJson<T>(payload: Buffer, what: string): T {
  try {
    return JSON.parse(payload.toString('utf8')) as T;
  } catch (error) {
    throw new FrameError(`${what} frame is not JSON: ${(error as Error).message}`);
  }
}

function parseDiskBegin(payload: Buffer): DiskBeginFrame {
  const frame = parseJson<DiskBeginFrame>(payload, 'disk-begin');
  if (typeof frame?.disk !== 'string' || !Number.isSafeInteger(frame.sizeBytes)) throw new FrameError(`disk-begin frame ${payload.toString('utf8').slice(0, 120)} lacks disk or sizeBytes`);
  return frame;
}

function parseDiskEnd(payload: Buffer): DiskEndFrame {
  const frame = parseJson<DiskEndFrame>(payload, 'disk-end');
  if (!Number.isSafeInteger(frame?.extents) || !Number.isSafeInteger(frame.dataBytes)) throw new FrameError(`disk-end frame ${payload.toString('utf8').slice(0, 120)} lacks extents or dataBytes`);
  return frame;
}

function parseSeedBegin(payload: Buffer): SeedBeginFrame {
  const frame = parseJson<SeedBeginFrame>(payload, 'seed-begin');
  if (typeof frame?.seed !== 'string' || !Array.isArray(frame.disks)) throw new FrameError(`seed-begin frame ${payload.toString('utf8').slice(0, 120)} lacks seed or disks`);
  return frame;
}

function onceDrained(stream: PassThrough): Promise<void> {
  return new Promise((resolve, reject) => {
    const cleanup = () => {
      stream.off('drain', onDrain);
      stream.off('close', onClose);
    };
    const onDrain = () => (cleanup(), resolve());
    const onClose = () => (cleanup(), reject(new Error('checkpoint stream closed while waiting for the disk')));
    stream.on('drain', onDrain);
    stream.on('close', onClose);
  });
}
