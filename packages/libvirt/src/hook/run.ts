/**
 * What the installed hook script runs for ftvm's domains: `node run.js <libvirt hook args>` with the
 * hook's configuration (JSON) in FTVM_HOOK_CONFIG and the domain XML on stdin.
 */
import { runInstalledHook } from './main.js';

let config: object = {};
try {
  config = JSON.parse(process.env['FTVM_HOOK_CONFIG'] ?? '{}') as object;
} catch {
  // defaults
}
await runInstalledHook(config);
