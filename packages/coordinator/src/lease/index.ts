export { HostLease, LeaseUnusableError, type HostLeaseOptions, type LeaseState } from './host-lease.js';
export { ClusterStore, type CallDeadline, type ClusterStoreOptions, type JsonEntry, type PutJsonOptions } from './cluster-store.js';
export { EtcdCallError, isUnavailableError, type ComponentLog } from './etcd-session.js';
export type { WatchOptions } from './range-watch.js';
export { RenewalTracker } from './renewal-tracker.js';
export { normalizePrefix, ownerKey, specKey, vmOfSpecKey, vmsPrefix } from './keys.js';
