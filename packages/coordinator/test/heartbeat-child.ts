/**
 * A HeartbeatService in its own process, for heartbeat.int.test.ts (started with LabChild inside
 * the lab host `backup`). argv[2] is JSON: { host, listen, intervalMs, timeoutMs, peers: [{name,
 * address, port}] } — no SSH connection of its own: its beats reach the peer over the channel the
 * peer opens to it. Prints NDJSON:
 *   {event:'started'} {event:'beat', from, path, seq, at} {event:'up', peer, at} {event:'down', peer, lastBeatAt, at}
 *   {event:'log', level, msg, fields} {event:'error', message}
 * Times are wall-clock ms (performance.timeOrigin + performance.now()).
 */
import { HeartbeatService, type HeartbeatPeer, type HeartbeatServiceOptions } from '../src/heartbeat/index.js';

const wall = (perfNow: number) => performance.timeOrigin + perfNow;
const emit = (event: Record<string, unknown>) => process.stdout.write(`${JSON.stringify(event)}\n`);
const config = JSON.parse(process.argv[2] ?? '{}') as Omit<HeartbeatServiceOptions, 'payload' | 'log'> & { peers: HeartbeatPeer[] };

try {
  const service = await HeartbeatService.start({
    ...config,
    payload: () => ({ vm1: { role: 'backup', running: false, epoch: 7 } }),
    log: (level, msg, fields) => emit({ event: 'log', level, msg, fields }),
  });
  service.onBeat((from, path, beat) => emit({ event: 'beat', from, path, seq: beat.seq, vms: beat.vms, at: wall(performance.now()) }));
  service.onPeerUp((peer) => emit({ event: 'up', peer, at: wall(performance.now()) }));
  service.onPeerDown((peer, lastBeatAt) => emit({ event: 'down', peer, lastBeatAt: wall(lastBeatAt), at: wall(performance.now()) }));
  for (const peer of config.peers) service.addPeer(peer);
  emit({ event: 'started' });
  process.on('SIGTERM', () => void service.close().then(() => process.exit(0)));
} catch (error) {
  emit({ event: 'error', message: (error as Error).message });
  process.exit(1);
}
