/**
 * The workload guest as a protected VM in the lab: its root disk a local qcow2 on the host that
 * runs it (replicated by ftvm), its console a file on that host, the two `ftvm agent`s of
 * test/support/ft-cluster.ts. Unlike the probe cluster, the VM is left unprotected until
 * `protect()`, so one boot measures both ways; and nothing here needs the probe (this guest has
 * no network).
 */
import fs from 'node:fs';
import path from 'node:path';
import { ftReadyFromSpec } from '@ftvm/libvirt';
import type { VmRecord } from '@ftvm/coordinator';
import { Etcd3 } from 'etcd3';
import { stringify as toYaml } from 'yaml';
import { hostInfo, labEtcdEndpoint, labUp } from '../lab/lab.js';
import { sleep } from '../lab/wait.js';
import { readRecord } from '../support/failover-runs.js';
import {
  AGENT_HOSTS,
  CLUSTER_DIR,
  controlClient,
  ETCD_PREFIX,
  killStrayAgents,
  other,
  qemuPidOf,
  removeVm,
  startAgent,
  untilAgents,
  virsh,
  waitProtectedOn,
  vmImageDir,
  vmStatus,
  type AgentHost,
  type Cluster,
} from '../support/ft-cluster.js';
import { workloadCmdline, type WorkloadImage, type WorkloadParams } from './image.js';
import { realtimeNs } from './serial.js';

export interface WorkloadVmOptions {
  vm: string;
  /** The patched QEMU (test/support/patched-qemu.ts). */
  emulator: string;
  params: WorkloadParams;
  memoryMiB: number;
  checkpointIntervalMs: number;
}

/** The VM's console log as this process sees it on `host` (libvirt writes it there). */
export function serialLogOf(host: AgentHost, vm: string): string {
  return path.join(hostInfo(host).runDir, 'ftvm', `${vm}.serial.log`);
}

/**
 * A fresh copy of the image's root disk on `host` (under its /var/lib/libvirt/images/<vm>/; a
 * full copy, not an overlay: the replica is of one self-contained image) and the FT-ready XML.
 */
export async function workloadVmXml(image: WorkloadImage, host: AgentHost, options: WorkloadVmOptions): Promise<string> {
  const { inHost, here } = vmImageDir(host, options.vm);
  fs.rmSync(here, { recursive: true, force: true });
  fs.mkdirSync(here, { recursive: true });
  fs.copyFileSync(image.disk, path.join(here, 'root.qcow2'));
  const yaml = toYaml({
    name: options.vm,
    type: 'qemu',
    memoryMiB: options.memoryMiB,
    vcpus: 1,
    boot: { kernel: image.kernel, initrd: image.initrd, cmdline: workloadCmdline(image, options.params) },
    // cache=none: what the guest flushed is in the image file, as on the probe's disks
    disks: [{ path: path.posix.join(inHost, 'root.qcow2'), format: 'qcow2', cache: 'none' }],
    serialLog: `/run/ftvm/${options.vm}.serial.log`,
    ftvm: { peer: { host: other(host) }, checkpointIntervalMs: options.checkpointIntervalMs },
  });
  return ftReadyFromSpec(yaml, { emulator: { path: options.emulator, require: true } }).xml;
}

/**
 * Lab up, the VM booted on `primary` from a fresh disk copy, both agents running — the VM NOT yet
 * protected. Agents inherit this process's environment (FTVM_TEST_DISK_AUDIT).
 */
export async function startWorkloadCluster(image: WorkloadImage, options: WorkloadVmOptions): Promise<Cluster> {
  await labUp();
  await killStrayAgents();
  fs.rmSync(CLUSTER_DIR, { recursive: true, force: true });
  fs.mkdirSync(CLUSTER_DIR, { recursive: true });
  await removeTestVms();
  await removeVm(options.vm);
  for (const host of AGENT_HOSTS) {
    fs.mkdirSync(path.join(hostInfo(host).runDir, 'ftvm'), { recursive: true });
    fs.rmSync(serialLogOf(host, options.vm), { force: true });
    fs.rmSync(vmImageDir(host, options.vm).here, { recursive: true, force: true });
  }
  const xmlFile = path.join(CLUSTER_DIR, `${options.vm}.xml`);
  fs.writeFileSync(xmlFile, await workloadVmXml(image, 'primary', options));
  await virsh('primary', 'define', xmlFile);
  await virsh('primary', 'start', options.vm);
  const agentPids = { primary: await startAgent('primary'), backup: await startAgent('backup') };
  return { vm: options.vm, primary: 'primary', agentPids };
}

/**
 * Every VM an earlier, interrupted test run left in the test cluster (a record under ETCD_PREFIX):
 * its domains, stores and keys. Without this the agents started here take such a VM over and
 * checkpoint it beside the one being measured. Only for a holder of the lab lock.
 */
