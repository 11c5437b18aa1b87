export { Checkpointer, type CheckpointerOptions, type CheckpointResult } from './checkpointer.js';
export { MigrationSocket } from './migration-socket.js';
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
export { HeartbeatService, heartbeatSchema, type Heartbeat, type HeartbeatPeer, type PeerState } from './heartbeat/index.js';
export { ControlClient } from './api/client.js';
