/**
 * Why a checkpoint could not be committed or read, or the disk replica not brought to one:
 * - `no-disk-base`: a checkpoint's disk deltas do not apply on this store's disk head (the newest
 *   committed epoch, or a completed seed with nothing on it yet); the primary reseeds.
 * - `no-replica`: no complete disk replica here, or the replica is past this checkpoint's disk
 *   state (it was applied further), so this checkpoint's disks cannot be had.
 * - `locked`: another process kept the replica's lock past the deadline.
 */
export type CheckpointStoreErrorCode =
  | 'io'
  | 'no-space'
  | 'permission'
  | 'verify'
  | 'corrupt'
  | 'conflict'
  | 'not-found'
  | 'no-base'
  | 'no-disk-base'
  | 'no-replica'
  | 'locked';

/** A checkpoint could not be committed or read; `epoch` and `path` say which and where. */
export class CheckpointStoreError extends Error {
  override name = 'CheckpointStoreError';
  constructor(
    message: string,
    readonly code: CheckpointStoreErrorCode,
    readonly epoch?: number,
    readonly path?: string,
  ) {
    super(message);
  }

  /** Maps an fs error to a store error with a message a user can act on. */
  static fromFs(error: unknown, action: string, epoch?: number): CheckpointStoreError {
    const err = error as NodeJS.ErrnoException;
    const code = err.code === 'ENOSPC' || err.code === 'EDQUOT' ? 'no-space' : err.code === 'EACCES' || err.code === 'EPERM' || err.code === 'EROFS' ? 'permission' : 'io';
    const hint = code === 'no-space' ? ' (disk full)' : code === 'permission' ? ' (permission denied)' : '';
    return new CheckpointStoreError(`${action}${hint}: ${err.message}`, code, epoch, err.path);
  }
}
