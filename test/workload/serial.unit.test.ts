import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { acksBefore, parseSerialLine, roundFigures, SerialLog, WorkloadSerialError } from './serial.js';

describe('parseSerialLine', () => {
  it('reads acknowledgements, events with fields, and free text after the fields', () => {
    expect(parseSerialLine('FTVM-ACK 42')).toEqual({ kind: 'ack', n: 42 });
    expect(parseSerialLine('FTVM-WL pgbench-end round=3 rc=0 s=31.9 tps=68.6')).toEqual({ kind: 'event', event: 'pgbench-end', fields: { round: '3', rc: '0', s: '31.9', tps: '68.6' }, text: '' });
    expect(parseSerialLine('FTVM-WL seq-error n=17 server closed the connection a=b')).toEqual({ kind: 'event', event: 'seq-error', fields: { n: '17' }, text: 'server closed the connection a=b' });
  });

  it('finds a protocol line behind kernel output on the same console line, and skips other lines', () => {
    expect(parseSerialLine('[  163.70] sysrq: Power Off')).toBeUndefined();
    expect(parseSerialLine('[    5.1] random: crng init doneFTVM-ACK 7')).toEqual({ kind: 'ack', n: 7 });
  });

  it('refuses a malformed acknowledgement or event, with the offset', () => {
    expect(() => parseSerialLine('FTVM-ACK 12x', 300)).toThrow(WorkloadSerialError);
    expect(() => parseSerialLine('FTVM-ACK 12x', 300)).toThrow(/at offset 300 \[BAD_ACK\]/);
    expect(() => parseSerialLine('FTVM-WL =3', 9)).toThrow(/without an event name.*at offset 9 \[BAD_EVENT\]/);
  });
});

describe('SerialLog', () => {
  const dirs: string[] = [];
  afterEach(() => dirs.splice(0).forEach((d) => fs.rmSync(d, { recursive: true, force: true })));
  const tmpFile = () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ftvm-serial-'));
    dirs.push(dir);
    return path.join(dir, 'serial.log');
  };

  it('follows a file written in pieces (split lines, CRLF), stamping lines when read, with byte offsets', () => {
    const file = tmpFile();
    const log = new SerialLog(file);
    log.poll(); // no file yet: nothing, no error
    fs.writeFileSync(file, 'FTVM-WL boot mode=bench\r\nFTVM-AC');
    log.poll();
    expect(log.lines.map((l) => l.line)).toEqual([{ kind: 'event', event: 'boot', fields: { mode: 'bench' }, text: '' }]);
    const firstStamp = log.lines[0]!.hostNs;
    fs.appendFileSync(file, 'K 1\r\nkernel noise\r\nFTVM-ACK 2\r\n');
    log.poll();
    expect(log.acks().map((a) => a.n)).toEqual([1, 2]);
    expect(log.lines[1]!.offset).toBe('FTVM-WL boot mode=bench\r\n'.length);
    expect(log.lines[2]!.offset).toBe('FTVM-WL boot mode=bench\r\nFTVM-ACK 1\r\nkernel noise\r\n'.length);
    expect(log.lines[1]!.hostNs).toBeGreaterThanOrEqual(firstStamp);
  });

  it('waitFor rejects at once on a guest error line and when the writer is gone', async () => {
    const file = tmpFile();
    fs.writeFileSync(file, 'FTVM-WL error postgres did not start\n');
    const log = new SerialLog(file);
    await expect(log.waitFor('ready', (l) => l.line.kind === 'event' && l.line.event === 'ready', { timeoutMs: 5_000 })).rejects.toThrow(/postgres did not start.*GUEST_ERROR/);
    fs.writeFileSync(file, '');
    const other = new SerialLog(file);
    await expect(other.waitFor('ready', () => false, { timeoutMs: 5_000, gone: () => 'QEMU exited (SIGKILL)' })).rejects.toThrow(/QEMU exited \(SIGKILL\)/);
  });

  it("gives a round's figures from its four lines, with tps over host seconds", () => {
    const file = tmpFile();
    const log = new SerialLog(file);
    fs.writeFileSync(file, 'FTVM-WL pgbench-start round=2\n');
    log.poll();
    fs.appendFileSync(file, 'FTVM-WL pgbench-end round=2 rc=0 s=31.5 tps=70.1 tx=2100 failed=0 latency_ms=28.5\nFTVM-WL build-start round=2\n');
    log.poll();
    fs.appendFileSync(file, 'FTVM-WL build-end round=2 rc=0 s=47.2\n');
    log.poll();
    // fix the host stamps: 35 s of pgbench (the guest saw 31.5), 50 s of build
    const at = (i: number, s: number) => (log.lines[i]!.hostNs = BigInt(s * 1e9));
    at(0, 100);
    at(1, 135);
    at(2, 136);
    at(3, 186);
    const r = roundFigures(log, 2);
    expect(r.pgbench.hostS).toBe(35);
    expect(r.pgbench.tpsHost).toBe(60);
    expect(r.pgbench.tpsGuest).toBe(70.1);
    expect(r.build.hostS).toBe(50);
    expect(() => roundFigures(log, 3)).toThrow(/round 3: 0 pgbench-start lines/);
  });

  it('refuses a round whose pgbench failed', () => {
    const file = tmpFile();
    fs.writeFileSync(file, ['pgbench-start round=1', 'pgbench-end round=1 rc=2 s=1 tps=none tx=none failed=none latency_ms=none', 'build-start round=1', 'build-end round=1 rc=0 s=40'].map((l) => `FTVM-WL ${l}\n`).join(''));
    const log = new SerialLog(file);
    log.poll();
    expect(() => roundFigures(log, 1)).toThrow(/pgbench exited 2/);
  });
});

describe('acksBefore', () => {
  it('counts the acknowledgements read before an instant, and whether they run without a gap', () => {
    const acks = [1, 2, 3, 4].map((n) => ({ n, hostNs: BigInt(n * 10) }));
    expect(acksBefore(acks, 35n)).toEqual({ count: 3, highest: 3, contiguous: true });
    expect(acksBefore(acks, 10n)).toEqual({ count: 0, highest: 0, contiguous: true });
    expect(acksBefore([...acks.slice(0, 2), { n: 4, hostNs: 30n }], 100n)).toEqual({ count: 3, highest: 4, contiguous: false });
  });
});
