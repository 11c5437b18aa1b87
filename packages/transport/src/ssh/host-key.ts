import { createHash } from 'node:crypto';

/**
 * OpenSSH's fingerprint of a host key blob: `SHA256:` + unpadded base64 of its sha256, exactly what
 * `ssh-keygen -lf` prints — so a user can pin what they already see.
 */
export function fingerprintOfKeyBlob(blob: Buffer): string {
  return `SHA256:${createHash('sha256').update(blob).digest('base64').replace(/=+$/, '')}`;
}

/** Fingerprint of a public key line (`ssh-ed25519 AAAA… comment`) or a known_hosts entry. */
export function fingerprintOfPublicKeyLine(line: string): string {
  const fields = line.trim().split(/\s+/);
  const blobIndex = fields.findIndex((f) => /^AAAA[0-9A-Za-z+/]+=*$/.test(f));
  if (blobIndex < 0) throw new Error(`not an OpenSSH public key line: ${JSON.stringify(line.slice(0, 60))}`);
  return fingerprintOfKeyBlob(Buffer.from(fields[blobIndex]!, 'base64'));
}
