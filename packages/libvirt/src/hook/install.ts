import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { DEFAULT_HOOK_CONFIG, type HookConfig } from './hook.js';
import { parseEndpoint } from './notify.js';
import { FTVM_NS } from '../xml/dom.js';

export const HOOK_MARKER = 'ftvm-libvirt-hook: generated';

export interface InstallOptions {
  /** Default /etc/libvirt/hooks. */
  hooksDir?: string;
  endpoint?: string;
  logFile?: string;
  timeoutMs?: number;
  runDir?: string;
  /** The compiled hook entry; default this package's dist/hook/run.js. */
  mainModule?: string;
  /** Node binary for the shebang; default the one running now. */
  node?: string;
  /** Replace a `qemu` hook that is not ftvm's (default: install as qemu.d/ftvm next to it). */
  force?: boolean;
}

export interface InstallResult {
  script: string;
  /** The hooks directory or script did not exist before: libvirtd must be restarted or sent SIGHUP. */
  needsReload: boolean;
  config: HookConfig;
}

/** This package's compiled hook entry point (dist/hook/run.js), also when running from src/. */
export function defaultMainModule(): string {
  const here = fileURLToPath(import.meta.url);
  const dir = path.dirname(here);
  const dist = dir.replace(/([/\\])src([/\\])hook$/, '$1dist$2hook');
  return path.join(dist, 'run.js');
}

/**
 * Writes the qemu hook: a small POSIX sh script carrying its configuration. It reads the domain XML
 * libvirt sends on stdin and leaves at once (no node start-up, a few ms) unless the XML has ftvm's
 * metadata namespace; ftvm's domains go to the compiled hook (`node run.js`, absolute node path:
 * libvirt runs hooks with a minimal PATH) under coreutils `timeout`. The script exits 0 whatever
 * happens (a missing module, a crashing node), so a broken install never stops libvirt from
 * starting domains. libvirtd looks for hook scripts only at start-up and on SIGHUP.
 */
export function installHook(options: InstallOptions = {}): InstallResult {
  const hooksDir = options.hooksDir ?? '/etc/libvirt/hooks';
  const mainModule = path.resolve(options.mainModule ?? defaultMainModule());
  if (!fs.existsSync(mainModule)) throw new Error(`hook module ${mainModule} does not exist: build @ftvm/libvirt first (pnpm build)`);
  if (options.endpoint) parseEndpoint(options.endpoint); // validate
  const config: HookConfig = {
    ...DEFAULT_HOOK_CONFIG,
    ...(options.endpoint ? { endpoint: options.endpoint } : {}),
    ...(options.logFile ? { logFile: options.logFile } : {}),
    ...(options.timeoutMs ? { timeoutMs: options.timeoutMs } : {}),
    ...(options.runDir ? { runDir: options.runDir } : {}),
  };
  if (!(config.timeoutMs > 0 && config.timeoutMs <= 10_000)) throw new Error(`timeoutMs must be in (0, 10000]: libvirt waits for its hooks`);

  const dirExisted = fs.existsSync(hooksDir);
  let script = path.join(hooksDir, 'qemu');
  if (fs.existsSync(script) && !isOurs(script) && !options.force) {
    script = path.join(hooksDir, 'qemu.d', 'ftvm'); // libvirt ≥ 6.5 runs these after the main script
  }
  const existed = fs.existsSync(script);
  fs.mkdirSync(path.dirname(script), { recursive: true });
  const node = options.node ?? process.execPath;
  const budgetS = ((config.timeoutMs + 1_000) / 1000).toFixed(1);
  const text = `#!/bin/sh
# ${HOOK_MARKER} ${new Date().toISOString()}; reinstall rather than edit.
# libvirt qemu hook for ftvm (@ftvm/libvirt): protect/unprotect notifications, ftvm path fixes.
config=${shellQuote(JSON.stringify(config))}
node=${shellQuote(node)}
main=${shellQuote(mainModule)}
log=${shellQuote(config.logFile)}
xml=$(cat)
case $xml in
  *'${FTVM_NS}'*) ;;
  *) exit 0 ;;
esac
if [ ! -r "$main" ] || [ ! -x "$node" ]; then
  mkdir -p "$(dirname "$log")" 2>/dev/null
  echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) ftvm hook: $main or $node missing; $1 $2 $3 not handled" >>"$log" 2>/dev/null
  exit 0
fi
printf '%s' "$xml" | FTVM_HOOK_CONFIG="$config" timeout -k 0.5 ${budgetS} "$node" "$main" "$@"
status=$?
if [ $status -ne 0 ]; then
  echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) ftvm hook: node exited $status on $1 $2 $3 (libvirt not blocked)" >>"$log" 2>/dev/null
fi
exit 0
`;
  const tmp = `${script}.tmp-${process.pid}`;
  fs.writeFileSync(tmp, text, { mode: 0o755 });
  fs.renameSync(tmp, script);
  return { script, needsReload: !dirExisted || !existed, config };
}

/** Removes the hook if it is ftvm's; returns the removed paths. */
export function uninstallHook(options: { hooksDir?: string } = {}): string[] {
  const hooksDir = options.hooksDir ?? '/etc/libvirt/hooks';
  const removed: string[] = [];
  for (const script of [path.join(hooksDir, 'qemu'), path.join(hooksDir, 'qemu.d', 'ftvm')]) {
    if (fs.existsSync(script) && isOurs(script)) {
      fs.rmSync(script);
      removed.push(script);
    }
  }
  return removed;
}

/** The installed hook script and its configuration, if ftvm's hook is installed. */
export function installedHook(options: { hooksDir?: string } = {}): { script: string; config: HookConfig } | undefined {
  const hooksDir = options.hooksDir ?? '/etc/libvirt/hooks';
  for (const script of [path.join(hooksDir, 'qemu'), path.join(hooksDir, 'qemu.d', 'ftvm')]) {
    if (!fs.existsSync(script) || !isOurs(script)) continue;
    const m = /^config='(.*)'$/m.exec(fs.readFileSync(script, 'utf8'));
    if (m?.[1]) return { script, config: JSON.parse(m[1].replaceAll("'\\''", "'")) as HookConfig };
  }
  return undefined;
}

/** Single-quoted for sh. */
function shellQuote(text: string): string {
  return `'${text.replaceAll("'", "'\\''")}'`;
}

function isOurs(file: string): boolean {
  try {
    return fs.readFileSync(file, 'utf8').slice(0, 400).includes(HOOK_MARKER);
  } catch {
    return false;
  }
}

/**
 * Makes libvirtd rescan its hooks: SIGHUP (its reload path re-runs the hook discovery; running
 * domains are untouched). `pidFile` defaults to /run/libvirtd.pid.
 */
export function reloadLibvirtd(pidFile = '/run/libvirtd.pid'): number {
  const pid = Number(fs.readFileSync(pidFile, 'utf8').trim());
  if (!Number.isInteger(pid) || pid <= 1) throw new Error(`${pidFile} holds no pid`);
  process.kill(pid, 'SIGHUP');
  return pid;
}
