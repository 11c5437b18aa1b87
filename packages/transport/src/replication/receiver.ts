import { PassThrough, type Readable, type Writable } from 'node:stream';
import type { CheckpointStore, StreamVerifier } from '../store/index.js';
import { CheckpointStoreError } from '../store/index.js';
import {
  FrameDecoder,
  FrameType,
  type CheckpointHeader,
  type CheckpointTrailer,
  type ReceiverReply,
} from './frames.js';

export interface ReceiverOptions {
  store: CheckpointStore;
  /** A fresh verifier per checkpoint (the migration-stream parser, in production). */
  createVerifier?: () => StreamVerifier;
  log?: (message: string) => void;
}

interface InFlight {
  header: CheckpointHeader;
  /** Set once the commit has failed: the rest of its data is read and dropped. */
  failed: boolean;
  data: PassThrough;
  trailer: (value: CheckpointTrailer) => void;
  abort: (reason: Error) => void;
  done: Promise<void>;
}

/**
 * The backup's side of replication: reads frames from the primary (the SSH channel's stdin),
 * commits every checkpoint through the store, and answers each with an ack only once it is
 * durable. Backpressure: while the store's disk is slower than the link, the input is paused.
 */
export async function runReceiver(input: Readable, output: Writable, options: ReceiverOptions): Promise<void> {
  const decoder = new FrameDecoder();
  const log = options.log ?? (() => {});
  let current: InFlight | undefined;
  const reply = (message: ReceiverReply) => output.write(`${JSON.stringify(message)}\n`);

  const begin = (header: CheckpointHeader): InFlight => {
    // objectMode: chunks are handed on as they came; a byte-mode read() would join what is buffered (a copy)
    const data = new PassThrough({ objectMode: true, highWaterMark: 64 });
    let trailer!: (value: CheckpointTrailer) => void;
    let abort!: (reason: Error) => void;
    const trailerPromise = new Promise<CheckpointTrailer>((resolve, reject) => {
      trailer = resolve;
      abort = reject;
    });
    trailerPromise.catch(() => undefined);
    const flight = { header, data, failed: false } as InFlight;
    const done = options.store
      .commit({
        vm: header.vm,
        epoch: header.epoch,
        data,
        stopNs: 0n,
        resumeNs: 0n,
        qemuVersion: header.qemuVersion,
        ...(header.domainXml === undefined ? {} : { domainXml: header.domainXml }),
        ...(header.base === undefined ? {} : { base: header.base }),
        ...(options.createVerifier ? { verifier: options.createVerifier() } : {}),
        trailer: async () => {
          const t = await trailerPromise;
          return { stopNs: BigInt(t.stopNs), resumeNs: BigInt(t.resumeNs) };
        },
      })
      .then(
        (meta) => {
          log(`committed epoch ${meta.epoch}: ${meta.bytes} bytes${meta.base === undefined ? '' : ` on epoch ${meta.base}`}`);
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
          data.resume(); // nobody reads it any more; let writes go through
          const code = error instanceof CheckpointStoreError ? error.code : 'io';
          log(`epoch ${header.epoch} not committed: ${(error as Error).message}`);
          reply({ type: 'nack', epoch: header.epoch, code, message: (error as Error).message });
        },
      );
    return Object.assign(flight, {
      trailer,
      abort: (reason: Error) => (abort(reason), data.destroy(reason)),
      done,
    });
  };

  try {
    for await (const chunk of input as AsyncIterable<Buffer>) {
      for (const frame of decoder.push(chunk)) {
        switch (frame.type) {
          case FrameType.Header:
            if (current) throw new Error(`header for a new checkpoint while epoch ${current.header.epoch} is open`);
            current = begin(JSON.parse(frame.payload.toString('utf8')) as CheckpointHeader);
            break;
          case FrameType.Data:
            if (!current) throw new Error('data frame outside a checkpoint');
            if (current.failed) break; // already nacked: drain the sender's remaining data
            // Honour the store's pace: wait for drain rather than buffering without bound, but
            // stop waiting if the commit fails meanwhile (it will not read again).
            // a view of the input chunk: Node never reuses a stream chunk's memory
            if (!current.data.write(frame.payload)) {
              await Promise.race([onceDrained(current.data).catch(() => undefined), current.done]);
            }
            break;
          case FrameType.Trailer: {
            if (!current) throw new Error('trailer frame outside a checkpoint');
            current.trailer(JSON.parse(frame.payload.toString('utf8')) as CheckpointTrailer);
            if (!current.failed) current.data.end();
            await current.done;
            current = undefined;
            break;
          }
          case FrameType.Abort:
            if (current) {
              current.abort(new Error('the primary aborted this checkpoint'));
              await current.done;
              current = undefined;
            }
            break;
        }
      }
    }
    if (current) throw new Error(`input ended inside checkpoint ${current.header.epoch}`);
  } catch (error) {
    // The link broke or the primary sent garbage: the open checkpoint must not be committed.
    current?.abort(error as Error);
    await current?.done;
    throw error;
  }
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
