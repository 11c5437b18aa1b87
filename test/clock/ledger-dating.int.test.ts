import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Checkpointer } from '@ftvm/coordinator';
import { DriftLedger, PauseTracker } from '@ftvm/kvmclock';
import { openRemoteReceiver, type ReplicationSender } from '@ftvm/transport';
import type { SshConnection } from '@ftvm/transport';
import { hostInfo, labUp } from '../lab/lab.js';
import { connectLabSsh } from '../support/lab-ssh.js';
import { clockOffset } from '../support/probe-client.js';
import { startProbeVm, type ProbeVm } from '../support/probe-vm.js';

// The drift ledger of a VM checkpointed by stock QEMU (nothing gives the stopped time back), set
// against the guest clock measured by the probe. QEMU stamps STOP ~1 ms after the clock froze and
// RESUME a little before it restarts, so pauses counted from those stamps come out short, every
// one of them. Dated from the checkpoints' own virtual clock (the backup reads it from the stream
// and acknowledges it), the pauses telescope: the sum is off by one stamp's delay at most.
const VM = 'ledger-dating';
const CHECKPOINTS = 20;
const STORE_INSIDE = `/var/lib/libvirt/ftvm/${VM}`;
let vm: ProbeVm | undefined;
let ssh: SshConnection | undefined;
let sender: ReplicationSender | undefined;

beforeAll(async () => {
  await labUp();
  fs.rmSync(path.join(hostInfo('backup').libvirtLibDir, 'ftvm', VM), { recursive: true, force: true });
  vm = await startProbeVm({ host: 'primary', name: VM });
  ssh = await connectLabSsh('backup');
  sender = (await openRemoteReceiver(ssh, { storeDir: STORE_INSIDE, keep: 2 })).sender;
});

afterAll(async () => {
  sender?.close();
  ssh?.close();
  await vm?.destroy();
});

describe('drift ledger over stock-QEMU checkpoints', () => {
  it(`predicts the guest's lag after ${CHECKPOINTS} checkpoints to within 3 ms, with every pause but the first dated from the stream`, async () => {
    const { qmp, probe, paths } = vm!;
    const ledger = new DriftLedger(VM);
    const stamped = new DriftLedger(`${VM} (STOP/RESUME stamps)`);
    const tracker = new PauseTracker(qmp, ledger);
    const stampTracker = new PauseTracker(qmp, stamped);
    const checkpointer = await Checkpointer.create({ vm: VM, qmp, socketPath: paths.migrationOutside, qemuSocketPath: paths.migration, qemuVersion: '7.2' });
    const latenessMs: number[] = [];
    try {
      expect(checkpointer.selfResuming).toBe(false); // stock QEMU: `cont` after each checkpoint
      const before = await clockOffset(probe, { samples: 32 });
      for (let epoch = 1; epoch <= CHECKPOINTS; epoch++) {
        tracker.expect('checkpoint');
        stampTracker.expect('checkpoint');
        const result = await checkpointer.checkpoint(epoch, sender!);
        if (epoch === 1) {
          expect(result.frozeAt.source).toBe('stop-event'); // nothing to date it from yet
          continue;
        }
        expect(result.frozeAt.source, result.frozeAt.rejected).toBe('stream');
        expect(ledger.redateStop(result.stopNs, result.frozeAt.stopNs)).toBeDefined();
        latenessMs.push(Number(result.frozeAt.stopEventLatenessNs) / 1e6);
        await new Promise((r) => setTimeout(r, 200));
      }
      await new Promise((r) => setTimeout(r, 200)); // the last RESUME reaches the trackers
      const after = await clockOffset(probe, { samples: 32 });
      const measuredLagNs = before.offsetNs - after.offsetNs;
      const ms = (ns: bigint) => Number(ns) / 1e6;
      console.log(
        `${CHECKPOINTS} checkpoints: guest lost ${ms(measuredLagNs).toFixed(2)} ms ± ${ms(before.errorNs + after.errorNs).toFixed(2)}; ` +
          `ledger (stream-dated) ${ms(ledger.predictedLagNs).toFixed(2)} ms, from STOP/RESUME stamps ${ms(stamped.predictedLagNs).toFixed(2)} ms; ` +
          `STOP stamp after the derived freeze by ${Math.min(...latenessMs).toFixed(2)}–${Math.max(...latenessMs).toFixed(2)} ms`,
      );
      expect(ledger.entries).toHaveLength(CHECKPOINTS);
      // The stamps' own view is short by ~1 ms a pause: the stream-dated ledger must not be.
      expect(Math.abs(ms(measuredLagNs - ledger.predictedLagNs))).toBeLessThanOrEqual(3 + ms(before.errorNs + after.errorNs));
      expect(stamped.predictedLagNs).toBeLessThan(ledger.predictedLagNs);
      // A freeze derived after its STOP stamp would mean a wrong reference; one far before, an unseen pause.
      for (const late of latenessMs) expect(late).toBeGreaterThan(-0.05);
    } finally {
      tracker.close();
      stampTracker.close();
      await checkpointer.close();
    }
  });
});
