import { z, type ZodError } from 'zod';
import type { ProgressEvent } from '../agent/control.js';

/**
 * The control API's wire, shared by the server and the client. HTTP/1.1 over a unix socket:
 * - `GET` routes are queries and answer one JSON document (`{"error":…}` with a 4xx/5xx on failure).
 * - `POST /v1/vms/:vm/<operation>` answers 200 at once with an NDJSON stream: `{"progress":…}`
 *   lines as the operation goes, then exactly one `{"result":…}` or `{"error":…}` line.
 *   A request that is refused before the operation starts (unknown route, bad body) gets a plain
 *   JSON error with its status instead.
 */

export const NDJSON = 'application/x-ndjson';
export const JSON_TYPE = 'application/json; charset=utf-8';
/** Request bodies are small JSON objects. */
export const MAX_BODY_BYTES = 64 * 1024;

export const VM_OPERATIONS = ['protect', 'unprotect', 'switchover', 'reprotect', 'checkpoint'] as const;
export type VmOperation = (typeof VM_OPERATIONS)[number];
export const VM_QUERIES = ['drift'] as const;
export type VmQuery = (typeof VM_QUERIES)[number];

export const STATUS_PATH = '/v1/status';
export const vmPath = (vm: string, action: VmOperation | VmQuery) => `/v1/vms/${encodeURIComponent(vm)}/${action}`;

export interface WireError {
  message: string;
  status: number;
}

export type StreamLine<T> = { progress: ProgressEvent } | { result: T } | { error: WireError };

/** Same rule as the agent config's VM names (libvirt domain names). */
export const vmNameSchema = z.string().regex(/^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/, 'a libvirt domain name: letters, digits, _ . -');
const hostName = z.string().regex(/^[a-z0-9][a-z0-9.-]{0,62}$/i, 'a host name: letters, digits, dots and dashes');

/** `POST /v1/vms/:vm/protect` (the VM comes from the path). */
export const protectBodySchema = z
  .object({
    backup: hostName,
    checkpointIntervalMs: z.number().int().min(50).max(3_600_000).optional(),
    outputCommit: z.boolean().optional(),
    fullEvery: z.number().int().min(1).max(1_000_000).optional(),
  })
  .strict();
/** `POST /v1/vms/:vm/reprotect`. */
export const reprotectBodySchema = z.object({ backup: hostName.optional() }).strict();
/** Operations without parameters take no body, or `{}`. */
export const emptyBodySchema = z.object({}).strict();

export type ProtectBody = z.infer<typeof protectBodySchema>;
export type ReprotectBody = z.infer<typeof reprotectBodySchema>;

/** `backup: Required; checkpointIntervalMs: Number must be greater than or equal to 50`. */
export function describeIssues(error: ZodError): string {
  return error.issues
    .map((issue) => {
      const field = issue.path.length ? issue.path.join('.') : '(body)';
      if (issue.code === 'unrecognized_keys') return `${field === '(body)' ? '' : `${field}: `}unknown field${issue.keys.length > 1 ? 's' : ''} ${issue.keys.map((k) => `'${k}'`).join(', ')}`;
      return `${field}: ${issue.message}`;
    })
    .join('; ');
}

const progressSchema = z.discriminatedUnion('state', [
  z.object({ step: z.string(), state: z.literal('start') }),
  z.object({ step: z.string(), state: z.literal('done'), detail: z.string().optional() }),
  z.object({ step: z.string(), state: z.literal('fail'), detail: z.string() }),
]);
export const wireErrorSchema = z.object({ message: z.string(), status: z.number().int() });

/** Parses one NDJSON line; undefined when it is not one of the three line kinds. */
export function parseStreamLine(line: string): StreamLine<unknown> | undefined {
  let value: unknown;
  try {
    value = JSON.parse(line);
  } catch {
    return undefined;
  }
  if (value === null || typeof value !== 'object' || Array.isArray(value)) return undefined;
  const keys = Object.keys(value);
  if (keys.length !== 1) return undefined;
  const record = value as Record<string, unknown>;
  if ('result' in record) return { result: record.result };
  if ('progress' in record) {
    const progress = progressSchema.safeParse(record.progress);
    return progress.success ? { progress: progress.data } : undefined;
  }
  if ('error' in record) {
    const error = wireErrorSchema.safeParse(record.error);
    return error.success ? { error: error.data } : undefined;
  }
  return undefined;
}
