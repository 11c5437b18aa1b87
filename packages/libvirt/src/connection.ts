import { Hypervisor, type Domain } from '@unraid/libvirt';
import { DomainNotFoundError, LibvirtConnectionError, LibvirtError, LibvirtTimeoutError, classifyLibvirtError, withDeadline } from './errors.js';
import { LifecycleEventStream, type LifecycleStreamOptions } from './events.js';
import { virsh } from './virsh.js';

/** virDomainState, lower-cased. */
export type DomainStateName = 'nostate' | 'running' | 'blocked' | 'paused' | 'shutdown' | 'shutoff' | 'crashed' | 'pmsuspended';
const STATES: readonly DomainStateName[] = ['nostate', 'running', 'blocked', 'paused', 'shutdown', 'shutoff', 'crashed', 'pmsuspended'];

export interface ConnectOptions {
  /** Default deadline for every call on this connection. Default 30 s. */
  timeoutMs?: number;
  /** Deadline for opening the connection. Default 15 s. */
  connectTimeoutMs?: number;
}

export interface CallOptions {
  timeoutMs?: number;
}

export interface DomainInfo {
  name: string;
  uuid: string;
  state: DomainStateName;
  /** KiB, as libvirt reports them. */
  maxMemKiB: number;
  memoryKiB: number;
  vcpus: number;
  cpuTimeNs: number;
}

/** virDomainGetXMLDesc flags. */
const XML_SECURE = 1;
const XML_INACTIVE = 2;
const XML_MIGRATABLE = 8;

/**
 * One libvirt connection: the `@unraid/libvirt` binding for the calls it has, `virsh` for the rest
 * (start paused, state reasons, undefine flags, monitor passthrough, lifecycle events). URIs are
 * passed through unchanged: a local daemon (`qemu:///system`, `qemu:///system?socket=/path`),
 * `qemu+ssh://[user@]host/system[?keyfile=…&no_verify=1]` or
 * `qemu+libssh://host/system?keyfile=…&known_hosts=…&sshauth=privkey`.
 *
 * Every call has a deadline (LibvirtTimeoutError). The binding's calls run on libuv's threadpool
 * and cannot be cancelled, so a binding call that times out marks the connection broken: later
 * calls fail at once with LibvirtConnectionError and the caller reconnects.
 */
export class LibvirtConnection {
  private brokenReason: string | undefined;
  private closed = false;

  private constructor(
    private readonly hypervisor: Hypervisor,
    readonly uri: string,
    readonly timeoutMs: number,
  ) {}

  static async connect(uri: string, options: ConnectOptions = {}): Promise<LibvirtConnection> {
    const hypervisor = new Hypervisor({ uri });
    const conn = new LibvirtConnection(hypervisor, uri, options.timeoutMs ?? 30_000);
    await withDeadline(hypervisor.connectOpen(), options.connectTimeoutMs ?? 15_000, { operation: 'connect', domain: undefined, uri }).catch((error: unknown) => {
      throw error instanceof LibvirtTimeoutError || error instanceof LibvirtConnectionError
        ? error
        : new LibvirtConnectionError('connect', undefined, uri, (error as LibvirtError).libvirtMessage ?? String(error));
    });
    return conn;
  }

  /** Why the connection is unusable (a native call timed out or the daemon went away), if it is. */
  get broken(): string | undefined {
    return this.brokenReason;
  }

  // ---- domains ---------------------------------------------------------------------------------

  /**
   * Defines a persistent domain (redefining one needs its <uuid> in the XML, or libvirt reports the
   * name as taken: DomainExistsError); returns its name and UUID.
   */
  async define(xml: string, options: CallOptions = {}): Promise<{ name: string; uuid: string }> {
    const name = /<name>([^<]*)<\/name>/.exec(xml)?.[1];
    const dom = await this.native('define', name, options, () => this.hypervisor.domainDefineXML(xml));
    const [realName, uuid] = await Promise.all([
      this.native('get name', name, options, () => dom.getName()),
      this.native('get uuid', name, options, () => dom.getUUIDString()),
    ]);
    return { name: realName, uuid };
  }

