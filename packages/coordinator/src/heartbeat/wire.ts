import { z } from 'zod';

/** What an agent says about each VM in every heartbeat. */
export interface VmBeat {
  role: 'primary' | 'backup' | 'none';
  running: boolean;
  epoch?: number;
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
}

// Not strict: fields a newer agent adds are dropped, so two versions can beat each other.
const vmBeatSchema = z.object({
  role: z.enum(['primary', 'backup', 'none']),
  running: z.boolean(),
  epoch: z.number().int().nonnegative().optional(),
});

export const heartbeatSchema = z.object({
  from: z.string().min(1).max(253),
  seq: z.number().int().nonnegative(),
  sentAtMs: z.number().finite(),
  vms: z.record(z.string().min(1), vmBeatSchema),
});

/** Larger than this is not a heartbeat (and does not fit a UDP datagram anyway). */
export const MAX_HEARTBEAT_BYTES = 60_000;

export function encodeHeartbeat(beat: Heartbeat): string {
  return JSON.stringify(beat);
}

/** A heartbeat, or why the bytes are not one (for the log). Never throws. */
export function parseHeartbeat(data: Buffer | string): { beat: Heartbeat } | { error: string } {
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
  return { beat: result.data };
}
