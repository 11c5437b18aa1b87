import { appendIndented, childElement, childElementNS, childElements, FTVM_NS, parseDomainXml, removeElement, textOf, type Document, type Element } from './dom.js';

/** Why a VM was stopped (kept in step with @ftvm/kvmclock's PauseCause). */
export type PauseCause = 'checkpoint' | 'user' | 'migration' | 'failover';
export type OnImpossible = 'record' | 'agent' | 'fail';

/** The per-VM clock policy as @ftvm/kvmclock reads it (same fields, same defaults). */
export interface ClockPolicySettings {
  compensate: PauseCause[];
  maxStepMs: number;
  onImpossible: OnImpossible;
}

export const DEFAULT_CLOCK_POLICY: ClockPolicySettings = {
  compensate: ['checkpoint', 'migration', 'failover'],
  maxStepMs: 60_000,
  onImpossible: 'record',
};
export const PAUSE_CAUSES: readonly PauseCause[] = ['checkpoint', 'user', 'migration', 'failover'];
export const ON_IMPOSSIBLE: readonly OnImpossible[] = ['record', 'agent', 'fail'];

/** What ftvm keeps in a domain's `<metadata>` (namespace https://ftvm.dev/xmlns/1). */
export interface Protection {
  protected: boolean;
  /** The other host of the pair (name as the coordinator knows it) and how to reach its libvirtd. */
  peer: { host: string; uri?: string };
  checkpointIntervalMs: number;
  /** Hold the guest's network output until the checkpoint that produced it is committed (default off). */
  outputCommit?: boolean;
  clock: ClockPolicySettings;
  /** ftvm's own QMP socket, as QEMU sees it on the host. */
  qmpSocket: string;
  /** ftvm's own guest-agent socket, when ftvm added one. */
  agentSocket?: string;
  /** The emulator ftvm put in <devices><emulator> (its patched QEMU), if any. */
  emulator?: string;
  /** The operator confirmed that writable disks are on storage the peer shares. */
  sharedStorage: boolean;
  /** Directory of ftvm's sockets on the host (default /run/ftvm). */
  runDir: string;
}

export const PROTECTION_VERSION = '1';

/** The metadata element is present but does not say what ftvm needs. */
export class ProtectionMetadataError extends Error {
  override name = 'ProtectionMetadataError';
}

const yes = (b: boolean) => (b ? 'yes' : 'no');

/** Replaces (or adds) ftvm's metadata element in the document. */
export function writeProtection(doc: Document, protection: Protection): void {
  const root = doc.documentElement!;
  let metadata = childElement(root, 'metadata');
  if (!metadata) {
    metadata = doc.createElement('metadata');
    // libvirt's order puts <metadata> after name/uuid/genid/title/description; libvirt reorders anyway
    const after = ['description', 'title', 'genid', 'uuid', 'name'].map((n) => childElement(root, n)).find(Boolean);
    const next = after ? nextElement(after) : undefined;
    appendIndented(root, metadata, next);
  }
  const old = childElementNS(metadata, FTVM_NS, 'protection');
  if (old) removeElement(old);

  const el = doc.createElementNS(FTVM_NS, 'ftvm:protection');
  el.setAttributeNS('http://www.w3.org/2000/xmlns/', 'xmlns:ftvm', FTVM_NS);
  el.setAttribute('version', PROTECTION_VERSION);
  const child = (name: string, attrs: Record<string, string | undefined>, text?: string) => {
    const c = doc.createElementNS(FTVM_NS, `ftvm:${name}`);
    for (const [k, v] of Object.entries(attrs)) if (v !== undefined) c.setAttribute(k, v);
    if (text !== undefined) c.appendChild(doc.createTextNode(text));
    return c;
  };
  appendIndented(metadata, el);
  appendIndented(el, child('protected', {}, yes(protection.protected)));
  appendIndented(el, child('peer', { host: protection.peer.host, uri: protection.peer.uri }));
  appendIndented(el, child('checkpoint', { 'interval-ms': String(protection.checkpointIntervalMs), 'output-commit': protection.outputCommit === undefined ? undefined : yes(protection.outputCommit) }));
  appendIndented(
    el,
    child('clock', {
      compensate: protection.clock.compensate.join(' '),
      'max-step-ms': String(protection.clock.maxStepMs),
      'on-impossible': protection.clock.onImpossible,
    }),
  );
  appendIndented(el, child('paths', { 'run-dir': protection.runDir, qmp: protection.qmpSocket, agent: protection.agentSocket }));
  if (protection.emulator) appendIndented(el, child('emulator', { path: protection.emulator }));
  appendIndented(el, child('storage', { shared: yes(protection.sharedStorage) }));
}

