import { parse } from 'yaml';
import type { PauseCause } from './ledger.js';

/** What to do when a pause cannot be corrected at the VMM level (e.g. QEMU without our patch). */
export type OnImpossible = 'record' | 'agent' | 'fail';

/** Per-VM clock policy. */
export interface ClockPolicy {
  /** Which pauses to give the stopped time back for. */
  compensate: PauseCause[];
  /** Largest single correction allowed; a bigger one is refused (and recorded) — a guard against a bad clock. */
  maxStepMs: number;
  onImpossible: OnImpossible;
}

export const DEFAULT_POLICY: ClockPolicy = {
  compensate: ['checkpoint', 'migration', 'failover'],
  maxStepMs: 60_000,
  onImpossible: 'record',
};

const CAUSES: readonly PauseCause[] = ['checkpoint', 'user', 'migration', 'failover'];
const ON_IMPOSSIBLE: readonly OnImpossible[] = ['record', 'agent', 'fail'];

export class PolicyError extends Error {
  override name = 'PolicyError';
  constructor(
    readonly field: string,
    reason: string,
  ) {
    super(`clock policy: ${field}: ${reason}`);
  }
}

/** Validates a parsed policy object; unknown fields are errors (a typo must not pass silently). */
export function validatePolicy(input: unknown): ClockPolicy {
  if (input === null || input === undefined) return { ...DEFAULT_POLICY };
  if (typeof input !== 'object' || Array.isArray(input)) throw new PolicyError('(root)', 'must be a mapping');
  const record = input as Record<string, unknown>;
  for (const key of Object.keys(record)) {
    if (!['compensate', 'maxStepMs', 'onImpossible'].includes(key)) throw new PolicyError(key, 'unknown field (expected compensate, maxStepMs, onImpossible)');
  }
  const policy = { ...DEFAULT_POLICY };
  if (record['compensate'] !== undefined) {
    const list = record['compensate'];
    if (!Array.isArray(list)) throw new PolicyError('compensate', `must be a list of ${CAUSES.join(', ')}`);
    for (const [i, cause] of list.entries()) {
      if (!CAUSES.includes(cause as PauseCause)) throw new PolicyError(`compensate[${i}]`, `${JSON.stringify(cause)} is not one of ${CAUSES.join(', ')}`);
    }
    policy.compensate = [...new Set(list as PauseCause[])];
  }
  if (record['maxStepMs'] !== undefined) {
    const max = record['maxStepMs'];
    if (typeof max !== 'number' || !Number.isFinite(max) || max <= 0) throw new PolicyError('maxStepMs', `must be a positive number of milliseconds, got ${JSON.stringify(max)}`);
    policy.maxStepMs = max;
  }
  if (record['onImpossible'] !== undefined) {
    const on = record['onImpossible'];
    if (!ON_IMPOSSIBLE.includes(on as OnImpossible)) throw new PolicyError('onImpossible', `${JSON.stringify(on)} is not one of ${ON_IMPOSSIBLE.join(', ')}`);
    policy.onImpossible = on as OnImpossible;
  }
  return policy;
}

export function parsePolicy(yamlText: string): ClockPolicy {
  let parsed: unknown;
  try {
    parsed = parse(yamlText);
  } catch (error) {
    throw new PolicyError('(yaml)', (error as Error).message);
  }
  return validatePolicy(parsed);
}