  /** Starts a defined domain; `paused` starts QEMU with its vCPUs stopped (virsh `start --paused`). */
  async start(name: string, options: CallOptions & { paused?: boolean } = {}): Promise<void> {
    if (options.paused) {
      await this.virsh(['start', name, '--paused'], { ...options, domain: name, operation: 'start (paused)' });
      return;
    }
    const dom = await this.lookup(name, options);
    await this.native('start', name, options, () => dom.create());
  }

  async suspend(name: string, options: CallOptions = {}): Promise<void> {
    const dom = await this.lookup(name, options);
    await this.native('suspend', name, options, () => dom.suspend());
  }

  async resume(name: string, options: CallOptions = {}): Promise<void> {
    const dom = await this.lookup(name, options);
    await this.native('resume', name, options, () => dom.resume());
  }

  /** Asks the guest to shut down (ACPI); returns without waiting for it. */
  async shutdown(name: string, options: CallOptions = {}): Promise<void> {
    const dom = await this.lookup(name, options);
    await this.native('shutdown', name, options, () => dom.shutdown());
  }

  /** Hard stop (pulls the plug). */
  async destroy(name: string, options: CallOptions = {}): Promise<void> {
    const dom = await this.lookup(name, options);
    await this.native('destroy', name, options, () => dom.destroy());
  }

  /** Removes the persistent definition; `nvram` also removes a UEFI varstore (virsh `--nvram`). */
  async undefine(name: string, options: CallOptions & { nvram?: boolean } = {}): Promise<void> {
    if (options.nvram) {
      await this.virsh(['undefine', name, '--nvram'], { ...options, domain: name, operation: 'undefine' });
      return;
    }
    const dom = await this.lookup(name, options);
    await this.native('undefine', name, options, () => dom.undefine());
  }

  /** Destroys (if running) and undefines (if defined); a missing domain is fine. */
  async remove(name: string, options: CallOptions = {}): Promise<void> {
    for (const step of [() => this.destroy(name, options), () => this.undefine(name, options)]) {
      try {
        await step();
      } catch (error) {
        if (error instanceof DomainNotFoundError) return;
        if (!(error instanceof LibvirtError) || error instanceof LibvirtTimeoutError || error instanceof LibvirtConnectionError) throw error;
        // "domain is not running" / "cannot undefine transient domain": carry on
      }
    }
  }

  async xml(name: string, options: CallOptions & { inactive?: boolean; secure?: boolean; migratable?: boolean } = {}): Promise<string> {
    const flags = (options.inactive ? XML_INACTIVE : 0) | (options.secure ? XML_SECURE : 0) | (options.migratable ? XML_MIGRATABLE : 0);
    const dom = await this.lookup(name, options);
    return this.native('get XML', name, options, () => dom.getXMLDesc(flags));
  }

  async state(name: string, options: CallOptions = {}): Promise<DomainStateName> {
    return (await this.info(name, options)).state;
  }

  /** State plus libvirt's reason ("paused (user)", "shut off (destroyed)"), via virsh `domstate --reason`. */
  async stateReason(name: string, options: CallOptions = {}): Promise<{ state: string; reason: string }> {
    const out = (await this.virsh(['domstate', name, '--reason'], { ...options, domain: name, operation: 'get state' })).trim();
    const m = /^(.*?)\s*\((.*)\)$/.exec(out);
    return m ? { state: m[1] ?? out, reason: m[2] ?? '' } : { state: out, reason: '' };
  }

  async info(name: string, options: CallOptions = {}): Promise<DomainInfo> {
    const dom = await this.lookup(name, options);
    const [info, uuid] = await Promise.all([
      this.native('get info', name, options, () => dom.getInfo()),
      this.native('get uuid', name, options, () => dom.getUUIDString()),
    ]);
    return {
      name,
      uuid,
      state: STATES[info.state] ?? 'nostate',
      maxMemKiB: info.maxMem,
      memoryKiB: info.memory,
      vcpus: info.nrVirtCpu,
      cpuTimeNs: info.cpuTime,
    };
  }

  async exists(name: string, options: CallOptions = {}): Promise<boolean> {
    try {
      await this.lookup(name, options);
      return true;
    } catch (error) {
      if (error instanceof DomainNotFoundError) return false;
      throw error;
    }
  }

