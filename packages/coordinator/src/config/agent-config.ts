import fs from 'node:fs';
import { parse as parseYaml, YAMLParseError } from 'yaml';
import { z } from 'zod';

/**
 * The agent's YAML config, one file per host (`ftvm agent --config /etc/ftvm/agent.yaml`). Every
 * host of a cluster lists the same `hosts`, `etcd` and `vms`; `host` says which one it is.
 */
const hostName = z.string().regex(/^[a-z0-9][a-z0-9.-]{0,62}$/i, 'a host name: letters, digits, dots and dashes');
const vmName = z.string().regex(/^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/, 'a libvirt domain name: letters, digits, _ . -');
const absolutePath = z.string().startsWith('/', 'an absolute path');
const port = z.number().int().min(1).max(65535);
const ms = (min: number, max: number) => z.number().int().min(min).max(max);

const hostSchema = z
  .object({
    /** Where the other hosts reach this one: heartbeats, SSH, the control port. */
    address: z.string().min(1),
    sshPort: port.default(22),
    sshUser: z.string().min(1).default('root'),
    /** `SHA256:…` of the host's SSH host key (as `ssh-keygen -lf` prints it); or taken from ssh.knownHosts. */
    sshHostKeyFingerprint: z.string().regex(/^SHA256:[A-Za-z0-9+/]+=*$/, 'SHA256:<base64>').optional(),
    /** libvirt URI of this host's own daemon, as this host's agent opens it. */
    libvirtUri: z.string().min(1).default('qemu:///system'),
  })
  .strict();

const vmSchema = z
  .object({
    name: vmName,
    /** FT-ready libvirt domain XML (makeFtReady / `ftvm protect` writes one). */
    domainXml: absolutePath,
    /** The host that runs the VM when the cluster first protects it; the other one is its backup. */
    primary: hostName,
    backup: hostName,
    checkpointIntervalMs: ms(50, 3_600_000).default(1_000),
    /** Hold the VM's network output until the checkpoint that produced it is committed. */
    outputCommit: z.boolean().default(false),
    /** Committed checkpoints the backup keeps (and every checkpoint they build on). */
    keep: z.number().int().min(1).max(100).default(3),
    /**
     * With ftvm's QEMU a checkpoint carries only the pages written since the last one; a full one
     * comes at least every this many, bounding the chain a failover flattens. Default: 30, or
     * one every 30 s with shorter intervals (a full checkpoint takes longer than a short interval).
     */
    fullEvery: z.number().int().min(1).max(10_000).optional(),
  })
  .strict()
  .refine((vm) => vm.primary !== vm.backup, { message: 'primary and backup must be different hosts', path: ['backup'] });

