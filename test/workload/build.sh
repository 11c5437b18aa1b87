#!/usr/bin/env bash
# Builds the workload guest: a Debian 12 root file system (debootstrap) with PostgreSQL 15
# (pgbench), gcc + make and Lua's sources (the CPU-bound build), booted with Debian's cloud kernel
# and its initramfs (direct kernel boot, root on the first virtio disk).
# Output: $FTVM_CACHE/workload/<hash>/{root.qcow2,vmlinuz,initrd.img,manifest.json}; the directory
# is the last line of stdout (progress goes to stderr). <hash> covers this script and guest/*, so
# an existing directory is reused as is. See README.md.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${FTVM_CACHE:-/var/cache/ftvm}/workload
suite=bookworm
mirror=${FTVM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
security_mirror=${FTVM_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
# Virtual size of the root disk: the installed system takes ~0.7 GiB; pgbench's history table and
# the build's objects grow by a few MiB per round.
disk_size=2G
# Guest kernel command line (the mode, ftvm.wl=, is appended by whoever boots it). The clock flags
# are the test guest's (test/guest/README.md, "Guest clock under TCG"); quiet + loglevel keep the
# emulated UART for the workload's own lines.
cmdline="root=/dev/vda rw rootfstype=ext4 init=/usr/local/sbin/ftvm-workload-init console=ttyS0 quiet loglevel=3 panic=-1 clocksource=tsc tsc=reliable mitigations=off 8250.nr_uarts=1 i8042.noaux i8042.nokbd"
# Everything in the image beyond debootstrap's minbase.
packages=(linux-image-cloud-amd64 postgresql-15 postgresql-client-15 gcc make libc6-dev libpq-dev)
build_src=lua5.4

say() { echo "workload/build.sh: $*" >&2; }
die() { say "$*"; exit 1; }

for tool in debootstrap:debootstrap mke2fs:e2fsprogs qemu-img:qemu-utils apt-get:apt; do
  command -v "${tool%%:*}" >/dev/null || die "needs ${tool%%:*} (apt-get install --no-install-recommends ${tool#*:})"
done
[[ $(id -u) -eq 0 ]] || die "debootstrap and chroot need root"

hash=$(cat "$here/build.sh" "$here"/guest/* | sha256sum | cut -c1-16)
out=$cache/$hash
if [[ -f "$out/manifest.json" ]]; then
  say "cached: $out"
  echo "$out"
  exit 0
fi

mkdir -p "$cache"
work=$(mktemp -d "$cache/.build-$hash.XXXXXX")
root=$work/root
mounted=()
cleanup() {
  local i
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount -l "${mounted[i]}" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
started=$(date +%s)
say "building $hash in $work"

# --- base system ---------------------------------------------------------------------------------
debootstrap --variant=minbase "$suite" "$root" "$mirror" >&2 || { tail -n 30 "$root/debootstrap/debootstrap.log" >&2 || true; die "debootstrap failed"; }

cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror $suite main
deb $mirror $suite-updates main
deb $security_mirror $suite-security main
EOF
# The mirror may serve a dated snapshot whose Release files are past Valid-Until.
printf '%s\n' 'APT::Install-Recommends "false";' 'APT::Install-Suggests "false";' 'Acquire::Check-Valid-Until "false";' >"$root/etc/apt/apt.conf.d/90ftvm"
# No service starts inside the chroot (postgresql's postinst would try).
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 0755 "$root/usr/sbin/policy-rc.d"
echo ftvm-workload >"$root/etc/hostname"

mount -t proc proc "$root/proc" && mounted+=("$root/proc")
mount -t sysfs sysfs "$root/sys" && mounted+=("$root/sys")
mount -t tmpfs -o mode=1777 tmpfs "$root/dev/shm" && mounted+=("$root/dev/shm")
in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"; }

in_root apt-get update -q >&2
# initramfs-tools first, so its configuration is in place before the kernel's postinst builds the
# initramfs: only the modules a virtio-blk ext4 root needs (fewer to unpack and load under TCG).
in_root apt-get install -y -q initramfs-tools >&2
printf '%s\n' virtio_pci virtio_blk ext4 crc32c_generic >>"$root/etc/initramfs-tools/modules"
printf '%s\n' MODULES=list COMPRESS=gzip >"$root/etc/initramfs-tools/conf.d/ftvm.conf"
in_root apt-get install -y -q "${packages[@]}" >&2

# --- the workload's programs ---------------------------------------------------------------------
install -m 0755 "$here/guest/ftvm-workload-init" "$root/usr/local/sbin/ftvm-workload-init"
install -m 0644 "$here/guest/seq.c" "$root/tmp/seq.c"
in_root gcc -O2 -Wall -Wextra -Werror -I/usr/include/postgresql -o /usr/local/bin/ftvm-seq /tmp/seq.c -lpq
rm "$root/tmp/seq.c"

# Lua's release tarball from Debian's source package (deb-src), unpacked to /usr/src/lua.
mkdir "$work/src"
(cd "$work/src" && apt-get source --download-only -q "$build_src" >&2)
orig=$(ls "$work"/src/*.orig.tar.*)
[[ $(wc -w <<<"$orig") -eq 1 ]] || die "expected one orig tarball of $build_src, got: $orig"
mkdir "$root/usr/src/lua"
tar -xf "$orig" -C "$root/usr/src/lua" --strip-components=1
[[ -f "$root/usr/src/lua/src/Makefile" ]] || die "$orig has no src/Makefile"
build_src_version=$(basename "$(ls "$work"/src/*.dsc)" .dsc)

# --- PostgreSQL: small enough for 1 GiB under TCG; durable commits (the point of the check) ------
pgconf=$root/etc/postgresql/15/main/conf.d/ftvm.conf
[[ -d $(dirname "$pgconf") ]] || die "postgresql-15 made no cluster (no /etc/postgresql/15/main)"
cat >"$pgconf" <<'EOF'
listen_addresses = ''
max_connections = 20
shared_buffers = 32MB
fsync = on
synchronous_commit = on
full_page_writes = on
logging_collector = off
EOF
# The bench database, made natively now rather than under TCG at every boot: pgbench's tables at
# scale 1 (100 000 accounts) and the sequence client's table.
pg="/usr/lib/postgresql/15/bin/pg_ctl -D /var/lib/postgresql/15/main -o -cconfig_file=/etc/postgresql/15/main/postgresql.conf"
mkdir -p "$root/run/postgresql" && in_root chown postgres:postgres /run/postgresql
in_root runuser -u postgres -- $pg -w -t 120 -l /tmp/pg-build.log start >&2 || { cat "$root/tmp/pg-build.log" >&2; die "postgres does not start in the chroot"; }
in_root runuser -u postgres -- createdb bench
in_root runuser -u postgres -- pgbench -i -q -s 1 bench >&2
in_root runuser -u postgres -- psql -q -v ON_ERROR_STOP=1 -d bench -c 'CREATE TABLE seq (n bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT now())'
in_root runuser -u postgres -- $pg -w -m fast stop >&2
rm -f "$root/tmp/pg-build.log"

# --- trim and pack ---------------------------------------------------------------------------------
in_root apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root/debootstrap"
rm -f "$root/usr/sbin/policy-rc.d"
kver=$(ls "$root/lib/modules")
[[ $(wc -w <<<"$kver") -eq 1 ]] || die "expected one kernel in the image, got: $kver"
install -m 0644 "$root/boot/vmlinuz-$kver" "$work/vmlinuz"
install -m 0644 "$root/boot/initrd.img-$kver" "$work/initrd.img"
versions=$(in_root dpkg-query -W -f '${Package}=${Version}\n' linux-image-cloud-amd64 "linux-image-$kver" postgresql-15 gcc-12 make libpq5)
for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount "${mounted[i]}"; done
mounted=()

# mke2fs copies the tree (owners, modes, links, device nodes) into a fresh file system: no loop
# mount. Raw first, then qcow2 (only the used blocks take space).
mke2fs -q -F -t ext4 -L ftvm-root -d "$root" "$work/root.raw" "$disk_size" >&2
qemu-img convert -f raw -O qcow2 "$work/root.raw" "$work/root.qcow2"
rm "$work/root.raw"

{
  printf '{\n  "hash": "%s",\n  "kernelVersion": "%s",\n  "cmdline": "%s",\n' "$hash" "$kver" "$cmdline"
  printf '  "diskSize": "%s",\n  "buildSource": "%s",\n' "$disk_size" "$build_src_version"
  printf '  "packages": {%s},\n' "$(printf '"%s",' $versions | sed 's/"\([^=]*\)=\([^"]*\)"/"\1": "\2"/g; s/,$//')"
  printf '  "buildSeconds": %d,\n' "$(($(date +%s) - started))"
  printf '  "built": "%s"\n}\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$work/manifest.json"

mkdir "$work/out"
mv "$work/root.qcow2" "$work/vmlinuz" "$work/initrd.img" "$work/manifest.json" "$work/out/"
# Rename into place last, so a half-built directory is never mistaken for a cached one.
mv -T "$work/out" "$out" 2>/dev/null || say "another build won the race; using its result"
say "built $out in $(($(date +%s) - started)) s ($(du -h "$out/root.qcow2" | cut -f1) root.qcow2)"
echo "$out"
