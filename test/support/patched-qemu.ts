import { execFileSync } from 'node:child_process';

/**
 * ftvm's QEMU (packages/kvmclock/qemu): built from Debian's source with the ftvm patches, cached
 * by patch hash, so this is instant after the first build. Stock QEMU 7.2 under TCG can lose
 * guest writes during precopy (fixed by patch 0010), so a test that restores a checkpoint and
 * expects the guest to live on uses this one, as ftvm itself does.
 */
export function patchedQemu(): string {
  if (process.env.FTVM_QEMU_PATCHED) return process.env.FTVM_QEMU_PATCHED;
  const script = new URL('../../packages/kvmclock/qemu/build.sh', import.meta.url).pathname;
  return execFileSync('bash', [script], { encoding: 'utf8', timeout: 3_600_000, stdio: ['ignore', 'pipe', 'inherit'] }).trim().split('\n').pop()!;
}
