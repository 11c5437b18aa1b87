/**
 * The main job, run by scripts/demo.sh: bring up the three-host lab, boot the clock-probe guest
 * under `primary`'s libvirtd, stop it 5 × 200 ms the way checkpoints do, and print the lag its
 * clock picked up — measured by the probe and predicted from QEMU's STOP/RESUME events.
 */
import { labUp, hostInfo } from '../test/lab/lab.js';
import { measurePauseLag } from '../test/support/pause-recorder.js';
import { startProbeVm } from '../test/support/probe-vm.js';

const ms = (ns: bigint) => (Number(ns) / 1e6).toFixed(2);
const step = (text: string) => console.log(`\n▶ ${text}`);

step('bringing up the lab: primary, backup, witness');
await labUp();
for (const name of ['primary', 'backup', 'witness'] as const) {
  const host = hostInfo(name);
  console.log(`  ${name.padEnd(8)} ${host.ip}  libvirt ${host.libvirtUri}`);
}

step("booting the clock-probe guest under primary's libvirtd (TCG)");
const started = performance.now();
const vm = await startProbeVm({ host: 'primary', name: 'ftvm-demo' });
console.log(`  probe answered after ${((performance.now() - started) / 1000).toFixed(1)} s; guest clock synced to the host`);

try {
  step('stopping the VM 5 × 200 ms, as checkpoints do');
  const { before, after, pauses, measuredLagNs: measured, predictedLagNs: predicted } = await measurePauseLag(vm.qmp, vm.probe, {
    count: 5,
    pauseMs: 200,
  });
  console.log(`  guest − host offset before: ${ms(before.offsetNs)} ms ± ${ms(before.errorNs)} ms`);
  const error = (Number(measured - predicted) / Number(predicted)) * 100;
  console.log(`  pauses (QMP STOP→RESUME): ${pauses.map((p) => ms(p.resumeNs - p.stopNs)).join(', ')} ms`);
  console.log(`  guest lag measured by the probe:      ${ms(measured)} ms (± ${ms(before.errorNs + after.errorNs)} ms)`);
  console.log(`  guest lag predicted from QMP events:  ${ms(predicted)} ms (measured − predicted: ${error.toFixed(2)} %)`);
  console.log('\n  Uncorrected, every pause leaves the guest further behind real time. That is what ftvm fixes.');
} finally {
  await vm.destroy();
}
