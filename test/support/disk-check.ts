/**
 * Host side of the probe guest's disk workloads (test/guest/probe.c): makes the two disk images
 * the guest recognises (a counter ring and an ext4 file system), reads the ring back out of an
 * image, and checks a copy of the file system with e2fsck. Formats: test/guest/README.md.
 */
import { execFile } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { crc32 } from 'node:zlib';

export type DiskFormat = 'raw' | 'qcow2';
export const DISK_FORMATS: readonly DiskFormat[] = ['raw', 'qcow2'];

/** virtio-blk serials the guest's init looks for (/sys/block/vdX/serial). */
export const RING_SERIAL = 'ftvm-ring';
export const FS_SERIAL = 'ftvm-fs';
/** ext4 volume label of the fs disk: init finds the disk by it when there is no serial. */
export const FS_LABEL = 'ftvm-fs';

export interface ProbeDisk {
  path: string;
  format: DiskFormat;
  serial: typeof RING_SERIAL | typeof FS_SERIAL;
}

/** The probe guest's disks; boot-qemu.ts and probe-domain.ts attach whichever are given. */
export interface ProbeDisks {
  ring?: ProbeDisk;
  fs?: ProbeDisk;
}

export type DiskCheckErrorCode =
  | 'BAD_OPTION'
  | 'TOOL_FAILED'
  | 'BAD_RING_HEADER'
  | 'TRUNCATED_RING';

export class DiskCheckError extends Error {
  override readonly name = 'DiskCheckError';
  constructor(
    readonly code: DiskCheckErrorCode,
    detail: string,
    /** Byte offset in the image, where the problem has one. */
    readonly offset?: number,
  ) {
    super(`disk check: ${detail}${offset === undefined ? '' : ` at offset ${offset} (0x${offset.toString(16)})`} [${code}]`);
  }
}

// ---- ring format (little-endian; the C side is ring_open/ring_main in probe.c) ---------------------

export const SECTOR = 4096;
export const RING_SLOTS = 256;
const HEADER_MAGIC = Buffer.from('FTVMRDSK');
const RECORD_MAGIC = Buffer.from('FTVMRING');
const RING_VERSION = 1;
/** Every sector ends in zlib's crc32 of the bytes before it. */
const CRC_OFFSET = SECTOR - 4;

export interface RingHeader {
  slots: number;
  /** Boot id of the probe that last took the ring over (0: never used). */
  bootId: bigint;
}

export interface RingRecord {
  bootId: bigint;
  counter: bigint;
  slot: number;
  /** Guest CLOCK_MONOTONIC / CLOCK_REALTIME when the write was issued. */
  monotonicNs: bigint;
  realtimeNs: bigint;
}

const sealed = (sector: Buffer): boolean => sector.readUInt32LE(CRC_OFFSET) === crc32(sector.subarray(0, CRC_OFFSET));

export function encodeRingHeader(header: RingHeader): Buffer {
  const h = Buffer.alloc(SECTOR);
  HEADER_MAGIC.copy(h, 0);
  h.writeUInt32LE(RING_VERSION, 8);
  h.writeUInt32LE(SECTOR, 12);
  h.writeUInt32LE(header.slots, 16);
  h.writeBigUInt64LE(header.bootId, 24);
  h.writeUInt32LE(crc32(h.subarray(0, CRC_OFFSET)), CRC_OFFSET);
  return h;
}

/** Sector 0 of a ring image; throws BAD_RING_HEADER (with the offset of the bad field). */
export function decodeRingHeader(sector: Buffer): RingHeader {
  if (sector.length < SECTOR) throw new DiskCheckError('TRUNCATED_RING', `ring header needs ${SECTOR} bytes, got ${sector.length}`, 0);
  const bad = (offset: number, what: string): never => {
    throw new DiskCheckError('BAD_RING_HEADER', what, offset);
  };
  if (!sector.subarray(0, 8).equals(HEADER_MAGIC)) bad(0, `magic ${JSON.stringify(sector.subarray(0, 8).toString('latin1'))}, expected FTVMRDSK`);
  if (sector.readUInt32LE(8) !== RING_VERSION) bad(8, `version ${sector.readUInt32LE(8)}, expected ${RING_VERSION}`);
  if (sector.readUInt32LE(12) !== SECTOR) bad(12, `sector size ${sector.readUInt32LE(12)}, expected ${SECTOR}`);
  const slots = sector.readUInt32LE(16);
  if (slots < 2 || slots > 65535) bad(16, `slot count ${slots} outside 2..65535`);
  if (!sealed(sector.subarray(0, SECTOR))) bad(CRC_OFFSET, 'crc mismatch');
  return { slots, bootId: sector.readBigUInt64LE(24) };
}

