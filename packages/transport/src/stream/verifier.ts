// A checkpoint verifier for the store: parses the stream as it is written, discarding records, so
// a stream cut short or garbled is refused before it is committed. Fits the store's StreamVerifier
// shape: update() never throws (the first error is kept and parsing stops), end() throws it.

import { RamCoverage, type CheckpointLayout, type RamBlockExtent } from './chain.js';
import { MigrationStreamParser, type MigrationStreamParserOptions } from './parser.js';
import type { DeviceSectionRecord, MigrationRecord } from './records.js';
import { decodeTimerSection, TIMER_SECTION_NAME } from './timer-section.js';

export interface StreamSummary {
  bytes: number;
  records: number;
  ramPages: number;
  deviceSections: number;
  hasDescription: boolean;
  /** The RAM blocks the stream announced (undefined: it had no "ram" section). */
  ramBlocks: RamBlockExtent[] | undefined;
  /** Every page of every block was carried: a full checkpoint, not an incremental one. */
  fullRam: boolean;
  /** Present when QEMU marked the stream as an increment (x-ftvm-incremental configuration subsection). */
  incremental?: true;
  /** When not full: the first block with pages missing, and how many. */
  ramGap?: { block: string; missingPages: number };
  /** Where its parts begin, for assembling checkpoint chains (when it has RAM and device state). */
  layout?: CheckpointLayout;
  /**
   * The VM's virtual clock when it stopped for this stream: the `timer` section's cpu_clock_offset
   * (ns of running time since QEMU started; it stands still while the VM is stopped). Absent when
   * the stream has no timer section.
   */
  guestClockNs?: bigint;
}

export class MigrationStreamVerifier {
  private readonly parser: MigrationStreamParser;
  private error: Error | undefined;
  private readonly stats = { bytes: 0, records: 0, ramPages: 0, deviceSections: 0, hasDescription: false };
  private readonly coverage = new RamCoverage();
  private guestClockNs: bigint | undefined;
  private readonly count = (r: MigrationRecord): void => {
    this.stats.records++;
    this.coverage.add(r);
    if (r.type === 'ram-page' || r.type === 'ram-zero' || r.type === 'ram-compressed' || r.type === 'ram-xbzrle') this.stats.ramPages++;
    else if (r.type === 'device-section') {
      this.stats.deviceSections++;
      if (r.idstr === TIMER_SECTION_NAME) this.guestClockNs = guestClockOf(r);
    } else if (r.type === 'vm-description') this.stats.hasDescription = true;
  };

  constructor(options?: MigrationStreamParserOptions) {
    this.parser = new MigrationStreamParser(options);
  }

  update(chunk: Buffer): void {
    if (this.error) return;
    this.stats.bytes += chunk.length;
    try {
      this.parser.push(chunk, this.count);
    } catch (e) {
      this.error = e as Error;
    }
  }

  /** Throws the first parse error, or a truncation error; returns what was seen otherwise. */
  end(): StreamSummary {
    if (this.error) throw this.error;
    this.parser.end(this.count);
    const gap = this.coverage.firstGap();
    const layout = this.coverage.layout;
    return {
      ...this.stats,
      ramBlocks: this.coverage.blocks,
      fullRam: this.coverage.blocks !== undefined && gap === undefined,
      ...(this.parser.incremental ? { incremental: true as const } : {}),
      ...(gap ? { ramGap: gap } : {}),
      ...(layout ? { layout } : {}),
      ...(this.guestClockNs !== undefined ? { guestClockNs: this.guestClockNs } : {}),
    };
  }
}

/** The timer section's clock; undefined for a layout this codec does not know (not a reason to refuse the stream). */
function guestClockOf(section: DeviceSectionRecord): bigint | undefined {
  try {
    return decodeTimerSection(section).cpuClockOffsetNs;
  } catch {
    return undefined;
  }
}

/** A fresh verifier (one per checkpoint). */
export function createStreamVerifier(options?: MigrationStreamParserOptions): MigrationStreamVerifier {
  return new MigrationStreamVerifier(options);
}
