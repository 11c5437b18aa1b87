/**
 * A lease holder in its own process, for lease.int.test.ts (started with LabChild, usually inside
 * the lab host `primary`). argv[2] is JSON: HostLeaseOptions without `log`, plus `vms` to claim
 * and `renewAfterFence` (after a fence, call renew() every 200 ms until it works). Prints NDJSON:
 *   {event:'granted', id} {event:'claimed', vm, ok} {event:'renewed', sentAt, answeredAt}
 *   {event:'fence', reason, at} {event:'lost', reason, at} {event:'regranted', id, at}
 *   {event:'log', level, msg, fields} {event:'error', message}
 * Times are wall-clock ms (performance.timeOrigin + performance.now()).
 */
import { HostLease, type HostLeaseOptions } from '../src/lease/index.js';

const wall = (perfNow: number) => performance.timeOrigin + perfNow;
const emit = (event: Record<string, unknown>) => process.stdout.write(`${JSON.stringify(event)}\n`);

const config = JSON.parse(process.argv[2] ?? '{}') as Omit<HostLeaseOptions, 'log'> & { vms: string[]; renewAfterFence?: boolean };

try {
  const lease = await HostLease.open({ ...config, log: (level, msg, fields) => emit({ event: 'log', level, msg, fields }) });
  emit({ event: 'granted', id: lease.id });
  lease.onRenewed((sentAt, answeredAt) => emit({ event: 'renewed', sentAt: wall(sentAt), answeredAt: wall(answeredAt) }));
  lease.onLost((reason) => emit({ event: 'lost', reason, at: wall(performance.now()) }));
  lease.onFence((reason) => {
    emit({ event: 'fence', reason, at: wall(performance.now()) });
    if (!config.renewAfterFence) return;
    const retry = () =>
      lease.renew().then(
        (id) => emit({ event: 'regranted', id, at: wall(performance.now()) }),
        () => setTimeout(retry, 200),
      );
    setTimeout(retry, 200);
  });
  for (const vm of config.vms) emit({ event: 'claimed', vm, ok: await lease.claim(vm) });
  process.on('SIGTERM', () => void lease.close().then(() => process.exit(0)));
} catch (error) {
  emit({ event: 'error', message: (error as Error).message });
  process.exit(1);
}
