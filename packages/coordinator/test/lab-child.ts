/**
 * Runs a TypeScript script as a child process — inside a lab host (its network, mount and UTS
 * namespaces, so `cutLink` really cuts it) or in the root namespace — and reads the NDJSON events
 * it prints on stdout. The child is one process (node with tsx's loader, exec'd by nsenter), so
 * SIGKILL / SIGSTOP on `pid` hit the script itself.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createRequire } from 'node:module';
import { pathToFileURL } from 'node:url';
import { inHostArgv, type LabHostName } from '../../../test/lab/lab.js';

const tsxLoader = pathToFileURL(createRequire(import.meta.url).resolve('tsx')).href;

export interface ChildEvent {
  event: string;
  [field: string]: unknown;
}

export class LabChild {
  readonly events: ChildEvent[] = [];
  private readonly waiters = new Set<() => void>();
  private stderr = '';
  private exit: string | undefined;

  private constructor(
    readonly name: string,
    private readonly child: ChildProcess,
  ) {
    let buffered = '';
    child.stdout!.setEncoding('utf8').on('data', (chunk: string) => {
      buffered += chunk;
      let newline: number;
      while ((newline = buffered.indexOf('\n')) >= 0) {
        const line = buffered.slice(0, newline).trim();
        buffered = buffered.slice(newline + 1);
        if (!line) continue;
        try {
          this.events.push(JSON.parse(line) as ChildEvent);
        } catch {
          this.stderr += `(stdout, not JSON) ${line}\n`;
        }
      }
      this.wake();
    });
    child.stderr!.setEncoding('utf8').on('data', (chunk: string) => {
      this.stderr = (this.stderr + chunk).slice(-4000);
    });
    child.once('exit', (code, signal) => {
      this.exit = signal ?? `code ${code}`;
      this.wake();
    });
  }

  /** Starts `script` (a .ts path) with `args`, inside `host` (undefined: the root namespace). */
  static start(name: string, script: string, args: string[], host?: LabHostName): LabChild {
    const argv = [process.execPath, '--conditions=@ftvm/source', '--import', tsxLoader, script, ...args];
    const [program, ...rest] = host ? inHostArgv(host, argv) : argv;
    const child = spawn(program!, rest, { stdio: ['ignore', 'pipe', 'pipe'] });
    return new LabChild(name, child);
  }

  get pid(): number {
    return this.child.pid!;
  }

  get exited(): string | undefined {
    return this.exit;
  }

  /** The first event (from the start) matching `match`; waits up to timeoutMs for it. */
  async waitFor(match: (event: ChildEvent) => boolean, timeoutMs: number, what: string): Promise<ChildEvent> {
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      const found = this.events.find(match);
      if (found) return found;
      if (this.exit !== undefined) throw new Error(`${this.name} exited (${this.exit}) before ${what}\n${this.describe()}`);
      const remaining = deadline - performance.now();
      if (remaining <= 0) throw new Error(`${this.name}: timed out after ${timeoutMs} ms waiting for ${what}\n${this.describe()}`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(done, remaining);
        const waiters = this.waiters;
        function done() {
          clearTimeout(timer);
          waiters.delete(done);
          resolve();
        }
        waiters.add(done);
      });
    }
  }

  signal(signal: NodeJS.Signals): void {
    if (this.exit === undefined) process.kill(this.pid, signal);
  }

  /** SIGKILLs the child (and a stopped one too) and waits for it to be gone. */
  async kill(timeoutMs = 5_000): Promise<void> {
    if (this.exit !== undefined) return;
    this.signal('SIGKILL');
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`${this.name} (pid ${this.pid}) did not die within ${timeoutMs} ms`)), timeoutMs);
      this.child.once('exit', () => {
        clearTimeout(timer);
        resolve();
      });
      if (this.exit !== undefined) {
        clearTimeout(timer);
        resolve();
      }
    });
  }

  describe(): string {
    const tail = this.events.slice(-8).map((e) => JSON.stringify(e)).join('\n');
    return `--- ${this.name} last events:\n${tail || '(none)'}\n--- ${this.name} stderr:\n${this.stderr || '(none)'}`;
  }

  private wake(): void {
    for (const waiter of [...this.waiters]) waiter();
  }
}

/** Wall-clock milliseconds of a performance.now() value, comparable across processes on one machine. */
export const wallOf = (perfNow: number) => performance.timeOrigin + perfNow;
