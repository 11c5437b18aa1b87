#!/usr/bin/env bash
# The Vagrant lab end to end, in one command, on a machine without /dev/kvm or a route out:
#
#   bash vagrant/lab.sh          # box, three VMs, provisioning (twice), a protected probe VM,
#                                # `virsh destroy` of primary, failover, `vagrant up primary`,
#                                # `ftvm reprotect`; prints each step's time, writes
#                                # bench/results/vagrant-lab.json, then `vagrant destroy -f`
#   bash vagrant/lab.sh --ci     # box, `primary` alone (FTVM_VAGRANT_HOSTS=primary: its own etcd),
#                                # provisioned twice, the agent's unit active; then `vagrant
#                                # destroy -f` (what .ci/run covers)
#   --keep                       # leave the VMs up at the end (tear down: vagrant destroy -f)
#   --reuse                      # with VMs a --keep run left: skip up and provisioning (their
#                                # figures are then absent from the JSON); for working on the story
#
# Run as root after scripts/bootstrap.sh (Vagrant, vagrant-libvirt, Ansible, libvirt, the built
# tree). It starts the machine's libvirtd itself when there is no systemd. Environment:
#   FTVM_VAGRANT_ACCEL   kvm or tcg; default kvm when this machine's /dev/kvm works, else tcg.
#                        Nested KVM is used when the host offers it; otherwise the VMs' own guest
#                        (the probe VM) runs under TCG inside them.
#   FTVM_VAGRANT_RESULTS where the JSON goes (default bench/results/vagrant-lab.json; --ci: none)
set -euo pipefail
# (everything below is in main, read whole before it runs: editing this file mid-run is safe)
main() {
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
mode=full keep=0 reuse=0
for arg in "$@"; do
  case $arg in
    --ci) mode=ci ;;
    --keep) keep=1 ;;
    --reuse) reuse=1 ;;
    *) echo "lab.sh: unknown argument '$arg' (use --ci, --keep, --reuse)" >&2; exit 2 ;;
  esac
done
results="${FTVM_VAGRANT_RESULTS-}"
[[ -n $results || $mode == ci ]] || results="$repo/bench/results/vagrant-lab.json"
state="$repo/vagrant/.vagrant/lab"
mkdir -p "$state"
ssh_config="$state/ssh_config"
export VAGRANT_CWD="$here"
# each task's time in the provision logs
export ANSIBLE_CALLBACKS_ENABLED=ansible.posix.profile_tasks

