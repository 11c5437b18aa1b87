/**
 * QEMU's own reason for refusing a stream ("Unknown savevm section or instance 'xyz' 0", "Machine
 * type received is … and local is …") goes to QEMU's stderr only, which libvirt appends (through
 * virtlogd) to the per-domain log `<dir>/<domain>.log`. A restore remembers where that file ended
 * when it began and, on failure, reads what was written since and picks QEMU's error lines.
 */
import fs from 'node:fs';
import path from 'node:path';

export const DEFAULT_QEMU_LOG_DIR = '/var/log/libvirt/qemu';

/** At most this much of the log's tail is read (a failing QEMU writes a few lines; the rest is libvirt's). */
export const QEMU_LOG_TAIL_BYTES = 64 * 1024;

/** The reason is kept short enough for a log line and an error message. */
const MAX_LINES = 6;
const MAX_LINE_CHARS = 400;

/** libvirt's per-domain QEMU log as this process sees it. */
export function qemuLogPath(dir: string, domain: string): string {
  return path.join(dir, `${domain}.log`);
}

/** The log's current size (where lines written from now on start); 0 when it does not exist yet. */
export function logOffset(file: string): number {
  try {
    return fs.statSync(file).size;
  } catch {
    return 0;
  }
}

/**
 * What was appended to `file` since `offset`, at most the last `maxBytes` of it. A file shorter than
 * `offset` was truncated or rotated since: it is read from its start. '' when it is missing.
 */
export function readLogSince(file: string, offset: number, maxBytes = QEMU_LOG_TAIL_BYTES): string {
  let fd: number;
  try {
    fd = fs.openSync(file, 'r');
  } catch {
    return '';
  }
  try {
    const size = fs.fstatSync(fd).size;
    const from = Math.max(size < offset ? 0 : offset, size - maxBytes);
    const buffer = Buffer.alloc(size - from);
    let read = 0;
    while (read < buffer.length) {
      const n = fs.readSync(fd, buffer, read, buffer.length - read, from + read);
      if (n === 0) break;
      read += n;
    }
    let text = buffer.subarray(0, read).toString('utf8');
    // a tail cut mid-line starts with a fragment
    if (from > offset && from > 0) text = text.slice(text.indexOf('\n') + 1);
    return text;
  } finally {
    fs.closeSync(fd);
  }
}

// `-msg timestamp=on` (libvirt sets it) and virtlogd prefix lines with an ISO time
const TIMESTAMP = /^\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?:?\s*/;
// error_report() prefixes its lines with the program's basename: qemu-system-x86_64: …, qemu-kvm: …
const QEMU_PREFIX = /^qemu(?:-system-[\w.-]+|-kvm)?: /;
const QEMU_PHRASES = [/unknown savevm section/i, /machine type received/i, /load of migration failed/i, /\berror\b/i, /\bfailed\b/i];
// libvirt's own lines in the same file: the command line it ran, one argument a line ending in
// ' \' (it names the qemu-system binary and may hold "error" in an argument), its start-up,
// char-device and shutdown notes; and QEMU's warnings, which are not why it refused
const LIBVIRT_LINES = [/^LC_ALL=/, / \\$/, /^-\w/, /^starting up libvirt/i, /^char device redirected/i, /^shutting down, reason=/i, /^qemu[^:\s]*: warning: /i];

/**
 * QEMU's error lines in a piece of its libvirt log, timestamps stripped, in order, duplicates and
 * libvirt's own lines dropped; the last few if there are many. [] when QEMU said nothing.
 */
export function pickQemuErrors(text: string): string[] {
  const picked: string[] = [];
  for (const raw of text.split('\n')) {
    const line = raw.replace(TIMESTAMP, '').trim();
    if (!line || LIBVIRT_LINES.some((p) => p.test(line))) continue;
    if (!QEMU_PREFIX.test(line) && !QEMU_PHRASES.some((p) => p.test(line))) continue;
    const short = line.length > MAX_LINE_CHARS ? `${line.slice(0, MAX_LINE_CHARS)}…` : line;
    if (!picked.includes(short)) picked.push(short);
  }
  return picked.slice(-MAX_LINES);
}

/** QEMU's reason from the log lines since `offset`, joined with '; ' (undefined when there is none). */
export function qemuReasonFromLog(file: string, offset: number): string | undefined {
  const lines = pickQemuErrors(readLogSince(file, offset));
  return lines.length ? lines.join('; ') : undefined;
}
