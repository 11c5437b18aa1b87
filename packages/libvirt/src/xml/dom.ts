import { DOMParser, XMLSerializer, type Document, type Element, type Node } from '@xmldom/xmldom';

export const QEMU_NS = 'http://libvirt.org/schemas/domain/qemu/1.0';
export const FTVM_NS = 'https://ftvm.dev/xmlns/1';
const XMLNS_NS = 'http://www.w3.org/2000/xmlns/';

const ELEMENT_NODE = 1;
const TEXT_NODE = 3;

/** The input is not well-formed XML, or not a libvirt domain. */
export class DomainXmlError extends Error {
  override name = 'DomainXmlError';
}

/**
 * Parses domain XML with @xmldom/xmldom, strictly: any parser error or warning (a stray `&`, an
 * unclosed tag, a duplicate attribute) is a DomainXmlError rather than a silently repaired tree.
 */
export function parseDomainXml(xml: string): Document {
  // xmldom repairs a bare '&' silently; libvirt (libxml2) would refuse it, so do we
  const bare = /&(?!(?:[A-Za-z_][\w.-]*|#\d+|#x[0-9A-Fa-f]+);)/.exec(xml.replace(/<!--[\s\S]*?-->|<!\[CDATA\[[\s\S]*?\]\]>/g, (m) => ' '.repeat(m.length)));
  if (bare) throw new DomainXmlError(`domain XML is not well-formed: unescaped '&' at offset ${bare.index}`);
  let doc: Document;
  try {
    doc = new DOMParser({
      onError: (level, message) => {
        throw new DomainXmlError(`domain XML is not well-formed (${level}): ${message}`);
      },
    }).parseFromString(xml, 'text/xml');
  } catch (error) {
    if (error instanceof DomainXmlError) throw error;
    const cause = (error as { cause?: unknown }).cause;
    throw new DomainXmlError(`domain XML is not well-formed: ${cause instanceof DomainXmlError ? cause.message : (error as Error).message}`);
  }
  const root = doc.documentElement;
  if (!root || root.localName !== 'domain' || root.namespaceURI) throw new DomainXmlError(`not a libvirt domain: the root element is <${root?.tagName ?? '(none)'}>, expected <domain>`);
  return doc;
}

/** Serializes without adding or dropping anything (no pretty-printing: the text nodes are kept). */
export function serializeXml(doc: Document): string {
  return new XMLSerializer().serializeToString(doc);
}

export function childElements(parent: Element | Document, name?: string): Element[] {
  const out: Element[] = [];
  for (let n: Node | null = parent.firstChild; n; n = n.nextSibling) {
    if (n.nodeType === ELEMENT_NODE && (name === undefined || (n as Element).tagName === name)) out.push(n as Element);
  }
  return out;
}

export function childElement(parent: Element, name: string): Element | undefined {
  return childElements(parent, name)[0];
}

export function childElementNS(parent: Element, ns: string, localName: string): Element | undefined {
  for (let n: Node | null = parent.firstChild; n; n = n.nextSibling) {
    if (n.nodeType === ELEMENT_NODE && (n as Element).namespaceURI === ns && (n as Element).localName === localName) return n as Element;
  }
  return undefined;
}

/** Elements at a `/`-separated path below `parent`, e.g. `devices/disk`. */
export function elementsAt(parent: Element, path: string): Element[] {
  let current: Element[] = [parent];
  for (const step of path.split('/')) current = current.flatMap((el) => childElements(el, step));
  return current;
}

export function textOf(el: Element | undefined): string | undefined {
  if (!el) return undefined;
  let text = '';
  for (let n: Node | null = el.firstChild; n; n = n.nextSibling) if (n.nodeType === TEXT_NODE) text += (n as unknown as { data: string }).data;
  return text.trim();
}

/** `/domain/devices/hostdev[2]`: the element's position among same-named siblings, 1-based. */
export function elementPath(el: Element): string {
  const parts: string[] = [];
  for (let cur: Element | null = el; cur; cur = cur.parentNode && cur.parentNode.nodeType === ELEMENT_NODE ? (cur.parentNode as Element) : null) {
    const parent = cur.parentNode;
    const siblings = parent && parent.nodeType === ELEMENT_NODE ? childElements(parent as Element, cur.tagName) : [cur];
    parts.unshift(siblings.length > 1 ? `${cur.tagName}[${siblings.indexOf(cur) + 1}]` : cur.tagName);
  }
  return `/${parts.join('/')}`;
}

/** Indentation of `el`'s children, guessed from the document (libvirt uses two spaces). */
function indentFor(parent: Element): { inner: string; outer: string } {
  const prev = parent.previousSibling;
  const outer = prev && prev.nodeType === TEXT_NODE ? ((prev as unknown as { data: string }).data.split('\n').pop() ?? '') : '';
  const first = parent.firstChild;
  const guessed = first && first.nodeType === TEXT_NODE ? ((first as unknown as { data: string }).data.split('\n').pop() ?? '') : undefined;
  return { outer, inner: guessed !== undefined && guessed.length > outer.length ? guessed : `${outer}  ` };
}

/**
 * Appends `child` as the last element of `parent`, keeping the surrounding indentation tidy (so a
 * generated document reads like one libvirt wrote). Only whitespace text nodes are added.
 */
export function appendIndented(parent: Element, child: Element, before?: Element): Element {
  const doc = parent.ownerDocument!;
  const { inner, outer } = indentFor(parent);
  if (before) {
    parent.insertBefore(child, before);
    parent.insertBefore(doc.createTextNode(`\n${inner}`), before);
    return child;
  }
  const last = parent.lastChild;
  if (last && last.nodeType === TEXT_NODE && /^\s*$/.test((last as unknown as { data: string }).data)) {
    parent.insertBefore(doc.createTextNode(`\n${inner}`), last);
    parent.insertBefore(child, last);
  } else {
    parent.appendChild(doc.createTextNode(`\n${inner}`));
    parent.appendChild(child);
    parent.appendChild(doc.createTextNode(`\n${outer}`));
  }
  // the first child of a previously empty parent: drop the duplicate leading newline
  return child;
}

/** Removes `el` together with the whitespace text node in front of it. */
export function removeElement(el: Element): void {
  const parent = el.parentNode;
  if (!parent) return;
  const prev = el.previousSibling;
  if (prev && prev.nodeType === TEXT_NODE && /^\s*$/.test((prev as unknown as { data: string }).data)) parent.removeChild(prev);
  parent.removeChild(el);
}

/** The prefix bound to `ns` on the root, declaring `preferred` if there is none. */
export function ensureNamespace(doc: Document, ns: string, preferred: string): string {
  const root = doc.documentElement!;
  const existing = root.lookupPrefix(ns);
  if (existing) return existing;
  let prefix = preferred;
  for (let i = 2; root.lookupNamespaceURI(prefix); i++) prefix = `${preferred}${i}`;
  root.setAttributeNS(XMLNS_NS, `xmlns:${prefix}`, ns);
  return prefix;
}

export function isElement(n: Node | null | undefined): n is Element {
  return !!n && n.nodeType === ELEMENT_NODE;
}

export type { Document, Element };