t0=$(date +%s.%N)
log() { printf '\033[1m[vagrant-lab %6.1fs]\033[0m %s\n' "$(since "$t0")" "$*"; }
die() { printf '\033[1m[vagrant-lab]\033[0m error: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$(now)" -v b="$1" 'BEGIN { printf "%.1f", a - b }'; }
# A step's stdout+stderr into $state/<name>.log, bounded by a deadline; its tail on failure.
step_run() {
  local name="$1" deadline="$2"
  shift 2
  if ! timeout --kill-after=30 "$deadline" "$@" >"$state/$name.log" 2>&1; then
    tail -n 40 "$state/$name.log" >&2
    die "$name failed or ran past ${deadline}s: $* (log: $state/$name.log)"
  fi
}
vssh() { # vssh HOST CMD...: a command in a VM as root, bounded
  local host="$1"
  shift
  # ssh hands the remote shell one string: the arguments quoted once for it
  timeout --kill-after=10 "${VSSH_TIMEOUT:-120}" ssh -F "$ssh_config" -o ConnectTimeout=20 "$host" sudo -n "$(printf '%q ' "$@")"
}
# CMD without this shell's descriptors above 2: a daemon must not hold what lab.sh's caller holds
# (a flock around the run stayed locked for as long as libvirtd ran)
detached() { (for fd in /proc/$BASHPID/fd/*; do fd=${fd##*/}; ((fd > 2)) && eval "exec ${fd}>&-" 2>/dev/null; done; exec "$@"); }
running() { [[ -s $1 ]] && kill -0 "$(<"$1")" 2>/dev/null; } # a daemon alive by its pid file
hvirsh() { timeout 60 virsh -c qemu:///system "$@"; } # the machine's own libvirtd, bounded
refresh_ssh_config() { timeout 120 vagrant ssh-config >"$ssh_config" || die "vagrant ssh-config failed"; }
json() { node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{const v=JSON.parse(s);const f=new Function("v","return ("+process.argv[1]+")");const r=f(v);process.stdout.write(typeof r==="string"?r:JSON.stringify(r))})' "$1"; }
# poll_until DEADLINE_S CMD...: until CMD succeeds (1 when the deadline passes)
poll_until() {
  local deadline="$1" start
  shift
  start=$(date +%s)
  until "$@" >/dev/null 2>&1; do
    (($(date +%s) - start < deadline)) || return 1
    sleep 2
  done
}
# wait_for WHAT DEADLINE_S CMD...: poll_until, or die naming WHAT
wait_for() {
  local what="$1" deadline="$2"
  shift 2
  poll_until "$deadline" "$@" || die "$what: not within ${deadline}s"
}

[[ $(id -u) -eq 0 ]] || die "run as root (libvirt's system instance, the box build)"
for cmd in vagrant virsh ansible-playbook rsync node qemu-img; do
  command -v "$cmd" >/dev/null || die "$cmd not found: run scripts/bootstrap.sh first"
done
vagrant plugin list 2>/dev/null | grep -q vagrant-libvirt || die "the vagrant-libvirt plugin is missing: apt install vagrant-libvirt"
[[ -e $repo/node_modules/.modules.yaml && -e $repo/packages/coordinator/dist/bin/ftvm.js ]] || die "the tree is not built: run scripts/bootstrap.sh first"

kvm_works() { # QEMU starts with -accel kvm and is still running after 5 s (timeout's 124)
  local rc=0
  [[ -c /dev/kvm ]] || return 1
  # A /dev/kvm without vmx/svm in the CPU flags (seen on a sandbox: QEMU starts, but a guest never
  # gets past its BIOS) is not used.
  grep -qwE 'vmx|svm' /proc/cpuinfo || return 1
  # libvirt runs QEMU as libvirt-qemu (group kvm). Where udev did not give /dev/kvm its usual
  # root:kvm 0660 (containers, some CI), set that, as Debian's udev rule would.
  if id libvirt-qemu >/dev/null 2>&1 && ! runuser -u libvirt-qemu -- test -r /dev/kvm -a -w /dev/kvm; then
    log "/dev/kvm is $(stat -c '%U:%G %a' /dev/kvm): setting root:kvm 0660 (Debian's udev rule) so libvirt's QEMU can use it"
    chgrp kvm /dev/kvm && chmod 0660 /dev/kvm || return 1
  fi
  timeout 5 qemu-system-x86_64 -accel kvm -M none -display none -nodefaults -S </dev/null >/dev/null 2>&1 || rc=$?
  ((rc == 124))
}
accel="${FTVM_VAGRANT_ACCEL:-}"
[[ -n $accel ]] || { if kvm_works; then accel=kvm; else accel=tcg; fi; }
nested=0
[[ $accel == kvm ]] && grep -qsx '[Y1]' /sys/module/kvm_intel/parameters/nested /sys/module/kvm_amd/parameters/nested && nested=1
nested_accel=tcg; ((nested)) && nested_accel=kvm
export FTVM_VAGRANT_ACCEL="$accel" FTVM_VAGRANT_NESTED="$nested" FTVM_VAGRANT_OFFLINE=1 FTVM_VAGRANT_BOX=ftvm/bookworm-local
if [[ $mode == ci ]]; then vms=(primary); else vms=(primary backup witness); fi
# the VM the provisioner hangs on (the last one defined) and the agents' hosts
provisioner="${vms[-1]}"
kvm_vms=(primary); [[ $mode == ci ]] || kvm_vms=(primary backup)

# ---- the machine's libvirtd (Vagrant's provider talks to qemu:///system) -------------------------
if ! hvirsh version >/dev/null 2>&1; then
  if [[ -d /run/systemd/system ]] && systemctl is-system-running >/dev/null 2>&1; then
    log "starting libvirtd (systemd)"
    systemctl start libvirtd
  else
    log "starting virtlogd and libvirtd (no systemd here)"
    # By the machine's own pid files, not pgrep: the ftvm test lab's hosts run theirs in other
    # mount namespaces, and those must not count as the machine's.
    running /run/virtlogd.pid || detached virtlogd -d
    running /run/libvirtd.pid || detached libvirtd -d
  fi
  wait_for "libvirtd answering" 60 hvirsh version
fi

cleanup() {
  local rc=$?
  if ((keep)); then
    log "--keep: the VMs stay up (cd vagrant && vagrant destroy -f)"
  else
    log "vagrant destroy -f"
    FTVM_VAGRANT_HOSTS= timeout 600 vagrant destroy -f >"$state/destroy.log" 2>&1 || echo "lab.sh: vagrant destroy failed (log: $state/destroy.log)" >&2
  fi
  exit $rc
}
trap cleanup EXIT

# ---- box and prebuilt parts -----------------------------------------------------------------------
log "box: vagrant/box/build.sh (cached by recipe hash)"
t=$(now)
step_run box 3600 bash "$here/box/build.sh"
box_step_s=$(since "$t")
box_cached=false
grep -q 'cache hit\|vagrant already has' "$state/box.log" && box_cached=true
# the build that made this box (this run's, or the cached one's): its BUILDINFO, beside the .box
box_file="$(tail -n 1 "$state/box.log")"
box_build_s="$(sed -n 's/^built=.* in \([0-9]*\) s on .*/\1/p' "$(dirname "$box_file")/BUILDINFO" 2>/dev/null || true)"
log "box ready in ${box_step_s}s (cache hit: $box_cached; the box was built in ${box_build_s:-?}s)"

step_run qemu 3600 bash "$repo/packages/kvmclock/qemu/build.sh"
qemu_bin="$(tail -n 1 "$state/qemu.log")"
[[ -x $qemu_bin ]] || die "packages/kvmclock/qemu/build.sh printed no QEMU binary (log: $state/qemu.log)"
# What the KVM hosts get instead of a registry and a compiler: this machine's node and QEMU build
# (hard links where the file system allows), rsynced to /opt/ftvm/prebuilt.
prebuilt="$state/prebuilt"
rm -rf "$prebuilt" && mkdir -p "$prebuilt/qemu"
cp -l "$(readlink -f "$(command -v node)")" "$prebuilt/node" 2>/dev/null || cp "$(readlink -f "$(command -v node)")" "$prebuilt/node"
qemu_dir="$(dirname "$(dirname "$qemu_bin")")"
cp -al "$qemu_dir/bin" "$qemu_dir/share" "$prebuilt/qemu/" 2>/dev/null || cp -a "$qemu_dir/bin" "$qemu_dir/share" "$prebuilt/qemu/"
export FTVM_VAGRANT_PREBUILT="$prebuilt"
guest_dir="$(readlink -f /var/cache/ftvm/guest/current 2>/dev/null || true)"
if [[ $mode == full ]]; then
  step_run guest 1800 bash "$repo/test/guest/build.sh"
  guest_dir="$(readlink -f /var/cache/ftvm/guest/current)"
  [[ -s $guest_dir/vmlinuz && -s $guest_dir/initrd.img ]] || die "no test guest in $guest_dir"
fi

# ---- up and provision -------------------------------------------------------------------------------
if ((reuse)); then
  log "--reuse: the VMs of the last --keep run, as they are"
  [[ $mode == ci ]] && export FTVM_VAGRANT_HOSTS=primary
  up_s='' up_retries='' provision_s='' second_provision_s='' second_changed=''
else
log "leftovers: vagrant destroy -f"
FTVM_VAGRANT_HOSTS= timeout 600 vagrant destroy -f >"$state/destroy-before.log" 2>&1 || true
# domains an interrupted run defined but Vagrant never recorded (vagrant-libvirt names them
# <directory>_<machine>)
for name in primary backup witness; do
  if hvirsh dominfo "vagrant_$name" >/dev/null 2>&1; then
    hvirsh destroy "vagrant_$name" >/dev/null 2>&1 || true
    hvirsh undefine "vagrant_$name" --remove-all-storage >/dev/null 2>&1 || die "cannot remove the leftover domain vagrant_$name"
  fi
done
[[ $mode == ci ]] && export FTVM_VAGRANT_HOSTS=primary
# One VM at a time, each bounded: a `vagrant up` that fails or hangs (seen once here: stuck after
# defining the domain) is destroyed and tried once more from scratch; the retries are reported.
up_retries=0
up_one() {
  local name="$1"
  timeout --kill-after=30 900 vagrant up --no-provision "$name" >"$state/up-$name.log" 2>&1 && return 0
  log "vagrant up $name failed or hung (log: $state/up-$name.log): destroying it, one more try"
  up_retries=$((up_retries + 1))
  timeout 300 vagrant destroy -f "$name" >>"$state/up-$name.log" 2>&1 || true
  step_run "up-$name-retry" 900 vagrant up --no-provision "$name"
}
log "vagrant up --no-provision (${vms[*]}, ${accel^^})"
t=$(now)
for name in "${vms[@]}"; do
  up_one "$name"
  log "  $name up"
done
up_s=$(since "$t")
log "${#vms[@]} VM(s) up in ${up_s}s"

recap_changed() { # the sum of changed= over the PLAY RECAP of a provision log
  awk '/PLAY RECAP/ { r = 1; next } r && /changed=/ { for (i = 1; i <= NF; i++) if ($i ~ /^changed=/) { split($i, a, "="); s += a[2] } } END { print s + 0 }' "$1"
}
log "vagrant provision (ansible/site.yml, systemd mode)"
t=$(now)
step_run provision-1 3600 vagrant provision "$provisioner"
provision_s=$(since "$t")
log "provisioned in ${provision_s}s (changed: $(recap_changed "$state/provision-1.log"))"
t=$(now)
step_run provision-2 1800 vagrant provision "$provisioner"
second_provision_s=$(since "$t")
second_changed=$(recap_changed "$state/provision-2.log")
log "second provision in ${second_provision_s}s: changed=$second_changed"
fi

refresh_ssh_config
for host in "${kvm_vms[@]}"; do
  active="$(vssh "$host" systemctl is-active ftvm-agent libvirtd || true)"
  [[ $(echo "$active" | head -n 1) == active ]] || die "ftvm-agent on $host is not active: $active"
  vssh "$host" ftvm status --json >"$state/status-$host.json" || die "ftvm status on $host failed"
done
for host in "${vms[@]}"; do
  [[ $(vssh "$host" systemctl is-active etcd || true) == active ]] || die "etcd on $host is not active"
done
log "agent active on ${kvm_vms[*]} (systemd units), etcd on ${vms[*]}"

emit() { # the results JSON ($results), from the variables set so far
  [[ -n $results ]] || return 0
  mkdir -p "$(dirname "$results")"
  node -e '
    const [file, ...kv] = process.argv.slice(1);
    const out = {};
    for (let i = 0; i < kv.length; i += 2) { const v = kv[i + 1]; out[kv[i]] = v === "" ? null : /^-?[0-9.]+$/.test(v) ? Number(v) : v === "true" ? true : v === "false" ? false : v; }
    require("fs").writeFileSync(file, JSON.stringify(out, null, 2) + "\n");
  ' "$results" date "$(date -u +%Y-%m-%dT%H:%M:%SZ)" commit "$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    accelerator "$accel" nested_accelerator "$nested_accel" host_cores "$(nproc)" \
    box_build_s "$box_build_s" box_step_s "$box_step_s" box_cached "$box_cached" up_s "$up_s" up_retries "$up_retries" provision_s "$provision_s" \
    second_provision_s "$second_provision_s" second_provision_changed "$second_changed" \
    "$@"
  log "results: $results"
}

if [[ $mode == ci ]]; then
  ((second_changed == 0)) || die "the second provision changed $second_changed things (log: $state/provision-2.log)"
  emit
  log "done (--ci)"
  exit 0
fi

# ---- the probe VM, protected ---------------------------------------------------------------------
log "probe VM: the test guest (kernel + initramfs, 128 MiB, nested TCG) copied to primary and backup"
for host in primary backup; do
  VSSH_TIMEOUT=300 vssh "$host" mkdir -p "$guest_dir"
  tar -C "$guest_dir" -cf - vmlinuz initrd.img manifest.json |
    timeout 300 ssh -F "$ssh_config" "$host" sudo -n tar -C "$guest_dir" -xf - || die "copying the guest to $host failed"
done
# a probe VM an earlier --keep run left: unprotected, gone from both hosts
if ((reuse)); then
  VSSH_TIMEOUT=300 vssh primary ftvm unprotect probe >/dev/null 2>&1 || true
  VSSH_TIMEOUT=300 vssh backup ftvm unprotect probe >/dev/null 2>&1 || true
  for host in primary backup; do VSSH_TIMEOUT=120 vssh "$host" bash -c 'virsh destroy probe; virsh undefine probe' >/dev/null 2>&1 || true; done
fi
(cd "$repo" && node --import tsx test/vagrant/probe.ts spec probe backup) >"$state/probe.yaml"
timeout 60 ssh -F "$ssh_config" primary sudo -n tee /run/ftvm/probe.yaml <"$state/probe.yaml" >/dev/null
VSSH_TIMEOUT=300 vssh primary bash -c 'cd /opt/ftvm/src && node --import tsx test/vagrant/probe.ts xml /run/ftvm/probe.yaml >/run/ftvm/probe.xml && virsh define /run/ftvm/probe.xml && virsh start probe' >"$state/probe-define.log" 2>&1 ||
  { cat "$state/probe-define.log" >&2; die "defining the probe VM on primary failed"; }
t=$(now)
# The probe tool only reads the guest (or sets its clock again): when node itself crashes inside
# the nested-TCG VM (seen once: SIGSEGV right after a failover), it is run once more.
probe() {
  local cmd="cd /opt/ftvm/src && node --import tsx test/vagrant/probe.ts ${3:-measure}" rc=0
  VSSH_TIMEOUT=${2:-120} vssh "$1" bash -c "$cmd" || rc=$?
  case $rc in
    132 | 134 | 135 | 139) log "probe on $1: node died of signal $((rc - 128)); running it once more" >&2 ;;
    *) return $rc ;;
  esac
  VSSH_TIMEOUT=${2:-120} vssh "$1" bash -c "$cmd"
}
probe primary 900 "wait 840" || die "the probe guest did not answer within 840 s of its start on primary"
guest_boot_s=$(since "$t")
probe primary 120 sync >/dev/null || die "setting the guest clock failed"
log "probe guest up in ${guest_boot_s}s; clock set to primary's"

