#!/usr/bin/env node
import { runCli } from '../cli/program.js';

const code = await runCli(process.argv.slice(2));
process.exitCode = code;
// Whatever still holds the event loop (a stopped agent's stray handle) must not keep the process alive.
setTimeout(() => process.exit(code), 1_000).unref();
