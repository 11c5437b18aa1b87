// Wire constants of QEMU's migration stream (QEMU 7.2, migration/savevm.c and migration/ram.c).
// Everything multi-byte on this wire is big-endian.

/** `QEVM`, the first four bytes of every stream (QEMU_VM_FILE_MAGIC). */
export const QEMU_VM_FILE_MAGIC = 0x5145564d;
/** The only version QEMU 7.2 loads (QEMU_VM_FILE_VERSION; version 2 is "obsolete" in qemu_loadvm_state). */
export const QEMU_VM_FILE_VERSION = 3;

/** Top-level record type bytes (savevm.c). Note EOF is 0x00; 0x05 is a vmstate subsection marker. */
export const SectionType = {
  EOF: 0x00,
  START: 0x01,
  PART: 0x02,
  END: 0x03,
  FULL: 0x04,
  SUBSECTION: 0x05,
  VMDESCRIPTION: 0x06,
  CONFIGURATION: 0x07,
  COMMAND: 0x08,
  FOOTER: 0x7e,
} as const;

/**
 * RAM record flags, carried in the low bits of the be64 record header (ram.c, RAM_SAVE_FLAG_*).
 * The header is `offset-in-block | flags`; offsets are target-page aligned, so flags live below
 * TARGET_PAGE_SIZE.
 */
export const RamFlag = {
  /** Unused since QEMU 1.x ("FULL"); rejected. */
  FULL: 0x01,
  /** A page filled with one byte (that byte follows); called COMPRESS in old code. */
  ZERO: 0x02,
  /** The block list, in the START section of "ram". The header's address part is the total size. */
  MEM_SIZE: 0x04,
  /** A raw page of TARGET_PAGE_SIZE bytes follows. */
  PAGE: 0x08,
  /** End of this section's RAM records. */
  EOS: 0x10,
  /** Same block as the previous page record: no block id string follows. */
  CONTINUE: 0x20,
  /** XBZRLE-encoded page: u8 encoding, be16 length, data. */
  XBZRLE: 0x40,
  /** RDMA hook; never seen on exec/fd/tcp transports. */
  HOOK: 0x80,
  /** zlib-compressed page (compress capability): be32 length, data. */
  COMPRESS_PAGE: 0x100,
} as const;

/** TARGET_PAGE_SIZE for x86 (target-page-bits 12). */
export const DEFAULT_TARGET_PAGE_SIZE = 4096;

/** ENCODING_FLAG_XBZRLE, the only XBZRLE encoding byte load_xbzrle accepts. */
export const XBZRLE_ENCODING = 0x01;

/** QEMU_VM_COMMAND sub-commands (savevm.c, enum qemu_vm_cmd). */
export const MigCommand = {
  INVALID: 0,
  OPEN_RETURN_PATH: 1,
  PING: 2,
  POSTCOPY_ADVISE: 3,
  POSTCOPY_LISTEN: 4,
  POSTCOPY_RUN: 5,
  POSTCOPY_RAM_DISCARD: 6,
  PACKAGED: 7,
  ENABLE_COLO: 8,
  POSTCOPY_RESUME: 9,
  RECV_BITMAP: 10,
} as const;

/** MAX_VM_CMD_PACKAGED_SIZE in savevm.c (1 << 24). */
export const MAX_PACKAGED_SIZE = 1 << 24;

/** Prefix of configuration subsections (vmstate_configuration's subsections in savevm.c). */
export const CONFIGURATION_SUBSECTION_PREFIX = 'configuration/';

/**
 * ftvm's QEMU (patch 0013, x-ftvm-incremental): this configuration subsection (version 1, no
 * fields) marks a stream that carries only the pages written since the previous migration, i.e. an
 * increment that must be applied on its base. QEMU refuses to load one; so does this parser when a
 * full image is required (MigrationStreamParserOptions.requireFull).
 */
export const FTVM_INCREMENTAL_SUBSECTION = 'configuration/x-ftvm-incremental';
