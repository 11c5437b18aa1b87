export {
  HeartbeatService,
  type HeartbeatLog,
  type HeartbeatOptions,
  type HeartbeatPeer,
  type HeartbeatServiceOptions,
  type PeerState,
} from './heartbeat-service.js';
export { PeerTracker, type HeartbeatPath } from './peer-tracker.js';
export { ClockOffsetEstimator, peerInstantOnOurClock, type ClockOffsetEstimate, type ClockOffsetOptions, type ClockSample, type SampleVerdict } from './clock-offset.js';
export { encodeHeartbeat, heartbeatSchema, parseHeartbeat, MAX_HEARTBEAT_BYTES, type Heartbeat, type HeartbeatEcho, type VmBeat } from './wire.js';
