/**
 * The workload guest on its own, in plain QEMU under TCG (no lab, no lock needed):
 *   1. one round of [pgbench, build] on a fresh overlay of the image: boot time, tps, build time;
 *   2. a crash: pgbench and the sequence client running, QEMU gets SIGKILL; the same disk booted in
 *      check mode must recover with every acknowledged commit present (the check bench:workload
 *      makes of a replica after a failover, here against a plain crash).
 *
 *   pnpm exec tsx --conditions=@ftvm/source test/workload/standalone-check.ts
 *
 * Prints the figures as JSON (FTVM_WORKLOAD_PGBENCH_S: pgbench's seconds, default 30).
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { buildWorkloadImage } from './image.js';
import { acksBefore, realtimeNs, roundFigures } from './serial.js';
import { bootWorkload, checkDisk } from './standalone.js';

const pgbenchS = Number(process.env['FTVM_WORKLOAD_PGBENCH_S'] ?? 30);
const log = (line: string) => console.error(`standalone-check: ${line}`);
const round3 = (x: number) => Math.round(x * 1000) / 1000;

const imageStarted = performance.now();
const image = await buildWorkloadImage({ log });
log(`image ${image.dir} (${Math.round((performance.now() - imageStarted) / 1000)} s here; built in ${image.manifest.buildSeconds} s)`);
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ftvm-workload-check-'));

// 1. one round
const bench = await bootWorkload({ image, params: { mode: 'bench', rounds: 1, pgbenchS }, dir: path.join(dir, 'round') });
const ready = await bench.serial.waitFor('PostgreSQL up', (l) => l.line.kind === 'event' && l.line.event === 'ready', { timeoutMs: 600_000, gone: bench.gone });
const readyS = Number(ready.hostNs - bench.spawnedNs) / 1e9;
log(`ready ${readyS.toFixed(1)} s after spawn`);
await bench.serial.waitFor('the end of round 1', (l) => l.line.kind === 'event' && l.line.event === 'done', { timeoutMs: 1_800_000, gone: bench.gone });
await bench.exited;
const round = roundFigures(bench.serial, 1);
const acks = bench.serial.acks();
log(`round 1: pgbench ${round.pgbench.tpsHost.toFixed(1)} tps (host), build ${round.build.hostS.toFixed(1)} s`);

// 2. a crash during pgbench, then check mode on the same disk
const crash = await bootWorkload({ image, params: { mode: 'bench', pgbenchS }, dir: path.join(dir, 'crash') });
const started = await crash.serial.waitFor('pgbench running', (l) => l.line.kind === 'event' && l.line.event === 'pgbench-start', { timeoutMs: 600_000, gone: crash.gone });
await new Promise((r) => setTimeout(r, (pgbenchS * 1000) / 3));
const killNs = realtimeNs();
await crash.kill('SIGKILL');
const acked = acksBefore(crash.serial.acks(), killNs);
log(`SIGKILL ${Number(killNs - started.hostNs) / 1e9} s into pgbench; ${acked.count} acks read, highest ${acked.highest}`);
const check = await checkDisk(image, crash.disk, acked.highest, { dir: path.join(dir, 'check') });
log(`check: ${check.ok ? 'ok' : check.problems.join('; ')}`);

console.log(
  JSON.stringify(
    {
      image: { dir: image.dir, hash: image.manifest.hash, build_s: image.manifest.buildSeconds, qcow2_bytes: fs.statSync(image.disk).size, packages: image.manifest.packages },
      round: {
        ready_s: round3(readyS),
        pgbench: { tps_host: round3(round.pgbench.tpsHost), tps_guest: round.pgbench.tpsGuest, transactions: round.pgbench.transactions, failed: round.pgbench.failed, latency_ms: round.pgbench.latencyMs, host_s: round3(round.pgbench.hostS), guest_s: round.pgbench.guestS },
        build: { host_s: round3(round.build.hostS), guest_s: round.build.guestS },
        seq_acks: acks.length,
      },
      crash: { acked, check },
    },
    null,
    2,
  ),
);
fs.rmSync(dir, { recursive: true, force: true });