export const agentConfigSchema = z
  .object({
    /** This host's name: a key of `hosts`. */
    host: hostName,
    hosts: z.record(hostName, hostSchema).refine((hosts) => Object.keys(hosts).length >= 2, 'at least two hosts (a primary and a backup)'),
    ssh: z
      .object({
        privateKey: absolutePath,
        /** OpenSSH known_hosts with every host's key, used when a host gives no fingerprint. */
        knownHosts: absolutePath.optional(),
        connectTimeoutMs: ms(100, 120_000).default(3_000),
      })
      .strict(),
    etcd: z
      .object({
        endpoints: z.array(z.string().url('an http(s) URL such as http://10.0.0.3:2379')).min(1),
        prefix: z.string().startsWith('/').default('/ftvm'),
        /** The lease every VM's owner key hangs on. etcd's floor is 1 s (it raises shorter ones). */
        leaseTtlSeconds: z.number().int().min(1).max(60).default(1),
        keepaliveIntervalMs: ms(20, 30_000).default(100),
        /**
         * A primary that has not renewed for this long stops its VMs: well before the lease can
         * expire on etcd (which counts from the keepalive's arrival, later than its sending). Default 0.6 × TTL.
         */
        fenceAfterMs: ms(50, 60_000).optional(),
        requestTimeoutMs: ms(50, 60_000).default(500),
      })
      .strict(),
    heartbeat: z
      .object({
        /** UDP and TCP port every agent listens on (TCP on the loopback, reached through SSH). */
        port: port.default(7410),
        intervalMs: ms(10, 60_000).default(100),
        timeoutMs: ms(30, 600_000).default(500),
      })
      .strict()
      .refine((h) => h.timeoutMs > h.intervalMs * 2, { message: 'must be more than twice intervalMs', path: ['timeoutMs'] })
      .default({}),
    /**
     * Failsafe mode (agent/failsafe.ts): while etcd cannot be reached, a primary keeps its VM
     * running as long as its backup confirms over the heartbeats that it cannot reach etcd either
     * and will not take the VM over. Off: a primary that cannot renew its lease stops its VMs.
     */
    failsafe: z
      .object({
        enabled: z.boolean().default(true),
        /** A confirmation keeps the VM running this long after the send of the beat it answers. */
        confirmMs: ms(50, 60_000).default(1_000),
        /** The backup's promise not to take over outlasts that by this much (time to stop the VM). */
        marginMs: ms(50, 60_000).default(500),
      })
      .strict()
      .default({}),
    control: z
      .object({
        /** The CLI talks to the agent here (HTTP over a unix socket). */
        socket: absolutePath.default('/run/ftvm/agent.sock'),
        /** The libvirt hook tells the agent here when an ftvm domain starts or stops (one JSON line, `ok` back). */
        hookSocket: absolutePath.default('/run/ftvm/hook.sock'),
        /** Prometheus metrics (`GET /metrics`); omit to serve none. */
        metrics: z.object({ address: z.string().min(1).default('0.0.0.0'), port: port.default(9464) }).strict().optional(),
      })
      .strict()
      .default({}),
    /**
     * A checkpoint not committed within this long is given up (the next one is tried), and
     * `protect` waits this long for the first one. Hosts that emulate their CPUs need more: a
     * full checkpoint under nested TCG moves a few MB/s.
     */
    checkpointTimeoutMs: ms(1_000, 3_600_000).default(30_000),
    /** The primary's watch on its own QEMU: QMP must answer `query-status` within timeoutMs. */
    health: z
      .object({ intervalMs: ms(20, 60_000).default(250), timeoutMs: ms(50, 600_000).default(1_000) })
      .strict()
      .default({}),
    failover: z
      .object({
        /**
         * The restored VM resumes this long after its clock is rewritten: enough to load the device
         * state (2.5–30 ms measured under TCG); it adds to the failover time, not to the clock error.
         */
        resumeMarginMs: ms(5, 5_000).default(60),
        /**
         * The same onto a mapped standby: only the small blocks' pages and the device state load
         * (a few hundred KB) after the claim, and this margin is most of the take-over's own time.
         */
        mappedResumeMarginMs: ms(5, 5_000).default(20),
        /** Bound on fencing the old primary through libvirt over SSH (an unreachable one is skipped). */
        fenceTimeoutMs: ms(50, 60_000).default(500),
        /**
         * `mapped`: a backup's standby maps its RAM from a file (libvirt's memory_backing_dir, on a
         * tmpfs) that the agent keeps at the newest committed checkpoint, so a failover loads only
         * device state; it costs the backup one guest RAM per VM. `loaded`: the standby's RAM is
         * loaded from the store at failover (time grows with RAM and dirty rate).
         */
        standbyRam: z.enum(['mapped', 'loaded']).default('mapped'),
      })
      .strict()
      .default({}),
    /**
     * The agent's nice value. Like other HA daemons (corosync runs real-time) it must keep its
     * heartbeats, lease renewals and the failover's scheduled resume on time on a busy host; the
     * VMs' QEMUs stay at their own priority. Needs root (CAP_SYS_NICE) below 0.
     */
    nice: z.number().int().min(-20).max(19).default(-10),
    /** Committed checkpoints, one directory per VM, on whichever host is the backup. */
    storeDir: absolutePath.default('/var/lib/ftvm/checkpoints'),
    /** Sockets of the protected VMs' QEMU (ftvm QMP, migration). */
    runDir: absolutePath.default('/run/ftvm'),
    /** ftvm's patched QEMU; without it checkpoint pauses are only corrected at failover. */
    emulator: absolutePath.optional(),
    log: z
      .object({ level: z.enum(['trace', 'debug', 'info', 'warn', 'error']).default('info'), file: absolutePath.optional() })
      .strict()
      .default({}),
    vms: z.array(vmSchema).default([]),
  })
  .strict()
  .superRefine((config, ctx) => {
    if (!(config.host in config.hosts)) ctx.addIssue({ code: 'custom', path: ['host'], message: `'${config.host}' is not one of hosts (${Object.keys(config.hosts).join(', ')})` });
    const seen = new Set<string>();
    config.vms.forEach((vm, i) => {
      if (seen.has(vm.name)) ctx.addIssue({ code: 'custom', path: ['vms', i, 'name'], message: `'${vm.name}' is listed twice` });
      seen.add(vm.name);
      for (const role of ['primary', 'backup'] as const) {
        if (!(vm[role] in config.hosts)) ctx.addIssue({ code: 'custom', path: ['vms', i, role], message: `'${vm[role]}' is not one of hosts` });
      }
    });
    const fenceAfterMs = config.etcd.fenceAfterMs ?? config.etcd.leaseTtlSeconds * 600;
    if (fenceAfterMs >= config.etcd.leaseTtlSeconds * 1000) {
      ctx.addIssue({ code: 'custom', path: ['etcd', 'fenceAfterMs'], message: `must be below the lease TTL (${config.etcd.leaseTtlSeconds * 1000} ms), or a cut-off primary could still run when its lease expires` });
    }
    if (config.etcd.keepaliveIntervalMs * 2 > fenceAfterMs) {
      ctx.addIssue({ code: 'custom', path: ['etcd', 'keepaliveIntervalMs'], message: `must be at most half of fenceAfterMs (${fenceAfterMs} ms)` });
    }
    // failsafe's ask and confirmation must cross before the lease fences (README, "Failsafe")
    const crossMs = 2.5 * config.etcd.keepaliveIntervalMs + 2 * config.heartbeat.intervalMs;
    if (config.failsafe.enabled && crossMs >= fenceAfterMs) {
      ctx.addIssue({ code: 'custom', path: ['failsafe', 'enabled'], message: `needs 2.5 × etcd.keepaliveIntervalMs + 2 × heartbeat.intervalMs (${crossMs} ms) below etcd.fenceAfterMs (${fenceAfterMs} ms): shorten the intervals, lengthen the lease, or turn failsafe off` });
    }
    if (config.failsafe.confirmMs <= config.heartbeat.intervalMs * 2) {
      ctx.addIssue({ code: 'custom', path: ['failsafe', 'confirmMs'], message: `must be more than two heartbeat intervals (${config.heartbeat.intervalMs * 2} ms), or confirmations lapse between beats` });
    }
    if (!config.ssh.knownHosts) {
      for (const [name, host] of Object.entries(config.hosts)) {
        if (!host.sshHostKeyFingerprint) ctx.addIssue({ code: 'custom', path: ['hosts', name, 'sshHostKeyFingerprint'], message: 'needed when ssh.knownHosts is not given (host keys are always pinned)' });
      }
    }
  });

