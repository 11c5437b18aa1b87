import { DEFAULT_HOOK_CONFIG, hookLog, runHook, type HookConfig } from './hook.js';

/** How long to wait for libvirt to finish writing the domain XML to stdin. */
const STDIN_TIMEOUT_MS = 500;

function readStdin(timeoutMs: number): Promise<string> {
  return new Promise((resolve) => {
    if (process.stdin.isTTY) return resolve('');
    const chunks: Buffer[] = [];
    const done = () => {
      clearTimeout(timer);
      resolve(Buffer.concat(chunks).toString('utf8'));
    };
    const timer = setTimeout(done, timeoutMs);
    process.stdin.on('data', (c: Buffer) => chunks.push(c));
    process.stdin.on('end', done);
    process.stdin.on('error', done);
  });
}

/**
 * Entry point of the installed hook script (`/etc/libvirt/hooks/qemu`): runs the hook with a hard
 * time budget (timeoutMs + 500 ms: libvirt waits for hooks synchronously), prints filtered XML for
 * migrate/restore, logs what it did, and always exits 0.
 */
export async function runInstalledHook(partial: Partial<HookConfig>, argv = process.argv.slice(2)): Promise<void> {
  const started = performance.now();
  const config: HookConfig = { ...DEFAULT_HOOK_CONFIG, ...partial };
  const budgetMs = config.timeoutMs + 500;
  const label = argv.slice(0, 3).join(' ');
  const watchdog = setTimeout(() => {
    hookLog(config, `${label}: gave up after ${budgetMs} ms (time budget)`);
    process.exit(0);
  }, budgetMs);
  watchdog.unref();
  try {
    const stdin = await readStdin(STDIN_TIMEOUT_MS);
    const outcome = await runHook({ args: argv, stdin }, config);
    if (outcome.stdout !== undefined) process.stdout.write(outcome.stdout);
    if (outcome.action) hookLog(config, `${label}: ${outcome.action} [${Math.round(performance.now() - started)} ms]`);
  } catch (error) {
    hookLog(config, `${label}: error (libvirt not blocked): ${(error as Error).stack ?? String(error)}`);
  }
  clearTimeout(watchdog);
  // stdout must be flushed before exit for the migrate/restore filters
  process.stdout.write('', () => process.exit(0));
}