t=$(now)
VSSH_TIMEOUT=600 vssh primary ftvm protect probe --backup backup >"$state/protect.log" 2>&1 || { cat "$state/protect.log" >&2; die "ftvm protect failed"; }
vm_status() { vssh "$1" ftvm status --json | json 'v.vms.find(m => m.name === "probe") || {}'; }
epoch_on() { vm_status "$1" | json 'v.lastCheckpoint ? v.lastCheckpoint.epoch : -1'; }
# (the backup's status has its standby; the committed checkpoints are the primary's to report)
backup_ready() { (($(epoch_on primary) > 0)) && [[ $(vm_status backup | json 'String(v.role === "backup" && !!(v.standby && v.standby.ready))') == true ]]; }
wait_for "a committed checkpoint on backup and its standby ready" 600 backup_ready
protect_s=$(since "$t")
log "protected in ${protect_s}s: $(vm_status primary | json '`epoch ${v.lastCheckpoint.epoch}, pause ${v.lastCheckpoint.pauseMs} ms, ${(v.lastCheckpoint.bytes / 1e6).toFixed(1)} MB`')"

# ---- failover ------------------------------------------------------------------------------------
before="$(probe primary)" || die "measuring the guest on primary failed"
epoch_before=$(epoch_on primary)
newer_checkpoint() { (($(epoch_on primary) > epoch_before)); }
wait_for "a checkpoint taken after the measurement" 120 newer_checkpoint
log "before: guest − primary $(echo "$before" | json 'v.offsetMs.toFixed(3)') ms, counter $(echo "$before" | json 'v.counter'); checkpoint epoch $(epoch_on primary) committed since"
domain="$(cat "$here/.vagrant/machines/primary/libvirt/id")"
log "virsh destroy primary (the Vagrant VM: its agent, etcd member, libvirtd and the probe VM with it)"
t=$(now)
hvirsh destroy "$domain" >/dev/null
running_on_backup() { [[ $(vm_status backup | json 'String(v.role === "primary" && v.domainState === "running")') == true ]]; }
wait_for "the probe VM running on backup" 600 running_on_backup
seen_s=$(since "$t")
after="$(probe backup 300 "wait 240 && node --import tsx test/vagrant/probe.ts measure")" || die "measuring the guest on backup failed"
VSSH_TIMEOUT=60 vssh backup ftvm status >"$state/status-backup-after.txt" 2>&1 || true
resumed="$(vssh backup grep -h 'VM resumed from its last committed checkpoint' /var/log/ftvm/agent.log | tail -n 1)"
[[ -n $resumed ]] || die "the backup agent's log has no resume line"
failover_s=$(echo "$resumed" | json 'v.lastBeatToResumeMs / 1000')
offset_ms=$(node -e 'const [a, b] = process.argv.slice(1).map(JSON.parse); console.log((b.offsetMs - a.offsetMs).toFixed(3))' "$before" "$after")
probe_error_ms=$(node -e 'const [a, b] = process.argv.slice(1).map(JSON.parse); console.log((a.errorMs + b.errorMs).toFixed(3))' "$before" "$after")
# The VMs keep their own time (no NTP in the lab): the agents measure primary − backup over their
# heartbeats, and the guest keeps the old primary's time line. residual: the guest against that
# time line after the failover (offset change less the hosts' measured offset).
host_offset_ms=$(echo "$resumed" | json 'v.hostOffset && v.hostOffset.offsetMs !== undefined ? String(v.hostOffset.offsetMs) : ""')
residual_ms=""
[[ -n $host_offset_ms ]] && residual_ms=$(node -e 'console.log((Number(process.argv[1]) - Number(process.argv[2])).toFixed(3))' "$offset_ms" "$host_offset_ms")
continuity_ok=$(node -e 'const [a, b] = process.argv.slice(1).map(JSON.parse); console.log(String(a.bootId === b.bootId && BigInt(b.counter) >= BigInt(a.counter)))' "$before" "$after")
log "failover: the backup agent resumed the VM ${failover_s}s after primary's last heartbeat (seen by lab.sh ${seen_s}s after the destroy)"
log "agent: $(echo "$resumed" | json '`epoch ${v.epoch}, clock moved ${v.deltaMs} ms, in-place steps ${v.inPlaceSteps ?? 0}, uncorrected ${v.uncorrectedMs ?? 0} ms`'), host offset ${host_offset_ms:-n/a} ms"
log "after: guest − backup $(echo "$after" | json 'v.offsetMs.toFixed(3)') ms → offset change ${offset_ms} ms (± ${probe_error_ms}); hosts' offset ${host_offset_ms:-?} ms → residual ${residual_ms:-?} ms; counter $(echo "$after" | json 'v.counter'), same boot → continuity $continuity_ok"
cat "$state/status-backup-after.txt"