export type AgentConfig = z.output<typeof agentConfigSchema>;
export type AgentConfigInput = z.input<typeof agentConfigSchema>;
export type HostConfig = AgentConfig['hosts'][string];
export type VmConfig = AgentConfig['vms'][number];

/** The config is unusable; `problems` name each field (`etcd.endpoints[0]`) and what is wrong with it. */
export class ConfigError extends Error {
  override name = 'ConfigError';
  constructor(
    readonly source: string,
    readonly problems: readonly string[],
  ) {
    super(`${source}: invalid config\n${problems.map((p) => `  - ${p}`).join('\n')}`);
  }
}

function fieldPath(path: readonly (string | number)[]): string {
  return path.reduce<string>((out, part) => (typeof part === 'number' ? `${out}[${part}]` : out ? `${out}.${part}` : part), '') || '(top level)';
}

/** Validates an already-parsed config object. */
export function parseAgentConfig(value: unknown, source = 'config'): AgentConfig {
  const result = agentConfigSchema.safeParse(value);
  if (result.success) return result.data;
  throw new ConfigError(
    source,
    result.error.issues.map((issue) => {
      if (issue.code === 'unrecognized_keys') return `${fieldPath(issue.path)}: unknown field${issue.keys.length > 1 ? 's' : ''} ${issue.keys.map((k) => `'${k}'`).join(', ')}`;
      return `${fieldPath(issue.path)}: ${issue.message}`;
    }),
  );
}

/** Parses YAML text; YAML syntax errors are reported with their line. */
export function parseAgentConfigYaml(text: string, source = 'config'): AgentConfig {
  let value: unknown;
  try {
    value = parseYaml(text);
  } catch (error) {
    if (error instanceof YAMLParseError) throw new ConfigError(source, [`YAML: ${error.message.split('\n')[0]}`]);
    throw error;
  }
  if (value === null || typeof value !== 'object' || Array.isArray(value)) throw new ConfigError(source, ['(top level): a mapping of settings']);
  return parseAgentConfig(value, source);
}

export function loadAgentConfig(file: string): AgentConfig {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (error) {
    throw new ConfigError(file, [`cannot read it: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`]);
  }
  return parseAgentConfigYaml(text, file);
}

/** fenceAfterMs with its default filled in. */
export const fenceAfterMs = (config: AgentConfig) => config.etcd.fenceAfterMs ?? config.etcd.leaseTtlSeconds * 600;
