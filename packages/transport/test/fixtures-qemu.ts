// Real QEMU for the stream tests: start a TCG VM (no kernel: the firmware alone gives RAM and
// devices to migrate), migrate it to a file with `exec:cat > FILE`, and load a file into a fresh
// `-incoming defer` VM. QMP is spoken as raw JSON lines here (this package does not depend on
// @ftvm/qmp).

import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';

export interface QmpReply {
  return?: unknown;
  error?: { class: string; desc: string };
}

/** Minimal QMP client: greeting, qmp_capabilities, id-matched commands; events are dropped. */
export class RawQmp {
  private nextId = 1;
  private readonly pending = new Map<number, { resolve: (r: QmpReply) => void; reject: (e: Error) => void }>();
  private buffer = '';
  private closedError: Error | undefined;

  private constructor(private readonly socket: net.Socket) {
    socket.setEncoding('utf8');
    socket.on('data', (data: string) => {
      this.buffer += data;
      let nl: number;
      while ((nl = this.buffer.indexOf('\n')) >= 0) {
        const line = this.buffer.slice(0, nl).trim();
        this.buffer = this.buffer.slice(nl + 1);
        if (line) this.onLine(line);
      }
    });
    const onClose = (): void => {
      this.closedError ??= new Error('QMP connection closed');
      for (const p of this.pending.values()) p.reject(this.closedError);
      this.pending.clear();
    };
    socket.on('close', onClose);
    socket.on('error', (e) => {
      this.closedError = e;
    });
  }

