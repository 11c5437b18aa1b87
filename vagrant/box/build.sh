#!/usr/bin/env bash
# Builds a Debian 12 (bookworm) Vagrant box for the libvirt provider from Debian's packages with
# debootstrap, caches it by a hash of its recipe, and adds it to Vagrant as ftvm/bookworm-local.
#
#   bash vagrant/box/build.sh     # prints the .box path as its last stdout line
#
# A cache hit takes about a second: it only checks that Vagrant has this exact box (else
# `vagrant box add --force`). A miss (as root, Debian 12, about 10 minutes on 2 cores) debootstraps
# into a directory, installs everything ftvm's Ansible roles install, builds the disk image, boots
# it once under TCG and logs in over SSH as `vagrant` with Vagrant's insecure key, and only then
# publishes ${FTVM_CACHE:-/var/cache/ftvm}/vagrant-box/<hash>/ atomically (built in a temporary
# directory, renamed). Progress goes to stderr; the full log is <hash>/build.log (or
# <hash>.failed.log on failure).
#
# What the box holds: Debian 12 with systemd, linux-image-cloud-amd64 (virtio, KVM modules, small),
# openssh-server, sudo, python3 and python3-apt (Ansible's apt module), rsync, the `vagrant` user
# (passwordless sudo, Vagrant's insecure public key, read from the local Vagrant installation), a
# DHCP client on the first NIC (systemd-networkd; `net.ifnames=0`, so the NICs are eth0, eth1, ...
# and Vagrant's Debian guest plugin configures eth1.. through networkd), and the packages the roles
# install (read from their defaults/main.yml: ftvm_kvm_packages, ftvm_etcd_packages,
# ftvm_build_packages), so that no VM needs a package mirror. Nothing reaches out at boot: no apt
# timers, no NTP client, no DNS resolver with fallback servers. etcd.service is installed but
# disabled (the etcd_witness role enables it on the witness only). Each VM gets its own
# machine-id and SSH host keys at first boot.
#
# The boot path, and why: a qcow2 disk with an MBR partition table, one ext4 partition and GRUB for
# BIOS, which is what vagrant-libvirt boots by default (SeaBIOS, virtio disk) with no kernel or
# initrd outside the box and no change to the Vagrantfile. The image is made without loop devices
# or mounts, so it also builds where losetup is not allowed (containers, some CI): the ext4 file
# system is written straight from the root directory into the disk file at its 1 MiB offset
# (`mke2fs -d DIR -E offset=...`), and GRUB's own boot sector and core image (made by grub-mkimage
# inside the new system, with an early config that finds the root file system by UUID) are written
# to sectors 0 and 1.. with dd, exactly where grub-bios-setup would put them: boot.img's default
# kernel sector is 1 and core.img's default block list starts at sector 2 with the length
# grub-mkimage fills in. grub.cfg is written by hand and boots /boot/vmlinuz and /boot/initrd.img,
# symlinks that Debian's kernel packages keep up to date (kernel-img.conf: link_in_boot), so a
# kernel upgrade inside a VM still boots. Only /proc, /sys, /dev and the apt package cache are
# mounted into the chroot while packages install.
#
# Environment:
#   FTVM_CACHE             cache root (default /var/cache/ftvm)
#   FTVM_BOX_NAME          the Vagrant box name (default ftvm/bookworm-local)
#   FTVM_BOX_MIRROR        Debian mirror URI (default: the machine's own apt sources)
#   FTVM_BOX_ADD           0: build (or find) the box but do not `vagrant box add` it
#   FTVM_BOX_BOOT_CHECK    0: skip the TCG boot check before publishing (not recommended)
#   FTVM_VAGRANT_PUBKEY    Vagrant's insecure public key file (default: found in Vagrant's install)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
self="$here/$(basename "${BASH_SOURCE[0]}")"
cache="${FTVM_CACHE:-/var/cache/ftvm}/vagrant-box"
box_name="${FTVM_BOX_NAME:-ftvm/bookworm-local}"

