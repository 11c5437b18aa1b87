import { describe, expect, it } from 'vitest';
import { normalizePrefix, ownerKey, specKey } from '../src/lease/keys.js';
import { RenewalTracker } from '../src/lease/renewal-tracker.js';

describe('RenewalTracker', () => {
  it('counts the grant as the first renewal, sent when the grant was sent', () => {
    const t = new RenewalTracker(600, 500);
    expect(t.lastRenewedSentAt).toBeUndefined();
    expect(t.mustFence(1e9)).toBe(false); // nothing granted, nothing to fence
    t.granted(1000);
    expect(t.lastRenewedSentAt).toBe(1000);
    expect(t.fenceDeadline()).toBe(1600);
  });

  it('pairs answers with sends first-in first-out and keeps the send time of the newest answered', () => {
    const t = new RenewalTracker(600, 500);
    t.granted(0);
    t.sent(100);
    t.sent(250);
    expect(t.pending).toBe(2);
    expect(t.answered()).toBe(100);
    expect(t.lastRenewedSentAt).toBe(100);
    expect(t.answered()).toBe(250);
    expect(t.lastRenewedSentAt).toBe(250);
    expect(t.answered()).toBeUndefined(); // an answer with nothing in flight changes nothing
    expect(t.lastRenewedSentAt).toBe(250);
  });

  it('fences strictly after fenceAfterMs since the last answered send, however long the answer took', () => {
    const t = new RenewalTracker(600, 500);
    t.granted(0);
    t.sent(100);
    // The answer arrives late (at 650): renewal counts from the send (100), not the answer.
    expect(t.answered()).toBe(100);
    expect(t.mustFence(700)).toBe(false);
    expect(t.mustFence(700.0001)).toBe(true);
    expect(t.mustFence(700)).toBe(false); // exactly fenceAfterMs is not more than it
    expect(t.fenceDeadline()).toBe(700);
  });

  it('keepalives sent but unanswered do not postpone the fence', () => {
    const t = new RenewalTracker(600, 500);
    t.granted(0);
    for (let at = 150; at <= 600; at += 150) t.sent(at);
    expect(t.mustFence(601)).toBe(true);
  });

  it('sees a stall when the oldest keepalive waited more than stallAfterMs', () => {
    const t = new RenewalTracker(600, 500);
    t.granted(0);
    expect(t.stalled(10_000)).toBe(false); // nothing in flight
    t.sent(100);
    t.sent(250);
    expect(t.stalled(600)).toBe(false);
    expect(t.stalled(600.5)).toBe(true);
    expect(t.oldestWaitMs(700)).toBe(600);
    t.streamLost(); // the answers will never come: forget them
    expect(t.pending).toBe(0);
    expect(t.stalled(10_000)).toBe(false);
    expect(t.lastRenewedSentAt).toBe(0);
  });

  it('limits keepalives in flight', () => {
    const t = new RenewalTracker(600, 500, 2);
    t.granted(0);
    t.sent(1);
    expect(t.canSend()).toBe(true);
    t.sent(2);
    expect(t.canSend()).toBe(false);
    t.answered();
    expect(t.canSend()).toBe(true);
  });

  it('refuses nonsense settings', () => {
    expect(() => new RenewalTracker(0, 500)).toThrow(/fenceAfterMs/);
    expect(() => new RenewalTracker(600, -1)).toThrow(/stallAfterMs/);
  });
});

describe('etcd key layout', () => {
  it('puts owner and spec keys under <prefix>/vms/<vm>/', () => {
    expect(ownerKey('/ftvm', 'vm1')).toBe('/ftvm/vms/vm1/owner');
    expect(specKey('/ftvm/', 'vm1')).toBe('/ftvm/vms/vm1/spec');
    expect(normalizePrefix('/a/b//')).toBe('/a/b');
  });

  it('refuses names that would make keys ambiguous', () => {
    expect(() => ownerKey('/ftvm', 'a/b')).toThrow(/not a VM name/);
    expect(() => ownerKey('/ftvm', '')).toThrow(/not a VM name/);
    expect(() => normalizePrefix('ftvm')).toThrow(/must start with '\/'/);
  });
});
