export { QmpClient, type QmpConnectOptions, type ExecuteOptions, type WaitForEventOptions } from './qmp-client.js';
export { GuestAgentClient, type GuestAgentOptions } from './guest-agent.js';
export type { SocketTarget } from './socket.js';
export { type QmpEvent, type QmpGreeting, type QmpEventTimestamp, timestampToNs } from './messages.js';
export { JsonLineDecoder, encodeMessage, type Frame } from './framing.js';
export {
  QmpClientError,
  QmpCommandError,
  QmpTimeoutError,
  QmpConnectionClosedError,
  QmpProtocolError,
} from './errors.js';