type SlotContent = { kind: 'empty' } | { kind: 'corrupt'; why: string } | { kind: 'record'; record: RingRecord };

/** One slot sector: empty (never written), corrupt (torn or garbage) or a record. */
export function decodeRingSlot(sector: Buffer, slot: number): SlotContent {
  if (sector.subarray(0, 8).equals(Buffer.alloc(8)) && sector.readUInt32LE(CRC_OFFSET) === 0) return { kind: 'empty' };
  if (!sector.subarray(0, 8).equals(RECORD_MAGIC)) return { kind: 'corrupt', why: 'magic' };
  if (!sealed(sector)) return { kind: 'corrupt', why: 'crc' };
  const record: RingRecord = {
    bootId: sector.readBigUInt64LE(8),
    counter: sector.readBigUInt64LE(16),
    slot: sector.readUInt32LE(24),
    monotonicNs: sector.readBigUInt64LE(32),
    realtimeNs: sector.readBigUInt64LE(40),
  };
  if (record.slot !== slot || record.counter < 1n) return { kind: 'corrupt', why: `slot ${record.slot} / counter ${record.counter} in slot ${slot}` };
  return { kind: 'record', record };
}

export interface RingState {
  /** The boot whose records count: the header's, unless the caller named one. */
  bootId: bigint;
  slots: number;
  /** Highest counter of that boot on disk; 0n if it wrote none. */
  newest: bigint;
  /** Guest CLOCK_REALTIME at which the newest record was issued (0n if none). */
  newestRealtimeNs: bigint;
  /** Records of that boot with a good crc. */
  valid: number;
  /** Good records of other boots (left from earlier boots). */
  stale: number;
  /** Slots with a bad magic, crc, or a record in the wrong slot (a torn write shows here). */
  corrupt: number;
  empty: number;
  /**
   * Counters of the window max(1, newest − slots + 2) .. newest that are not on disk. Writes are
   * one at a time and each waits for O_DSYNC, so every counter below the newest one was durable
   * before it was issued: anything missing here is a lost write. (The window leaves out the slot
   * of newest + 1, which the crash may have torn.)
   */
  missing: number;
}

/**
 * Reads the counter ring from an image: a Buffer holds the image's raw bytes from offset 0 (at
 * least the header and the slots); a path is read as `format` (qcow2 through `qemu-img convert
 * -U`, which also works while QEMU has the image open).
 */
export async function readRing(image: Buffer | string, format: DiskFormat = 'raw', options: { bootId?: bigint } = {}): Promise<RingState> {
  const bytes = typeof image === 'string' ? await readRingBytes(image, format) : image;
  const header = decodeRingHeader(bytes);
  const end = (header.slots + 1) * SECTOR;
  if (bytes.length < end) throw new DiskCheckError('TRUNCATED_RING', `ring of ${header.slots} slots needs ${end} bytes, image has ${bytes.length}`, bytes.length);
  const bootId = options.bootId ?? header.bootId;
  const state: RingState = { bootId, slots: header.slots, newest: 0n, newestRealtimeNs: 0n, valid: 0, stale: 0, corrupt: 0, empty: 0, missing: 0 };
  const counters = new Set<bigint>();
  for (let slot = 0; slot < header.slots; slot++) {
    const content = decodeRingSlot(bytes.subarray((slot + 1) * SECTOR, (slot + 2) * SECTOR), slot);
    if (content.kind !== 'record') {
      state[content.kind]++;
      continue;
    }
    const { record } = content;
    if (record.bootId !== bootId) {
      state.stale++;
      continue;
    }
    if ((record.counter - 1n) % BigInt(header.slots) !== BigInt(slot)) {
      state.corrupt++;
      continue;
    }
    state.valid++;
    counters.add(record.counter);
    if (record.counter > state.newest) {
      state.newest = record.counter;
      state.newestRealtimeNs = record.realtimeNs;
    }
  }
  const first = state.newest - BigInt(header.slots) + 2n;
  for (let c = first > 1n ? first : 1n; c <= state.newest; c++) if (!counters.has(c)) state.missing++;
  return state;
}

