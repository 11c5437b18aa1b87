// Public surface of the migration-stream codec.
export { MigrationStreamParser, parseMigrationStream, iterateMigrationStream } from './parser.js';
export type { MigrationStreamParserOptions, RecordCallback } from './parser.js';
export { encodeRecord, encodeRecords, encodeRecordStream, encodedSize } from './writer.js';
export { DeviceStateSet, type ReplaceSectionOptions } from './device-state.js';
export {
  decodeTimerSection,
  encodeTimerSection,
  TIMER_SECTION_NAME,
  TIMER_SECTION_VERSION,
  type TimerSectionState,
} from './timer-section.js';
export {
  decodeKvmclockSection,
  encodeKvmclockSection,
  KVMCLOCK_SECTION_NAME,
  KVMCLOCK_SECTION_VERSION,
  type KvmclockSectionState,
} from './kvmclock-section.js';
export { configurationCapabilities, configurationIncremental, configurationPageSize } from './configuration.js';
export { describedVmsdSize, describedSections, parseVmDescription } from './description.js';
export type { VmDescription, VmDescriptionDevice, VmDescriptionField, VmDescriptionVmsd, DescribedSection } from './description.js';
export { MigrationStreamError, DeviceStateError, type MigrationStreamErrorCode } from './errors.js';
export {
  QEMU_VM_FILE_MAGIC,
  QEMU_VM_FILE_VERSION,
  SectionType,
  RamFlag,
  MigCommand,
  DEFAULT_TARGET_PAGE_SIZE,
  FTVM_INCREMENTAL_SUBSECTION,
} from './constants.js';
export type * from './records.js';
export {
  assembleCheckpointChain,
  checkpointLayout,
  flattenCheckpointChain,
  CheckpointChainError,
  RamCoverage,
  sameBlocks,
  type AssembledCheckpoint,
  type CheckpointLayout,
  type RamBlockExtent,
} from './chain.js';
export { CheckpointChainCompactor, compactCheckpointChain, ChainCompactionError, type ChainCompactionErrorCode } from './compact.js';
export { createStreamVerifier, MigrationStreamVerifier, type StreamSummary } from './verifier.js';
