/** Base class: every error this package throws is a QmpClientError, so callers can catch one type. */
export class QmpClientError extends Error {
  override name = 'QmpClientError';
}

/** QEMU answered a command with `{"error": {...}}`. */
export class QmpCommandError extends QmpClientError {
  override name = 'QmpCommandError';
  constructor(
    readonly command: string,
    readonly errorClass: string,
    readonly desc: string,
  ) {
    super(`${command}: ${errorClass}: ${desc}`);
  }
}

/** No reply within the command's deadline. The connection stays usable; a late reply is dropped. */
export class QmpTimeoutError extends QmpClientError {
  override name = 'QmpTimeoutError';
  constructor(
    readonly command: string,
    readonly timeoutMs: number,
  ) {
    super(`${command}: no reply within ${timeoutMs} ms`);
  }
}

/** The peer closed the socket (or it broke) while a command was outstanding, or before use. */
export class QmpConnectionClosedError extends QmpClientError {
  override name = 'QmpConnectionClosedError';
  constructor(
    readonly command: string | undefined,
    readonly reason: string,
  ) {
    super(command ? `${command}: connection closed before a reply (${reason})` : `connection closed (${reason})`);
  }
}

/** The peer sent something that is not the protocol: a line that is not JSON, or a wrong message shape. */
export class QmpProtocolError extends QmpClientError {
  override name = 'QmpProtocolError';
  constructor(
    message: string,
    readonly offending?: string,
  ) {
    super(offending === undefined ? message : `${message}: ${JSON.stringify(truncate(offending, 120))}`);
  }
}

function truncate(text: string, max: number): string {
  return text.length <= max ? text : `${text.slice(0, max)}…`;
}
