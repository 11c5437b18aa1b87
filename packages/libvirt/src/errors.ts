/**
 * Every error this package throws is a LibvirtError naming the operation, the domain (when there is
 * one) and the connection, with libvirt's own message kept in `libvirtMessage`. The subclasses are
 * decided from libvirt's message prefix (libvirt's error strings start with the text of the error
 * code, e.g. "Domain not found: …"; the Node binding does not pass the numeric code through).
 */
export class LibvirtError extends Error {
  override name = 'LibvirtError';
  constructor(
    readonly operation: string,
    readonly domain: string | undefined,
    readonly uri: string,
    readonly libvirtMessage: string,
    options?: { cause?: unknown },
  ) {
    super(`libvirt ${operation}${domain === undefined ? '' : ` of domain '${domain}'`} on ${uri} failed: ${libvirtMessage}`, options);
  }
}

/** The domain does not exist (lookup by name or UUID failed). */
export class DomainNotFoundError extends LibvirtError {
  override name = 'DomainNotFoundError';
}

/** libvirt refused the operation in the domain's current state ("domain is not running", "already active"). */
export class DomainStateError extends LibvirtError {
  override name = 'DomainStateError';
}

/** A domain with that name or UUID is already defined or running. */
export class DomainExistsError extends LibvirtError {
  override name = 'DomainExistsError';
}

/** The daemon could not be reached, or the connection broke. */
export class LibvirtConnectionError extends LibvirtError {
  override name = 'LibvirtConnectionError';
}

/**
 * No answer within the operation's deadline. A call through the native binding cannot be cancelled:
 * it keeps one libuv threadpool thread until libvirt returns, and the connection is marked broken
 * (see `LibvirtConnection.broken`). A virsh call is killed.
 */
export class LibvirtTimeoutError extends LibvirtError {
  override name = 'LibvirtTimeoutError';
  constructor(
    operation: string,
    domain: string | undefined,
    uri: string,
    readonly timeoutMs: number,
  ) {
    super(operation, domain, uri, `no answer within ${timeoutMs} ms`);
  }
}

const NOT_FOUND = [/^Domain not found/i, /failed to get domain/i, /no domain with matching/i];
const STATE = [/^Requested operation is not valid/i, /domain is not running/i, /domain is already (running|active)/i];
const EXISTS = [/already exists/i, /is already defined/i];
const CONNECTION = [
  /^Failed to connect socket/i,
  /^Cannot recv data/i,
  /^Cannot write data/i,
  /End of file while reading data/i,
  /^no connection driver available/i,
  /client socket is closed/i,
  /internal error: client socket is closed/i,
  /failed to connect to the hypervisor/i,
  /^Unable to connect/i,
  /^authentication failed/i,
];

/** Turns whatever libvirt (binding or virsh) threw into the matching LibvirtError subclass. */
export function classifyLibvirtError(operation: string, domain: string | undefined, uri: string, error: unknown): LibvirtError {
  if (error instanceof LibvirtError) return error;
  const raw = error instanceof Error ? error.message : String(error);
  const message = raw.replace(/^error:\s*/gim, '').trim().replace(/\s*\n\s*/g, '; ');
  const matches = (patterns: RegExp[]) => patterns.some((p) => p.test(message));
  const Kind = matches(NOT_FOUND)
    ? DomainNotFoundError
    : matches(CONNECTION)
      ? LibvirtConnectionError
      : matches(STATE)
        ? DomainStateError
        : matches(EXISTS)
          ? DomainExistsError
          : LibvirtError;
  return new Kind(operation, domain, uri, message || 'unknown error', { cause: error });
}

/**
 * Races `promise` against a deadline. On timeout `onTimeout` runs (e.g. to kill a child or mark a
 * connection broken) and the returned promise rejects with LibvirtTimeoutError; a late settlement of
 * `promise` is swallowed.
 */
export function withDeadline<T>(
  promise: Promise<T>,
  timeoutMs: number,
  what: { operation: string; domain: string | undefined; uri: string },
  onTimeout?: () => void,
): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const timer = setTimeout(() => {
      onTimeout?.();
      reject(new LibvirtTimeoutError(what.operation, what.domain, what.uri, timeoutMs));
    }, timeoutMs);
    promise.then(
      (value) => {
        clearTimeout(timer);
        resolve(value);
      },
      (error: unknown) => {
        clearTimeout(timer);
        reject(classifyLibvirtError(what.operation, what.domain, what.uri, error));
      },
    );
  });
}

/**
 * A restore failed; `stage` says where (prepare, define, start paused, QMP, stream, resume). Before
 * the VM resumed, the domain was destroyed and undefined again; a restore never destroys a domain
 * that may have run (see PreparedRestore.load). `qemuReason` is what QEMU itself said — its error
 * lines in libvirt's per-domain log since the step began, or `query-migrate`'s error-desc — and is
 * part of the message too.
 */
export class RestoreError extends Error {
  override name = 'RestoreError';
  readonly qemuReason: string | undefined;
  constructor(
    readonly domain: string,
    readonly stage: string,
    message: string,
    options?: { cause?: unknown; qemuReason?: string | undefined },
  ) {
    const reason = options?.qemuReason;
    super(`restore of '${domain}' failed at ${stage}: ${message}${reason && !message.includes(reason) ? ` (QEMU: ${reason})` : ''}`, options);
    this.qemuReason = reason;
  }
}
