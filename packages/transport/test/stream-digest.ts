// Comparing parses cheaply: a digest of records instead of deep equality over page buffers.

import { createHash } from 'node:crypto';
import type { MigrationRecord } from '../src/stream/index.js';

/** A digest of records that covers every field and every byte of every buffer. */
export function digestRecords(records: MigrationRecord[]): string {
  const h = createHash('sha256');
  for (const rec of records) {
    for (const [k, v] of Object.entries(rec)) {
      h.update(k);
      if (Buffer.isBuffer(v)) h.update(v);
      else h.update(JSON.stringify(v, (_k, x: unknown) => (typeof x === 'bigint' ? x.toString() : x)) ?? 'undefined');
    }
    h.update('\n');
  }
  return h.digest('hex');
}
