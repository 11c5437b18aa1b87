/** zx for the lab: quiet, and no command runs unbounded (30 s unless the call says otherwise). */
import { $ } from 'zx';

export const sh = $({ quiet: true, timeout: '30s' });

export const shWithin = (timeoutMs: number) => $({ quiet: true, timeout: timeoutMs });
