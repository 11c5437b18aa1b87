import fs from 'node:fs';
import { StandbyRam, type StandbyRamApplied } from '@ftvm/transport';
import type { Log } from './types.js';

/** A missed inotify event (or none at all) delays an apply at most this long. */
const POLL_MS = 1_000;

/** What the status says of a standby's RAM. */
export type StandbyRamState = 'cold' | 'warm' | 'behind';

/**
 * Applies every checkpoint the store commits to a mapped standby's RAM file as it commits (the
 * store directory is watched; a poll catches what a watch misses). One catch-up runs at a time; a
 * commit during one starts the next right after it.
 */
export class StandbyRamFollower {
  private watcher: fs.FSWatcher | undefined;
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<void> | undefined;
  private again = false;
  private stopped = true;
  private warned = false;
  /** The last catch-up's failure, until one succeeds. */
  lastError: string | undefined;

  constructor(
    readonly ram: StandbyRam,
    private readonly storeDir: string,
    private readonly log: Log,
    private readonly onApplied: (applied: StandbyRamApplied) => void = () => undefined,
  ) {}

  /** Starts following (again, after stop: the file is as the last apply left it). */
  start(): void {
    if (!this.stopped) return;
    this.stopped = false;
    this.ram.reopen();
    try {
      fs.mkdirSync(this.storeDir, { recursive: true });
    } catch (error) {
      // a store broken for now (not a directory, no space): the polling below catches up once it mends
      this.log.warn({ err: (error as Error).message, dir: this.storeDir }, 'the checkpoint store is not usable yet: the standby RAM follows it when it is');
    }
    try {
      this.watcher = fs.watch(this.storeDir, (_event, name) => {
        if (name === null || name.endsWith('.json')) this.kick(); // metadata is written last: the commit
      });
      this.watcher.on('error', () => this.watcher?.close());
    } catch (error) {
      this.log.warn({ err: (error as Error).message, dir: this.storeDir }, 'cannot watch the checkpoint store: the standby RAM follows it by polling');
    }
    this.timer = setInterval(() => this.kick(), POLL_MS);
    this.timer.unref();
    this.kick();
  }

  /** Stops after the apply under way (if any); the file then holds a whole checkpoint, or none. */
  async stop(): Promise<void> {
    this.stopped = true;
    this.watcher?.close();
    this.watcher = undefined;
    clearInterval(this.timer);
    await this.ram.close();
    await this.running;
  }

  /** Applies what is committed now, then stops (a failover takes the standby). */
  async settle(): Promise<void> {
    this.stopped = true;
    this.watcher?.close();
    this.watcher = undefined;
    clearInterval(this.timer);
    await this.running;
    await this.catchUp();
    await this.ram.close();
  }

  /** Where the file stands against the newest checkpoint this store may apply. */
  state(newestEpoch: number | undefined): StandbyRamState {
    const epoch = this.ram.epoch;
    if (epoch === undefined) return 'cold';
    return newestEpoch === undefined || epoch >= newestEpoch ? 'warm' : 'behind';
  }

  private kick(): void {
    if (this.stopped) return;
    if (this.running) {
      this.again = true;
      return;
    }
    this.running = (async () => {
      do {
        this.again = false;
        await this.catchUp();
      } while (this.again && !this.stopped);
    })().finally(() => {
      this.running = undefined;
    });
  }

  private async catchUp(): Promise<void> {
    const wasCold = this.ram.epoch === undefined;
    try {
      for (const applied of await this.ram.catchUp()) {
        this.log.debug({ ...applied }, 'standby RAM at checkpoint');
        this.onApplied(applied);
      }
      this.lastError = undefined;
      this.warned = false;
      if (wasCold && this.ram.epoch !== undefined) this.log.info({ epoch: this.ram.epoch, file: this.ram.file }, 'standby RAM warm: a failover loads only device state');
    } catch (error) {
      this.lastError = (error as Error).message;
      if (!this.warned) this.log.warn({ err: this.lastError }, 'cannot apply a checkpoint to the standby RAM (a failover loads the whole checkpoint)');
      this.warned = true;
    }
  }
}
