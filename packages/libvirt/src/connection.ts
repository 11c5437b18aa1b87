import { Hypervisor, type Domain } from '@unraid/libvirt';
import { DomainNotFoundError, LibvirtConnectionError, LibvirtError, LibvirtTimeoutError, classifyLibvirtError, withDeadline } from './errors.js';
import { LifecycleEventStream, type LifecycleStreamOptions } from './events.js';
import { virsh } from './virsh.js';

/** virDomainState, lower-cased. */
export type DomainStateName = 'nostate' | 'running' | 'blocked' | 'paused' | 'shutdown' | 'shutoff' | 'crashed' | 'pmsuspended';
const STATES: readonly DomainStateName[] = ['nostate', 'running', 'blocked', 'paused', 'shutdown', 'shutoff', 'crashed', 'pmsuspended'];

export interface ConnectOptions {
  /** Default deadline for every call on this connection (a reconnect and retry included). Default 30 s. */
  timeoutMs?: number;
  /** Deadline for opening the connection, and for each reconnect attempt. Default 15 s. */
  connectTimeoutMs?: number;
  /**
   * Reopen a broken connection (daemon restarted, socket closed) on the next call and retry the
   * call once when that is safe. Default true; false keeps a broken connection broken (every call
   * fails at once with LibvirtConnectionError).
   */
  reconnect?: boolean;
  /** Longest pause between reconnect attempts (the backoff starts at 100 ms and doubles). Default 2 s. */
  reconnectMaxBackoffMs?: number;
  /** The connection was found broken (once per breakage). Listener errors are ignored. */
  onBroken?: (event: BrokenEvent) => void;
  /** A broken connection was reopened. Listener errors are ignored. */
  onReconnect?: (event: ReconnectEvent) => void;
}

export interface BrokenEvent {
  uri: string;
  /** What broke it: libvirt's message, or the call that got no answer. */
  reason: string;
  /** The call that found it broken. */
  operation: string;
  domain: string | undefined;
}

export interface ReconnectEvent {
  uri: string;
  /** Why the connection had been broken. */
  reason: string;
  /** Connect attempts this reconnect took (1 = the first one worked). */
  attempts: number;
  /** From the start of the first attempt to the open connection. */
  durationMs: number;
  /** `conn.reconnects` after this one. */
  reconnects: number;
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

/** Start and cap of the pause between reconnect attempts. */
const RECONNECT_FIRST_BACKOFF_MS = 100;
const DEFAULT_RECONNECT_MAX_BACKOFF_MS = 2_000;

/**
 * libvirt messages that say the request never reached the daemon whole: libvirt refused to send on
 * a socket it already knew closed, or the write itself failed (a partly written RPC is never
 * executed). After any other connection error a mutating request may or may not have been done.
 */
const NOT_SENT = [/client socket is closed/i, /^Cannot write data/i, /^Failed to connect socket/i, /^no connection driver available/i, /^Unable to connect/i];

/** How a logical call runs its native steps; `mutating` steps are the ones not to repeat blindly. */
type Step = <T>(operation: string, call: (h: Hypervisor) => Promise<T>, options?: { mutating?: boolean }) => Promise<T>;

/**
 * One libvirt connection: the `@unraid/libvirt` binding for the calls it has, `virsh` for the rest
 * (start paused, state reasons, undefine flags, monitor passthrough, lifecycle events). URIs are
 * passed through unchanged: a local daemon (`qemu:///system`, `qemu:///system?socket=/path`),
 * `qemu+ssh://[user@]host/system[?keyfile=…&no_verify=1]` or
 * `qemu+libssh://host/system?keyfile=…&known_hosts=…&sshauth=privkey`.
 *
 * Every call has one deadline, a reconnect and retry included (LibvirtTimeoutError). The binding
 * registers no libvirt event loop, so a daemon that went away (restarted) is only noticed by the
 * next call, as a connection error; and a binding call cannot be cancelled, so one that times out
 * leaves the connection unusable too. Either way the connection is *broken* (`broken` says why):
 * the next call reopens it to the same URI (bounded backoff, within that call's deadline) before
 * sending anything. A call that meets a connection error itself is retried once on the reopened
 * connection when that is safe: always for reads, and for a mutating call only when libvirt says
 * the request was never sent; otherwise it fails with a LibvirtConnectionError saying the outcome
 * is unknown.
 */
export class LibvirtConnection {
  private hypervisor: Hypervisor;
  /** Bumped on every reopen; an error from an older connection says nothing about the current one. */
  private generation = 0;
  private brokenReason: string | undefined;
  /** A native call on the current connection never returned (its thread is stuck): never close it. */
  private stuck = false;
  private closed = false;
  private reconnectCount = 0;
  private reopening: Promise<void> | undefined;
  /** A connect attempt that missed its deadline and has not returned: no second one meanwhile. */
  private pendingOpen: Promise<unknown> | undefined;
  private lastReconnectError: string | undefined;
  private readonly connectTimeoutMs: number;