function nextElement(el: Element): Element | undefined {
  for (let n = el.nextSibling; n; n = n.nextSibling) if (n.nodeType === 1) return n as Element;
  return undefined;
}

/**
 * Reads ftvm's metadata from domain XML (a string or a parsed document); undefined when the domain
 * carries none. Unknown child elements are ignored (a newer ftvm may add some); known ones with a
 * bad value are a ProtectionMetadataError.
 */
export function readProtection(xml: string | Document): Protection | undefined {
  const doc = typeof xml === 'string' ? parseDomainXml(xml) : xml;
  const metadata = childElement(doc.documentElement!, 'metadata');
  const el = metadata && childElementNS(metadata, FTVM_NS, 'protection');
  if (!el) return undefined;
  const get = (name: string) => childElements(el).find((c) => c.namespaceURI === FTVM_NS && c.localName === name);
  const bad = (what: string, value: unknown) => new ProtectionMetadataError(`ftvm metadata: ${what}: ${JSON.stringify(value)}`);

  const protectedText = textOf(get('protected')) ?? 'no';
  if (protectedText !== 'yes' && protectedText !== 'no') throw bad('protected must be yes or no', protectedText);
  const peer = get('peer');
  const host = peer?.getAttribute('host');
  if (!host) throw bad('peer host missing', host ?? null);
  const interval = Number(get('checkpoint')?.getAttribute('interval-ms'));
  if (!Number.isFinite(interval) || interval <= 0) throw bad('checkpoint interval-ms', get('checkpoint')?.getAttribute('interval-ms') ?? null);

  const outputCommitText = get('checkpoint')?.getAttribute('output-commit') || undefined;
  if (outputCommitText !== undefined && outputCommitText !== 'yes' && outputCommitText !== 'no') throw bad('checkpoint output-commit must be yes or no', outputCommitText);

  const clockEl = get('clock');
  const clock = { ...DEFAULT_CLOCK_POLICY };
  if (clockEl) {
    const compensate = (clockEl.getAttribute('compensate') ?? '').split(/\s+/).filter(Boolean);
    for (const c of compensate) if (!PAUSE_CAUSES.includes(c as PauseCause)) throw bad('clock compensate', c);
    if (clockEl.hasAttribute('compensate')) clock.compensate = compensate as PauseCause[];
    if (clockEl.hasAttribute('max-step-ms')) {
      const max = Number(clockEl.getAttribute('max-step-ms'));
      if (!Number.isFinite(max) || max <= 0) throw bad('clock max-step-ms', clockEl.getAttribute('max-step-ms'));
      clock.maxStepMs = max;
    }
    const on = clockEl.getAttribute('on-impossible');
    if (on !== null && on !== '') {
      if (!ON_IMPOSSIBLE.includes(on as OnImpossible)) throw bad('clock on-impossible', on);
      clock.onImpossible = on as OnImpossible;
    }
  }
  const paths = get('paths');
  const qmp = paths?.getAttribute('qmp');
  if (!qmp) throw bad('paths qmp missing', qmp ?? null);
  const agent = paths?.getAttribute('agent');
  const emulator = get('emulator')?.getAttribute('path');
  const peerUri = peer?.getAttribute('uri');
  return {
    protected: protectedText === 'yes',
    peer: peerUri ? { host, uri: peerUri } : { host },
    checkpointIntervalMs: interval,
    ...(outputCommitText ? { outputCommit: outputCommitText === 'yes' } : {}),
    clock,
    qmpSocket: qmp,
    ...(agent ? { agentSocket: agent } : {}),
    ...(emulator ? { emulator } : {}),
    sharedStorage: get('storage')?.getAttribute('shared') === 'yes',
    runDir: paths?.getAttribute('run-dir') || '/run/ftvm',
  };
}
