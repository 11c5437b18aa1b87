// Errors of the NBD client. NbdProtocolError: the server's bytes break the protocol (codec level,
// carries the absolute offset in the server-to-client byte stream); the connection is unusable
// after one. NbdError: everything else a caller must tell apart (a refused option, an unknown
// export, a failed command, a deadline, a dropped connection).

import { formatOffset } from '../stream/errors.js';

export type NbdProtocolErrorCode =
  /** A magic number is wrong: not an NBD server, or the stream lost its framing. */
  | 'BAD_MAGIC'
  /** The server speaks a variant this client does not (oldstyle, non-fixed newstyle). */
  | 'UNSUPPORTED'
  /** A length field contradicts the message type (or the request it answers). */
  | 'BAD_LENGTH'
  /** A structured reply chunk type this client does not know and that is not an error type. */
  | 'UNKNOWN_CHUNK_TYPE'
  /** A reply for a cookie no request in flight carries. */
  | 'UNKNOWN_COOKIE'
  /** A well-formed message that is not allowed here (wrong option, wrong chunk for the command...). */
  | 'UNEXPECTED_REPLY'
  /** A reply whose content is invalid (range outside the request, zero-length extent...). */
  | 'BAD_REPLY'
  /** A message larger than this client accepts. */
  | 'LIMIT_EXCEEDED'
  /** The stream ended inside a message. */
  | 'TRUNCATED';

export class NbdProtocolError extends Error {
  override readonly name = 'NbdProtocolError';
  constructor(
    readonly code: NbdProtocolErrorCode,
    /** Absolute byte offset in the server-to-client stream where the problem is. */
    readonly offset: number,
    detail: string,
  ) {
    super(`nbd: ${detail} at server byte offset ${formatOffset(offset)} [${code}]`);
  }
}

export type NbdErrorCode =
  /** The server answered an option with NBD_REP_ERR_* (other than an unknown export). */
  | 'OPTION_REFUSED'
  /** NBD_OPT_GO / SET_META_CONTEXT named an export the server does not offer. */
  | 'EXPORT_UNKNOWN'
  /** A requested metadata context was not selected by the server. */
  | 'CONTEXT_UNAVAILABLE'
  /** The server answered a command with an error (errno). */
  | 'COMMAND_FAILED'
  /** A handshake or request deadline passed. */
  | 'TIMEOUT'
  /** The connection closed or failed; everything pending on it fails with this. */
  | 'DISCONNECTED'
  /** The caller asked for something the export cannot do (range past the end, too long). */
  | 'BAD_REQUEST';

export class NbdError extends Error {
  override readonly name = 'NbdError';
  constructor(
    readonly code: NbdErrorCode,
    message: string,
    readonly details: { errno?: number; reply?: number; cause?: unknown } = {},
  ) {
    super(message, details.cause === undefined ? undefined : { cause: details.cause });
  }
}
