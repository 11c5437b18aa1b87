export {
  LibvirtConnection,
  type ConnectOptions,
  type CallOptions,
  type DomainInfo,
  type DomainStateName,
  type BrokenEvent,
  type ReconnectEvent,
} from './connection.js';
export {
  LibvirtError,
  DomainNotFoundError,
  DomainStateError,
  DomainExistsError,
  LibvirtConnectionError,
  LibvirtTimeoutError,
  classifyLibvirtError,
} from './errors.js';
export { LifecycleEventStream, parseLifecycleLine, type LifecycleEvent, type LifecycleEventType, type LifecycleStreamOptions } from './events.js';
export { virsh, type VirshOptions } from './virsh.js';
export {
  makeFtReady,
  setIncomingDefer,
  fixFtvmPaths,
  ftvmQemuArgs,
  NotProtectableError,
  DEFAULT_RUN_DIR,
  DEFAULT_CHECKPOINT_INTERVAL_MS,
  type FtReadyOptions,
  type FtReadyResult,
  type ProtectionOptions,
  type ProbeOptions,
  type PathFixResult,
} from './xml/ft-ready.js';
export { checkProtectable, describeFindings, type Finding, type FindingSeverity } from './xml/checks.js';
export { replicatedDisks, standbyDomainXml, type ReplicatedDisk } from './xml/disks.js';
export { serviceNics, type DomainNic } from './xml/nics.js';
export { withSharedRamFile, type SharedRamXml } from './xml/memory.js';
export {
  readProtection,
  ProtectionMetadataError,
  DEFAULT_CLOCK_POLICY,
  PROTECTION_VERSION,
  type Protection,
  type ClockPolicySettings,
  type PauseCause,
  type OnImpossible,
} from './xml/protection.js';
export { parseDomainSpec, domainSpecToXml, ftReadyFromSpec, SpecError, type DomainSpec, type DiskSpec, type FtDomainSpec } from './xml/spec.js';
export { validateDomainXml, validatorAvailable, ValidatorMissingError, type ValidationResult } from './xml/validate.js';
export { parseDomainXml, serializeXml, DomainXmlError, FTVM_NS, QEMU_NS } from './xml/dom.js';
export { deviceSignature } from './xml/device-signature.js';
export {
  restoreFromCheckpoint,
  PreparedRestore,
  type PrepareOptions,
  type LoadOptions,
  defaultStreamWriter,
  RestoreError,
  type RestoreOptions,
  type RestoreResult,
  type RestoreTimings,
  type StreamWriter,
  type ResumeFunction,
} from './restore.js';
export { runHook, hookLog, DEFAULT_HOOK_CONFIG, type HookConfig, type HookInvocation, type HookOutcome } from './hook/hook.js';
export { notify, parseEndpoint, type Endpoint, type HookMessage, type NotifyResult } from './hook/notify.js';
export { installHook, uninstallHook, installedHook, reloadLibvirtd, defaultMainModule, HOOK_MARKER, type InstallOptions, type InstallResult } from './hook/install.js';