async function readRingBytes(image: string, format: DiskFormat): Promise<Buffer> {
  checkFormat(format);
  if (format === 'qcow2') return withTempDir(async (dir) => {
    const raw = path.join(dir, 'ring.raw');
    await run('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'raw', image, raw]);
    return fs.readFileSync(raw);
  });
  const fd = fs.openSync(image, 'r');
  try {
    const header = Buffer.alloc(SECTOR);
    fs.readSync(fd, header, 0, SECTOR, 0);
    const { slots } = decodeRingHeader(header);
    const bytes = Buffer.alloc((slots + 1) * SECTOR);
    const n = fs.readSync(fd, bytes, 0, bytes.length, 0);
    return bytes.subarray(0, n);
  } finally {
    fs.closeSync(fd);
  }
}

// ---- creating the images ---------------------------------------------------------------------------

export interface CreateProbeDisksOptions {
  ringMiB?: number;
  /** Fill the ring disk beyond its slots with random bytes (a seed then has that much to copy). */
  fillRing?: boolean;
  fsMiB?: number;
  format?: DiskFormat;
}

/**
 * Creates `ring.<format>` (header written, slots zero, boot id 0) and `fs.<format>` (ext4 made by
 * this host's mke2fs, label ftvm-fs, inode tables and journal fully initialised so the guest has
 * no background lazy-init writes) in `dir`. qcow2 images are converted from raw ones.
 */
export async function createProbeDisks(dir: string, options: CreateProbeDisksOptions = {}): Promise<Required<ProbeDisks>> {
  const format = options.format ?? 'qcow2';
  const ringMiB = options.ringMiB ?? 4;
  const fsMiB = options.fsMiB ?? 64;
  checkFormat(format);
  if (!Number.isInteger(ringMiB) || ringMiB * 1024 * 1024 < (RING_SLOTS + 1) * SECTOR) {
    throw new DiskCheckError('BAD_OPTION', `ringMiB ${ringMiB}: must be a whole number ≥ ${Math.ceil(((RING_SLOTS + 1) * SECTOR) / (1 << 20))}`);
  }
  // ext4 with a journal needs a few MiB; below 16 the journal is tiny and the workload's log rotates into ENOSPC
  if (!Number.isInteger(fsMiB) || fsMiB < 16) throw new DiskCheckError('BAD_OPTION', `fsMiB ${fsMiB}: must be a whole number ≥ 16`);
  fs.mkdirSync(dir, { recursive: true });

  const ringRaw = path.join(dir, format === 'raw' ? 'ring.raw' : 'ring.raw.tmp');
  const fsRaw = path.join(dir, format === 'raw' ? 'fs.raw' : 'fs.raw.tmp');
  fs.writeFileSync(ringRaw, encodeRingHeader({ slots: RING_SLOTS, bootId: 0n }));
  fs.truncateSync(ringRaw, ringMiB << 20);
  if (options.fillRing) {
    const fd = fs.openSync(ringRaw, 'r+');
    try {
      for (let at = (RING_SLOTS + 1) * SECTOR; at < ringMiB << 20; at += 1 << 20) fs.writeSync(fd, crypto.randomBytes(Math.min(1 << 20, (ringMiB << 20) - at)), 0, undefined, at);
    } finally {
      fs.closeSync(fd);
    }
  }
  fs.rmSync(fsRaw, { force: true });
  await run('mke2fs', ['-q', '-F', '-t', 'ext4', '-b', '4096', '-L', FS_LABEL, '-E', 'lazy_itable_init=0,lazy_journal_init=0', fsRaw, `${fsMiB}M`]);
  if (format === 'raw') {
    return { ring: { path: ringRaw, format, serial: RING_SERIAL }, fs: { path: fsRaw, format, serial: FS_SERIAL } };
  }
  const ring = path.join(dir, 'ring.qcow2');
  const fsImage = path.join(dir, 'fs.qcow2');
  await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', ringRaw, ring]);
  await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', fsRaw, fsImage]);
  fs.rmSync(ringRaw);
  fs.rmSync(fsRaw);
  return { ring: { path: ring, format, serial: RING_SERIAL }, fs: { path: fsImage, format, serial: FS_SERIAL } };
}

// ---- file-system check ------------------------------------------------------------------------------

export interface FsckResult {
  /**
   * The file system is consistent after journal replay: the copy's journal was replayed (as a
   * mount would) and then `e2fsck -fn` found nothing to fix (exit 0). See README.md.
   */
  clean: boolean;
  /** The journal held transactions to replay (always so after a hard kill of a mounted fs). */
  needsRecovery: boolean;
  /** e2fsck's output: the replay step (if any), then the forced read-only check. */
  output: string;
  /** The forced check's exit code (0 clean, 4 errors left uncorrected, 8 operational error). */
  exitCode: number;
  /** First line of /current in the checked copy: the newest fs cycle made durable by rename. */
  current?: { bootId: bigint; cycle: bigint };
  /** Highest cycle in /log (or /log.1 when log was just rotated). */
  logLast?: bigint;
}

/**
 * Checks a copy of an ext4 image (the original is never written, and may be open in QEMU):
 * converts it to a raw temporary file, replays the journal if it needs it (`e2fsck -E
 * journal_only -y`), then runs `e2fsck -fn`, and reads /current and /log with debugfs.
 */
export async function fsckCopy(imagePath: string, format: DiskFormat = 'raw'): Promise<FsckResult> {
  checkFormat(format);
  return withTempDir(async (dir) => {
    const copy = path.join(dir, 'fs.raw');
    await run('qemu-img', ['convert', '-U', '-f', format, '-O', 'raw', imagePath, copy]);
    const features = /^Filesystem features:\s*(.*)$/m.exec((await run('dumpe2fs', ['-h', copy])).stdout)?.[1] ?? '';
    const needsRecovery = features.split(/\s+/).includes('needs_recovery');
    let output = '';
    if (needsRecovery) {
      // exit 0/1: replayed (1 = "file system modified", which the replay is); ≥ 2 is a failure
      const replay = await run('e2fsck', ['-E', 'journal_only', '-y', copy], [0, 1]);
      output += `$ e2fsck -E journal_only -y\n${replay.stdout}${replay.stderr}`;
    }
    const check = await run('e2fsck', ['-fn', copy], [0, 1, 2, 4]);
    output += `$ e2fsck -fn\n${check.stdout}${check.stderr}`;
    const result: FsckResult = { clean: check.code === 0, needsRecovery, output, exitCode: check.code };
    const current = /^ftvm-fs ([0-9a-f]{16}) (\d+)$/m.exec(await debugfsCat(copy, '/current'));
    if (current) result.current = { bootId: BigInt(`0x${current[1]}`), cycle: BigInt(current[2]!) };
    for (const log of ['/log', '/log.1']) {
      const lines = [...(await debugfsCat(copy, log)).matchAll(/^(\d+) [0-9a-f]{16}$/gm)];
      if (lines.length > 0) {
        result.logLast = BigInt(lines.at(-1)![1]!);
        break;
      }
    }
    return result;
  });
}

async function debugfsCat(image: string, file: string): Promise<string> {
  const { stdout, code } = await run('debugfs', ['-R', `cat ${file}`, image], [0, 1]);
  return code === 0 ? stdout : '';
}

// ---- helpers ----------------------------------------------------------------------------------------

const TOOL_TIMEOUT_MS = 120_000;

function checkFormat(format: string): asserts format is DiskFormat {
  if (!DISK_FORMATS.includes(format as DiskFormat)) throw new DiskCheckError('BAD_OPTION', `format ${JSON.stringify(format)}: expected raw or qcow2`);
}

/** Runs a tool with a deadline; exit codes outside `ok` (default [0]) throw TOOL_FAILED. */
function run(file: string, args: string[], ok: number[] = [0]): Promise<{ stdout: string; stderr: string; code: number }> {
  return new Promise((resolve, reject) => {
    execFile(file, args, { timeout: TOOL_TIMEOUT_MS, maxBuffer: 64 << 20 }, (error, stdout, stderr) => {
      const code = error ? (typeof error.code === 'number' ? error.code : -1) : 0;
      if (ok.includes(code)) return resolve({ stdout, stderr, code });
      const why = error?.killed ? `timed out after ${TOOL_TIMEOUT_MS} ms` : `exit ${String(error?.code ?? code)}`;
      reject(new DiskCheckError('TOOL_FAILED', `${file} ${args.join(' ')}: ${why}\n${stderr.slice(-2000)}${stdout.slice(-2000)}`));
    });
  });
}

async function withTempDir<T>(use: (dir: string) => Promise<T>): Promise<T> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ftvm-disk-check-'));
  try {
    return await use(dir);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
