import { execFile } from 'node:child_process';
import { classifyLibvirtError, LibvirtTimeoutError } from './errors.js';

export interface VirshOptions {
  timeoutMs: number;
  /** Written to virsh's stdin. */
  input?: string;
  /** Domain the call is about (for the error message). */
  domain?: string;
  /** Operation name for the error message; defaults to the virsh command. */
  operation?: string;
}

/**
 * Runs `virsh -c <uri> <args…>` with a hard deadline (SIGKILL on expiry, so a frozen daemon cannot
 * hold us). Used for what the Node binding has no call for: starting paused, lifecycle events,
 * `domstate --reason`, monitor passthrough, undefine with flags.
 */
export function virsh(uri: string, args: string[], options: VirshOptions): Promise<string> {
  const operation = options.operation ?? args[0] ?? 'virsh';
  return new Promise((resolve, reject) => {
    const child = execFile(
      'virsh',
      ['-q', '-c', uri, ...args],
      { timeout: options.timeoutMs, killSignal: 'SIGKILL', maxBuffer: 64 << 20, env: { ...process.env, LC_ALL: 'C' } },
      (error, stdout, stderr) => {
        if (!error) return resolve(stdout);
        const killed = (error as { killed?: boolean }).killed === true || (error as { signal?: string }).signal === 'SIGKILL';
        if (killed) return reject(new LibvirtTimeoutError(operation, options.domain, uri, options.timeoutMs));
        const message = (stderr || error.message).trim();
        reject(classifyLibvirtError(operation, options.domain, uri, new Error(message)));
      },
    );
    if (options.input !== undefined) child.stdin?.end(options.input);
    else child.stdin?.end();
  });
}
