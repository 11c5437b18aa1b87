export { DriftLedger, PauseTracker, type PauseCause, type PauseEntry, type Actuator, type Correction, type LedgerSummary, type ResidualMeasurement } from './ledger.js';
export { loadWithLateClockRewrite, type LateRewriteResult } from './late-rewrite-load.js';
export { advanceClockSections, splitCheckpoint, type ClockSectionAdvance, type SplitCheckpoint } from './stream-rewrite.js';
export { InPlaceActuator, GuestAgentActuator, COMPENSATE_COMMAND, QUERY_COMPENSATION_COMMAND, type AppliedCompensation } from './actuators.js';
export { ClockHook, type ClockHookOptions } from './clock-hook.js';
export { parsePolicy, validatePolicy, PolicyError, DEFAULT_POLICY, type ClockPolicy, type OnImpossible } from './policy.js';
