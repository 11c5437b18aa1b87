import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import net from 'node:net';
import { pipeline } from 'node:stream/promises';
import { promisify } from 'node:util';
import { QmpClient } from '@ftvm/qmp';
import { buildGuest, type GuestImage } from '../guest/boot-qemu.js';
import { hostInfo, type LabHostName } from '../lab/lab.js';
import { waitForProbe, syncGuestClock, type ProbeTarget } from './probe-client.js';
import type { ProbeDisks } from './disk-check.js';
import { probeDomainXml, withClocksource, type ProbeClocksource } from './probe-domain.js';

const run = promisify(execFile);

export interface ProbeVm {
  name: string;
  host: LabHostName;
  image: GuestImage;
  qmp: QmpClient;
  probe: ProbeTarget;
  /** Root-namespace paths of the VM's sockets and console log. */
  qmpPath: string;
  agentPath: string;
  serialLogPath: string;
  /** The same sockets as QEMU inside the host sees them. */
  paths: { run: string; migration: string; migrationOutside: string };
  xml: string;
  virsh(...args: string[]): Promise<string>;
  destroy(): Promise<void>;
}

export interface ProbeVmOptions {
  host: LabHostName;
  name?: string;
  memoryMiB?: number;
  probePort?: number;
  workloadMiBps?: number;
  bootTimeoutMs?: number;
  /** Start paused waiting for a migration stream instead of booting (`-incoming defer`). */
  incoming?: boolean;
  /** QEMU binary (e.g. ftvm's patched build); libvirt's default otherwise. */
  emulator?: string;
  /** The probe's disks, paths as the host sees them (see ft-cluster makeProbeDisks). */
  disks?: ProbeDisks;
  /** KiB per fs-workload cycle (20 cycles/s): the disk write load. */
  fsKiB?: number;
  /** The guest kernel's clocksource (default: the image's, tsc); checked once the guest is up. */
  clocksource?: ProbeClocksource;
  /** vCPUs (default 1). */
  vcpus?: number;
}

/**
 * Defines and starts the clock-probe guest as a libvirt domain on a lab host's own libvirtd and
 * connects QMP. Booting (the default) also waits for the probe and syncs the guest clock to the
 * host's; with `incoming` the domain waits, paused, for `restoreCheckpoint`.
 */
export async function startProbeVm(options: ProbeVmOptions): Promise<ProbeVm> {
  const host = hostInfo(options.host);
  const name = options.name ?? 'ftvm-probe';
  const image = await buildGuest();
  const probePort = options.probePort ?? 5555;
  const inside = (file: string) => `/run/ftvm/${file}`;
  const outside = (file: string) => path.join(host.runDir, 'ftvm', file);
  fs.mkdirSync(path.join(host.runDir, 'ftvm'), { recursive: true });
  const xml = probeDomainXml({
    name,
    kernel: image.kernel,
    initrd: image.initrd,
    cmdline: options.clocksource ? withClocksource(image.cmdline, options.clocksource) : image.cmdline,
    memoryMiB: options.memoryMiB ?? 256,
    ...(options.vcpus ? { vcpus: options.vcpus } : {}),
    probeListen: { address: host.ip, port: probePort },
    qmpSocket: inside(`${name}.qmp`),
    agentSocket: inside(`${name}.qga`),
    serialLog: inside(`${name}.serial.log`),
    ...(options.workloadMiBps ? { workloadMiBps: options.workloadMiBps } : {}),
    ...(options.incoming ? { extraQemuArgs: ['-incoming', 'defer'] } : {}),
    ...(options.emulator ? { emulator: options.emulator } : {}),
    ...(options.disks ? { disks: options.disks } : {}),
    ...(options.fsKiB ? { fsKiB: options.fsKiB } : {}),
  });
  const virsh = async (...args: string[]) =>
    (await run('virsh', ['-c', host.libvirtUri, ...args], { timeout: 60_000 })).stdout;

  await virsh('destroy', name).catch(() => undefined);
  await virsh('undefine', name).catch(() => undefined);
  const xmlDir = fs.mkdtempSync(path.join(os.tmpdir(), 'ftvm-domain-'));
  try {
    const xmlFile = path.join(xmlDir, `${name}.xml`);
    fs.writeFileSync(xmlFile, xml);
    await virsh('define', xmlFile);
  } finally {
    fs.rmSync(xmlDir, { recursive: true, force: true });
  }
  await virsh('start', name, ...(options.incoming ? ['--paused'] : []));

  const qmp = await QmpClient.connectWhenReady({ path: outside(`${name}.qmp`) }, { timeoutMs: 30_000, connectTimeoutMs: 2_000, retryMs: 100 });
  const probe = { host: host.ip, port: probePort };
  const vm: ProbeVm = {
    name,
    host: options.host,
    image,
    qmp,
    probe,
    qmpPath: outside(`${name}.qmp`),
    agentPath: outside(`${name}.qga`),
    serialLogPath: outside(`${name}.serial.log`),
    paths: { run: '/run/ftvm', migration: inside(`${name}.mig`), migrationOutside: outside(`${name}.mig`) },
    xml,
    virsh,
    destroy: async () => {
      await qmp.close().catch(() => undefined);
      await virsh('destroy', name).catch(() => undefined);
      await virsh('undefine', name).catch(() => undefined);
    },
  };
  if (!options.incoming) {
    await waitForGuest(vm, options.bootTimeoutMs ?? 60_000, true);
    if (options.clocksource) {
      // the kernel may refuse the one asked for (falls back to another): the figures would lie
      const ready = await readyClocksource(vm.serialLogPath, 10_000);
      if (ready !== options.clocksource) {
        await vm.destroy();
        throw new Error(`probe guest ${name} keeps time with clocksource '${ready ?? 'unknown'}', not the '${options.clocksource}' asked for`);
      }
    }
  }
  return vm;
}

