export {
  CheckpointStore,
  type CheckpointBase,
  type CommitInput,
  type LoadableCheckpoint,
  type SeedInput,
  type StreamShape,
  type StreamVerifier,
} from './checkpoint-store.js';
export { CheckpointStoreError, type CheckpointStoreErrorCode } from './errors.js';
export type { CheckpointMetadata, DiskBase, DiskDeltaMetadata } from './metadata.js';
export {
  DiskDeltaError,
  DiskDeltaWriter,
  scanDiskDelta,
  MAX_EXTENT_DATA,
  type DiskDeltaErrorCode,
  type DiskDeltaSummary,
  type DiskExtent,
  type DiskGeometry,
  type DiskSection,
  type DiskSectionInput,
} from './disk-delta.js';
export type { ReplicaMarker, ReplicaState } from './replica.js';
export { applyToRamFile, writeRamPages, readRamFileStamp, writeRamFileStamp, RamFileError, type RamFilePage, type RamFileApply, type RamFileApplyOptions, type RamFileErrorCode, type RamFileStamp } from './ram-file.js';
export { StandbyRam, withIgnoreShared, IGNORE_SHARED_CAPABILITY, type StandbyRamApplied, type StandbyRamOptions } from './standby-ram.js';
