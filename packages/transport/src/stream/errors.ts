// Errors of the migration-stream codec. Everything the parser does not understand surfaces as a
// MigrationStreamError carrying the absolute byte offset; NeedMoreData is the reader's internal
// "not enough bytes yet" signal and never escapes the parser.

export type MigrationStreamErrorCode =
  | 'BAD_MAGIC'
  | 'BAD_VERSION'
  | 'UNKNOWN_SECTION_TYPE'
  | 'UNKNOWN_SECTION_ID'
  | 'UNSUPPORTED'
  | 'FOOTER_MISMATCH'
  | 'BAD_RAM_RECORD'
  | 'BAD_CONFIGURATION'
  /** An increment (x-ftvm-incremental marker) where a full image is required. */
  | 'INCREMENTAL_STREAM'
  | 'BAD_COMMAND'
  | 'BAD_DESCRIPTION'
  | 'DESCRIPTION_MISMATCH'
  | 'UNDELIMITED_DEVICE_STATE'
  | 'LIMIT_EXCEEDED'
  | 'TRUNCATED'
  | 'TRAILING_DATA';

/** Formats an offset as `1234 (0x4d2)`, the form every message uses. */
export function formatOffset(offset: number): string {
  return `${offset} (0x${offset.toString(16)})`;
}

export class MigrationStreamError extends Error {
  override readonly name = 'MigrationStreamError';
  constructor(
    readonly code: MigrationStreamErrorCode,
    /** Absolute byte offset in the stream where the problem is. */
    readonly offset: number,
    detail: string,
  ) {
    super(`migration stream: ${detail} at offset ${formatOffset(offset)} [${code}]`);
  }
}

/**
 * Thrown by ByteReader when the buffered bytes end before the value being read. `needed` is the
 * absolute stream offset the reader must be able to reach to go on.
 */
export class NeedMoreData extends Error {
  override readonly name = 'NeedMoreData';
  readonly needed: number;
  constructor(needed: number) {
    // Thrown at every chunk boundary that splits a record and always caught: skip the stack trace.
    const limit = Error.stackTraceLimit;
    Error.stackTraceLimit = 0;
    super('need more stream bytes');
    Error.stackTraceLimit = limit;
    this.needed = needed;
  }
}

/** Errors of the device-state helpers (finding, replacing or decoding a section body). */
export class DeviceStateError extends Error {
  override readonly name = 'DeviceStateError';
}
