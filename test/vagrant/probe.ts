/**
 * The Vagrant lab's probe VM, for vagrant/lab.sh: the clock-probe test guest (test/guest) as a
 * tiny protected VM inside `primary`, and its measurements. Run with `node --import tsx`.
 *
 *   probe.ts spec NAME PEER        (on the controller) the guest's ftvm domain spec, YAML, paths of
 *                                  the controller's guest image (lab.sh copies it to the same paths)
 *   probe.ts xml SPEC              (in a VM) FT-ready libvirt XML with the patched QEMU, from SPEC
 *   probe.ts wait [TIMEOUT_S]      (in a VM) until the guest's probe answers on 127.0.0.1
 *   probe.ts sync                  (in a VM) the guest clock set to this VM's clock
 *   probe.ts measure               (in a VM) one JSON line: guest − this VM's clock, boot id,
 *                                  workload counter
 *
 * The probe port is forwarded on every address of whichever VM runs the guest, so it follows the
 * guest through a failover; measuring inside that VM compares the guest with that VM's own clock.
 */
import fs from 'node:fs';
import { ftReadyFromSpec } from '@ftvm/libvirt';
import { probeGuestYaml } from '../guest/probe-spec.js';
import { clockOffset, syncGuestClock, waitForProbe } from '../support/probe-client.js';

const PORT = 5555;
const EMULATOR = '/opt/ftvm/bin/qemu-system-x86_64';
const target = { host: '127.0.0.1', port: PORT };
const [command, ...args] = process.argv.slice(2);

function usage(message: string): never {
  console.error(`probe.ts: ${message}\nusage: probe.ts spec NAME PEER | xml SPEC | wait [TIMEOUT_S] | sync | measure`);
  process.exit(2);
}

switch (command) {
  case 'spec': {
    const [name, peer] = args;
    if (!name || !peer) usage('spec needs NAME and PEER');
    // Small and quiet: it runs under TCG inside a TCG VM. 1 MiB/s keeps a counter moving.
    process.stdout.write(await probeGuestYaml({ name, peer: { host: peer }, checkpointIntervalMs: 1000, probeListen: { address: '0.0.0.0', port: PORT }, memoryMiB: 128, workloadMiBps: 1 }));
    break;
  }
  case 'xml': {
    const [file] = args;
    if (!file) usage('xml needs SPEC (a YAML file)');
    process.stdout.write(ftReadyFromSpec(fs.readFileSync(file, 'utf8'), { emulator: { path: EMULATOR, require: true } }).xml);
    break;
  }
  case 'wait': {
    const timeoutS = Number(args[0] ?? 300);
    if (!(timeoutS > 0)) usage(`wait: TIMEOUT_S must be a positive number of seconds, not ${args[0]}`);
    await waitForProbe(target, timeoutS * 1000);
    break;
  }
  case 'sync': {
    const synced = await syncGuestClock(target, { samples: 8 });
    console.log(JSON.stringify({ offsetMs: Number(synced.offsetNs) / 1e6, errorMs: Number(synced.errorNs) / 1e6 }));
    break;
  }
  case 'measure': {
    const m = await clockOffset(target, { samples: 16 });
    console.log(
      JSON.stringify({
        offsetMs: Number(m.offsetNs) / 1e6,
        errorMs: Number(m.errorNs) / 1e6,
        bootId: m.bootId.toString(16),
        counter: m.workloadCounter.toString(),
        atMs: Number(m.hostRealtimeNs / 1_000_000n),
      }),
    );
    break;
  }
  default:
    usage(command ? `unknown command '${command}'` : 'a command is needed');
}
