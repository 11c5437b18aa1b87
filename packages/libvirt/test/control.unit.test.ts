import { describe, expect, it } from 'vitest';
import {
  classifyLibvirtError,
  DomainExistsError,
  DomainNotFoundError,
  DomainStateError,
  LibvirtConnectionError,
  LibvirtError,
  parseLifecycleLine,
} from '@ftvm/libvirt';

describe('lifecycle lines from virsh event --timestamp', () => {
  it('parses events with one- and multi-word details', () => {
    expect(parseLifecycleLine("2026-11-30 19:04:57.219+0000: event 'lifecycle' for domain 'lv-scratch': Started Booted", 5)).toEqual({
      domain: 'lv-scratch',
      event: 'started',
      detail: 'Booted',
      timestamp: new Date('2026-11-30T19:04:57.219Z'),
      receivedAtMs: 5,
    });
    expect(parseLifecycleLine("2026-11-30 19:04:59.238+0000: event 'lifecycle' for domain 'a': Shutdown Finished after host request")).toMatchObject({
      event: 'shutdown',
      detail: 'Finished after host request',
    });
    expect(parseLifecycleLine("2026-11-30 19:04:59.238+0000: event 'lifecycle' for domain 'it's': Undefined Removed")).toMatchObject({ domain: "it's", event: 'undefined' });
  });

  it('ignores anything else', () => {
    expect(parseLifecycleLine('event loop interrupted')).toBeUndefined();
    expect(parseLifecycleLine("2026-11-30 19:04:59.238+0000: event 'reboot' for domain 'a'")).toBeUndefined();
    expect(parseLifecycleLine("2026-11-30 19:04:59.238+0000: event 'lifecycle' for domain 'a': Exploded Loudly")).toBeUndefined();
  });
});

describe('libvirt errors', () => {
  const classify = (message: string) => classifyLibvirtError('start', 'vm1', 'qemu:///system', new Error(message));

  it('picks the type from libvirt message prefixes and names domain and operation', () => {
    const notFound = classify("Domain not found: no domain with matching name 'vm1'");
    expect(notFound).toBeInstanceOf(DomainNotFoundError);
    expect(notFound.message).toBe("libvirt start of domain 'vm1' on qemu:///system failed: Domain not found: no domain with matching name 'vm1'");
    expect(notFound).toMatchObject({ operation: 'start', domain: 'vm1', uri: 'qemu:///system' });
    expect(classify('Requested operation is not valid: domain is not running')).toBeInstanceOf(DomainStateError);
    expect(classify("operation failed: domain 'vm1' already exists with uuid 1234")).toBeInstanceOf(DomainExistsError);
    expect(classify("Failed to connect socket to '/run/libvirt/libvirt-sock': No such file or directory")).toBeInstanceOf(LibvirtConnectionError);
    const other = classify('internal error: missing domain type attribute');
    expect(other.constructor).toBe(LibvirtError);
  });

  it('strips virsh\'s "error:" prefixes and joins lines', () => {
    const e = classify("error: failed to get domain 'vm1'\nerror: Domain not found: no domain with matching name 'vm1'");
    expect(e).toBeInstanceOf(DomainNotFoundError);
    expect(e.libvirtMessage).toBe("failed to get domain 'vm1'; Domain not found: no domain with matching name 'vm1'");
  });
});
