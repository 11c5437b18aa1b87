import { spawn, type ChildProcess } from 'node:child_process';
import { LibvirtConnectionError, LibvirtError, LibvirtTimeoutError } from './errors.js';

/** libvirt's lifecycle event types (virDomainEventType), as virsh names them, lower-cased. */
export type LifecycleEventType =
  | 'defined'
  | 'undefined'
  | 'started'
  | 'suspended'
  | 'resumed'
  | 'stopped'
  | 'shutdown'
  | 'pmsuspended'
  | 'crashed';

export interface LifecycleEvent {
  domain: string;
  event: LifecycleEventType;
  /** virsh's detail text, e.g. "Booted", "Destroyed", "Finished after host request", "Unpaused". */
  detail: string;
  /** libvirt client's receive time (virsh --timestamp, ms resolution). */
  timestamp: Date;
  /** Our own receive time (performance.now()) for latency measurements. */
  receivedAtMs: number;
}

const LINE = /^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})\+0000: event 'lifecycle' for domain '(.*)': (\S+)(?: (.*))?$/;
const TYPES: Record<string, LifecycleEventType> = {
  Defined: 'defined',
  Undefined: 'undefined',
  Started: 'started',
  Suspended: 'suspended',
  Resumed: 'resumed',
  Stopped: 'stopped',
  Shutdown: 'shutdown',
  PMSuspended: 'pmsuspended',
  Crashed: 'crashed',
};

/** Parses one line of `virsh event --event lifecycle --timestamp`; anything else gives undefined. */
export function parseLifecycleLine(line: string, receivedAtMs = performance.now()): LifecycleEvent | undefined {
  const m = LINE.exec(line.trimEnd());
  if (!m) return undefined;
  const event = TYPES[m[3] ?? ''];
  if (!event) return undefined;
  return {
    domain: m[2] ?? '',
    event,
    detail: (m[4] ?? '').trim(),
    timestamp: new Date(`${(m[1] ?? '').replace(' ', 'T')}Z`),
    receivedAtMs,
  };
}

export interface LifecycleStreamOptions {
  /** Only this domain's events (by name; the domain need not exist yet). */
  domain?: string;
  /** Until libvirtd has confirmed the callback registration. Default 10 s. */
  readyTimeoutMs?: number;
}

type Listener = (event: LifecycleEvent) => void;

/**
 * libvirt lifecycle events as a stream. The Node binding has no event API (it registers no event
 * loop), so this runs `virsh event --loop --event lifecycle --timestamp` and parses its lines.
 * `open` resolves only once libvirtd has acknowledged the callback registration: virsh runs with
 * libvirt's client debug log on stderr (LIBVIRT_LOG_FILTERS) and we wait for the reply to the
 * REGISTER_ANY RPC (remote procedure 316), so an event caused after `open` returns is never missed.
 */
export class LifecycleEventStream {
  readonly events: LifecycleEvent[] = [];
  private readonly listeners = new Set<Listener>();
  private readonly closeListeners = new Set<(error: Error) => void>();
  private closedError: Error | undefined;
  private stderrTail = '';

  private constructor(
    private readonly child: ChildProcess,
    readonly uri: string,
    readonly domain: string | undefined,
  ) {}