/**
 * Feeds a stored checkpoint (a migration stream file, root-namespace path) into a domain started
 * with `incoming`, then resumes it through libvirt. QEMU listens on a unix socket and we stream
 * the file in (libvirt's seccomp sandbox forbids QEMU to spawn `exec:` helpers). Returns when the
 * probe answers.
 */
export async function restoreCheckpoint(vm: ProbeVm, checkpointPath: string, timeoutMs = 60_000): Promise<{ loadMs: number }> {
  const started = performance.now();
  const completed = vm.qmp.waitForEvent<{ status: string }>('MIGRATION', {
    timeoutMs,
    predicate: (e) => e.data.status === 'completed' || e.data.status === 'failed',
  });
  completed.catch(() => undefined);
  const incoming = `${vm.name}.incoming`;
  await vm.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
  await vm.qmp.execute('migrate-incoming', { uri: `unix:${vm.paths.run}/${incoming}` });
  const socket = net.connect(path.join(path.dirname(vm.qmpPath), incoming));
  // QEMU closes the socket once it has read the stream's end, which can beat our side's 'finish'
  // ("Premature close", EPIPE): what counts is how QEMU says the load ended (as @ftvm/libvirt's
  // restore does).
  const sent = await pipeline(fs.createReadStream(checkpointPath), socket, { signal: AbortSignal.timeout(timeoutMs) }).then(
    () => undefined,
    (error: Error) => error,
  );
  const outcome = sent ? await Promise.race([completed, new Promise<undefined>((r) => setTimeout(() => r(undefined), 3_000))]) : await completed;
  if (outcome?.data.status !== 'completed') {
    throw new Error(`loading ${checkpointPath} into ${vm.name} on ${vm.host} failed${sent ? ` (sending it: ${sent.message})` : ''}`);
  }
  const loadMs = performance.now() - started;
  await vm.virsh('resume', vm.name);
  await waitForGuest(vm, timeoutMs, false);
  return { loadMs };
}

/** The clocksource the guest's init announced on its console (its READY line may trail the probe by a little). */
async function readyClocksource(serialLog: string, timeoutMs: number): Promise<string | undefined> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    const text = fs.existsSync(serialLog) ? fs.readFileSync(serialLog, 'utf8') : '';
    const found = /FTVM-PROBE-READY .*clocksource=(\S+)/.exec(text)?.[1];
    if (found || performance.now() > deadline) return found;
    await new Promise((r) => setTimeout(r, 200));
  }
}

async function waitForGuest(vm: ProbeVm, timeoutMs: number, sync: boolean): Promise<void> {
  try {
    await waitForProbe(vm.probe, timeoutMs);
    if (sync) await syncGuestClock(vm.probe);
  } catch (error) {
    const console = fs.existsSync(vm.serialLogPath) ? fs.readFileSync(vm.serialLogPath, 'utf8').slice(-2000) : '(no console log)';
    throw new Error(`probe guest ${vm.name} on ${vm.host} does not answer: ${(error as Error).message}\nconsole:\n${console}`);
  }
}

