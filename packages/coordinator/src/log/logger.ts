import pino from 'pino';

/** ftvm's logger: pino, JSON lines. Per-VM children carry the VM's name: `log.child({ vm })`. */
export type Logger = pino.Logger;
export type LogLevel = 'trace' | 'debug' | 'info' | 'warn' | 'error' | 'fatal' | 'silent';

export interface LoggerOptions {
  level: LogLevel;
  /** Component name, in every line as `name` (e.g. `ftvm-agent`). */
  name: string;
  /** Append to this file (created with its directory); without it, lines go to stdout. */
  file?: string | undefined;
}

type FileDestination = ReturnType<typeof pino.destination>;
const fileDestinations = new WeakMap<Logger, FileDestination>();

/**
 * Lines go to stdout synchronously (journald/systemd capture them and none is lost on a crash),
 * or to an append-only file through an asynchronous pino destination. pino flushes that one
 * synchronously when the process exits; flushLogger() waits for it at other times.
 */
export function createLogger(options: LoggerOptions): Logger {
  const base = { name: options.name, level: options.level, timestamp: pino.stdTimeFunctions.isoTime };
  if (!options.file) return pino(base, pino.destination({ dest: 1, sync: true }));
  // minLength 1 writes each line as soon as it comes, like 0, but makes flush(cb) wait until the
  // buffered lines are written and fsynced (with 0, sonic-boom calls back at once).
  const destination = pino.destination({ dest: options.file, sync: false, append: true, mkdir: true, minLength: 1 });
  const logger = pino(base, destination);
  fileDestinations.set(logger, destination);
  return logger;
}

/** Waits until the log file has every line so far (a no-op for stdout); gives up after timeoutMs. */
export function flushLogger(logger: Logger, timeoutMs = 2_000): Promise<void> {
  if (!fileDestinations.has(logger)) return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, timeoutMs);
    logger.flush(() => {
      clearTimeout(timer);
      resolve();
    });
  });
}

/** Reopens the log file (after logrotate moved it; the agent does this on SIGHUP). False for stdout. */
export function reopenLogFile(logger: Logger): boolean {
  const destination = fileDestinations.get(logger);
  if (!destination) return false;
  destination.reopen();
  return true;
}
