/**
 * `pnpm lab <command>` (or `npx tsx test/lab/cli.ts <command>`):
 *   up | down | status
 *   exec <host> -- cmd…
 *   kill | freeze | thaw | cut | restore | restart <host>
 */
import { spawnSync } from 'node:child_process';
import {
  cutLink,
  freezeHost,
  hostInfo,
  inHostArgv,
  killHost,
  LAB_HOSTS,
  labDown,
  labLeftovers,
  labStatus,
  labUp,
  restartHost,
  restoreLink,
  thawHost,
  type LabHostName,
} from './lab.js';

const USAGE = 'usage: lab up|down|status | exec <host> -- cmd… | kill|freeze|thaw|cut|restore|restart <host>';
const HOST_COMMANDS: Record<string, (host: LabHostName) => Promise<void>> = {
  kill: killHost,
  freeze: freezeHost,
  thaw: thawHost,
  cut: cutLink,
  restore: restoreLink,
  restart: (host) => restartHost(host),
};

const [command, hostArg, ...rest] = process.argv.slice(2);
// `lab status | head` closes the pipe early; that is not an error.
process.stdout.on('error', (error: NodeJS.ErrnoException) => {
  if (error.code === 'EPIPE') process.exit(0);
  throw error;
});

function parseHost(): LabHostName {
  if (!(LAB_HOSTS as readonly string[]).includes(hostArg ?? '')) fail(`expected a host (${LAB_HOSTS.join(', ')}), got ${JSON.stringify(hostArg)}`);
  return hostArg as LabHostName;
}

function fail(message: string): never {
  console.error(`lab: ${message}\n${USAGE}`);
  process.exit(2);
}

async function printStatus(): Promise<void> {
  const status = await labStatus();
  console.log(`bridge ${status.bridge ? 'up' : 'absent'}, service bridge ${status.serviceBridge ? 'up' : 'absent'}`);
  console.table(
    status.hosts.map((h) => ({
      host: h.name,
      ip: h.ip,
      network: h.network,
      service: h.service,
      link: h.linkUp ? 'up' : 'down',
      holder: h.holderPid ?? '-',
      procs: h.processes,
      frozen: h.frozen,
      libvirtd: h.libvirt,
      sshd: h.ssh,
      spawned: h.spawned.join(' ') || '-',
    })),
  );
  for (const name of LAB_HOSTS) console.log(`${name.padEnd(8)} ${hostInfo(name).libvirtUri}`);
  const leftovers = status.hosts.some((h) => h.network) ? [] : await labLeftovers();
  if (leftovers.length > 0) console.log(`leftovers: ${leftovers.join('; ')}`);
}

try {
  if (command === 'up') {
    const result = await labUp({ log: (line) => console.log(`lab: ${line}`) });
    console.log(result.built ? `lab: built in ${result.durationMs} ms` : `lab: already up and healthy (checked in ${result.durationMs} ms)`);
    await printStatus();
  } else if (command === 'down') {
    const started = performance.now();
    await labDown();
    console.log(`lab: down in ${Math.round(performance.now() - started)} ms`);
  } else if (command === 'status') {
    await printStatus();
  } else if (command === 'exec') {
    const host = parseHost();
    const argv = rest[0] === '--' ? rest.slice(1) : rest;
    if (argv.length === 0) fail('exec needs a command after --');
    // Interactive use: the command gets this terminal, unbounded (the caller can ^C it).
    const [program, ...args] = inHostArgv(host, argv);
    const result = spawnSync(program!, args, { stdio: 'inherit' });
    process.exitCode = result.status ?? 1;
  } else if (command !== undefined && command in HOST_COMMANDS) {
    await HOST_COMMANDS[command]!(parseHost());
  } else {
    fail(command === undefined ? 'no command' : `unknown command ${JSON.stringify(command)}`);
  }
} catch (error) {
  console.error(error instanceof Error ? error.message : error);
  process.exitCode = 1;
}