# ---- primary back, reprotect ------------------------------------------------------------------------
log "vagrant up primary"
t=$(now)
step_run up-primary 1800 vagrant up --no-provision primary
refresh_ssh_config
agent_answers() { vssh primary ftvm status --json; }
wait_for "the agent on primary answering" 300 agent_answers
primary_back_s=$(since "$t")
log "primary back in ${primary_back_s}s"
t=$(now)
VSSH_TIMEOUT=900 vssh backup ftvm reprotect probe >"$state/reprotect.log" 2>&1 || { cat "$state/reprotect.log" >&2; die "ftvm reprotect failed"; }
primary_is_backup() { (($(epoch_on backup) > 0)) && [[ $(vm_status primary | json 'String(v.role === "backup" && !!(v.standby && v.standby.ready))') == true ]]; }
reprotect_ok=false
if poll_until 600 primary_is_backup; then reprotect_ok=true; fi
reprotect_s=$(since "$t")
if [[ $reprotect_ok == true ]]; then
  log "reprotected in ${reprotect_s}s: primary is the backup now (backup's newest checkpoint: epoch $(epoch_on backup))"
else
  VSSH_TIMEOUT=60 vssh primary ftvm status >"$state/status-primary-after.txt" 2>&1 || true
  log "reprotect: primary not a backup with a ready standby within 600s (ftvm status on primary: $state/status-primary-after.txt)"
fi

emit guest_boot_s "$guest_boot_s" protect_s "$protect_s" failover_s "$failover_s" failover_seen_s "$seen_s" \
  offset_ms "$offset_ms" probe_error_ms "$probe_error_ms" continuity_ok "$continuity_ok" \
  agent_clock_delta_ms "$(echo "$resumed" | json 'v.deltaMs')" agent_in_place_steps "$(echo "$resumed" | json 'String(v.inPlaceSteps ?? 0)')" agent_uncorrected_ms "$(echo "$resumed" | json 'String(v.uncorrectedMs ?? 0)')" \
  agent_host_offset_ms "$host_offset_ms" residual_ms "$residual_ms" \
  primary_back_s "$primary_back_s" reprotect_s "$reprotect_s" reprotect_ok "$reprotect_ok" \
  total_s "$(since "$t0")"
[[ $reprotect_ok == true ]] || die "reprotect did not complete (the results JSON says so)"
log "done"
}
main "$@"