log() { printf 'ftvm-box: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---- the recipe (everything here is part of the cache key) -----------------------------------
suite=bookworm
arch=amd64
disk_gib=20                 # virtual size; the qcow2 holds only what is written
root_uuid=5f2c3f0e-7d1a-4b7e-9a51-f7f00d000001 # fixed: grub.cfg, fstab and core.img name it
kernel_cmdline="root=UUID=$root_uuid ro net.ifnames=0 biosdevname=0 console=tty0 console=ttyS0,115200n8"
# The base system; what the roles install is added from their defaults below.
base_packages=(
  systemd-sysv udev dbus libpam-systemd kmod procps iproute2 netbase ca-certificates less
  linux-image-cloud-amd64 initramfs-tools zstd e2fsprogs grub-pc-bin
  openssh-server sudo python3 python3-apt rsync
  dnsmasq-base iptables # what libvirt's networks use (libvirt-daemon-system only recommends them)
)
# Ansible role defaults whose package lists are baked in (file:variable).
role_package_lists=(
  ansible/roles/kvm_host/defaults/main.yml:ftvm_kvm_packages
  ansible/roles/etcd_witness/defaults/main.yml:ftvm_etcd_packages
  ansible/roles/ftvm_install/defaults/main.yml:ftvm_build_packages
)
host_deps=(debootstrap e2fsprogs fdisk qemu-utils qemu-system-x86 openssh-client python3)

# A YAML list variable's items (`name:` then `  - item` lines) from a role's defaults file.
yaml_list() {
  awk -v var="$2" '
    $0 ~ "^" var ":[[:space:]]*$" { inlist = 1; next }
    inlist && /^[[:space:]]*-[[:space:]]/ { sub(/^[[:space:]]*-[[:space:]]*/, ""); sub(/[[:space:]]*(#.*)?$/, ""); print; next }
    inlist && /^[[:space:]]*(#.*)?$/ { next }
    inlist { exit }
  ' "$1"
}
role_packages=()
for entry in "${role_package_lists[@]}"; do
  file="$repo/${entry%%:*}" var="${entry##*:}"
  [[ -f $file ]] || die "$file not found (its $var is baked into the box)"
  mapfile -t items < <(yaml_list "$file" "$var")
  ((${#items[@]})) || die "no items read from $var in $file (expected a YAML list of package names)"
  role_packages+=("${items[@]}")
done
packages=($(printf '%s\n' "${base_packages[@]}" "${role_packages[@]}" | sort -u))

# Vagrant's insecure public key, from the local installation (never downloaded).
find_pubkey() {
  local c
  for c in "${FTVM_VAGRANT_PUBKEY:-}" \
    /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub \
    /usr/lib/ruby/vendor_ruby/vagrant/keys/vagrant.pub \
    /opt/vagrant/embedded/gems/gems/vagrant-*/keys/vagrant.pub \
    /opt/vagrant/embedded/gems/*/gems/vagrant-*/keys/vagrant.pub; do
    [[ -n $c && -s $c ]] && { echo "$c"; return 0; }
  done
  return 1
}
pubkey_file="$(find_pubkey)" || die "Vagrant's insecure public key (keys/vagrant.pub) not found in the Vagrant installation; install vagrant or set FTVM_VAGRANT_PUBKEY"
grep -q '^ssh-' "$pubkey_file" || die "$pubkey_file does not look like an OpenSSH public key"
# Its private half, for the boot check (same directory: `vagrant`, or `vagrant.key.*` in newer Vagrant).
privkey_file=""
for c in "$(dirname "$pubkey_file")"/vagrant "$(dirname "$pubkey_file")"/vagrant.key.rsa; do
  [[ -s $c ]] && { privkey_file="$c"; break; }
done

hash="$(
  {
    echo "script $(sha256sum <"$self" | cut -d' ' -f1)"
    echo "suite $suite arch $arch"
    printf 'package %s\n' "${packages[@]}"
    echo "pubkey $(sha256sum <"$pubkey_file" | cut -d' ' -f1)"
  } | sha256sum | cut -c1-16
)"
out="$cache/$hash"
box="$out/ftvm-bookworm.box"

# ---- vagrant box add (unless this exact box is there) --------------------------------------------
# The box carries its hash in ftvm-box-hash, which Vagrant unpacks into the box's directory.
add_box() {
  [[ ${FTVM_BOX_ADD:-1} == 0 ]] && return 0
  command -v vagrant >/dev/null || die "vagrant not found: install vagrant and vagrant-libvirt, or set FTVM_BOX_ADD=0"
  local vhome="${VAGRANT_HOME:-$HOME/.vagrant.d}"
  local marker="$vhome/boxes/${box_name//\//-VAGRANTSLASH-}/0/libvirt/ftvm-box-hash"
  if [[ -f $marker && $(cat "$marker") == "$hash" ]]; then
    log "vagrant already has $box_name ($hash)"
    return 0
  fi
  log "vagrant box add --force --name $box_name $box"
  # away from any Vagrantfile (vagrant loads the one in its working directory, which may want settings)
  (cd "$cache" && env -u VAGRANT_CWD vagrant box add --force --name "$box_name" "$box") >&2 || die "vagrant box add failed for $box"
  [[ -f $marker && $(cat "$marker") == "$hash" ]] || die "vagrant box add succeeded but $marker does not name $hash"
}

if [[ -s $box ]]; then
  log "cache hit: $box_name ($hash)"
  add_box
  echo "$box"
  exit 0
fi

# ---- cache miss: build --------------------------------------------------------------------------
[[ $(id -u) -eq 0 ]] || die "cache miss ($out): building needs root (debootstrap, chroot); run as root once"
[[ $(dpkg --print-architecture) == "$arch" ]] || die "this builds an $arch box on an $arch host; this host is $(dpkg --print-architecture)"
mkdir -p "$cache"
exec 9>"$cache/.lock-$hash"
flock 9
if [[ -s $box ]]; then # built by a concurrent run while we waited
  add_box
  echo "$box"
  exit 0
fi

# The machine may be shared (tests, other builds): everything from here on yields CPU and disk.
renice -n 19 -p $$ >/dev/null
ionice -c3 -p $$
started=$(date +%s)
tmp="$(mktemp -d "$cache/.build-$hash.XXXXXX")"
build_log="$tmp/build.log"
root="$tmp/root"
mounts=() # mount points inside $root, in mount order
qemu_pid=""
unmount_all() {
  local i
  for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do
    umount "${mounts[$i]}" 2>/dev/null || umount -l "${mounts[$i]}" 2>/dev/null || true
  done
  mounts=()
  # debootstrap mounts /proc and /sys itself and may leave them after a failure.
  local m
  while read -r m; do umount -l "$m" 2>/dev/null || true; done < <(findmnt -rn -o TARGET | grep -F "$root/" | sort -r || true)
}
cleanup() {
  [[ -n $qemu_pid ]] && kill "$qemu_pid" 2>/dev/null || true
  unmount_all
  if findmnt -rn -o TARGET | grep -qF "$tmp/"; then
    log "warning: something is still mounted under $tmp; leaving it in place (remove it by hand)"
  else
    rm -rf --one-file-system "$tmp"
  fi
}
trap cleanup EXIT
log "cache miss: building $box_name ($hash); log: $build_log"

# shellcheck source=../../scripts/lib/cached-build.sh
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib/cached-build.sh" # fail, run, install_missing
in_root() { run chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"; }

export DEBIAN_FRONTEND=noninteractive
install_missing "${host_deps[@]}"

# The Debian repositories this machine's apt uses ("URI SUITE" lines of deb entries, both the
# one-line and the deb822 format), so the box is built from the same mirror, named nowhere here.
apt_repos() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -f $f ]] && awk '$1 == "deb" { i = 2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ } print $i, $(i + 1) }' "$f"
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f $f ]] && awk '
      function flush() { if (types ~ /(^| )deb( |$)/ && enabled != "no") { n = split(uris, u, " "); m = split(suites, s, " "); for (i = 1; i <= n; i++) for (j = 1; j <= m; j++) print u[i], s[j] } types = uris = suites = enabled = "" }
      /^[[:space:]]*$/ { flush(); next }
      /^Types:/ { sub(/^Types:[[:space:]]*/, ""); types = $0 }
      /^URIs:/ { sub(/^URIs:[[:space:]]*/, ""); uris = $0 }
      /^Suites:/ { sub(/^Suites:[[:space:]]*/, ""); suites = $0 }
      /^Enabled:/ { sub(/^Enabled:[[:space:]]*/, ""); enabled = $0 }
      END { flush() }' "$f"
  done
}
repos="$(apt_repos)"
mirror="${FTVM_BOX_MIRROR:-$(awk -v s="$suite" '$2 == s { print $1; exit }' <<<"$repos")}"
security="$(awk -v s="$suite-security" '$2 == s { print $1; exit }' <<<"$repos")"
[[ -n $mirror ]] || die "no apt source for $suite on this machine (/etc/apt/sources.list*); set FTVM_BOX_MIRROR to a Debian mirror URI"
mirror="${mirror%/}"
log "debootstrap $suite from the machine's apt mirror (packages cached in $cache/debs)"
mkdir -p "$cache/debs" "$root"
run debootstrap --variant=minbase --arch="$arch" --cache-dir="$cache/debs" "$suite" "$root" "$mirror"

# ---- inside the new system ----------------------------------------------------------------------
{
  echo "deb $mirror $suite main"
  echo "deb $mirror $suite-updates main"
  [[ -n $security ]] && echo "deb ${security%/} $suite-security main"
} >"$root/etc/apt/sources.list"
# No docs, man pages or translations (copyright files stay).
cat >"$root/etc/dpkg/dpkg.cfg.d/01-ftvm-nodoc" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
EOF
# No services start while packages install.
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 0755 "$root/usr/sbin/policy-rc.d"
# /boot/vmlinuz and /boot/initrd.img follow the installed kernel (grub.cfg boots them).
printf 'do_symlinks = yes\nlink_in_boot = yes\n' >"$root/etc/kernel-img.conf"
echo "ftvm-box" >"$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tftvm-box\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
echo "UUID=$root_uuid / ext4 errors=remount-ro 0 1" >"$root/etc/fstab"

bind() { # bind SRC at $root/DST, remembered for cleanup
  mkdir -p "$root$2"
  mount --bind "$1" "$root$2" || fail "mount --bind $1 $root$2 failed"
  mounts+=("$root$2")
}
mkdir -p "$root/proc" "$root/sys" "$cache/apt-archives/partial"
mount -t proc proc "$root/proc" || fail "mounting /proc in the chroot failed"
mounts+=("$root/proc")
mount -t sysfs sysfs "$root/sys" || fail "mounting /sys in the chroot failed"
mounts+=("$root/sys")
bind /dev /dev
bind /dev/pts /dev/pts
bind "$cache/apt-archives" /var/cache/apt/archives # packages are kept between builds

log "installing ${#packages[@]} packages and their dependencies"
in_root apt-get update -q
in_root apt-get install -y -q --no-install-recommends -o Dpkg::Options::=--force-confdef "${packages[@]}"
kernel_version="$(cd "$root/lib/modules" && ls | sort -V | tail -n 1)"
[[ -n $kernel_version && -e $root/boot/vmlinuz && -e $root/boot/initrd.img ]] ||
  fail "no kernel or initrd in /boot after installing linux-image-cloud-amd64"
find "$root/lib/modules/$kernel_version" -name 'kvm.ko*' | grep -q . || fail "kernel $kernel_version has no kvm module"

log "configuring (vagrant user, network, services)"
in_root useradd --create-home --shell /bin/bash --user-group vagrant
in_root usermod -p '*' vagrant # no password, but not locked: key logins only
install -d -m 0700 "$root/home/vagrant/.ssh"
install -m 0600 "$pubkey_file" "$root/home/vagrant/.ssh/authorized_keys"
in_root chown -R vagrant:vagrant /home/vagrant/.ssh
printf 'Defaults:vagrant !requiretty\nvagrant ALL=(ALL) NOPASSWD: ALL\n' >"$root/etc/sudoers.d/vagrant"
chmod 0440 "$root/etc/sudoers.d/vagrant"
in_root visudo -c -f /etc/sudoers.d/vagrant

# The first NIC by DHCP. ClientIdentifier=mac: VMs from one box must not share a DHCP client ID.
cat >"$root/etc/systemd/network/10-eth0.network" <<'EOF'
[Match]
Name=eth0

[Network]
DHCP=ipv4

[DHCPv4]
ClientIdentifier=mac
EOF
in_root systemctl enable systemd-networkd.service ssh.service
in_root systemctl disable etcd.service
# Nothing fetches anything at boot.
in_root systemctl mask apt-daily.timer apt-daily-upgrade.timer
# A fresh SSH host key per VM, made at its first boot.
cat >"$root/etc/systemd/system/ftvm-ssh-host-keys.service" <<'EOF'
[Unit]
Description=Generate this machine's SSH host keys (ftvm box: none are shipped)
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
EOF
in_root systemctl enable ftvm-ssh-host-keys.service
rm -f "$root"/etc/ssh/ssh_host_*
echo 'UseDNS no' >"$root/etc/ssh/sshd_config.d/ftvm-box.conf"

# GRUB: modules and a hand-written grub.cfg in /boot/grub, a core image that finds the root file
# system by UUID.
log "GRUB for BIOS boot (kernel $kernel_version)"
mkdir -p "$root/boot/grub/i386-pc"
cp "$root"/usr/lib/grub/i386-pc/*.mod "$root"/usr/lib/grub/i386-pc/*.lst "$root/boot/grub/i386-pc/"
cat >"$root/boot/grub/grub.cfg" <<EOF
# Written by ftvm's vagrant/box/build.sh (no update-grub: /boot/vmlinuz follows the kernel).
set timeout=0
serial --unit=0 --speed=115200
terminal_input console serial
terminal_output console serial
menuentry 'Debian GNU/Linux 12 (ftvm box)' {
  insmod part_msdos
  insmod ext2
  search --no-floppy --fs-uuid --set=root $root_uuid
  linux /boot/vmlinuz $kernel_cmdline
  initrd /boot/initrd.img
}
EOF
printf 'search.fs_uuid %s root\nset prefix=($root)/boot/grub\n' "$root_uuid" >"$root/tmp/grub-early.cfg"
# -p is required; the early config's prefix (the partition found by UUID) replaces it
in_root grub-mkimage -O i386-pc -p /boot/grub -o /tmp/core.img -c /tmp/grub-early.cfg \
  biosdisk part_msdos ext2 search_fs_uuid normal
mv "$root/tmp/core.img" "$tmp/core.img"
cp "$root/usr/lib/grub/i386-pc/boot.img" "$tmp/boot.img"
rm -f "$root/tmp/grub-early.cfg"
core_sectors=$((($(stat -c %s "$tmp/core.img") + 511) / 512))
((core_sectors < 2047)) || fail "GRUB's core image ($core_sectors sectors) does not fit before the partition at 1 MiB"

log "cleaning up the image"
in_root apt-get clean
rm -f "$root/usr/sbin/policy-rc.d"
unmount_all
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/log/*.log "$root"/var/log/apt/* "$root"/var/cache/debconf/*-old \
  "$root"/tmp/* "$root"/var/tmp/* "$root"/root/.bash_history
find "$root/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete 2>/dev/null || true
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/*
# Each VM makes its own machine-id at first boot (it is its DHCP DUID, journal ID, ...).
: >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
[[ -s $root/home/vagrant/.ssh/authorized_keys ]] || fail "the vagrant user's authorized_keys is missing"

# ---- the disk image -----------------------------------------------------------------------------
log "writing the disk image (ext4 from the root directory, GRUB in the boot sectors)"
raw="$tmp/disk.raw"
truncate -s "${disk_gib}G" "$raw"
printf 'label: dos\nstart=2048, type=83, bootable\n' | run sfdisk -q "$raw"
fs_kib=$(((disk_gib * 1024 * 1024) - 1024))
run mkfs.ext4 -q -F -U "$root_uuid" -L ftvm-root -d "$root" \
  -O ^metadata_csum_seed,^orphan_file -E offset=1048576,lazy_itable_init=0,lazy_journal_init=0 \
  "$raw" "${fs_kib}k"
# boot.img's code (its bytes 0-439: the partition table sfdisk wrote stays), core.img from sector 1.
run dd if="$tmp/boot.img" of="$raw" bs=440 count=1 conv=notrunc status=none
run dd if="$tmp/core.img" of="$raw" bs=512 seek=1 conv=notrunc status=none
run e2fsck -fn "$raw?offset=1048576" # (io options after '?': the file system at its offset)
rm -rf --one-file-system "$root"

stage="$tmp/out"
mkdir -p "$stage"
log "converting to a compressed qcow2"
run qemu-img convert -f raw -O qcow2 -c "$raw" "$stage/box.img"
rm -f "$raw"

# ---- boot check: TCG, user-mode network, SSH as vagrant with the insecure key -------------------
boot_check() {
  local img="$1" port key console ssh_opts deadline answer
  [[ -n $privkey_file ]] || fail "Vagrant's insecure private key not found next to $pubkey_file (needed for the boot check)"
  key="$tmp/insecure_key"
  install -m 0600 "$privkey_file" "$key"
  port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  console="$tmp/console.log"
  log "boot check: booting the image under TCG (SSH at 127.0.0.1:$port, console in the build log)"
  local t0
  t0=$(date +%s)
  qemu-system-x86_64 -accel tcg -m 1024 -smp 1 -nodefaults -display none \
    -drive "file=$img,if=virtio,snapshot=on" \
    -netdev "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:$port-:22" -device virtio-net-pci,netdev=n0 \
    -serial "file:$console" >>"$build_log" 2>&1 &
  qemu_pid=$!
  ssh_opts=(-i "$key" -p "$port" -o IdentitiesOnly=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null
    -o ConnectTimeout=10 -o BatchMode=yes -o LogLevel=ERROR)
  deadline=$((t0 + 600))
  until ssh "${ssh_opts[@]}" vagrant@127.0.0.1 true 2>/dev/null; do
    kill -0 "$qemu_pid" 2>/dev/null || { cat "$console" >>"$build_log"; fail "QEMU exited during the boot check"; }
    (($(date +%s) < deadline)) || { cat "$console" >>"$build_log"; fail "no SSH login as vagrant within 600 s of boot"; }
    sleep 5
  done
  boot_s=$(($(date +%s) - t0))
  log "boot check: SSH answered after $boot_s s"
  # is-system-running --wait: until boot finished (deadline: ssh's own, within the 600 s above).
  local remaining=$((deadline - $(date +%s)))
  ((remaining >= 60)) || remaining=60
  answer="$(timeout "$remaining" ssh "${ssh_opts[@]}" vagrant@127.0.0.1 \
    'sudo -n true && echo sudo=ok; echo state=$(systemctl is-system-running --wait); python3 --version; virsh --version;
     etcd --version | head -n 1; qemu-system-x86_64 --version | head -n 1; ip -4 -o addr show eth0;
     systemctl --failed --no-legend --plain; echo timers=$(systemctl list-timers --no-legend --plain | wc -l)' 2>&1)" ||
    { echo "$answer" >>"$build_log"; fail "the checks over SSH failed: $answer"; }
  printf '%s\n' "$answer" | sed 's/^/boot check: /' | tee -a "$build_log" >&2
  grep -qx 'sudo=ok' <<<"$answer" || fail "passwordless sudo for vagrant does not work"
  grep -qx 'state=running' <<<"$answer" || fail "systemd is not 'running' after boot (failed units above)"
  grep -q '^Python 3' <<<"$answer" || fail "python3 missing"
  grep -qE '^[0-9]+\.[0-9]+' <<<"$answer" || fail "virsh missing"
  ssh "${ssh_opts[@]}" vagrant@127.0.0.1 'sudo -n systemctl poweroff' >/dev/null 2>&1 || true
  local i
  for ((i = 0; i < 60; i++)); do kill -0 "$qemu_pid" 2>/dev/null || break; sleep 1; done
  kill "$qemu_pid" 2>/dev/null || true
  wait "$qemu_pid" 2>/dev/null || true
  qemu_pid=""
  { echo "== console"; cat "$console"; } >>"$build_log"
}
boot_s=""
if [[ ${FTVM_BOX_BOOT_CHECK:-1} != 0 ]]; then
  boot_check "$stage/box.img"
else
  log "boot check skipped (FTVM_BOX_BOOT_CHECK=0)"
fi

# ---- the .box -----------------------------------------------------------------------------------
cat >"$stage/metadata.json" <<EOF
{"provider": "libvirt", "format": "qcow2", "virtual_size": $disk_gib}
EOF
cat >"$stage/Vagrantfile" <<'EOF'
# ftvm/bookworm-local: built by ftvm's vagrant/box/build.sh. BIOS boot from the virtio disk;
# the first NIC (eth0) takes its address by DHCP.
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |libvirt|
    libvirt.disk_bus = "virtio"
    libvirt.nic_model_type = "virtio"
  end
end
EOF
echo "$hash" >"$stage/ftvm-box-hash"
finished=$(date +%s)
{
  echo "hash=$hash"
  echo "name=$box_name"
  echo "suite=$suite arch=$arch kernel=$kernel_version"
  echo "packages=${packages[*]}"
  echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ) in $((finished - started)) s on $(nproc) cores"
  [[ -n $boot_s ]] && echo "tcg_boot_to_ssh_s=$boot_s"
} >"$stage/BUILDINFO"
log "packing the box"
run tar -C "$stage" -cf "$stage/ftvm-bookworm.box" metadata.json Vagrantfile box.img ftvm-box-hash BUILDINFO
rm -f "$stage/box.img" "$stage/metadata.json" "$stage/Vagrantfile" "$stage/ftvm-box-hash"
cp "$build_log" "$stage/build.log"

rm -rf "$out" # a leftover without a box (we hold the lock and saw none)
mv -T "$stage" "$out" || fail "could not publish $out"
rm -f "$cache/$hash.failed.log"
log "built in $((finished - started)) s: $box ($(du -h "$box" | cut -f1))"
add_box
echo "$box"
