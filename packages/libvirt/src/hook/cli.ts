#!/usr/bin/env node
import { parseArgs } from 'node:util';
import { installHook, installedHook, reloadLibvirtd, uninstallHook } from './install.js';

const USAGE = `usage:
  ftvm-libvirt-hook install [--hooks-dir DIR] [--endpoint URL|unix:PATH|PATH] [--log FILE]
                            [--timeout-ms N] [--run-dir DIR] [--force] [--reload [--pid-file FILE]]
  ftvm-libvirt-hook uninstall [--hooks-dir DIR] [--reload [--pid-file FILE]]
  ftvm-libvirt-hook status [--hooks-dir DIR]

libvirtd looks for hook scripts when it starts and on SIGHUP: --reload sends SIGHUP to the pid in
--pid-file (default /run/libvirtd.pid); or run 'systemctl reload libvirtd'.`;

function main(argv: string[]): number {
  const [command, ...rest] = argv;
  const { values } = parseArgs({
    args: rest,
    options: {
      'hooks-dir': { type: 'string' },
      endpoint: { type: 'string' },
      log: { type: 'string' },
      'timeout-ms': { type: 'string' },
      'run-dir': { type: 'string' },
      force: { type: 'boolean' },
      reload: { type: 'boolean' },
      'pid-file': { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
    strict: true,
  });
  if (values.help || !command) {
    console.log(USAGE);
    return command ? 0 : 2;
  }
  const hooksDir = values['hooks-dir'];
  const reload = () => {
    if (values.reload) console.log(`sent SIGHUP to libvirtd (pid ${reloadLibvirtd(values['pid-file'])})`);
  };
  switch (command) {
    case 'install': {
      const timeout = values['timeout-ms'] === undefined ? undefined : Number(values['timeout-ms']);
      if (timeout !== undefined && !(timeout > 0)) throw new Error(`--timeout-ms must be a positive number`);
      const result = installHook({
        ...(hooksDir ? { hooksDir } : {}),
        ...(values.endpoint ? { endpoint: values.endpoint } : {}),
        ...(values.log ? { logFile: values.log } : {}),
        ...(timeout ? { timeoutMs: timeout } : {}),
        ...(values['run-dir'] ? { runDir: values['run-dir'] } : {}),
        ...(values.force ? { force: true } : {}),
      });
      console.log(`installed ${result.script} (endpoint: ${result.config.endpoint ?? 'none, log only'}; log: ${result.config.logFile})`);
      if (result.needsReload && !values.reload) console.log('libvirtd must be restarted or sent SIGHUP before it runs the new hook (--reload)');
      reload();
      return 0;
    }
    case 'uninstall': {
      const removed = uninstallHook(hooksDir ? { hooksDir } : {});
      console.log(removed.length ? `removed ${removed.join(', ')}` : 'no ftvm hook installed');
      reload();
      return 0;
    }
    case 'status': {
      const hook = installedHook(hooksDir ? { hooksDir } : {});
      console.log(hook ? `${hook.script}: ${JSON.stringify(hook.config)}` : 'no ftvm hook installed');
      return hook ? 0 : 1;
    }
    default:
      console.error(USAGE);
      return 2;
  }
}

try {
  process.exitCode = main(process.argv.slice(2));
} catch (error) {
  console.error(`ftvm-libvirt-hook: ${(error as Error).message}`);
  process.exitCode = 1;
}
