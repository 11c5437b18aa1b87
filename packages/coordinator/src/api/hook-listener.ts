import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { z } from 'zod';
import type { Log } from '../agent/types.js';
import { removeStaleSocket } from './server.js';

/** What the libvirt hook sends (see @ftvm/libvirt's HookMessage), as the agent checks it. */
export const hookMessageSchema = z.object({
  v: z.literal(1),
  op: z.enum(['protect', 'unprotect']),
  phase: z.string(),
  domain: z.string().min(1),
  uuid: z.string().optional(),
  host: z.string(),
  at: z.string(),
  protection: z.unknown().optional(),
});
export type HookEvent = z.infer<typeof hookMessageSchema>;

const MAX_LINE = 1 << 20;
const READ_TIMEOUT_MS = 2_000;

/** Parses one line from the hook; the error names what was wrong. */
export function parseHookLine(line: string): { event: HookEvent } | { error: string } {
  let value: unknown;
  try {
    value = JSON.parse(line);
  } catch {
    return { error: 'not JSON' };
  }
  const result = hookMessageSchema.safeParse(value);
  if (!result.success) return { error: `not a hook message: ${result.error.issues.map((i) => `${i.path.join('.') || '(root)'}: ${i.message}`).join('; ')}` };
  return { event: result.data };
}

/**
 * The agent's ear for the libvirt hook: a unix socket (mode 0600) taking one JSON line per
 * connection and answering `ok` at once — the hook runs inside libvirt's domain job, so the agent
 * acts on the event only after answering (its libvirt calls would otherwise wait on that job).
 */
export async function startHookListener(options: { socketPath: string; log: Log; onEvent: (event: HookEvent) => void }): Promise<{ close(): Promise<void> }> {
  const { socketPath, log } = options;
  await removeStaleSocket(socketPath);
  fs.mkdirSync(path.dirname(socketPath), { recursive: true, mode: 0o755 });
  const server = net.createServer((socket) => {
    let buffer = '';
    socket.setTimeout(READ_TIMEOUT_MS, () => socket.destroy());
    socket.on('error', () => undefined);
    socket.on('data', (chunk: Buffer) => {
      buffer += chunk.toString('utf8');
      if (buffer.length > MAX_LINE) {
        socket.end('error: line too long\n');
        return;
      }
      const newline = buffer.indexOf('\n');
      if (newline < 0) return;
      const parsed = parseHookLine(buffer.slice(0, newline));
      if ('error' in parsed) {
        log.warn({ err: parsed.error }, 'libvirt hook: message refused');
        socket.end(`error: ${parsed.error}\n`);
        return;
      }
      socket.end('ok\n');
      log.info({ op: parsed.event.op, phase: parsed.event.phase, domain: parsed.event.domain }, 'libvirt hook');
      setImmediate(() => options.onEvent(parsed.event));
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(socketPath, () => {
      server.off('error', reject);
      resolve();
    });
  });
  fs.chmodSync(socketPath, 0o600);
  return {
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        fs.rmSync(socketPath, { force: true });
      }),
  };
}
