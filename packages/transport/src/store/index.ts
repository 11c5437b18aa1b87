export { CheckpointStore, type CheckpointBase, type CommitInput, type LoadableCheckpoint, type StreamShape, type StreamVerifier } from './checkpoint-store.js';
export { CheckpointStoreError } from './errors.js';
export type { CheckpointMetadata } from './metadata.js';
