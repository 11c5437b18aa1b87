// Wire constants of the NBD protocol (NetworkBlockDevice/nbd doc/proto.md; the values QEMU 7.2 uses in
// include/block/nbd.h). Everything multi-byte on this wire is big-endian.

/** `NBDMAGIC`: the first 8 bytes the server sends. */
export const NBD_MAGIC = Buffer.from('NBDMAGIC', 'latin1');
/** `IHAVEOPT`: the second server magic of newstyle negotiation, and the prefix of every client option. */
export const IHAVEOPT = Buffer.from('IHAVEOPT', 'latin1');
/** cliserv_magic: an oldstyle server sends this instead of IHAVEOPT (unsupported: no names, no options). */
export const OLDSTYLE_MAGIC = Buffer.from([0x00, 0x00, 0x42, 0x02, 0x81, 0x86, 0x12, 0x53]);
/** Magic of every option reply (0x3e889045565a9). */
export const OPTION_REPLY_MAGIC = Buffer.from([0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9]);

export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

/** Sizes of the fixed parts of each message. */
export const GREETING_SIZE = 18;
export const OPTION_HEADER_SIZE = 16;
export const OPTION_REPLY_HEADER_SIZE = 20;
export const REQUEST_SIZE = 28;
export const SIMPLE_REPLY_SIZE = 16;
export const CHUNK_HEADER_SIZE = 20;

/** Handshake flags (server, 16 bits). */
export const HandshakeFlag = {
  FIXED_NEWSTYLE: 1 << 0,
  NO_ZEROES: 1 << 1,
} as const;

/** Client flags (32 bits). */
export const ClientFlag = {
  FIXED_NEWSTYLE: 1 << 0,
  NO_ZEROES: 1 << 1,
} as const;

/** Transmission flags (16 bits, in NBD_INFO_EXPORT). */
export const TransmissionFlag = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
} as const;

/** Options (NBD_OPT_*). */
export const Opt = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const;

const REP_ERR = 0x8000_0000;
/** Option reply types (NBD_REP_*); errors have bit 31 set. */
export const Rep = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: REP_ERR + 1,
  ERR_POLICY: REP_ERR + 2,
  ERR_INVALID: REP_ERR + 3,
  ERR_PLATFORM: REP_ERR + 4,
  ERR_TLS_REQD: REP_ERR + 5,
  ERR_UNKNOWN: REP_ERR + 6,
  ERR_SHUTDOWN: REP_ERR + 7,
  ERR_BLOCK_SIZE_REQD: REP_ERR + 8,
  ERR_TOO_BIG: REP_ERR + 9,
  ERR_EXT_HEADER_REQD: REP_ERR + 10,
} as const;

export function isRepError(reply: number): boolean {
  return reply >= REP_ERR;
}

/** Information types inside NBD_REP_INFO (NBD_INFO_*). */
export const Info = {
  EXPORT: 0,
  NAME: 1,
  DESCRIPTION: 2,
  BLOCK_SIZE: 3,
} as const;

/** Commands (NBD_CMD_*). */
export const Cmd = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
} as const;

/** Command flags (NBD_CMD_FLAG_*). */
export const CmdFlag = {
  FUA: 1 << 0,
  NO_HOLE: 1 << 1,
  DF: 1 << 2,
  REQ_ONE: 1 << 3,
  FAST_ZERO: 1 << 4,
} as const;

/** Structured reply chunk flags. */
export const ReplyFlag = {
  DONE: 1 << 0,
} as const;

const TYPE_ERR = 0x8000;
/** Structured reply chunk types (NBD_REPLY_TYPE_*); errors have bit 15 set. */
export const ReplyType = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  ERROR: TYPE_ERR + 1,
  ERROR_OFFSET: TYPE_ERR + 2,
} as const;

export function isReplyTypeError(type: number): boolean {
  return (type & TYPE_ERR) !== 0;
}

/** Flags of the `base:allocation` context. */
export const AllocationFlag = {
  /** Unallocated; reads as zero only if ZERO is also set (a backing file may show through otherwise). */
  HOLE: 1 << 0,
  /** Reads as zeros. */
  ZERO: 1 << 1,
} as const;

/** Flag of QEMU's `qemu:dirty-bitmap:NAME` contexts. */
export const DIRTY_FLAG = 1 << 0;

export const BASE_ALLOCATION = 'base:allocation';
export const DIRTY_BITMAP_PREFIX = 'qemu:dirty-bitmap:';

/** Longest string the protocol allows (export names, messages, context names). */
export const MAX_STRING_SIZE = 4096;

const name = (table: Record<string, number>, prefix: string) => {
  const byValue = new Map(Object.entries(table).map(([k, v]) => [v, `${prefix}${k}`]));
  return (value: number): string => byValue.get(value) ?? `${prefix}? (${value >= 0x1000 ? `0x${value.toString(16)}` : value})`;
};

export const optName = name(Opt, 'NBD_OPT_');
export const repName = name(Rep, 'NBD_REP_');
export const cmdName = name(Cmd, 'NBD_CMD_');
export const replyTypeName = name(ReplyType, 'NBD_REPLY_TYPE_');

/** The errno values the protocol defines, by number (Linux numbering, as on the wire). */
const ERRNO: Record<number, string> = {
  1: 'EPERM',
  5: 'EIO',
  12: 'ENOMEM',
  22: 'EINVAL',
  28: 'ENOSPC',
  75: 'EOVERFLOW',
  95: 'ENOTSUP',
  108: 'ESHUTDOWN',
};

export function errnoName(errno: number): string {
  return ERRNO[errno] ?? `errno ${errno}`;
}
