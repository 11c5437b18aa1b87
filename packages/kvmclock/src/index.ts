export { DriftLedger, PauseTracker, type PauseCause, type PauseEntry, type Actuator, type Correction, type LedgerSummary, type ResidualMeasurement } from './ledger.js';
export { advanceClockSections, splitCheckpoint, type ClockSectionAdvance, type SplitCheckpoint } from './stream-rewrite.js';
