export { DriftLedger, PauseTracker, type PauseCause, type PauseEntry, type HostClockOffset, type UncorrectedReason, type Actuator, type Correction, type LedgerSummary, type ResidualMeasurement, type Jsonified } from './ledger.js';
export {
  loadWithLateClockRewrite,
  loadAndResumeOnTime,
  resumeOnTime,
  type OnTimeResume,
  type LateRewriteResult,
  type ResumeOnTimeOptions,
  type ResumeOnTimeResult,
} from './late-rewrite-load.js';
export {
  checkpointStopInstant,
  checkpointVirtualClockNs,
  stopInstantFromClock,
  type StopInstant,
  type StopInstantOptions,
  type VirtualClockReference,
} from './stop-instant.js';
export { realtimeClock, realtimeAnchorNs, type RealtimeClock } from './realtime.js';
export { advanceClockSections, splitAssembledCheckpoint, splitCheckpoint, type ClockSectionAdvance, type SplitCheckpoint } from './stream-rewrite.js';
export { InPlaceActuator, GuestAgentActuator, COMPENSATE_COMMAND, QUERY_COMPENSATION_COMMAND, DISARM_COMMAND, type AppliedCompensation } from './actuators.js';
export { ClockHook, ClockCorrectionImpossibleError, type ClockHookOptions } from './clock-hook.js';
export { parsePolicy, validatePolicy, PolicyError, DEFAULT_POLICY, type ClockPolicy, type OnImpossible } from './policy.js';
export { CLOCKSOURCE_LIMIT_NS, safeStepNs, machineClocks, describeMachineClocks, planSteps, type GuestClocksource, type MachineClocks } from './clocksource.js';
export {
  stepClockInPlace,
  followUpAfterRestore,
  firstStepNs,
  LATENESS_TOLERANCE_NS,
  InPlaceStepError,
  type ClockFollowUp,
  type InPlaceStep,
  type InPlaceStepsResult,
  type InPlaceStepsOptions,
} from './in-place-steps.js';
export { DEFAULT_LAG_MODEL, KVM_DEFAULT_CLOCKSOURCE, pauseKind, lagModelFor, validateLagModel, stopsWithVm, correctionReaches, pauseLagNs, predictionCandidates, type Accelerator, type LagModel, type PauseKind } from './lag-model.js';