  private constructor(
    hypervisor: Hypervisor,
    readonly uri: string,
    readonly timeoutMs: number,
    private readonly options: ConnectOptions,
  ) {
    this.hypervisor = hypervisor;
    this.connectTimeoutMs = options.connectTimeoutMs ?? 15_000;
  }

  static async connect(uri: string, options: ConnectOptions = {}): Promise<LibvirtConnection> {
    const timeoutMs = options.timeoutMs ?? 30_000;
    const connectTimeoutMs = options.connectTimeoutMs ?? 15_000;
    const durations: [string, number | undefined][] = [
      ['timeoutMs', timeoutMs],
      ['connectTimeoutMs', connectTimeoutMs],
      ['reconnectMaxBackoffMs', options.reconnectMaxBackoffMs],
    ];
    for (const [key, value] of durations) {
      if (value !== undefined && !(Number.isFinite(value) && value > 0)) throw new RangeError(`LibvirtConnection.connect: ${key} must be a positive number of milliseconds, got ${value}`);
    }
    const hypervisor = await openHypervisor(uri, connectTimeoutMs);
    return new LibvirtConnection(hypervisor, uri, timeoutMs, options);
  }

  /** Why the connection is unusable right now (a call got no answer, or the daemon went away), if it is. The next call reopens it. */
  get broken(): string | undefined {
    return this.brokenReason;
  }

  /** How many times a broken connection has been reopened. */
  get reconnects(): number {
    return this.reconnectCount;
  }

  /**
   * Reopens the connection now if it is broken (otherwise does nothing), within `timeoutMs`
   * (default: the connection's). Throws LibvirtConnectionError when the daemon cannot be reached in
   * time; `reconnect: false` connections throw at once.
   */
  async reconnect(options: CallOptions = {}): Promise<void> {
    await this.ensureOpen('reconnect', undefined, performance.now() + (options.timeoutMs ?? this.timeoutMs));
  }

  // ---- domains ---------------------------------------------------------------------------------

  /**
   * Defines a persistent domain (redefining one needs its <uuid> in the XML, or libvirt reports the
   * name as taken: DomainExistsError); returns its name and UUID.
   */
  async define(xml: string, options: CallOptions = {}): Promise<{ name: string; uuid: string }> {
    const name = /<name>([^<]*)<\/name>/.exec(xml)?.[1];
    return this.call('define', name, options, async (step) => {
      const dom = await step('define', (h) => h.domainDefineXML(xml), { mutating: true });
      const [realName, uuid] = await Promise.all([step('get name', () => dom.getName()), step('get uuid', () => dom.getUUIDString())]);
      return { name: realName, uuid };
    });
  }

  /** Starts a defined domain; `paused` starts QEMU with its vCPUs stopped (virsh `start --paused`). */
  async start(name: string, options: CallOptions & { paused?: boolean } = {}): Promise<void> {
    if (options.paused) {
      await this.virsh(['start', name, '--paused'], { ...options, domain: name, operation: 'start (paused)' });
      return;
    }
    await this.domainCall('start', name, options, (dom) => dom.create());
  }

  async suspend(name: string, options: CallOptions = {}): Promise<void> {
    await this.domainCall('suspend', name, options, (dom) => dom.suspend());
  }

