/** Picking QEMU's reason for a refused restore out of libvirt's per-domain QEMU log. */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { RestoreError } from '../src/errors.js';
import { logOffset, pickQemuErrors, qemuReasonFromLog, readLogSince } from '../src/qemu-log.js';

// The shape of /var/log/libvirt/qemu/<name>.log under libvirt 9 with QEMU 7.2 (-msg timestamp=on)
const START = `2026-12-01 10:00:00.000+0000: starting up libvirt version: 9.0.0, package: 9.0.0-4 (Debian), qemu version: 7.2.0Debian 1:7.2+dfsg-7+deb12u18, kernel: 6.1.0-28-amd64, hostname: backup
LC_ALL=C \\
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin \\
HOME=/var/lib/libvirt/qemu/domain-3-lv-ckpt \\
/opt/ftvm/bin/qemu-system-x86_64 \\
-name guest=lv-ckpt,debug-threads=on \\
-S \\
-blockdev '{"driver":"file","filename":"/x.qcow2","node-name":"libvirt-1-storage","discard":"unmap"}' \\
-device '{"driver":"virtio-blk-pci","drive":"d","id":"virtio-disk0","werror":"stop","rerror":"report"}' \\
-msg timestamp=on \\
-incoming defer
char device redirected to /dev/pts/3 (label charserial0)
2026-12-01T10:00:00.512345Z qemu-system-x86_64: warning: host doesn't support requested feature: CPUID.01H:ECX.vmx [bit 5]
`;
const REFUSED = `2026-12-01T10:00:07.123456Z qemu-system-x86_64: Unknown savevm section or instance 'xyz' 0. Make sure that your current VM setup matches your saved VM setup, including any hotplugged devices
2026-12-01T10:00:07.123500Z qemu-system-x86_64: load of migration failed: Invalid argument
2026-12-01 10:00:07.200+0000: shutting down, reason=failed
`;

describe('pickQemuErrors', () => {
  it("picks QEMU's error lines, timestamps off, and none of libvirt's command line, notes or QEMU's warnings", () => {
    expect(pickQemuErrors(START + REFUSED)).toEqual([
      "qemu-system-x86_64: Unknown savevm section or instance 'xyz' 0. Make sure that your current VM setup matches your saved VM setup, including any hotplugged devices",
      'qemu-system-x86_64: load of migration failed: Invalid argument',
    ]);
    expect(pickQemuErrors(START)).toEqual([]);
  });

  it('knows the machine-type refusal, qemu-kvm, lines without a timestamp, and drops repeats', () => {
    const text = [
      "2026-12-01T10:00:07.1Z qemu-kvm: Machine type received is 'pc-i440fx-7.1' and local is 'pc-i440fx-7.2'",
      'qemu-system-x86_64: load of migration failed: Invalid argument',
      'qemu-system-x86_64: load of migration failed: Invalid argument',
      'some unrelated line',
      '',
    ].join('\n');
    expect(pickQemuErrors(text)).toEqual([
      "qemu-kvm: Machine type received is 'pc-i440fx-7.1' and local is 'pc-i440fx-7.2'",
      'qemu-system-x86_64: load of migration failed: Invalid argument',
    ]);
  });

  it('keeps the last few lines, each cut to a bounded length', () => {
    const many = Array.from({ length: 20 }, (_, i) => `qemu-system-x86_64: error ${i} ${'x'.repeat(i === 19 ? 1000 : 1)}`).join('\n');
    const picked = pickQemuErrors(many);
    expect(picked).toHaveLength(6);
    expect(picked[0]).toMatch(/^qemu-system-x86_64: error 14 /);
    expect(picked.at(-1)!.length).toBeLessThan(410);
    expect(picked.at(-1)!.endsWith('…')).toBe(true);
  });
});

describe('reading the log since the restore began', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ftvm-qemu-log-'));
  const file = path.join(dir, 'lv-x.log');
  afterEach(() => fs.rmSync(file, { force: true }));

  it('only what was written after the remembered offset counts (an earlier failure of the same domain does not)', () => {
    fs.writeFileSync(file, START + "2026-12-01T09:00:00.000000Z qemu-system-x86_64: Unknown savevm section or instance 'old' 0\n");
    const offset = logOffset(file);
    expect(qemuReasonFromLog(file, offset)).toBeUndefined();
    fs.appendFileSync(file, REFUSED);
    expect(qemuReasonFromLog(file, offset)).toBe(
      "qemu-system-x86_64: Unknown savevm section or instance 'xyz' 0. Make sure that your current VM setup matches your saved VM setup, including any hotplugged devices; qemu-system-x86_64: load of migration failed: Invalid argument",
    );
  });

  it('a missing log is no reason and offset 0; a log shorter than the offset (rotated) is read from its start', () => {
    expect(logOffset(file)).toBe(0);
    expect(readLogSince(file, 0)).toBe('');
    expect(qemuReasonFromLog(file, 0)).toBeUndefined();
    fs.writeFileSync(file, REFUSED);
    expect(qemuReasonFromLog(file, 1_000_000)).toMatch(/^qemu-system-x86_64: Unknown savevm section/);
  });

  it('reads at most the last 64 KiB, from a line boundary', () => {
    fs.writeFileSync(file, `${'libvirt chatter line\n'.repeat(10_000)}${REFUSED}`);
    const text = readLogSince(file, 0);
    expect(text.length).toBeLessThanOrEqual(64 * 1024);
    expect(text.startsWith('libvirt chatter line\n')).toBe(true);
    expect(pickQemuErrors(text)).toHaveLength(2);
    fs.writeFileSync(file, `${'y'.repeat(70_000)}\n${REFUSED}`);
    expect(readLogSince(file, 0)).toBe(REFUSED); // the cut-off fragment of the long line is dropped
  });
});

describe('RestoreError', () => {
  it("carries QEMU's reason in the message and in qemuReason, once", () => {
    const error = new RestoreError('web1', 'stream', 'incoming migration failed', { qemuReason: "qemu-system-x86_64: Unknown savevm section or instance 'xyz' 0" });
    expect(error.message).toBe("restore of 'web1' failed at stream: incoming migration failed (QEMU: qemu-system-x86_64: Unknown savevm section or instance 'xyz' 0)");
    expect(error.qemuReason).toBe("qemu-system-x86_64: Unknown savevm section or instance 'xyz' 0");
    expect(new RestoreError('web1', 'start paused', 'internal error: qemu said: boom', { qemuReason: 'boom' }).message).toBe("restore of 'web1' failed at start paused: internal error: qemu said: boom");
    expect(new RestoreError('web1', 'stream', 'x').qemuReason).toBeUndefined();
  });
});
