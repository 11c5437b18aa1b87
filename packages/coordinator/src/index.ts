export { Checkpointer, type CheckpointerOptions, type CheckpointResult, type CheckpointDisks } from './checkpointer.js';
export { DiskReplicator, DiskReplicatorError, KEEP_BLOCK_ACTIVE, type DiskAudit } from './disk/disk-replicator.js';
export { MigrationSocket } from './migration-socket.js';
export { OutputCommit, OutputCommitError, OUTPUT_BUFFER_TYPE, OUTPUT_CLOSE_ACTION, type OutputBufferInfo } from './output/output-commit.js';
export { Agent } from './agent/agent.js';
export { runAgent } from './agent/run.js';
export { VmRecords, vmRecordSchema, RecordConflictError, type VmRecord } from './agent/vm-records.js';
export { StagedRestore, NoCheckpointError, type CompletedRestore } from './agent/staged-restore.js';
export { fenceLocal, fenceRemote, type RemoteFenceOutcome } from './agent/fence.js';
export {
  ControlError,
  type AgentControl,
  type AgentStatus,
  type VmStatus,
  type VmRole,
  type PeerStatus,
  type CheckpointSummary,
  type DriftReport,
  type Progress,
  type ProgressEvent,
  type ProtectRequest,
  type SwitchoverResult,
  type CheckpointNowResult,
} from './agent/control.js';
export { loadAgentConfig, parseAgentConfig, parseAgentConfigYaml, agentConfigSchema, ConfigError, type AgentConfig, type AgentConfigInput, type HostConfig, type VmConfig } from './config/agent-config.js';
export { ControlClient, AgentUnreachableError, ControlTimeoutError, ControlProtocolError, type ControlClientOptions, type CallOptions } from './api/client.js';
export { startControlServer, type ControlServer, type ControlServerOptions } from './api/server.js';
export { NDJSON, STATUS_PATH, vmPath, parseStreamLine, type StreamLine, type WireError, type VmOperation, type VmQuery } from './api/protocol.js';
export { AgentMetrics, type AgentMetricsOptions, type CommittedCheckpoint, type FailoverKind } from './metrics/agent-metrics.js';
export { startMetricsServer, type MetricsServer, type MetricsServerOptions } from './metrics/server.js';
export { createLogger, flushLogger, reopenLogFile, type Logger, type LoggerOptions, type LogLevel } from './log/logger.js';
export { runCli, DEFAULT_SOCKET, type CliDeps } from './cli/program.js';
export { ExitCode } from './cli/exit-codes.js';
export type { RunAgent, SignalSource } from './cli/agent-command.js';
export { encodeHeartbeat, parseHeartbeat, PeerTracker, MAX_HEARTBEAT_BYTES, ClockOffsetEstimator, peerInstantOnOurClock, type ClockOffsetEstimate, type ClockOffsetOptions, type ClockSample, type HeartbeatEcho, type HeartbeatLog, type HeartbeatOptions, type HeartbeatPath, type HeartbeatServiceOptions, type VmBeat } from './heartbeat/index.js';
export {
  HostLease,
  LeaseUnusableError,
  ClusterStore,
  EtcdCallError,
  isUnavailableError,
  RenewalTracker,
  normalizePrefix,
  ownerKey,
  specKey,
  vmsPrefix,
  type HostLeaseOptions,
  type LeaseState,
  type ClusterStoreOptions,
  type JsonEntry,
  type PutJsonOptions,
  type ComponentLog,
  type WatchOptions,
} from './lease/index.js';