  async resume(name: string, options: CallOptions = {}): Promise<void> {
    await this.domainCall('resume', name, options, (dom) => dom.resume());
  }

  /** Asks the guest to shut down (ACPI); returns without waiting for it. */
  async shutdown(name: string, options: CallOptions = {}): Promise<void> {
    await this.domainCall('shutdown', name, options, (dom) => dom.shutdown());
  }

  /** Hard stop (pulls the plug). */
  async destroy(name: string, options: CallOptions = {}): Promise<void> {
    await this.domainCall('destroy', name, options, (dom) => dom.destroy());
  }

  /** Removes the persistent definition; `nvram` also removes a UEFI varstore (virsh `--nvram`). */
  async undefine(name: string, options: CallOptions & { nvram?: boolean } = {}): Promise<void> {
    if (options.nvram) {
      await this.virsh(['undefine', name, '--nvram'], { ...options, domain: name, operation: 'undefine' });
      return;
    }
    await this.domainCall('undefine', name, options, (dom) => dom.undefine());
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
    return this.call('get XML', name, options, async (step) => {
      const dom = await step('lookup', (h) => h.domainLookupByName(name));
      return step('get XML', () => dom.getXMLDesc(flags));
    });
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
    return this.call('get info', name, options, async (step) => {
      const dom = await step('lookup', (h) => h.domainLookupByName(name));
      const [info, uuid] = await Promise.all([step('get info', () => dom.getInfo()), step('get uuid', () => dom.getUUIDString())]);
      return {
        name,
        uuid,
        state: STATES[info.state] ?? 'nostate',
        maxMemKiB: info.maxMem,
        memoryKiB: info.memory,
        vcpus: info.nrVirtCpu,
        cpuTimeNs: info.cpuTime,
      };
    });
  }

  /**
   * Whether the domain is defined or running. False only when libvirt itself said "not found": a
   * connection that cannot ask (broken and not reopened within the deadline) throws
   * LibvirtConnectionError / LibvirtTimeoutError, never false.
   */
  async exists(name: string, options: CallOptions = {}): Promise<boolean> {
    try {
      await this.call('lookup', name, options, (step) => step('lookup', (h) => h.domainLookupByName(name)));
      return true;
    } catch (error) {
      if (error instanceof DomainNotFoundError) return false;
      throw error;
    }
  }

  /** Names of all domains, active and inactive. */
  async list(options: CallOptions = {}): Promise<string[]> {
    return this.call('list domains', undefined, options, async (step) => {
      const domains = await step('list domains', (h) => h.connectListAllDomains());
      return Promise.all(domains.map((d) => step('get name', () => d.getName())));
    });
  }

  async hostname(options: CallOptions = {}): Promise<string> {
    return this.call('get hostname', undefined, options, (step) => step('get hostname', (h) => h.connectGetHostname()));
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

  /** Runs any virsh command on this connection with the connection's deadline (each virsh opens its own connection). */
  virsh(args: string[], options: CallOptions & { domain?: string; operation?: string; input?: string } = {}): Promise<string> {
    return virsh(this.uri, args, { ...options, timeoutMs: options.timeoutMs ?? this.timeoutMs });
  }

  async close(options: CallOptions = {}): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.stuck) return; // a stuck native call may hold the connection; leave it to the GC
    await withDeadline(this.hypervisor.connectClose(), options.timeoutMs ?? 5_000, { operation: 'close', domain: undefined, uri: this.uri }).catch(() => undefined);
  }

  // ---- internals ---------------------------------------------------------------------------------

  /** Lookup (a read) then one mutating call on the domain. */
  private domainCall(operation: string, name: string, options: CallOptions, action: (dom: Domain) => Promise<unknown>): Promise<void> {
    return this.call(operation, name, options, async (step) => {
      const dom = await step('lookup', (h) => h.domainLookupByName(name));
      await step(operation, () => action(dom), { mutating: true });
    });
  }

