export { Checkpointer, type CheckpointerOptions, type CheckpointResult } from './checkpointer.js';
export { MigrationSocket } from './migration-socket.js';