  static open(uri: string, options: LifecycleStreamOptions = {}): Promise<LifecycleEventStream> {
    const args = ['-c', uri, 'event', '--loop', '--event', 'lifecycle', '--timestamp'];
    // filtered here rather than with virsh --domain, which needs the domain to exist already and
    // follows one UUID (a domain undefined and defined again would be lost)
    const child = spawn('virsh', args, {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, LC_ALL: 'C', LIBVIRT_LOG_FILTERS: '1:libvirt 1:rpc.netclient', LIBVIRT_LOG_OUTPUTS: '1:stderr' },
    });
    const stream = new LifecycleEventStream(child, uri, options.domain);
    const timeoutMs = options.readyTimeoutMs ?? 10_000;
    return new Promise((resolve, reject) => {
      let registering = false;
      let ready = false;
      let errBuf = '';
      const timer = setTimeout(() => {
        stream.kill();
        reject(new LibvirtTimeoutError('event registration', options.domain, uri, timeoutMs));
      }, timeoutMs);
      child.stderr!.setEncoding('utf8');
      child.stderr!.on('data', (chunk: string) => {
        stream.stderrTail = (stream.stderrTail + chunk).slice(-4000);
        if (ready) return;
        errBuf += chunk;
        let nl: number;
        while ((nl = errBuf.indexOf('\n')) >= 0) {
          const line = errBuf.slice(0, nl);
          errBuf = errBuf.slice(nl + 1);
          if (line.includes('virConnectDomainEventRegisterAny')) registering = true;
          else if (registering && line.includes('RPC_CLIENT_MSG_RX') && / proc=316 type=1 /.test(line)) {
            ready = true;
            clearTimeout(timer);
            if (!/ status=0 /.test(line)) {
              stream.kill();
              reject(new LibvirtError('event registration', options.domain, uri, `libvirtd refused: ${line}`));
            } else resolve(stream);
            return;
          }
        }
      });
      let outBuf = '';
      child.stdout!.setEncoding('utf8');
      child.stdout!.on('data', (chunk: string) => {
        outBuf += chunk;
        let nl: number;
        while ((nl = outBuf.indexOf('\n')) >= 0) {
          const event = parseLifecycleLine(outBuf.slice(0, nl));
          outBuf = outBuf.slice(nl + 1);
          if (event && (options.domain === undefined || event.domain === options.domain)) stream.emit(event);
        }
      });
      child.on('error', (error) => {
        clearTimeout(timer);
        stream.markClosed(new LibvirtError('event stream', options.domain, uri, error.message));
        if (!ready) reject(stream.closedError);
      });
      child.on('exit', (code, signal) => {
        clearTimeout(timer);
        const tail = stream.stderrTail
          .split('\n')
          .filter((l) => /error/i.test(l) && !/ debug : /.test(l))
          .slice(-3)
          .join('; ');
        stream.markClosed(
          new LibvirtConnectionError('event stream', options.domain, uri, `virsh event exited (${signal ?? `code ${code}`})${tail ? `: ${tail}` : ''}`),
        );
        if (!ready) reject(stream.closedError);
      });
    });
  }

  on(listener: Listener): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /** Called once when the stream ends (virsh died, the connection broke, or close()). */
  onClose(listener: (error: Error) => void): void {
    if (this.closedError) listener(this.closedError);
    else this.closeListeners.add(listener);
  }

  get closed(): boolean {
    return this.closedError !== undefined;
  }

  /**
   * The next event matching `predicate` (for this stream's domain if it has one). With
   * `includePast`, an already received matching event resolves at once.
   */
  waitFor(
    predicate: (event: LifecycleEvent) => boolean,
    options: { timeoutMs: number; includePast?: boolean; what?: string },
  ): Promise<LifecycleEvent> {
    if (options.includePast) {
      const past = this.events.find(predicate);
      if (past) return Promise.resolve(past);
    }
    if (this.closedError) return Promise.reject(this.closedError);
    return new Promise((resolve, reject) => {
      const done = () => {
        clearTimeout(timer);
        off();
        this.closeListeners.delete(onClose);
      };
      const timer = setTimeout(() => {
        done();
        reject(new LibvirtTimeoutError(`wait for ${options.what ?? 'lifecycle event'}`, this.domain, this.uri, options.timeoutMs));
      }, options.timeoutMs);
      const off = this.on((event) => {
        if (!predicate(event)) return;
        done();
        resolve(event);
      });
      const onClose = (error: Error) => {
        done();
        reject(error);
      };
      this.closeListeners.add(onClose);
    });
  }

  /** Waits for `event` (and optionally `detail`) of `domain`. */
  waitForEvent(domain: string, event: LifecycleEventType, options: { timeoutMs: number; detail?: string; includePast?: boolean }): Promise<LifecycleEvent> {
    return this.waitFor((e) => e.domain === domain && e.event === event && (options.detail === undefined || e.detail === options.detail), {
      ...options,
      what: `'${event}${options.detail ? ` ${options.detail}` : ''}' event of '${domain}'`,
    });
  }

  async close(timeoutMs = 5_000): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    const exited = new Promise<void>((resolve) => this.child.once('exit', () => resolve()));
    this.child.kill('SIGINT');
    const timer = setTimeout(() => this.kill(), timeoutMs);
    await exited;
    clearTimeout(timer);
  }

  private kill(): void {
    try {
      this.child.kill('SIGKILL');
    } catch {
      // already gone
    }
  }

  private emit(event: LifecycleEvent): void {
    this.events.push(event);
    if (this.events.length > 10_000) this.events.splice(0, 5_000);
    for (const listener of [...this.listeners]) listener(event);
  }

  private markClosed(error: Error): void {
    if (this.closedError) return;
    this.closedError = error;
    for (const listener of [...this.closeListeners]) listener(error);
    this.closeListeners.clear();
  }
}
