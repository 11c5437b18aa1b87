export {
  HeartbeatService,
  type HeartbeatLog,
  type HeartbeatOptions,
  type HeartbeatPeer,
  type HeartbeatServiceOptions,
  type PeerState,
} from './heartbeat-service.js';
export { PeerTracker, type HeartbeatPath } from './peer-tracker.js';
export { encodeHeartbeat, heartbeatSchema, parseHeartbeat, MAX_HEARTBEAT_BYTES, type Heartbeat, type VmBeat } from './wire.js';
