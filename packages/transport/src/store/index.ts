export { CheckpointStore, type CommitInput, type StreamVerifier } from './checkpoint-store.js';
export { CheckpointStoreError } from './errors.js';
export type { CheckpointMetadata } from './metadata.js';