  /**
   * Runs one logical call under one deadline: reopens a broken connection first, runs `body`'s
   * native steps, and on a connection error retries `body` once on a reopened connection when
   * nothing mutating may have reached the daemon.
   */
  private async call<T>(operation: string, domain: string | undefined, options: CallOptions, body: (step: Step) => Promise<T>): Promise<T> {
    const timeoutMs = options.timeoutMs ?? this.timeoutMs;
    const deadline = performance.now() + timeoutMs;
    for (let attempt = 0; ; attempt++) {
      await this.ensureOpen(operation, domain, deadline);
      const generation = this.generation;
      const hypervisor = this.hypervisor;
      let sent = false;
      const step: Step = async (stepOperation, fn, stepOptions = {}) => {
        if (stepOptions.mutating) sent = true;
        return this.native(stepOperation, domain, generation, deadline, timeoutMs, () => fn(hypervisor));
      };
      try {
        return await body(step);
      } catch (error) {
        if (!(error instanceof LibvirtConnectionError) || this.closed) throw error;
        const unsent = !sent || NOT_SENT.some((p) => p.test(error.libvirtMessage));
        if (!unsent) {
          throw new LibvirtConnectionError(
            error.operation,
            domain,
            this.uri,
            `connection lost after the request was sent, so it may or may not have been done (${error.libvirtMessage}); the connection is reopened on the next call`,
            { cause: error },
          );
        }
        if (attempt >= 1 || this.options.reconnect === false || deadline - performance.now() <= 0) throw error;
        // the connection is marked broken (native); the next round reopens it and runs body again
      }
    }
  }

  /** One native call of `generation`'s connection with what is left of the deadline. */
  private async native<T>(operation: string, domain: string | undefined, generation: number, deadline: number, timeoutMs: number, call: () => Promise<T>): Promise<T> {
    if (this.closed) throw new LibvirtConnectionError(operation, domain, this.uri, 'connection closed');
    const remaining = Math.round(deadline - performance.now());
    // no time left (a reconnect used it up): fail without sending, and without blaming the connection
    if (remaining <= 0) throw new LibvirtTimeoutError(operation, domain, this.uri, timeoutMs);
    let promise: Promise<T>;
    try {
      promise = call();
    } catch (error) {
      throw classifyLibvirtError(operation, domain, this.uri, error);
    }
    try {
      return await withDeadline(promise, remaining, { operation, domain, uri: this.uri }, () => {
        if (generation === this.generation) this.stuck = true;
        this.markBroken(`${operation}${domain ? ` of '${domain}'` : ''} got no answer within ${timeoutMs} ms`, operation, domain, generation);
      });
    } catch (error) {
      if (error instanceof LibvirtTimeoutError && error.timeoutMs !== timeoutMs) {
        throw new LibvirtTimeoutError(operation, domain, this.uri, timeoutMs); // name the call's deadline, not the remainder
      }
      if (error instanceof LibvirtConnectionError) this.markBroken(error.libvirtMessage, operation, domain, generation);
      throw error;
    }
  }

  private markBroken(reason: string, operation: string, domain: string | undefined, generation: number): void {
    if (generation !== this.generation || this.brokenReason !== undefined) return;
    this.brokenReason = reason;
    notify(this.options.onBroken, { uri: this.uri, reason, operation, domain });
  }

  /** Resolves once the connection is usable, reopening it if broken; throws when it cannot by `deadline`. */
  private async ensureOpen(operation: string, domain: string | undefined, deadline: number): Promise<void> {
    if (this.closed) throw new LibvirtConnectionError(operation, domain, this.uri, 'connection closed');
    while (this.brokenReason !== undefined) {
      const reason = this.brokenReason;
      const remaining = deadline - performance.now();
      if (this.options.reconnect === false || remaining <= 0) {
        const tried = this.lastReconnectError ? `; reconnecting failed: ${this.lastReconnectError}` : '';
        throw new LibvirtConnectionError(operation, domain, this.uri, `connection unusable: ${reason}${tried}`);
      }
      // one reopen at a time, shared by concurrent calls; each waits only until its own deadline
      this.reopening ??= this.reopen(deadline).finally(() => {
        this.reopening = undefined;
      });
      await raceTimer(this.reopening, remaining);
      if (this.closed) throw new LibvirtConnectionError(operation, domain, this.uri, 'connection closed');
    }
  }

