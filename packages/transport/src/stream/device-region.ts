// Delimiting the device-state part of a stream: the QEMU_VM_SECTION_FULL sections that follow the
// RAM, then QEMU_VM_EOF, then (normally) the JSON VM description.
//
// A FULL section's body carries no length: its layout is only known from the vmstate definitions,
// which the stream itself describes in the JSON at its very end. Scanning for each footer
// (0x7e + be32 section id) and guessing that a plausible header follows is not sound: device
// bodies are arbitrary bytes (register files, buffers, guest-controlled values) and can contain
// that pattern, so a guess can be wrong and even a later "verification" can only reject the
// stream, not fix it. So this module BUFFERS the device state (small: ~15 KB here, ~200 KB on a
// big VM; bounded by maxDeviceStateBytes) until the description has arrived, then splits it with
// the exact body sizes the description implies (description.ts) and checks every header (idstr,
// instance), every footer and the EOF position against it. Only if the stream carries no
// description at all (suppress_vmdesc machine types, xen-save-devices-state style streams) does it
// fall back to the footer scan: it accepts only if exactly one chain of plausible sections, each
// closed by its own footer, ends at EOF, and marks the sections `verified: false`.
//
// Finding the description while bytes stream in: it is `00 06 <be32 len> {...}` at the end. Every
// such pattern is remembered as a candidate; once `len` bytes of it have arrived it is parsed and,
// if it is a description, used to split the region. A look-alike inside a body is rejected because
// it either is not JSON with "devices" or does not split the bytes before it exactly.

import {
  describeMismatch,
  describedSections,
  DescriptionShapeError,
  parseVmDescription,
  type VmDescription,
} from './description.js';
import { MigrationStreamError, formatOffset } from './errors.js';
import { SectionType } from './constants.js';
import type { DeviceSectionRecord, MigrationRecord } from './records.js';

export interface DeviceRegionLimits {
  /** Largest device-state part accepted before the description (bytes). */
  maxDeviceStateBytes: number;
  /** Largest VM description accepted (bytes). */
  maxDescriptionBytes: number;
}

export interface DeviceRegionResult {
  /** device-section records, then eof, then vm-description if present. */
  records: MigrationRecord[];
  /** Bytes buffered past the end of the description (the parser treats them as trailing data). */
  trailing: Buffer;
  /** Absolute offset of `trailing`. */
  trailingOffset: number;
}

interface FullHeader {
  sectionId: number;
  idstr: string;
  instanceId: number;
  versionId: number;
  /** Index of the first body byte. */
  bodyStart: number;
}

interface Candidate {
  /** Index of the QEMU_VM_EOF byte. */
  pos: number;
  /** Declared JSON length. */
  len: number;
}

/** Max footer candidates the fallback scan examines before giving up (keeps corrupt input bounded). */
const FOOTER_SCAN_BUDGET = 200_000;

export class DeviceStateRegion {
  private buf: Buffer = Buffer.allocUnsafe(64 * 1024);
  private len = 0;
  /** Next index at which a 0x06 byte may start a description candidate (pattern starts one before). */
  private scanFrom = 1;
  private pending: Candidate[] = [];
  /** Why the latest-placed description candidate was rejected (latest = most likely the real one). */
  private mismatch: { pos: number; error: MigrationStreamError } | undefined;
  /** Candidates whose bytes are not a JSON description: [EOF index, end index]. */
  private notJson: Array<[number, number]> = [];

  constructor(
    /** Absolute stream offset of the first FULL section. */
    readonly startOffset: number,
    private readonly limits: DeviceRegionLimits,
  ) {}

  get bufferedBytes(): number {
    return this.len;
  }

  /** Adds bytes; returns the split once the description is complete and agrees. */
  append(chunk: Buffer): DeviceRegionResult | undefined {
    if (chunk.length === 0) return undefined;
    if (this.len + chunk.length > this.limits.maxDeviceStateBytes) {
      throw new MigrationStreamError(
        'LIMIT_EXCEEDED',
        this.startOffset + this.limits.maxDeviceStateBytes,
        `device state after ${formatOffset(this.startOffset)} exceeds ${this.limits.maxDeviceStateBytes} bytes without a complete VM description`,
      );
    }
    this.grow(this.len + chunk.length);
    chunk.copy(this.buf, this.len);
    this.len += chunk.length;
    this.scan();
    return this.evaluateComplete();
  }