  static async connect(socketPath: string, timeoutMs = 15_000): Promise<RawQmp> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        const socket = await new Promise<net.Socket>((resolve, reject) => {
          const s = net.createConnection(socketPath);
          s.once('connect', () => resolve(s));
          s.once('error', reject);
        });
        const qmp = new RawQmp(socket);
        await qmp.waitGreeting(deadline - Date.now());
        const caps = await qmp.execute('qmp_capabilities');
        if (caps.error) throw new Error(`qmp_capabilities: ${caps.error.desc}`);
        return qmp;
      } catch (e) {
        if (Date.now() > deadline) throw e;
        await sleep(50);
      }
    }
  }

  private greeting: ((v: void) => void) | undefined;
  private greeted = false;

  private waitGreeting(timeoutMs: number): Promise<void> {
    if (this.greeted) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error('no QMP greeting')), Math.max(timeoutMs, 1000));
      this.greeting = () => {
        clearTimeout(t);
        resolve();
      };
    });
  }

  private onLine(line: string): void {
    const msg = JSON.parse(line) as QmpReply & { QMP?: unknown; id?: number; event?: string };
    if (msg.QMP) {
      this.greeted = true;
      this.greeting?.();
      return;
    }
    if (msg.id === undefined) return; // an event
    const p = this.pending.get(msg.id);
    this.pending.delete(msg.id);
    p?.resolve(msg);
  }

  execute(command: string, args?: Record<string, unknown>, timeoutMs = 30_000): Promise<QmpReply> {
    if (this.closedError) return Promise.reject(this.closedError);
    const id = this.nextId++;
    return new Promise<QmpReply>((resolve, reject) => {
      const t = setTimeout(() => {
        this.pending.delete(id);
        reject(new Error(`QMP ${command} timed out after ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, {
        resolve: (r) => {
          clearTimeout(t);
          resolve(r);
        },
        reject: (e) => {
          clearTimeout(t);
          reject(e);
        },
      });
      this.socket.write(`${JSON.stringify({ execute: command, id, ...(args ? { arguments: args } : {}) })}\n`);
    });
  }

  /** execute() that throws on a QMP error and returns `return`. */
  async run<T = unknown>(command: string, args?: Record<string, unknown>, timeoutMs?: number): Promise<T> {
    const r = await this.execute(command, args, timeoutMs);
    if (r.error) throw new Error(`QMP ${command}: ${r.error.class}: ${r.error.desc}`);
    return r.return as T;
  }

  close(): void {
    this.socket.destroy();
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

export interface VmOptions {
  /** Working directory for the socket and logs. */
  dir: string;
  name: string;
  memMiB: number;
  machine?: string;
  /** Start with `-incoming defer`. */
  incoming?: boolean;
  extraArgs?: string[];
}

export interface Vm {
  proc: ChildProcess;
  qmp: RawQmp;
  /** Resolves with the exit code when QEMU exits. */
  exited: Promise<number | null>;
  stderr(): string;
  kill(): Promise<void>;
}

export function qemuArgs(o: VmOptions): string[] {
  return [
    '-accel', 'tcg',
    '-m', String(o.memMiB),
    ...(o.machine ? ['-machine', o.machine] : []),
    '-nodefaults',
    '-display', 'none',
    '-qmp', `unix:${path.join(o.dir, `${o.name}.qmp`)},server=on,wait=off`,
    ...(o.incoming ? ['-incoming', 'defer'] : []),
    ...(o.extraArgs ?? []),
  ];
}

export async function startVm(o: VmOptions): Promise<Vm> {
  const sock = path.join(o.dir, `${o.name}.qmp`);
  fs.rmSync(sock, { force: true });
  const proc = spawn('qemu-system-x86_64', qemuArgs(o), { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  proc.stderr?.setEncoding('utf8').on('data', (d: string) => {
    err += d;
  });
  const exited = new Promise<number | null>((resolve) => proc.once('exit', (code) => resolve(code)));
  const deadline = Date.now() + 15_000;
  while (!fs.existsSync(sock)) {
    if (proc.exitCode !== null) throw new Error(`QEMU exited at start: ${err}`);
    if (Date.now() > deadline) throw new Error('QEMU did not create its QMP socket within 15 s');
    await sleep(20);
  }
  const qmp = await RawQmp.connect(sock);
  return {
    proc,
    qmp,
    exited,
    stderr: () => err,
    kill: async () => {
      qmp.close();
      if (proc.exitCode === null) {
        proc.kill('SIGKILL');
        await exited;
      }
    },
  };
}

interface MigrationInfo {
  status?: string;
  'error-desc'?: string;
}

/** Polls query-migrate until completed (or failed / QEMU gone / timeout). */
export async function waitMigration(vm: Vm, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (vm.proc.exitCode !== null) throw new Error(`QEMU exited (code ${vm.proc.exitCode}) during migration: ${vm.stderr()}`);
    const info = await vm.qmp.run<MigrationInfo>('query-migrate');
    if (info.status === 'completed') return;
    if (info.status === 'failed' || info.status === 'cancelled') {
      throw new Error(`migration ${info.status}: ${info['error-desc'] ?? ''} ${vm.stderr()}`);
    }
    if (Date.now() > deadline) throw new Error(`migration still '${info.status}' after ${timeoutMs} ms`);
    await sleep(50);
  }
}

/** Migrates a running VM to `file` (exec:cat) and waits for completion. */
export async function migrateToFile(vm: Vm, file: string, timeoutMs = 120_000): Promise<void> {
  // Lift the 128 MiB/s default so big guests finish quickly; exec:cat is local.
  await vm.qmp.run('migrate-set-parameters', { 'max-bandwidth': 8 * 1024 * 1024 * 1024 });
  await vm.qmp.run('migrate', { uri: `exec:cat > ${file}` });
  await waitMigration(vm, timeoutMs);
}

/** Loads `file` into an `-incoming defer` VM and waits until the incoming migration completed. */
export async function loadFromFile(vm: Vm, file: string, timeoutMs = 120_000): Promise<void> {
  await vm.qmp.run('migrate-incoming', { uri: `exec:cat ${file}` });
  await waitMigration(vm, timeoutMs);
}

/** Boots a VM for `bootMs`, migrates it to `<dir>/<name>.mig` and kills it; returns the path. */
export async function makeStream(o: VmOptions & { bootMs?: number }): Promise<string> {
  const file = path.join(o.dir, `${o.name}.mig`);
  const vm = await startVm(o);
  try {
    await sleep(o.bootMs ?? 1000);
    await migrateToFile(vm, file);
  } finally {
    await vm.kill();
  }
  return file;
}
