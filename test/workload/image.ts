/** The workload guest's image (test/workload/build.sh): build it or find it in the cache. */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const BUILD_SCRIPT = fileURLToPath(new URL('./build.sh', import.meta.url));

export interface WorkloadImage {
  dir: string;
  /** The root file system disk (qcow2, ext4 on the whole disk: the guest's /dev/vda). */
  disk: string;
  kernel: string;
  initrd: string;
  /** Command line to boot with; the mode (ftvm.wl=…) is added by the caller. */
  cmdline: string;
  manifest: WorkloadManifest;
}

export interface WorkloadManifest {
  hash: string;
  kernelVersion: string;
  cmdline: string;
  diskSize: string;
  buildSource: string;
  packages: Record<string, string>;
  buildSeconds: number;
  built: string;
}

/**
 * Runs build.sh (a cache hit takes well under a second; a build, debootstrap included, minutes)
 * and returns the image it printed.
 */
export function buildWorkloadImage(options: { timeoutMs?: number; log?: (line: string) => void } = {}): Promise<WorkloadImage> {
  return new Promise((resolve, reject) => {
    const child = execFile('bash', [BUILD_SCRIPT], { timeout: options.timeoutMs ?? 3_600_000, maxBuffer: 64 << 20 }, (error, stdout, stderr) => {
      if (error) return reject(new Error(`test/workload/build.sh failed: ${error.message}\n${stderr.slice(-3000)}`));
      const dir = stdout.trim().split('\n').pop() ?? '';
      try {
        resolve(workloadImageAt(dir));
      } catch (e) {
        reject(new Error(`test/workload/build.sh printed ${JSON.stringify(dir)}, which is not a workload image: ${(e as Error).message}`));
      }
    });
    if (options.log) child.stderr?.on('data', (chunk: Buffer) => chunk.toString().split('\n').filter(Boolean).forEach((l) => options.log!(l)));
  });
}

/** The image in an existing build directory (throws naming what is missing). */
export function workloadImageAt(dir: string): WorkloadImage {
  const manifest = JSON.parse(fs.readFileSync(path.join(dir, 'manifest.json'), 'utf8')) as WorkloadManifest;
  const image = { dir, disk: path.join(dir, 'root.qcow2'), kernel: path.join(dir, 'vmlinuz'), initrd: path.join(dir, 'initrd.img'), cmdline: manifest.cmdline, manifest };
  for (const file of [image.disk, image.kernel, image.initrd]) if (!fs.existsSync(file)) throw new Error(`${file} is missing`);
  if (typeof manifest.cmdline !== 'string' || !manifest.cmdline.includes('root=')) throw new Error(`manifest.json has no usable cmdline: ${JSON.stringify(manifest.cmdline)}`);
  return image;
}

/** What the guest does at boot (kernel parameters ftvm.wl…; see guest/ftvm-workload-init). */
export interface WorkloadParams {
  mode: 'bench' | 'check';
  /** pgbench's -T, in guest seconds (default 30). */
  pgbenchS?: number;
  /** pgbench's -c (default 2). */
  clients?: number;
  /** ms between the sequence client's inserts; 0: no client (default 100). */
  seqMs?: number;
  /** Rounds of [pgbench, build]; 0: until killed (default 0). */
  rounds?: number;
}

/** The kernel command line for `params`. */
export function workloadCmdline(image: WorkloadImage, params: WorkloadParams): string {
  const words = [image.cmdline, `ftvm.wl=${params.mode}`];
  const numeric: [string, number | undefined][] = [
    ['pgbench', params.pgbenchS],
    ['clients', params.clients],
    ['seq_ms', params.seqMs],
    ['rounds', params.rounds],
  ];
  for (const [key, value] of numeric) {
    if (value === undefined) continue;
    if (!Number.isInteger(value) || value < 0) throw new Error(`workload parameter ${key}: a whole number ≥ 0, got ${value}`);
    words.push(`ftvm.wl.${key}=${value}`);
  }
  return words.join(' ');
}
