import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { childElement, FTVM_NS, parseDomainXml, textOf } from '../xml/dom.js';
import { fixFtvmPaths } from '../xml/ft-ready.js';
import { readProtection, type Protection } from '../xml/protection.js';
import { notify, parseEndpoint, type HookMessage, type NotifyResult } from './notify.js';

/** The installed hook's settings (embedded in the script `install` writes). */
export interface HookConfig {
  /** Where the local coordinator listens (see parseEndpoint). No endpoint: log only. */
  endpoint?: string;
  /** Append-only log of what the hook did. Default /var/log/ftvm/libvirt-hook.log. */
  logFile: string;
  /** Deadline for telling the coordinator. Default 1500 ms; the whole hook stays under timeoutMs + 500. */
  timeoutMs: number;
  /** Override of the run directory ftvm's sockets go to on this host (default: the metadata's). */
  runDir?: string;
}

export const DEFAULT_HOOK_CONFIG: HookConfig = {
  logFile: '/var/log/ftvm/libvirt-hook.log',
  timeoutMs: 1_500,
};

export interface HookInvocation {
  /** argv after the script: object, operation, sub-operation, extra. */
  args: string[];
  /** The domain XML libvirt sent on stdin. */
  stdin: string;
}

export interface HookOutcome {
  /** XML to print on stdout (migrate/restore filters), or undefined for "unchanged". */
  stdout?: string;
  /** One line about what was done, for the log; undefined when the domain is not ftvm's. */
  action?: string;
  notified?: NotifyResult;
}

/**
 * libvirt's qemu hook, for ftvm's domains (those whose XML has ftvm's metadata namespace; every
 * other domain is left alone at once):
 * - `prepare begin`: create the run directory for ftvm's sockets;
 * - `started begin` / `reconnect begin`: tell the coordinator to protect the domain (if protected);
 * - `stopped end`: tell it to unprotect; if that could not be delivered, `release end` tries again;
 * - `release end`: remove ftvm's stale sockets;
 * - `migrate begin` / `restore begin`: print the XML with ftvm's paths made right for this host.
 * Never fails the libvirt operation: errors are logged and the hook exits 0.
 */
export async function runHook(invocation: HookInvocation, config: HookConfig): Promise<HookOutcome> {
  const [domain = '-', operation = '-', sub = '-'] = invocation.args;
  if (!invocation.stdin.includes(FTVM_NS)) return {};
  const op = `${operation} ${sub}`;

  if (op === 'migrate begin' || op === 'restore begin') {
    const fixed = fixFtvmPaths(invocation.stdin, config.runDir ? { runDir: config.runDir } : {});
    return fixed.changed ? { stdout: fixed.xml, action: `rewrote ftvm paths: ${fixed.changes.join(', ')}` } : { action: 'ftvm paths already right' };
  }

  const doc = parseDomainXml(invocation.stdin);
  const protection = readProtection(doc);
  if (!protection) return {};
  const runDir = config.runDir ?? protection.runDir;
  const uuid = textOf(childElement(doc.documentElement!, 'uuid'));
  const pendingMarker = path.join(runDir, `${domain}.unprotect-pending`);

  switch (op) {
    case 'prepare begin':
      fs.mkdirSync(runDir, { recursive: true, mode: 0o755 });
      return { action: `ensured ${runDir}` };
    case 'started begin':
    case 'reconnect begin': {
      if (!protection.protected) return { action: 'not protected (metadata says protected=no)' };
      fs.rmSync(pendingMarker, { force: true });
      const result = await send(config, message('protect', operation, domain, uuid, protection));
      return { action: `protect: ${describe(result)}`, ...(result ? { notified: result } : {}) };
    }
    case 'stopped end': {
      const result = await send(config, message('unprotect', operation, domain, uuid));
      if (result && !result.delivered) writeMarker(pendingMarker);
      return { action: `unprotect: ${describe(result)}`, ...(result ? { notified: result } : {}) };
    }
    case 'release end': {
      const removed: string[] = [];
      for (const file of [protection.qmpSocket, protection.agentSocket, path.posix.join(runDir, `${domain}.incoming`)]) {
        if (file && fs.existsSync(file)) {
          fs.rmSync(file, { force: true });
          removed.push(path.basename(file));
        }
      }
      let retry = '';
      let notified: NotifyResult | undefined;
      if (fs.existsSync(pendingMarker)) {
        notified = await send(config, message('unprotect', operation, domain, uuid));
        if (!notified || notified.delivered) fs.rmSync(pendingMarker, { force: true });
        retry = `; unprotect retried: ${describe(notified)}`;
      }
      return { action: `released${removed.length ? ` (removed ${removed.join(', ')})` : ''}${retry}`, ...(notified ? { notified } : {}) };
    }
    default:
      return {};
  }
}

function message(op: HookMessage['op'], phase: string, domain: string, uuid: string | undefined, protection?: Protection): HookMessage {
  return { v: 1, op, phase, domain, uuid, host: os.hostname(), at: new Date().toISOString(), ...(protection ? { protection } : {}) };
}

async function send(config: HookConfig, msg: HookMessage): Promise<NotifyResult | undefined> {
  if (!config.endpoint) return undefined;
  return notify(parseEndpoint(config.endpoint), msg, config.timeoutMs);
}

function describe(result: NotifyResult | undefined): string {
  if (!result) return 'no endpoint configured (logged only)';
  return `${result.delivered ? 'delivered' : 'NOT delivered'} (${result.detail}, ${result.ms} ms)`;
}

function writeMarker(file: string): void {
  try {
    fs.mkdirSync(path.dirname(file), { recursive: true });
    fs.writeFileSync(file, `${new Date().toISOString()}\n`);
  } catch {
    // best effort
  }
}

/** Appends one line to the hook's log; never throws. */
export function hookLog(config: HookConfig, line: string): void {
  try {
    fs.mkdirSync(path.dirname(config.logFile), { recursive: true });
    fs.appendFileSync(config.logFile, `${new Date().toISOString()} [${process.pid}] ${line}\n`);
  } catch {
    // a hook must not fail libvirt because its log is unwritable
  }
}
