export { HeartbeatService, heartbeatSchema, type Heartbeat, type HeartbeatOptions, type HeartbeatPeer, type HeartbeatPath, type HeartbeatLog, type PeerState } from './heartbeat.js';
