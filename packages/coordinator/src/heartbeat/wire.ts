import { z } from 'zod';

/** What an agent says about each VM in every heartbeat. */
export interface VmBeat {
  role: 'primary' | 'backup' | 'none';
  running: boolean;
  epoch?: number;
  /**
   * Failsafe (see agent/failsafe.ts): the sender is this VM's backup, cannot reach etcd, does not
   * run the VM, and promises not to take it over for the failsafe's confirm + margin time from
   * this beat on. Counted by the primary from the send of the beat this one echoes.
   */
  confirmsFailsafe?: boolean;
  /** Failsafe: the sender runs this VM and its lease has gone unanswered: it asks its backup to confirm. */
  asksFailsafe?: boolean;
}

/**
 * One heartbeat: the same message goes over both paths — a UDP datagram (one JSON object) and a
 * line of NDJSON on the TCP connection carried by SSH — so `seq` tells duplicates apart.
 */
export interface Heartbeat {
  from: string;
  /** Per sender, +1 per beat; starts again when the sender restarts. */
  seq: number;
  /** The sender's Date.now() when it sent the beat (informational: clocks of two hosts differ). */
  sentAtMs: number;
  vms: Record<string, VmBeat>;
  /**
   * The sender's realtime (ns) when it sent the beat: t3 of the receiver's clock-offset round,
   * and what the receiver echoes back as t1. Absent from agents that do not measure offsets.
   */
  sentAtNs?: bigint;
  /** The newest beat the sender received from the receiver (see HeartbeatEcho). */
  echo?: HeartbeatEcho;
}

/**
 * Each beat to a peer echoes the newest beat received from it: that beat's `sentAtNs` (t1, on the
 * peer's clock) and when it arrived here (t2, on this host's clock). With the echoing beat's own
 * `sentAtNs` (t3) and its arrival (t4) the peer has the four timestamps of an NTP round.
 */
export interface HeartbeatEcho {
  sentAtNs: bigint;
  receivedAtNs: bigint;
}

// Not strict: fields a newer agent adds are dropped, so two versions can beat each other.
const vmBeatSchema = z.object({
  role: z.enum(['primary', 'backup', 'none']),
  running: z.boolean(),
  epoch: z.number().int().nonnegative().optional(),
  confirmsFailsafe: z.boolean().optional(),
  asksFailsafe: z.boolean().optional(),
});

export const heartbeatSchema = z.object({
  from: z.string().min(1).max(253),
  seq: z.number().int().nonnegative(),
  sentAtMs: z.number().finite(),
  vms: z.record(z.string().min(1), vmBeatSchema),
});

// ns instants are beyond 2^53: on the wire they are decimal strings
const nsSchema = z
  .string()
  .regex(/^[0-9]{1,20}$/, 'a decimal count of ns')
  .transform((s) => BigInt(s))
  .refine((n) => n > 0n && n < 2n ** 63n, 'ns within (0, 2^63)');
const timingSchema = z.object({
  sentAtNs: nsSchema.optional(),
  echo: z.object({ sentAtNs: nsSchema, receivedAtNs: nsSchema }).optional(),
});

/** Larger than this is not a heartbeat (and does not fit a UDP datagram anyway). */
export const MAX_HEARTBEAT_BYTES = 60_000;

export function encodeHeartbeat(beat: Heartbeat): string {
  const { sentAtNs, echo, ...rest } = beat;
  return JSON.stringify({
    ...rest,
    ...(sentAtNs !== undefined ? { sentAtNs: String(sentAtNs) } : {}),
    ...(echo ? { echo: { sentAtNs: String(echo.sentAtNs), receivedAtNs: String(echo.receivedAtNs) } } : {}),
  });
}

/**
 * A heartbeat, or why the bytes are not one (for the log). Never throws. The clock fields
 * (`sentAtNs`, `echo`) are optional, so agents without them and with them beat each other; bad
 * clock fields cost only the clock measure, never the beat: they are left out and `timingError`
 * says why.
 */
export function parseHeartbeat(data: Buffer | string): { beat: Heartbeat; timingError?: string } | { error: string } {
  const length = typeof data === 'string' ? Buffer.byteLength(data) : data.length;
  if (length > MAX_HEARTBEAT_BYTES) return { error: `${length} bytes, more than ${MAX_HEARTBEAT_BYTES}` };
  let json: unknown;
  try {
    json = JSON.parse(typeof data === 'string' ? data : data.toString('utf8'));
  } catch (error) {
    return { error: `not JSON (${(error as Error).message})` };
  }
  const result = heartbeatSchema.safeParse(json);
  if (!result.success) {
    const issue = result.error.issues[0]!;
    return { error: `not a heartbeat: ${issue.path.join('.') || '(root)'}: ${issue.message}` };
  }
  const beat: Heartbeat = result.data;
  const timing = timingSchema.safeParse(json);
  if (!timing.success) {
    const issue = timing.error.issues[0]!;
    return { beat, timingError: `clock fields left out: ${issue.path.join('.')}: ${issue.message}` };
  }
  if (timing.data.sentAtNs !== undefined) beat.sentAtNs = timing.data.sentAtNs;
  if (timing.data.echo) beat.echo = timing.data.echo;
  return { beat };
}
