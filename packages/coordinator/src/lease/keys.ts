/**
 * ftvm's key layout in etcd, under a cluster prefix such as `/ftvm`:
 *   <prefix>/vms/<vm>/owner   the host allowed to run the VM (value: host name), attached to that host's lease
 *   <prefix>/vms/<vm>/spec    the VM's protection record (JSON, see the agent's vm-records)
 */
const VM_NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/;

/** `/ftvm/` → `/ftvm`; refuses what would make keys ambiguous. */
export function normalizePrefix(prefix: string): string {
  const trimmed = prefix.replace(/\/+$/, '');
  if (!trimmed.startsWith('/')) throw new Error(`etcd key prefix must start with '/', got ${JSON.stringify(prefix)}`);
  return trimmed;
}

function checkVm(vm: string): string {
  if (!VM_NAME.test(vm)) throw new Error(`not a VM name usable in an etcd key: ${JSON.stringify(vm)} (letters, digits, _ . -)`);
  return vm;
}

export const vmsPrefix = (prefix: string) => `${normalizePrefix(prefix)}/vms/`;
export const ownerKey = (prefix: string, vm: string) => `${normalizePrefix(prefix)}/vms/${checkVm(vm)}/owner`;
export const specKey = (prefix: string, vm: string) => `${normalizePrefix(prefix)}/vms/${checkVm(vm)}/spec`;

/**
 * The VM whose record `key` is (`<prefix>/vms/<vm>/spec` → `vm`), or undefined for any other key
 * under the prefix (owner keys, a name no VM can have).
 */
export function vmOfSpecKey(prefix: string, key: string): string | undefined {
  const start = vmsPrefix(prefix);
  if (!key.startsWith(start) || !key.endsWith('/spec')) return undefined;
  const vm = key.slice(start.length, -'/spec'.length);
  return VM_NAME.test(vm) ? vm : undefined;
}
