export { runReceiver, type ReceiverOptions } from './receiver.js';
export { openRemoteReceiver, type RemoteReceiverOptions } from './remote-receiver.js';
export { ReplicationSender, ReplicationError, SeedError, type SendOptions, type SeedOptions } from './sender.js';
export {
  FrameDecoder,
  FrameError,
  FrameType,
  type CheckpointHeader,
  type CheckpointTrailer,
  type FrameErrorCode,
  type ReceiverReply,
} from './frames.js';
