import type { HostLease } from '../lease/index.js';
import type { Log, MetricsSink } from './types.js';

export interface LeaseKeeperOptions {
  log: Log;
  metrics: MetricsSink;
  closed: () => boolean;
  /** The lease could not be renewed in time: stop every VM this host runs, now. */
  fenceAll: (reason: string) => void;
  /** A fresh lease was granted: every VM gets a cycle (claims happen there). */
  renewed: () => void;
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/**
 * Lease trouble: every VM this host runs is stopped before the lease can expire on etcd; then a
 * fresh lease is asked for until etcd grants one (the owner watches stay on).
 */
export function keepLease(lease: HostLease, options: LeaseKeeperOptions): void {
  const { log, metrics } = options;
  let renewing = false;
  const renew = async () => {
    if (renewing || options.closed()) return;
    renewing = true;
    try {
      for (let attempt = 0; !options.closed() && lease.state !== 'held'; attempt++) {
        try {
          const id = await lease.renew();
          metrics.leaseHealthy(true);
          log.info({ lease: id }, 'new lease granted');
          options.renewed();
        } catch (error) {
          if (attempt % 20 === 0) log.warn({ err: (error as Error).message }, 'cannot get a new lease yet');
          await sleep(250);
        }
      }
    } finally {
      renewing = false;
    }
  };
  lease.onFence((reason) => {
    metrics.leaseHealthy(false);
    log.error({ reason }, 'lease not renewed in time: fencing every VM this host runs');
    options.fenceAll(reason);
    void renew();
  });
  lease.onLost((reason) => {
    log.error({ reason }, 'lease lost');
    void renew();
  });
}
