/**
 * The main job, run by scripts/demo.sh: the whole story in the three-host lab. Two `ftvm agent`s
 * (primary, backup) and etcd (witness); the clock-probe guest with its workload booted on
 * `primary` under ftvm's QEMU and protected; checkpoints every second into the backup's store;
 * then every process of `primary` is killed and the backup takes over from the last committed
 * checkpoint. Prints the failover time, the guest clock offset, the workload's continuity and the
 * disk check: the guest has two local disks (a counter ring written with O_DIRECT, and ext4 under
 * continuous file writes), replicated with every checkpoint; the agents run in audit mode so the
 * demo can show that the disk the backup resumed on is byte for byte the disk at that checkpoint.
 * Output commit is on (checkpoints every 200 ms): a client on `witness` receives the guest's
 * counter over its service NIC, and the demo shows it never saw a value the failover took back.
 */
import { hostInfo, labUp } from '../test/lab/lab.js';
import { controlClient, startCluster, stopCluster, type Cluster } from '../test/support/ft-cluster.js';
import { AUDIT_DIR, checkDisksAfterFailover } from '../test/support/disk-audit.js';
import { runFault } from '../test/support/failover-runs.js';
import { diskCounters } from '../test/support/probe-client.js';
import { probeOn } from '../test/support/ft-cluster.js';
import { patchedQemu } from '../test/support/patched-qemu.js';
import { probeService } from '../test/support/ft-cluster.js';
import { ServiceClient } from '../test/support/service-client.js';

const step = (text: string) => console.log(`\n▶ ${text}`);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

step('bringing up the lab: primary, backup, witness (etcd)');
await labUp();
for (const name of ['primary', 'backup', 'witness'] as const) console.log(`  ${name.padEnd(8)} ${hostInfo(name).ip}`);

step("ftvm's QEMU (cached build from Debian's source with the ftvm patches)");
const emulator = patchedQemu();
console.log(`  ${emulator}`);

let cluster: Cluster | undefined;
let client: ServiceClient | undefined;
try {
  step('booting the probe guest (256 MiB, two local qcow2 disks, a service NIC) on primary, starting both agents, `ftvm protect --interval 200 --output-commit`');
  process.env['FTVM_TEST_DISK_AUDIT'] = AUDIT_DIR; // the agents hash the disks at each checkpoint and failover
  cluster = await startCluster({ emulator, workloadMiBps: 4, checkpointIntervalMs: 200, outputCommit: true, service: true, disks: { format: 'qcow2', ringMiB: 4, fsMiB: 32 } });
  const service = probeService(cluster.vm);
  client = await ServiceClient.start(service.guestIp, { tcpIntervalMs: 50, requestTimeoutMs: 30_000 });
  await client.waitFor('the guest answering its client on witness', (s) => s.udpCount > 100 && s.tcpResponses > 5, 60_000);
  await sleep(5_000);
  const served = await client.stats({ resetLatencies: true });
  console.log(`  client on witness → ${service.guestIp}: ${served.udpCount} counter datagrams so far, TCP request latency p50 ${((served.latencyUs.p50 ?? NaN) / 1000).toFixed(0)} ms (output held until its checkpoint is committed)`);
  const status = await controlClient('primary').status();
  for (const vm of status.vms) {
    console.log(`  ${vm.name}: ${vm.role} on ${status.host}, backup ${vm.backupHost}, lease holder ${vm.leaseHolder}, phase ${vm.phase}`);
    if (vm.lastCheckpoint) console.log(`  last checkpoint: epoch ${vm.lastCheckpoint.epoch}, ${(vm.lastCheckpoint.bytes / 1e6).toFixed(1)} MB, pause ${vm.lastCheckpoint.pauseMs.toFixed(1)} ms, ${vm.lastCheckpoint.ageMs} ms ago; clock residual ${vm.clockResidualMs?.toFixed(3)} ms`);
  }

  const disksBefore = await diskCounters(probeOn('primary'));
  console.log(`  guest disks: ring at counter ${disksBefore.ring.completed} (${disksBefore.ring.state}), ext4 loop at cycle ${disksBefore.fs.cycles} (${disksBefore.fs.state})`);

  step('killing every process of primary (SIGKILL: agent, libvirtd, QEMU, sshd)');
  const clientBefore = await client.stats();
  const run = await runFault(cluster, 'kill', (line) => console.log(`  ${line}`));
  console.log(`  failover time (backup's last heartbeat → RESUME on backup): ${run.failoverS?.toFixed(3)} s`);
  console.log(`  guest − host offset: ${run.offsetBeforeMs.toFixed(3)} ms before the kill, ${run.offsetAfterMs.toFixed(3)} ms after the resume → ${run.offsetMs.toFixed(3)} ms (probe error ± ${run.probeErrorMs.toFixed(3)} ms)`);
  console.log(`  workload: counter ≥ ${run.counterAtCheckpointMin} at the last committed checkpoint, ${run.counterBeforeFault} just before the kill, ${run.counterAfter} after the resume; same boot: ${run.sameBoot} → continuity ${run.continuityOk ? 'OK' : 'BROKEN'}`);
  console.log(`  two copies running at once: ${run.doubleActive ? 'YES' : 'never'}`);
  const resumeNs = BigInt(run.resumeNs);
  const seen = await client.waitFor('the client hearing the resumed guest', (s) => s.udpLastAtNs > resumeNs && s.tcpLastAtNs > resumeNs, 60_000);
  const lost = seen.rollbacks.filter((r) => r.lost > 0n);
  console.log(`  output commit: the client had seen counter ${clientBefore.highestUdpCounter} (the guest itself was further on: its output waits for its checkpoint); the resumed guest went on from ${run.counterAfter}`);
  console.log(`  values the client saw that the failover took back: ${lost.length === 0 ? 'none' : lost.map((r) => `${r.via} −${r.lost}`).join(', ')}; its TCP connection ${seen.tcpReconnects === clientBefore.tcpReconnects ? 'survived the failover' : 'broke'}`);
  const disks = await checkDisksAfterFailover({ from: 'primary', to: 'backup', epoch: run.epoch, bootId: disksBefore.bootId, checksBefore: disksBefore.ring.checks });
  for (const d of disks.disks) console.log(`  disk ${d.disk}: replica the backup resumed on ${d.replica.slice(0, 16)}…, primary's disk at that checkpoint ${d.fleece?.slice(0, 16) ?? '(not logged)'}… → ${d.equal ? 'identical' : 'DIFFERENT'}`);
  console.log(`  guest's own ring check after the resume: ${disks.ring.violations === 0 ? 'disk matches its RAM' : `${disks.ring.violations} MISMATCHES`} (${disks.ring.checks} checks); ring at ${disks.ring.completed}, ext4 loop at cycle ${disks.fs.cycles}`);
  console.log(`  ext4 on the replica: ${disks.fsck.clean ? 'clean' : 'NOT clean'} after journal replay (e2fsck -fn)`);
  console.log('  primary was brought back and `ftvm reprotect` made it the new backup (its disks reseeded).');
} finally {
  await client?.stop().catch(() => undefined);
  await stopCluster(cluster);
  delete process.env['FTVM_TEST_DISK_AUDIT'];
}