  /** Names of all domains, active and inactive. */
  async list(options: CallOptions = {}): Promise<string[]> {
    const domains = await this.native('list domains', undefined, options, () => this.hypervisor.connectListAllDomains());
    return Promise.all(domains.map((d) => this.native('get name', undefined, options, () => d.getName())));
  }

  async hostname(options: CallOptions = {}): Promise<string> {
    return this.native('get hostname', undefined, options, () => this.hypervisor.connectGetHostname());
  }

  /** Polls until the domain is in `state` (e.g. after a guest-initiated shutdown). */
  async waitForState(name: string, state: DomainStateName, options: { timeoutMs: number; intervalMs?: number }): Promise<void> {
    const deadline = performance.now() + options.timeoutMs;
    let last: DomainStateName | undefined;
    for (;;) {
      const remaining = deadline - performance.now();
      if (remaining <= 0) throw new LibvirtTimeoutError(`wait for state ${state} (last seen: ${last ?? 'none'})`, name, this.uri, options.timeoutMs);
      last = await this.state(name, { timeoutMs: Math.max(1, Math.min(this.timeoutMs, remaining)) });
      if (last === state) return;
      await new Promise((r) => setTimeout(r, options.intervalMs ?? 50));
    }
  }

  /**
   * A QMP command through libvirt's own monitor (virsh `qemu-monitor-command`; libvirt marks the
   * domain tainted). ftvm normally speaks to its own QMP socket instead; this is for diagnostics.
   */
  async qemuMonitorCommand(name: string, command: string, args?: Record<string, unknown>, options: CallOptions = {}): Promise<unknown> {
    const request = JSON.stringify(args === undefined ? { execute: command } : { execute: command, arguments: args });
    const out = await this.virsh(['qemu-monitor-command', name, request], { ...options, domain: name, operation: `monitor command ${command}` });
    const reply = JSON.parse(out) as { return?: unknown; error?: { class: string; desc: string } };
    if (reply.error) throw new LibvirtError(`monitor command ${command}`, name, this.uri, `${reply.error.class}: ${reply.error.desc}`);
    return reply.return;
  }

  /** Lifecycle events (virsh `event --loop`); see LifecycleEventStream. */
  events(options: LifecycleStreamOptions = {}): Promise<LifecycleEventStream> {
    return LifecycleEventStream.open(this.uri, options);
  }

  /** Runs any virsh command on this connection with the connection's deadline. */
  virsh(args: string[], options: CallOptions & { domain?: string; operation?: string; input?: string } = {}): Promise<string> {
    return virsh(this.uri, args, { ...options, timeoutMs: options.timeoutMs ?? this.timeoutMs });
  }

  async close(options: CallOptions = {}): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.brokenReason) return; // a stuck native call may hold the connection; leave it to the GC
    await withDeadline(this.hypervisor.connectClose(), options.timeoutMs ?? 5_000, { operation: 'close', domain: undefined, uri: this.uri }).catch(() => undefined);
  }

  // ---- internals ---------------------------------------------------------------------------------

  private async lookup(name: string, options: CallOptions): Promise<Domain> {
    return this.native('lookup', name, options, () => this.hypervisor.domainLookupByName(name));
  }

  private async native<T>(operation: string, domain: string | undefined, options: CallOptions, call: () => Promise<T>): Promise<T> {
    if (this.closed) throw new LibvirtConnectionError(operation, domain, this.uri, 'connection closed');
    if (this.brokenReason) throw new LibvirtConnectionError(operation, domain, this.uri, `connection unusable: ${this.brokenReason}`);
    let promise: Promise<T>;
    try {
      promise = call();
    } catch (error) {
      throw classifyLibvirtError(operation, domain, this.uri, error);
    }
    const timeoutMs = options.timeoutMs ?? this.timeoutMs;
    try {
      return await withDeadline(promise, timeoutMs, { operation, domain, uri: this.uri }, () => {
        this.brokenReason = `${operation}${domain ? ` of '${domain}'` : ''} got no answer within ${timeoutMs} ms`;
      });
    } catch (error) {
      if (error instanceof LibvirtConnectionError && !this.brokenReason) this.brokenReason = error.libvirtMessage;
      throw error;
    }
  }
}
