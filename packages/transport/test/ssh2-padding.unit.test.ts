import { createRequire } from 'node:module';
import { describe, expect, it } from 'vitest';

// ssh2 is patched (patches/ssh2@1.17.0.patch): an SSH packet's random padding comes from a pool
// of CSPRNG bytes refilled 64 KiB at a time, not from a randomFillSync() call per packet.
const require = createRequire(import.meta.url);
const CRYPTO_MODULE = require.resolve('ssh2/lib/protocol/crypto.js');

interface Ssh2Cipher {
  allocPacket(payloadLength: number): Buffer;
}

/** A fresh copy of ssh2's crypto module, loaded while node:crypto's randomFillSync is counted. */
function loadCountingRandomFills(): { createCipher: (config: unknown) => Ssh2Cipher; fills: () => number } {
  const nodeCrypto = require('node:crypto') as typeof import('node:crypto');
  const original = nodeCrypto.randomFillSync;
  let fills = 0;
  nodeCrypto.randomFillSync = ((...args: Parameters<typeof original>) => (fills++, original(...args))) as typeof original;
  delete require.cache[CRYPTO_MODULE];
  try {
    const { createCipher } = require(CRYPTO_MODULE) as { createCipher: (config: unknown) => Ssh2Cipher };
    return { createCipher, fills: () => fills };
  } finally {
    nodeCrypto.randomFillSync = original;
    delete require.cache[CRYPTO_MODULE];
  }
}

describe('ssh2 packet padding (patched)', () => {
  it('is random, never reused across packets or pool refills, and costs one CSPRNG call per 64 KiB', () => {
    const { createCipher, fills } = loadCountingRandomFills();
    const cipher = createCipher({
      outbound: {
        onWrite: () => {},
        cipherInfo: { sslName: 'aes-128-gcm', blockLen: 16, keyLen: 16, ivLen: 12, authLen: 16, discardLen: 0, stream: false },
        cipherKey: Buffer.alloc(16, 1),
        cipherIV: Buffer.alloc(12, 2),
        seqno: 0,
      },
    });
    const channelData = 1 + 4 + 4 + 32 * 1024; // one full CHANNEL_DATA packet, as bulk data sends
    const paddings = new Set<string>();
    const packets = 20_000; // 6 bytes of padding each: ~117 KiB, so the pool refills at least once
    let paddingBytes = 0;
    for (let i = 0; i < packets; i++) {
      const packet = cipher.allocPacket(channelData);
      const padLength = packet[4]!;
      expect(padLength).toBeGreaterThanOrEqual(4);
      paddings.add(packet.subarray(5 + channelData, 5 + channelData + padLength).toString('hex'));
      paddingBytes += padLength;
    }
    // 20,000 random 48-bit values collide with probability ~7e-7; reused pool bytes would collide
    expect(paddings.size).toBe(packets);
    expect(fills()).toBeGreaterThanOrEqual(2);
    expect(fills()).toBeLessThanOrEqual(Math.ceil(paddingBytes / 65536) + 1);
  });
});
