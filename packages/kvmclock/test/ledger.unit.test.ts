import { describe, expect, it } from 'vitest';
import { DriftLedger } from '../src/ledger.js';
import { parsePolicy, PolicyError, DEFAULT_POLICY } from '../src/policy.js';

describe('DriftLedger', () => {
  it('predicts the lag as stopped time minus corrections, by cause', () => {
    const ledger = new DriftLedger('vm1');
    ledger.recordPause('checkpoint', 1_000n, 6_000n);
    ledger.recordPause('checkpoint', 10_000n, 13_000n);
    ledger.recordCorrection({ actuator: 'inplace', appliedNs: 3_000n });
    ledger.recordPause('user', 20_000n, 120_000n);
    expect(ledger.pausedNs).toBe(108_000n);
    expect(ledger.correctedNs).toBe(3_000n);
    expect(ledger.predictedLagNs).toBe(105_000n);
    const summary = ledger.summary();
    expect(summary.byCause.checkpoint).toEqual({ pauses: 2, pausedNs: 8_000n });
    expect(summary.byCause.user).toEqual({ pauses: 1, pausedNs: 100_000n });
    const residual = ledger.recordResidual(104_000n, 200_000n);
    expect(residual.predictedLagNs).toBe(105_000n);
    expect(ledger.summary().lastResidual).toEqual(residual);
  });

  it('takes the VMM-measured frozen time over the event stamps when a correction reports it', () => {
    const ledger = new DriftLedger('vm1');
    ledger.recordPause('checkpoint', 1_000_000n, 6_000_000n); // STOP stamp came late
    ledger.recordCorrection({ actuator: 'inplace', appliedNs: 5_800_000n, frozenNs: 5_800_000n });
    expect(ledger.pausedNs).toBe(5_800_000n);
    expect(ledger.predictedLagNs).toBe(0n);
  });

  it('refuses a pause that resumes before it stops, and a correction without a pause', () => {
    const ledger = new DriftLedger('vm1');
    expect(() => ledger.recordPause('user', 5n, 4n)).toThrow('resumes (4) before it stops (5)');
    expect(() => ledger.recordCorrection({ actuator: 'agent', appliedNs: 1n })).toThrow('no pause of vm1');
  });
});

describe('clock policy', () => {
  it('takes a valid YAML policy and fills defaults', () => {
    expect(parsePolicy('compensate: [checkpoint, failover]\nmaxStepMs: 500\n')).toEqual({
      compensate: ['checkpoint', 'failover'],
      maxStepMs: 500,
      onImpossible: DEFAULT_POLICY.onImpossible,
    });
    expect(parsePolicy('')).toEqual(DEFAULT_POLICY);
  });

  it.each([
    ['compensate: [checkpoint, nap]', 'compensate[1]: "nap" is not one of'],
    ['compensate: checkpoint', 'compensate: must be a list'],
    ['maxStepMs: -3', 'maxStepMs: must be a positive number'],
    ['onImpossible: panic', 'onImpossible: "panic" is not one of record, agent, fail'],
    ['maxStep: 5', 'maxStep: unknown field'],
    ['[1, 2]', '(root): must be a mapping'],
    ['compensate: [checkpoint', '(yaml)'],
  ])('rejects %j naming the field and the reason', (yaml, message) => {
    const error = (() => {
      try {
        parsePolicy(yaml);
      } catch (e) {
        return e;
      }
      return undefined;
    })();
    expect(error).toBeInstanceOf(PolicyError);
    expect((error as Error).message).toContain(message);
  });
});
