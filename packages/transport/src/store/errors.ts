/** A checkpoint could not be committed or read; `epoch` and `path` say which and where. */
export class CheckpointStoreError extends Error {
  override name = 'CheckpointStoreError';
  constructor(
    message: string,
    readonly code: 'io' | 'no-space' | 'permission' | 'verify' | 'corrupt' | 'conflict' | 'not-found' | 'no-base',
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
