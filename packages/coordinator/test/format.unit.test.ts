import { describe, expect, it } from 'vitest';
import { formatBytes, formatDuration, formatResidual, formatStatus, table } from '../src/cli/format.js';
import { agentStatus } from './fake-control.js';

describe('CLI formatting', () => {
  it('durations', () => {
    expect([undefined, 0, 730, 999.6, 1_000, 12_340, 59_949, 59_960, 60_000, 754_000, 3_599_000, 7_560_000].map(formatDuration)).toEqual([
      '-', '0ms', '730ms', '1.0s', '1.0s', '12.3s', '59.9s', '1m00s', '1m00s', '12m34s', '59m59s', '2h06m',
    ]);
  });

  it('clock residuals are signed, to the tenth of a millisecond, never -0.0', () => {
    expect([undefined, 0, 0.26, -0.42, -0.04, 12, Number.NaN].map(formatResidual)).toEqual(['-', '0.0ms', '+0.3ms', '-0.4ms', '0.0ms', '+12.0ms', '-']);
  });

  it('bytes', () => {
    expect([0, 1023, 1024, 268_435_456, 5 * 1024 ** 4].map(formatBytes)).toEqual(['0 B', '1023 B', '1.0 KiB', '256.0 MiB', '5.0 TiB']);
  });

  it('tables pad every column but the last', () => {
    expect(table([['A', 'BB', 'C'], ['long', 'x', '']])).toBe('A     BB  C\nlong  x');
  });

  it('status: VM table, host, lease and peers', () => {
    const status = agentStatus();
    status.lease = { id: undefined, healthy: false, lastRenewAgeMs: 2_400 };
    status.peers.push({ name: 'gamma', alive: false, lastBeatAgeMs: { udp: undefined, ssh: 95_000 } });
    status.peers.push({ name: 'delta', alive: true, lastBeatAgeMs: { udp: 20, ssh: 30 }, clockOffset: { offsetMs: -2000.04, errorMs: 0.23, ageMs: 40, samples: 64 } });
    status.peers.push({ name: 'eps', alive: true, lastBeatAgeMs: { udp: 20, ssh: 30 }, clockOffset: { offsetMs: 0.31, errorMs: 0.004, ageMs: 40, samples: 3 } });
    expect(formatStatus(status)).toBe(
      [
        'VM   ROLE     STATE    PHASE      PRIMARY  BACKUP  LEASE HOLDER  INTERVAL  OUTPUT  CHECKPOINT AGE  STANDBY  CLOCK   WHY',
        'vm1  primary  running  protected  alpha    beta    alpha         1.0s      direct  730ms           -        -0.4ms  checkpointed into beta',
        'vm2  backup   absent   degraded   alpha    beta    -             100ms     held    -               warm@42  -       checkpointed into beta',
        '',
        'host: alpha',
        'lease: none UNHEALTHY, renewed 2.4s ago',
        'peer beta: alive (last heartbeat udp 80ms ago, ssh never)',
        'peer gamma: DEAD (last heartbeat udp never, ssh 1m35s ago)',
        'peer delta: alive (last heartbeat udp 20ms ago, ssh 30ms ago), clock -2000.0ms ±0.3ms',
        'peer eps: alive (last heartbeat udp 20ms ago, ssh 30ms ago), clock +0.3ms ±0.1ms',
      ].join('\n'),
    );
    expect(formatStatus({ host: 'alpha', lease: { id: 'abc', healthy: true, lastRenewAgeMs: undefined }, peers: [], vms: [] })).toBe('no VMs\n\nhost: alpha\nlease: abc healthy\npeers: none');
  });
});
