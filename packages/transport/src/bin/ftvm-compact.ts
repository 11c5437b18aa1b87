#!/usr/bin/env node
/**
 * ftvm-compact: the checkpoint store's compaction worker (store/compaction.ts). Reads one job
 * (JSON: the store directory, the chain's metadata, the temporary to write) on stdin, writes one
 * JSON reply on stdout. Later lines `pause` and `resume` hold it between slices of work while the
 * store commits a checkpoint (100 ms at most per pause); `hurry` (it is behind the chain's growth)
 * ends the pauses and its low priority. It ends when its stdin closes: the store that started it is gone.
 */
import fs from 'node:fs';
import os from 'node:os';
import { PauseGate, replyOf, writeCompactedChain, type CompactionJob, type CompactionReply } from '../store/compaction.js';

// The store started this process in a session of its own; with autogroups on (sched(7)) its
// nice value counts only inside that session's autogroup, so the autogroup is niced as well.
setNice(19);

/** This process's autogroup and every thread of it (the store hurries a worker that is behind). */
function setNice(nice: number): void {
  try {
    fs.writeFileSync('/proc/self/autogroup', String(nice));
  } catch {
    // no autogroups (kernel without them, or not Linux): the threads' own nice values count
  }
  let threads: string[] = [];
  try {
    threads = fs.readdirSync('/proc/self/task');
  } catch {
    // not Linux: `nice` set the whole process already, and there is no hurrying it
  }
  for (const tid of threads) {
    try {
      os.setPriority(Number(tid), nice); // on Linux a thread id names just that thread
    } catch {
      // raising priority needs CAP_SYS_NICE: without it the worker stays niced (but unpaused)
    }
  }
}

let input = '';
let started = false;
const gate = new PauseGate();
process.stdin.setEncoding('utf8');
process.stdin.on('data', (text: string) => {
  input += text;
  for (let newline = input.indexOf('\n'); newline >= 0; newline = input.indexOf('\n')) {
    const line = input.slice(0, newline);
    input = input.slice(newline + 1);
    if (!started) {
      started = true;
      void run(line);
    } else if (line === 'pause') {
      gate.pause();
    } else if (line === 'resume') {
      gate.resume();
    } else if (line === 'hurry') {
      gate.hurry();
      setNice(0);
    }
  }
});
process.stdin.on('end', () => process.exit(started ? 3 : 2));

/** Between slices of work: the event loop runs (pause/resume lines arrive), and a pause waits. */
async function turn(): Promise<void> {
  await new Promise((resolve) => setImmediate(resolve));
  await gate.passed();
}

async function run(line: string): Promise<void> {
  let reply: CompactionReply;
  try {
    const job = JSON.parse(line) as CompactionJob;
    if (typeof job.dir !== 'string' || typeof job.tmp !== 'string' || !Array.isArray(job.chain) || job.chain.length < 2) {
      throw new Error('a job needs dir, tmp and a chain of at least two checkpoints');
    }
    reply = replyOf({ result: await writeCompactedChain(job, turn) });
  } catch (error) {
    reply = replyOf({ error });
  }
  process.stdout.write(`${JSON.stringify(reply)}\n`, () => process.exit(0));
}
