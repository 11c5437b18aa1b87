import { describe, expect, it } from 'vitest';
import { encodeHeartbeat, heartbeatSchema, parseHeartbeat, PeerTracker, type Heartbeat } from '../src/heartbeat/index.js';

const beat = (seq: number, sentAtMs = 1_000 + seq, vms: Heartbeat['vms'] = {}): Heartbeat => ({ from: 'backup', seq, sentAtMs, vms });

describe('heartbeat wire', () => {
  it('round-trips a beat', () => {
    const b = beat(3, 5_000, { vm1: { role: 'primary', running: true, epoch: 12 }, vm2: { role: 'none', running: false } });
    expect(parseHeartbeat(encodeHeartbeat(b))).toEqual({ beat: b });
    expect(parseHeartbeat(Buffer.from(encodeHeartbeat(b)))).toEqual({ beat: b });
  });

  it('says why something is not a beat, never throws', () => {
    expect(parseHeartbeat('garbage')).toEqual({ error: expect.stringMatching(/^not JSON/) });
    expect(parseHeartbeat('[]')).toEqual({ error: expect.stringMatching(/^not a heartbeat: \(root\)/) });
    expect(parseHeartbeat(JSON.stringify({ ...beat(1), seq: -1 }))).toEqual({ error: expect.stringMatching(/^not a heartbeat: seq:/) });
    expect(parseHeartbeat(JSON.stringify({ ...beat(1), from: '' }))).toEqual({ error: expect.stringMatching(/^not a heartbeat: from:/) });
    expect(parseHeartbeat(JSON.stringify(beat(1, 1, { vm1: { role: 'boss', running: true } as never })))).toEqual({
      error: expect.stringMatching(/^not a heartbeat: vms\.vm1\.role:/),
    });
    expect(parseHeartbeat('x'.repeat(70_000))).toEqual({ error: expect.stringMatching(/more than 60000/) });
  });

  it('ignores fields it does not know (a newer agent may send more)', () => {
    const parsed = parseHeartbeat(JSON.stringify({ ...beat(2), extra: true, vms: { vm1: { role: 'backup', running: false, later: 1 } } }));
    expect(parsed).toEqual({ beat: beat(2, 1_002, { vm1: { role: 'backup', running: false } }) });
  });
});

describe('heartbeat wire: clock fields', () => {
  const timed = (): Heartbeat => ({ ...beat(7), sentAtNs: 1_700_000_000_123_456_789n, echo: { sentAtNs: 1_700_000_000_100_000_001n, receivedAtNs: 1_699_999_998_100_050_000n } });

  it('carries ns instants as decimal strings (beyond 2^53) and round-trips them exactly', () => {
    const line = encodeHeartbeat(timed());
    expect(JSON.parse(line)).toMatchObject({ sentAtNs: '1700000000123456789', echo: { sentAtNs: '1700000000100000001', receivedAtNs: '1699999998100050000' } });
    expect(parseHeartbeat(line)).toEqual({ beat: timed() });
  });

  it('an old agent (no clock fields) and a new one understand each other', () => {
    expect(parseHeartbeat(encodeHeartbeat(beat(1)))).toEqual({ beat: beat(1) }); // old → new: no timingError
    // new → old: the old agent's schema (this one without the clock fields, not strict) drops them
    expect(heartbeatSchema.parse(JSON.parse(encodeHeartbeat(timed())))).toEqual(beat(7));
  });

  // [bad clock fields, what the error names]
  const rows: [string, object, RegExp][] = [
    ['sentAtNs a JSON number (rounded beyond 2^53)', { sentAtNs: 1_700_000_000_123_456_789 }, /^clock fields left out: sentAtNs: Expected string/],
    ['sentAtNs not decimal', { sentAtNs: '0x10' }, /^clock fields left out: sentAtNs: a decimal count of ns/],
    ['sentAtNs zero', { sentAtNs: '0' }, /^clock fields left out: sentAtNs: ns within \(0, 2\^63\)/],
    ['echo without receivedAtNs', { sentAtNs: '5', echo: { sentAtNs: '4' } }, /^clock fields left out: echo\.receivedAtNs: Required/],
    ['echo beyond 2^63', { sentAtNs: '5', echo: { sentAtNs: '99999999999999999999', receivedAtNs: '4' } }, /^clock fields left out: echo\.sentAtNs: ns within/],
  ];
  for (const [situation, fields, error] of rows) {
    it(`${situation}: the beat still counts, without its clock fields`, () => {
      expect(parseHeartbeat(JSON.stringify({ ...beat(3), ...fields }))).toEqual({ beat: beat(3), timingError: expect.stringMatching(error) });
    });
  }
});

describe('PeerTracker', () => {
  it('is up from the first beat on either path, down after timeoutMs without any, up again at the next', () => {
    const p = new PeerTracker('backup');
    expect(p.alive).toBe(false);
    expect(p.check(10_000, 500)).toBeUndefined(); // never heard: no "down" to report
    expect(p.beat('udp', beat(1), 100)).toBe(true);
    expect(p.alive).toBe(true);
    expect(p.beat('ssh', beat(1), 101)).toBe(false); // already up
    expect(p.check(601, 500)).toBeUndefined(); // 500 ms since the ssh beat: not more than timeoutMs
    expect(p.check(601.5, 500)).toBe(101); // down, with the time of the last beat on either path
    expect(p.alive).toBe(false);
    expect(p.check(2_000, 500)).toBeUndefined(); // reported once
    expect(p.beat('ssh', beat(2), 2_100)).toBe(true);
    expect(p.lastBeatAt).toEqual({ udp: 100, ssh: 2_100 });
  });

  it('one path alone keeps the peer up', () => {
    const p = new PeerTracker('backup');
    p.beat('udp', beat(1), 0);
    for (let t = 100, seq = 2; t <= 3_000; t += 100, seq++) {
      p.beat('ssh', beat(seq), t);
      expect(p.check(t + 50, 500)).toBeUndefined();
    }
    expect(p.alive).toBe(true);
  });

  it('keeps the newest beat: duplicates over the other path and late ones do not replace it; a restart does', () => {
    const p = new PeerTracker('backup');
    p.beat('udp', beat(5, 5_000), 0);
    p.beat('ssh', beat(4, 4_000), 1); // late, over the slower path
    expect(p.last?.seq).toBe(5);
    p.beat('ssh', beat(5, 5_000), 2); // the same beat again
    expect(p.last?.seq).toBe(5);
    p.beat('udp', beat(1, 9_000), 3); // the sender restarted: seq from the start, later in time
    expect(p.last).toEqual(beat(1, 9_000));
  });
});
