import { execFileSync } from 'node:child_process';
import os from 'node:os';

/** What a benchmark ran on, so a figure is never read without its machine. */
export function describeEnvironment() {
  const qemu = execFileSync('qemu-system-x86_64', ['--version'], { encoding: 'utf8' }).split('\n')[0] ?? '';
  return {
    measured_at: new Date().toISOString(),
    host: {
      hostname: os.hostname(),
      kernel: os.release(),
      cpus: os.cpus().length,
      cpu_model: os.cpus()[0]?.model ?? 'unknown',
      memory_gib: Math.round(os.totalmem() / 2 ** 30),
    },
    qemu,
    accelerator: 'tcg',
    node: process.version,
  };
}
