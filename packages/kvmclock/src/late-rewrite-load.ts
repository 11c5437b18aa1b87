import { once } from 'node:events';
import type { Writable } from 'node:stream';
import { advanceClockSections, splitCheckpoint, type ClockSectionAdvance } from './stream-rewrite.js';

export interface LateRewriteResult {
  deltaNs: bigint;
  advances: ClockSectionAdvance[];
  headBytes: number;
  tailBytes: number;
}

/**
 * Streams a checkpoint into a QEMU waiting for it (`-incoming`), RAM first, and only then — with
 * the RAM already loaded — asks `deltaNs()` for the clock delta, rewrites the clock sections and
 * sends the device state. Computing the delta this late leaves only the last few milliseconds
 * (device-state load, `cont`) to be predicted rather than measured.
 */
export async function loadWithLateClockRewrite(sink: Writable, checkpoint: Buffer, deltaNs: () => bigint): Promise<LateRewriteResult> {
  const split = splitCheckpoint(checkpoint);
  if (!sink.write(split.head)) await once(sink, 'drain');
  const delta = deltaNs();
  const advances = advanceClockSections(split.deviceState, delta);
  const tail = split.encodeTail();
  sink.end(tail);
  await once(sink, 'finish');
  return { deltaNs: delta, advances, headBytes: split.head.length, tailBytes: tail.length };
}