  /** Called at end of input: the split, or the reason there is none. */
  finish(): DeviceRegionResult {
    const done = this.evaluateComplete();
    if (done) return done;
    if (this.mismatch) throw this.mismatch.error;
    const end = this.startOffset + this.len;
    // No description: the region must end with QEMU_VM_EOF; split it by footers.
    if (this.len > 0 && this.buf[this.len - 1] === SectionType.EOF) {
      const sections = this.footerScan(this.len - 1);
      if (sections === 'ambiguous') {
        throw new MigrationStreamError(
          'UNDELIMITED_DEVICE_STATE',
          this.startOffset,
          'the stream has no VM description and its device state splits at section footers in more than one consistent way',
        );
      }
      if (sections) return { records: [...sections, { type: 'eof' }], trailing: Buffer.alloc(0), trailingOffset: end };
    }
    const damaged = this.notJson.find(([, e]) => e === this.len);
    if (damaged) {
      throw new MigrationStreamError('BAD_DESCRIPTION', this.startOffset + damaged[0] + 6, 'the VM description that ends the stream is not JSON with a "devices" array');
    }
    const open = this.pending.find((c) => c.pos + 6 + c.len > this.len);
    if (open) {
      throw new MigrationStreamError(
        'TRUNCATED',
        end,
        `stream ends inside the VM description that starts at ${formatOffset(this.startOffset + open.pos + 1)} (declares ${open.len} bytes, ${this.len - open.pos - 6} present)`,
      );
    }
    throw new MigrationStreamError(
      'TRUNCATED',
      end,
      `device state starting at ${formatOffset(this.startOffset)} is not followed by QEMU_VM_EOF and a VM description, and no footer scan delimits it (truncated or corrupt)`,
    );
  }

  private grow(need: number): void {
    if (need <= this.buf.length) return;
    let cap = this.buf.length * 2;
    while (cap < need) cap *= 2;
    // A new buffer every time: views handed out earlier stay valid because old bytes are never overwritten.
    const next = Buffer.allocUnsafe(cap);
    this.buf.copy(next, 0, 0, this.len);
    this.buf = next;
  }

  private scan(): void {
    const view = this.buf.subarray(0, this.len);
    let from = this.scanFrom;
    for (;;) {
      const i = view.indexOf(SectionType.VMDESCRIPTION, from);
      if (i === -1) {
        this.scanFrom = Math.max(from, this.len);
        return;
      }
      if (i + 6 > this.len) {
        this.scanFrom = i; // pattern not complete yet: look again when more bytes arrive
        return;
      }
      if (view[i - 1] === SectionType.EOF && view[i + 5] === 0x7b) {
        const len = view.readUInt32BE(i + 1);
        if (len <= this.limits.maxDescriptionBytes) this.pending.push({ pos: i - 1, len });
      }
      from = i + 1;
    }
  }

  private evaluateComplete(): DeviceRegionResult | undefined {
    const still: Candidate[] = [];
    let result: DeviceRegionResult | undefined;
    for (const c of this.pending) {
      if (result || c.pos + 6 + c.len > this.len) {
        still.push(c);
        continue;
      }
      result = this.tryCandidate(c);
    }
    this.pending = still;
    return result;
  }

  private tryCandidate(c: Candidate): DeviceRegionResult | undefined {
    const data = this.buf.subarray(c.pos + 6, c.pos + 6 + c.len);
    const description = parseVmDescription(data);
    if (!description) {
      // Look-alike bytes inside a device body — or a damaged description, if it ends the stream.
      this.notJson.push([c.pos, c.pos + 6 + c.len]);
      return undefined;
    }
    let sections: DeviceSectionRecord[];
    try {
      sections = this.splitWithDescription(c.pos, description);
    } catch (e) {
      let error: MigrationStreamError;
      if (e instanceof MigrationStreamError) error = e;
      else if (e instanceof DescriptionShapeError) error = new MigrationStreamError('BAD_DESCRIPTION', this.startOffset + c.pos + 6, `VM description: ${e.message}`);
      else throw e;
      // Reported at end of input unless another candidate agrees. Keeping the one placed last in
      // the stream (not the last evaluated) makes the error independent of how input was chunked.
      if (!this.mismatch || c.pos >= this.mismatch.pos) this.mismatch = { pos: c.pos, error };
      return undefined;
    }
    const end = c.pos + 6 + c.len;
    return {
      records: [...sections, { type: 'eof' }, { type: 'vm-description', data, description }],
      trailing: this.buf.subarray(end, this.len),
      trailingOffset: this.startOffset + end,
    };
  }

  private readHeader(p: number, limit: number): FullHeader | undefined {
    const b = this.buf;
    if (p + 6 > limit || b[p] !== SectionType.FULL) return undefined;
    const idlen = b[p + 5]!;
    const bodyStart = p + 6 + idlen + 8;
    if (bodyStart > limit) return undefined;
    return {
      sectionId: b.readUInt32BE(p + 1),
      idstr: b.toString('latin1', p + 6, p + 6 + idlen),
      instanceId: b.readUInt32BE(p + 6 + idlen),
      versionId: b.readUInt32BE(p + 10 + idlen),
      bodyStart,
    };
  }

  private section(h: FullHeader, bodyEnd: number, verified: boolean): DeviceSectionRecord {
    return {
      type: 'device-section',
      sectionId: h.sectionId,
      idstr: h.idstr,
      instanceId: h.instanceId,
      versionId: h.versionId,
      body: this.buf.subarray(h.bodyStart, bodyEnd),
      verified,
    };
  }

