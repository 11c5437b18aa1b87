import { Listr, PRESET_TIMER } from 'listr2';
import type { Progress, ProgressEvent } from '../agent/control.js';

/**
 * Renders an operation's progress stream with listr2: a row per step, ✔ or ✖ with its detail and
 * duration. Steps arrive one at a time from the agent, so each is its own Listr run, serialized
 * (a step that starts while another is still open is shown once that one ends). Without a TTY,
 * on CI, or with TERM=dumb, listr2's `simple` renderer prints one line per state change instead.
 */
export interface ProgressView {
  readonly progress: Progress;
  /** Closes steps still open (done when the operation succeeded, failed otherwise) and waits for the rendering. */
  finish(succeeded: boolean): Promise<void>;
}

interface OpenStep {
  resolve(detail: string | undefined): void;
  reject(error: Error): void;
}

export interface ProgressViewOptions {
  /** Force the line-per-event renderer (default: when stdout is not a TTY, on CI, or TERM=dumb). */
  simple?: boolean;
}

export function createProgressView(options: ProgressViewOptions = {}): ProgressView {
  const simple = options.simple ?? (process.stdout.isTTY !== true || Boolean(process.env.CI) || process.env.TERM === 'dumb');
  const open = new Map<string, OpenStep>();
  let rendering: Promise<void> = Promise.resolve();

  const startStep = (step: string): OpenStep => {
    let settle!: OpenStep;
    const outcome = new Promise<string | undefined>((resolve, reject) => (settle = { resolve, reject }));
    outcome.catch(() => undefined); // observed by the Listr task below; never an unhandled rejection
    const list = new Listr(
      [
        {
          title: step,
          task: async (_ctx, task) => {
            const detail = await outcome;
            if (detail) task.title = `${step}: ${detail}`;
          },
        },
      ],
      {
        renderer: 'default',
        fallbackRenderer: 'simple',
        fallbackRendererCondition: simple,
        registerSignalListeners: false,
        exitOnError: true,
        rendererOptions: { timer: PRESET_TIMER, collapseErrors: false },
        fallbackRendererOptions: { timer: PRESET_TIMER },
      },
    );
    rendering = rendering.then(() => list.run().then(
      () => undefined,
      () => undefined, // a failed step is shown by the renderer; the operation's error is reported by the caller
    ));
    open.set(step, settle);
    return settle;
  };

  const progress = (event: ProgressEvent) => {
    const step = open.get(event.step) ?? (event.state === 'start' ? undefined : startStep(event.step));
    switch (event.state) {
      case 'start':
        if (!step) startStep(event.step);
        return;
      case 'done':
        open.delete(event.step);
        step?.resolve(event.detail);
        return;
      case 'fail':
        open.delete(event.step);
        step?.reject(new Error(event.detail));
        return;
    }
  };

  return {
    progress,
    async finish(succeeded) {
      for (const [name, step] of open) {
        open.delete(name);
        if (succeeded) step.resolve(undefined);
        else step.reject(new Error('did not finish'));
      }
      await rendering;
    },
  };
}
