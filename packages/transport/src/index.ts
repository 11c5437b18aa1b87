export * from './store/index.js';
export * from './ssh/index.js';
export * from './replication/index.js';
export * from './stream/index.js';
export * from './nbd/index.js';
export { testPausePoint, pauseAfterFirst } from './test-pause.js';