  /** Connect attempts with backoff until one works or `deadline` passes. Never throws. */
  private async reopen(deadline: number): Promise<void> {
    const reason = this.brokenReason ?? 'unknown';
    const t0 = performance.now();
    const maxBackoffMs = this.options.reconnectMaxBackoffMs ?? DEFAULT_RECONNECT_MAX_BACKOFF_MS;
    let backoffMs = RECONNECT_FIRST_BACKOFF_MS;
    for (let attempts = 1; !this.closed; attempts++) {
      // an earlier attempt that never returned holds a thread: wait for it rather than add another
      if (this.pendingOpen) {
        await raceTimer(this.pendingOpen, deadline - performance.now());
        if (this.openStillPending()) return;
      }
      const remaining = deadline - performance.now();
      if (remaining <= 0) return;
      try {
        const hypervisor = await this.openOnce(Math.min(this.connectTimeoutMs, remaining));
        if (this.closed) {
          void hypervisor.connectClose().catch(() => undefined);
          return;
        }
        const old = this.hypervisor;
        const oldStuck = this.stuck;
        this.hypervisor = hypervisor;
        this.generation++;
        this.stuck = false;
        this.brokenReason = undefined;
        this.lastReconnectError = undefined;
        this.reconnectCount++;
        // the old connection is dead; closing it frees libvirt's client state (unless a call is stuck in it)
        if (!oldStuck) void withDeadline(old.connectClose(), 5_000, { operation: 'close', domain: undefined, uri: this.uri }).catch(() => undefined);
        notify(this.options.onReconnect, { uri: this.uri, reason, attempts, durationMs: Math.round(performance.now() - t0), reconnects: this.reconnectCount });
        return;
      } catch (error) {
        this.lastReconnectError = `${attempts} attempt(s) in ${Math.round(performance.now() - t0)} ms, last: ${error instanceof LibvirtError ? error.libvirtMessage : String(error)}`;
      }
      const pause = Math.min(backoffMs, deadline - performance.now());
      if (pause <= 0) return;
      await sleep(pause);
      backoffMs = Math.min(backoffMs * 2, maxBackoffMs);
    }
  }

  /** (A method, so the compiler does not assume the field unchanged across an await.) */
  private openStillPending(): boolean {
    return this.pendingOpen !== undefined;
  }

  private async openOnce(timeoutMs: number): Promise<Hypervisor> {
    const hypervisor = new Hypervisor({ uri: this.uri });
    const opening = hypervisor.connectOpen();
    const onTimeout = () => {
      // the attempt keeps its thread until libvirt gives up; close what it opens too late
      const pending: Promise<void> = opening
        .then(
          () => void hypervisor.connectClose().catch(() => undefined),
          () => undefined,
        )
        .finally(() => {
          if (this.pendingOpen === pending) this.pendingOpen = undefined;
        });
      this.pendingOpen = pending;
    };
    await withDeadline(opening, timeoutMs, { operation: 'reconnect', domain: undefined, uri: this.uri }, onTimeout);
    return hypervisor;
  }
}

async function openHypervisor(uri: string, timeoutMs: number): Promise<Hypervisor> {
  const hypervisor = new Hypervisor({ uri });
  await withDeadline(hypervisor.connectOpen(), timeoutMs, { operation: 'connect', domain: undefined, uri }).catch((error: unknown) => {
    throw error instanceof LibvirtTimeoutError || error instanceof LibvirtConnectionError
      ? error
      : new LibvirtConnectionError('connect', undefined, uri, (error as LibvirtError).libvirtMessage ?? String(error));
  });
  return hypervisor;
}

function notify<E>(listener: ((event: E) => void) | undefined, event: E): void {
  try {
    listener?.(event);
  } catch {
    // a listener's error is the listener's business, not the libvirt call's
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, Math.max(0, ms)));
}

/** Waits for `promise` (whose rejection is ignored) or `ms`, whichever comes first; clears its timer. */
async function raceTimer(promise: Promise<unknown>, ms: number): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([promise.catch(() => undefined), new Promise<void>((resolve) => (timer = setTimeout(resolve, Math.max(0, ms))))]);
  clearTimeout(timer);
}
