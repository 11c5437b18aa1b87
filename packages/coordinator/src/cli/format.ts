import type { AgentStatus, CheckpointNowResult, DriftReport, PeerStatus, SwitchoverResult, VmStatus } from '../agent/control.js';

/** Human output of the CLI: plain text, no colours (it is read in terminals and in logs alike). */

const DASH = '-';

/** 850 → `850ms`, 12_300 → `12.3s`, 754_000 → `12m34s`, 7_560_000 → `2h06m`. */
export function formatDuration(ms: number | undefined): string {
  if (ms === undefined || !Number.isFinite(ms)) return DASH;
  if (Math.round(ms) < 1_000) return `${Math.round(ms)}ms`;
  if (Math.round(ms / 100) < 600) return `${(ms / 1_000).toFixed(1)}s`;
  const s = Math.round(ms / 1_000);
  if (s < 3_600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s`;
  const m = Math.round(s / 60);
  return `${Math.floor(m / 60)}h${String(m % 60).padStart(2, '0')}m`;
}

/** Clock residual: signed, to the tenth of a millisecond (`+0.3ms`, `-12.0ms`). */
export function formatResidual(ms: number | undefined): string {
  if (ms === undefined || !Number.isFinite(ms)) return DASH;
  const tenths = Math.round(ms * 10) / 10;
  return `${tenths > 0 ? '+' : ''}${(tenths === 0 ? 0 : tenths).toFixed(1)}ms`;
}

export function formatBytes(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return unit === 0 ? `${bytes} B` : `${value.toFixed(1)} ${units[unit]}`;
}

/** Columns padded to their widest cell, two spaces apart, no trailing spaces. */
export function table(rows: readonly (readonly string[])[]): string {
  const widths: number[] = [];
  for (const row of rows) row.forEach((cell, i) => (widths[i] = Math.max(widths[i] ?? 0, cell.length)));
  return rows.map((row) => row.map((cell, i) => (i === row.length - 1 ? cell : cell.padEnd(widths[i] ?? 0))).join('  ').trimEnd()).join('\n');
}

const VM_HEADER = ['VM', 'ROLE', 'STATE', 'PHASE', 'PRIMARY', 'BACKUP', 'LEASE HOLDER', 'INTERVAL', 'OUTPUT', 'CHECKPOINT AGE', 'STANDBY', 'CLOCK', 'WHY'];

function vmRow(vm: VmStatus): string[] {
  return [
    vm.name,
    vm.role,
    vm.domainState,
    vm.phase,
    vm.primaryHost ?? DASH,
    vm.backupHost ?? DASH,
    vm.leaseHolder ?? DASH,
    vm.checkpointIntervalMs === undefined ? DASH : formatDuration(vm.checkpointIntervalMs),
    vm.outputCommit ? 'held' : 'direct',
    vm.lastCheckpoint ? formatDuration(vm.lastCheckpoint.ageMs) : DASH,
    formatStandby(vm.standby),
    formatResidual(vm.clockResidualMs),
    vm.stopped ? `stopped by the user (${vm.stopped.reason}, on ${vm.stopped.by} at ${vm.stopped.at})` : vm.reason,
  ];
}

/** A backup's standby: `warm@<epoch>` (its RAM file holds the newest checkpoint), `behind@`, `cold`, `loaded`, `starting`, `none`. */
function formatStandby(standby: VmStatus['standby']): string {
  if (!standby) return DASH;
  if (!standby.domain) return 'none';
  if (standby.ready === false) return 'starting';
  return standby.ramEpoch === undefined ? standby.ram : `${standby.ram}@${standby.ramEpoch}`;
}

export function formatVmTable(vms: readonly VmStatus[]): string {
  return table([VM_HEADER, ...vms.map(vmRow)]);
}

/** The error bound of a clock offset: `±0.3ms`, never below `±0.1ms` (it is never exactly 0). */
function formatBound(ms: number): string {
  return `±${Math.max(0.1, Math.ceil(ms * 10) / 10).toFixed(1)}ms`;
}

function peerLine(peer: PeerStatus): string {
  const beat = (path: string, ms: number | undefined) => `${path} ${ms === undefined ? 'never' : `${formatDuration(ms)} ago`}`;
  const clock = peer.clockOffset ? `, clock ${formatResidual(peer.clockOffset.offsetMs)} ${formatBound(peer.clockOffset.errorMs)}` : '';
  return `peer ${peer.name}: ${peer.alive ? 'alive' : 'DEAD'} (last heartbeat ${beat('udp', peer.lastBeatAgeMs?.udp)}, ${beat('ssh', peer.lastBeatAgeMs?.ssh)})${clock}`;
}

/** `ftvm status`: the VM table, then this host's lease and its peers. */
export function formatStatus(status: AgentStatus): string {
  const lease = status.lease;
  const leaseLine = `lease: ${lease.id ?? 'none'} ${lease.healthy ? 'healthy' : 'UNHEALTHY'}${lease.lastRenewAgeMs === undefined ? '' : `, renewed ${formatDuration(lease.lastRenewAgeMs)} ago`}`;
  const lines = [status.vms.length ? formatVmTable(status.vms) : 'no VMs', '', `host: ${status.host}`, leaseLine];
  lines.push(...(status.peers.length ? status.peers.map(peerLine) : ['peers: none']));
  return lines.join('\n');
}

export function formatSwitchover(result: SwitchoverResult): string {
  return `${result.vm} moved from ${result.from} to ${result.to}: guest downtime ${formatDuration(result.downtimeMs)}, checkpoint epoch ${result.epoch}`;
}

export function formatCheckpoint(result: CheckpointNowResult): string {
  const kind = result.base === undefined ? 'full' : `incremental on ${result.base}`;
  return `${result.vm}: checkpoint epoch ${result.epoch} committed (${kind}), ${formatBytes(result.bytes)}, guest pause ${result.pauseMs.toFixed(1)}ms`;
}

export function formatDrift(report: DriftReport): string {
  return [`${report.vm}: predicted guest clock lag ${report.predictedLagMs.toFixed(1)}ms`, 'ledger:', JSON.stringify(report.ledger, null, 2)].join('\n');
}
