/**
 * Watches for two running copies of one probe VM: every `everyMs` it asks the guest probe on each
 * host at once (the probe's port follows the VM to whichever host runs it). A copy whose vCPUs are
 * stopped does not answer; two answers whose round trips overlap in time mean two guests ran at
 * the same instant.
 */
import { clockOffset, hostRealtimeNs, realtimeAnchorNs, type ProbeTarget } from './probe-client.js';

export interface CopyAnswer {
  host: string;
  /** host realtime of the request and of the reply (ns) */
  sentNs: bigint;
  answeredNs: bigint;
  bootId: bigint;
  counter: bigint;
}

export interface CopiesReport {
  rounds: number;
  /** rounds in which no copy answered */
  silentRounds: number;
  /** pairs of overlapping answers from two hosts */
  doubles: [CopyAnswer, CopyAnswer][];
  /** hosts that answered at least once, in order of first answer */
  answeredFrom: string[];
  /** the longest interval no copy answered (ms) */
  longestSilenceMs: number;
  /** the guest boots seen (one: the VM never restarted) */
  bootIds: string[];
  /** answers whose workload counter was below an earlier answer's (the guest went back in time) */
  counterRegressions: number;
}


export function watchCopies(targets: Record<string, ProbeTarget>, options: { everyMs?: number } = {}): { stop(): Promise<CopiesReport> } {
  const everyMs = options.everyMs ?? 50;
  const report: CopiesReport = { rounds: 0, silentRounds: 0, doubles: [], answeredFrom: [], longestSilenceMs: 0, bootIds: [], counterRegressions: 0 };
  let highestCounter: bigint | undefined;
  let running = true;
  let lastAnswerAt = performance.now();
  // one anchor for the whole watch: anchoring spins on Date.now() and can fail on a busy host
  const anchor = realtimeAnchorNs();
  const realtimeNs = () => hostRealtimeNs(anchor);
  const loop = (async () => {
    while (running) {
      const started = performance.now();
      const answers = (
        await Promise.all(
          Object.entries(targets).map(async ([host, target]): Promise<CopyAnswer | undefined> => {
            try {
              const sentNs = realtimeNs();
              const o = await clockOffset(target, { samples: 1, timeoutMs: Math.max(10, everyMs - 10) });
              return { host, sentNs, answeredNs: realtimeNs(), bootId: o.bootId, counter: o.workloadCounter };
            } catch {
              return undefined;
            }
          }),
        )
      ).filter((a): a is CopyAnswer => a !== undefined);
      report.rounds++;
      if (answers.length === 0) report.silentRounds++;
      else {
        report.longestSilenceMs = Math.max(report.longestSilenceMs, performance.now() - lastAnswerAt);
        lastAnswerAt = performance.now();
      }
      for (const a of answers) {
        if (!report.answeredFrom.includes(a.host)) report.answeredFrom.push(a.host);
        if (!report.bootIds.includes(String(a.bootId))) report.bootIds.push(String(a.bootId));
        if (highestCounter !== undefined && a.counter < highestCounter) report.counterRegressions++;
        if (highestCounter === undefined || a.counter > highestCounter) highestCounter = a.counter;
      }
      for (let i = 0; i < answers.length; i++) {
        for (let j = i + 1; j < answers.length; j++) {
          const [a, b] = [answers[i]!, answers[j]!];
          if (a.sentNs <= b.answeredNs && b.sentNs <= a.answeredNs) report.doubles.push([a, b]);
        }
      }
      await new Promise((r) => setTimeout(r, Math.max(0, everyMs - (performance.now() - started))));
    }
  })();
  return {
    async stop() {
      running = false;
      await loop;
      return report;
    },
  };
}
