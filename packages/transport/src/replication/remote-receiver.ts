import { fileURLToPath } from 'node:url';
import type { SshConnection } from '../ssh/index.js';
import { ReplicationSender } from './sender.js';

export interface RemoteReceiverOptions {
  /** The checkpoint store directory on the backup. */
  storeDir: string;
  keep?: number;
  /** The receiver script on the backup; ftvm is installed at the same path on both hosts. */
  receiverPath?: string;
  nodePath?: string;
}

// The compiled receiver, whether this module runs from src/ (tests) or dist/ (both are two deep).
const DEFAULT_RECEIVER = fileURLToPath(new URL('../../dist/bin/ftvm-receive.js', import.meta.url));

const TEST_ENV = ['FTVM_TEST_PAUSE_AT', 'FTVM_TEST_PAUSE_MS'];

/** Quotes one word for the remote shell. */
const shellWord = (word: string) => `'${word.replace(/'/g, `'\\''`)}'`;

/**
 * Starts `ftvm-receive` on the backup over an SSH exec channel and returns the sender that feeds
 * it. The receiver's stderr is kept (last 4 KiB) so a failure on the backup can be explained.
 */
export async function openRemoteReceiver(
  ssh: SshConnection,
  options: RemoteReceiverOptions,
): Promise<{ sender: ReplicationSender; stderr: () => string }> {
  // test harnesses' pause points (test-pause.ts) reach the receiver through its command line
  const testEnv = TEST_ENV.filter((name) => process.env[name]).map((name) => `${name}=${shellWord(process.env[name]!)}`);
  const command = [
    ...testEnv,
    ...[options.nodePath ?? 'node', options.receiverPath ?? DEFAULT_RECEIVER, '--store', options.storeDir, '--keep', String(options.keep ?? 3)].map(shellWord),
  ].join(' ');
  const channel = await ssh.exec(command);
  let stderr = '';
  channel.stderr.on('data', (chunk: Buffer) => {
    stderr = (stderr + chunk.toString('utf8')).slice(-4096);
  });
  return { sender: new ReplicationSender(channel), stderr: () => stderr };
}