  /** Splits [0, eofPos) exactly as the description says, or throws what disagrees. */
  private splitWithDescription(eofPos: number, description: VmDescription): DeviceSectionRecord[] {
    const base = this.startOffset;
    const out: DeviceSectionRecord[] = [];
    let p = 0;
    for (const want of describedSections(description)) {
      const h = this.readHeader(p, eofPos);
      if (!h) {
        const found = p < eofPos ? `byte 0x${this.buf[p]!.toString(16)}` : 'QEMU_VM_EOF';
        throw new MigrationStreamError('DESCRIPTION_MISMATCH', base + p, describeMismatch(want, `expected its FULL section header, found ${found}`));
      }
      if (h.idstr !== want.idstr || h.instanceId !== want.instanceId) {
        throw new MigrationStreamError(
          'DESCRIPTION_MISMATCH',
          base + p,
          describeMismatch(want, `the stream has section '${h.idstr}' instance ${h.instanceId} there`),
        );
      }
      const bodyEnd = h.bodyStart + want.bodySize;
      if (bodyEnd + 5 > eofPos) {
        throw new MigrationStreamError('DESCRIPTION_MISMATCH', base + h.bodyStart, describeMismatch(want, `its ${want.bodySize}-byte body runs past QEMU_VM_EOF`));
      }
      if (this.buf[bodyEnd] !== SectionType.FOOTER || this.buf.readUInt32BE(bodyEnd + 1) !== h.sectionId) {
        throw new MigrationStreamError(
          'FOOTER_MISMATCH',
          base + bodyEnd,
          describeMismatch(want, `no footer 0x7e+${h.sectionId} after its ${want.bodySize}-byte body`),
        );
      }
      out.push(this.section(h, bodyEnd, true));
      p = bodyEnd + 5;
    }
    if (p !== eofPos) {
      throw new MigrationStreamError('DESCRIPTION_MISMATCH', base + p, `${eofPos - p} bytes of device state after the last described section, before QEMU_VM_EOF`);
    }
    return out;
  }

  private plausibleHeader(p: number, limit: number): FullHeader | undefined {
    const h = this.readHeader(p, limit);
    if (!h || h.idstr.length === 0 || h.instanceId > 0xffffff || h.versionId > 0xffffff) return undefined;
    for (let i = 0; i < h.idstr.length; i++) {
      const c = h.idstr.charCodeAt(i);
      if (c < 0x20 || c > 0x7e) return undefined;
    }
    return h;
  }

  /**
   * Fallback without a description: counts the chains of plausible FULL sections, each ended by its
   * own footer, that end exactly at eofPos (depth-first over footer positions, memoised by start
   * position, explicit stack, bounded work). Only a unique chain is returned: if bodies contain
   * look-alike footers that allow a second consistent split, the bytes cannot be delimited.
   */
  private footerScan(eofPos: number): DeviceSectionRecord[] | 'ambiguous' | undefined {
    interface Frame {
      start: number;
      h: FullHeader;
      footer: Buffer;
      searchFrom: number;
      /** Complete chains found from this frame (capped at 2). */
      count: number;
      /** Footer of the first chain found, for reconstruction. */
      firstFooter: number;
      /** Footer that led to the child frame being explored. */
      pendingFooter: number;
    }
    const view = this.buf.subarray(0, eofPos);
    const memo = new Map<number, { count: number; footer: number; h?: FullHeader }>();
    const frame = (start: number, h: FullHeader): Frame => {
      const footer = Buffer.alloc(5);
      footer[0] = SectionType.FOOTER;
      footer.writeUInt32BE(h.sectionId, 1);
      return { start, h, footer, searchFrom: h.bodyStart, count: 0, firstFooter: -1, pendingFooter: -1 };
    };
    const credit = (f: Frame, count: number, footer: number): void => {
      if (count > 0 && f.firstFooter < 0) f.firstFooter = footer;
      f.count = Math.min(2, f.count + count);
    };
    const first = this.plausibleHeader(0, eofPos);
    if (!first) return undefined;
    const stack: Frame[] = [frame(0, first)];
    let budget = FOOTER_SCAN_BUDGET;
    while (stack.length > 0) {
      if (--budget < 0) return undefined;
      const top = stack[stack.length - 1]!;
      const q = top.count >= 2 ? -1 : view.indexOf(top.footer, top.searchFrom);
      if (q === -1) {
        memo.set(top.start, { count: top.count, footer: top.firstFooter, h: top.h });
        stack.pop();
        const parent = stack[stack.length - 1];
        if (parent) credit(parent, top.count, parent.pendingFooter);
        continue;
      }
      top.searchFrom = q + 1;
      const next = q + 5;
      if (next === eofPos) {
        credit(top, 1, q);
        continue;
      }
      const known = memo.get(next);
      if (known) {
        credit(top, known.count, q);
        continue;
      }
      const h = this.plausibleHeader(next, eofPos);
      if (!h) {
        memo.set(next, { count: 0, footer: -1 });
        continue;
      }
      top.pendingFooter = q;
      stack.push(frame(next, h));
    }
    const root = memo.get(0);
    if (!root || root.count === 0) return undefined;
    if (root.count > 1) return 'ambiguous';
    const out: DeviceSectionRecord[] = [];
    for (let p = 0; p !== eofPos; ) {
      const m = memo.get(p)!;
      out.push(this.section(m.h!, m.footer, false));
      p = m.footer + 5;
    }
    return out;
  }
}
