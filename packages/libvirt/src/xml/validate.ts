import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

export interface ValidationResult {
  valid: boolean;
  /** virt-xml-validate's output (the schema errors when invalid). */
  output: string;
}

/** virt-xml-validate is not installed (Debian: libvirt-clients; it runs xmllint from libxml2-utils). */
export class ValidatorMissingError extends Error {
  override name = 'ValidatorMissingError';
}

/**
 * Validates domain XML against libvirt's own RelaxNG schema with `virt-xml-validate <file> domain`
 * (the schema libvirt installs; it covers <qemu:commandline> and foreign-namespace <metadata>).
 */
export async function validateDomainXml(xml: string, options: { timeoutMs?: number } = {}): Promise<ValidationResult> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ftvm-validate-'));
  const file = path.join(dir, 'domain.xml');
  fs.writeFileSync(file, xml);
  try {
    return await new Promise<ValidationResult>((resolve, reject) => {
      execFile('virt-xml-validate', [file, 'domain'], { timeout: options.timeoutMs ?? 30_000, killSignal: 'SIGKILL' }, (error, stdout, stderr) => {
        const output = `${stdout}${stderr}`.split(file).join('<domain.xml>').trim();
        if (!error) return resolve({ valid: true, output });
        if ((error as NodeJS.ErrnoException).code === 'ENOENT') return reject(new ValidatorMissingError('virt-xml-validate not found (install libvirt-clients and libxml2-utils)'));
        if ((error as { killed?: boolean }).killed) return reject(new Error(`virt-xml-validate got no result within ${options.timeoutMs ?? 30_000} ms`));
        resolve({ valid: false, output });
      });
    });
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/** True when virt-xml-validate and xmllint are on PATH. */
export function validatorAvailable(): boolean {
  const dirs = (process.env['PATH'] ?? '/usr/bin:/bin').split(':');
  const has = (bin: string) => dirs.some((d) => fs.existsSync(path.join(d, bin)));
  return has('virt-xml-validate') && has('xmllint');
}