export async function removeTestVms(): Promise<string[]> {
  const etcd = new Etcd3({ hosts: [labEtcdEndpoint()] });
  let names: string[];
  try {
    const keys = await etcd.getAll().prefix(`${ETCD_PREFIX}/vms/`).keys();
    names = [...new Set(keys.map((k) => k.slice(`${ETCD_PREFIX}/vms/`.length).split('/')[0]!).filter(Boolean))];
  } finally {
    etcd.close();
  }
  for (const name of names) await removeVm(name);
  return names;
}

/**
 * `ftvm protect` with the other host as backup; returns once the first checkpoint is committed.
 * The agent's protect waits 30 s for that checkpoint, less than a 1 GiB guest with a ~0.9 GB disk
 * seed takes under TCG; the protection itself goes on, so past that answer this waits for the
 * checkpoint in the agent's status (up to `timeoutMs`).
 */
export async function protectWorkload(cluster: Cluster, checkpointIntervalMs: number, timeoutMs = 600_000): Promise<{ protectAnswer: string }> {
  let protectAnswer = 'ok';
  try {
    await controlClient(cluster.primary).protect({ vm: cluster.vm, backup: other(cluster.primary), checkpointIntervalMs }, () => undefined);
  } catch (error) {
    if (!/a committed checkpoint of .* not within/.test((error as Error).message)) throw error;
    protectAnswer = (error as Error).message;
  }
  await waitProtectedOn(cluster.primary, cluster.vm, { timeoutMs });
  return { protectAnswer };
}

/**
 * For SerialLog.waitFor's `gone`: undefined while the VM's QEMU runs on `host`, else why not (read
 * synchronously from libvirt's pid file).
 */
export function qemuGone(host: AgentHost, vm: string): string | undefined {
  const pidFile = path.join(hostInfo(host).runDir, 'libvirt', 'qemu', `${vm}.pid`);
  let pid: number;
  try {
    pid = Number(fs.readFileSync(pidFile, 'utf8').trim());
  } catch {
    return `${vm} has no QEMU on ${host} (no ${pidFile})`;
  }
  return Number.isInteger(pid) && pid > 1 && fs.existsSync(`/proc/${pid}`) ? undefined : `the QEMU of ${vm} on ${host} (pid ${pid}) is gone`;
}

/** Removes the VM's disk copies on both hosts (the replicas go with removeVm's checkpoint stores). */
export async function removeWorkloadVm(vm: string): Promise<void> {
  await removeVm(vm);
  for (const host of AGENT_HOSTS) fs.rmSync(vmImageDir(host, vm).here, { recursive: true, force: true });
}

export interface CheckpointSample {
  epoch: number;
  pauseMs: number;
  bytes: number;
  /** Host realtime (ns) when the sample was taken. */
  seenNs: bigint;
}

/**
 * Every committed checkpoint of the VM, as its primary's agent reports the last one in `status`
 * (polled every `everyMs`; a checkpoint every second is seen well within that).
 */
export function sampleCheckpoints(host: AgentHost, vm: string, everyMs = 200): { samples: CheckpointSample[]; stop(): Promise<void> } {
  const samples: CheckpointSample[] = [];
  let running = true;
  const loop = (async () => {
    while (running) {
      const last = (await vmStatus(host, vm).catch(() => undefined))?.lastCheckpoint;
      if (last && samples.at(-1)?.epoch !== last.epoch) samples.push({ epoch: last.epoch, pauseMs: last.pauseMs, bytes: last.bytes, seenNs: realtimeNs() });
      await sleep(everyMs);
    }
  })();
  return {
    samples,
    async stop() {
      running = false;
      await loop;
    },
  };
}

/**
 * SIGKILLs the VM's QEMU where it runs and waits until the other host has taken it over (its
 * record's lastMove); that host becomes the cluster's primary. No probe involved.
 */
export async function killQemuAndTakeOver(cluster: Cluster): Promise<{ record: Partial<VmRecord>; killNs: bigint }> {
  const { vm } = cluster;
  const from = cluster.primary;
  const to = other(from);
  const before = (await readRecord(vm)).lastMove?.at;
  const pid = await qemuPidOf(from, vm);
  if (!pid) throw new Error(`no QEMU of ${vm} on ${from}`);
  const killNs = realtimeNs();
  process.kill(pid, 'SIGKILL');
  const record = await untilAgents(
    `${to} takes ${vm} over`,
    async () => {
      const r = await readRecord(vm);
      return r.lastMove && r.lastMove.at !== before && r.lastMove.to === to ? r : undefined;
    },
    180_000,
  );
  cluster.primary = to;
  return { record, killNs };
}
