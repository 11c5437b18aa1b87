#!/usr/bin/env node
/**
 * ftvm-receive: the backup's end of a replication channel. The primary runs it over SSH and pipes
 * checkpoint frames into its stdin; it commits each through the checkpoint store and answers with
 * one JSON line per checkpoint on stdout. Diagnostics go to stderr.
 */
import { parseArgs } from 'node:util';
import { CheckpointStore } from '../store/index.js';
import { runReceiver } from '../replication/index.js';
import { createStreamVerifier } from '../stream/index.js';

const { values } = parseArgs({
  options: {
    store: { type: 'string' },
    keep: { type: 'string', default: '3' },
  },
});

function fail(message: string): never {
  process.stderr.write(`ftvm-receive: ${message}\n`);
  process.exit(2);
}

if (!values.store) fail('--store DIR is required');
const keep = Number(values.keep);
if (!Number.isInteger(keep) || keep < 1) fail(`--keep must be an integer ≥ 1, got ${JSON.stringify(values.keep)}`);

const log = (message: string) => process.stderr.write(`ftvm-receive: ${message}\n`);
const store = await new CheckpointStore(values.store, keep, {
  onPruneError: (error) => log(`old checkpoints not pruned: ${error.message}`),
  onCompactError: (error) => log(`checkpoint chain not compacted (retried): ${error.message}`),
})
  .open()
  .catch((error: Error) => fail(error.message));
await runReceiver(process.stdin, process.stdout, {
  store,
  createVerifier: createStreamVerifier,
  log,
}).catch((error: Error) => fail(error.message));
