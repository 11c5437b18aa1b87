/** Bounded waiting: every wait in the lab has a deadline and says what it was waiting for. */
export const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

export interface WaitOptions {
  timeoutMs: number;
  /** Completes "timed out after N ms waiting for …". */
  what: string;
  intervalMs?: number;
  /** Extra text for the error (a log tail), computed only on timeout. */
  diagnostics?: () => string;
}

export async function waitUntil(check: () => Promise<boolean> | boolean, options: WaitOptions): Promise<void> {
  const deadline = Date.now() + options.timeoutMs;
  for (;;) {
    if (await check()) return;
    if (Date.now() >= deadline) {
      const extra = options.diagnostics ? `\n${options.diagnostics()}` : '';
      throw new Error(`lab: timed out after ${options.timeoutMs} ms waiting for ${options.what}${extra}`);
    }
    await sleep(options.intervalMs ?? 100);
  }
}
