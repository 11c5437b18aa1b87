import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { bootGuest, buildGuest, type BootedGuest } from '../../../test/guest/boot-qemu.js';
import { clockOffset } from '../../../test/support/probe-client.js';
import { GuestAgentClient, QmpTimeoutError } from '../src/index.js';

// The real qemu-ga inside the ftvm test guest, on its virtio-serial port.
let guest: BootedGuest;
let agent: GuestAgentClient;

beforeAll(async () => {
  guest = await bootGuest({ image: await buildGuest() });
  agent = await GuestAgentClient.connect({ path: guest.gaSocket }, { connectTimeoutMs: 30_000 });
});

afterAll(async () => {
  await agent?.close();
  await guest?.kill();
});

describe('GuestAgentClient against qemu-ga in a real guest', () => {
  it('pings and reads the guest clock exactly', async () => {
    await agent.ping();
    const offset = await clockOffset(guest.probe, { samples: 8 });
    const hostNs = BigInt(Date.now()) * 1_000_000n;
    const guestNs = await agent.getTime();
    // qemu-ga reports microseconds × 1000; beyond 2^53, so only an exact parse keeps them.
    expect(guestNs > 2n ** 53n).toBe(true);
    expect(guestNs % 1000n).toBe(0n);
    const agreeNs = guestNs - hostNs - offset.offsetNs;
    expect(agreeNs < 0n ? -agreeNs : agreeNs).toBeLessThan(200_000_000n); // agent and probe see one clock
  });

  it('sets the guest clock with guest-set-time, as the probe confirms', async () => {
    const target = BigInt(Date.now()) * 1_000_000n + 30_000_000_000n; // 30 s ahead
    await agent.setTime(target);
    const offset = await clockOffset(guest.probe, { samples: 16 });
    const offsetMs = Number(offset.offsetNs) / 1e6;
    expect(offsetMs).toBeGreaterThan(29_000);
    expect(offsetMs).toBeLessThan(31_000);
    await agent.setTime(BigInt(Date.now()) * 1_000_000n);
  });

  it('gives a clear timeout when the agent cannot answer (VM stopped)', async () => {
    const { QmpClient } = await import('../src/index.js');
    const qmp = await QmpClient.connect({ path: guest.qmpSocket });
    await qmp.execute('stop');
    try {
      const error = await agent.ping(300).catch((e: unknown) => e);
      expect(error).toBeInstanceOf(QmpTimeoutError);
      expect((error as Error).message).toContain('guest-ping');
    } finally {
      await qmp.execute('cont');
      await qmp.close();
    }
    await agent.ping(10_000); // resynchronised after the timeout
  });
});
