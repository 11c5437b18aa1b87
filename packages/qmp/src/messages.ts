/** Message shapes of the QMP wire (docs/interop/qmp-spec.txt in QEMU). */

export interface QmpGreeting {
  QMP: {
    version: { qemu: { major: number; minor: number; micro: number }; package: string };
    capabilities: string[];
  };
}

export interface QmpEventTimestamp {
  seconds: number;
  microseconds: number;
}

/** An asynchronous event, with QEMU's own wall-clock stamp kept exactly as nanoseconds. */
export interface QmpEvent<Data = Record<string, unknown>> {
  event: string;
  data: Data;
  /** QEMU's `timestamp` (g_get_real_time at emission), seconds·1e9 + microseconds·1e3. */
  timestampNs: bigint;
}

/** QEMU stamps events that could not get a clock with -1/-1; we keep that as -1n. */
export function timestampToNs(ts: QmpEventTimestamp): bigint {
  if (ts.seconds < 0) return -1n;
  return BigInt(ts.seconds) * 1_000_000_000n + BigInt(ts.microseconds) * 1_000n;
}

export function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

export function isGreeting(value: Record<string, unknown>): value is Record<string, unknown> & QmpGreeting {
  return isRecord(value['QMP']);
}

export function isEventMessage(
  value: Record<string, unknown>,
): value is { event: string; data?: Record<string, unknown>; timestamp: QmpEventTimestamp } {
  return typeof value['event'] === 'string' && isRecord(value['timestamp']);
}
