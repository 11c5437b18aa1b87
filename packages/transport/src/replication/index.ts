export { runReceiver, type ReceiverOptions } from './receiver.js';
export { openRemoteReceiver, type RemoteReceiverOptions } from './remote-receiver.js';
export { ReplicationSender, ReplicationError, type SendOptions } from './sender.js';
export {
  FrameDecoder,
  FrameError,
  FrameType,
  type CheckpointHeader,
  type CheckpointTrailer,
  type ReceiverReply,
} from './frames.js';
