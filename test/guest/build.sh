#!/usr/bin/env bash
# Builds the ftvm test guest (kernel + initramfs for QEMU direct kernel boot) from Debian packages.
# Output: $FTVM_CACHE/guest/<hash>/{vmlinuz,initrd.img,manifest.json}; the directory is printed as
# the last line of stdout (progress goes to stderr). <hash> covers this script, init, probe.c, the
# exact package versions and the compiler, so an existing directory is reused as is.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${FTVM_CACHE:-/var/cache/ftvm}/guest
# Direct kernel boot command line. Why each flag is there: see README.md ("Kernel command line").
cmdline="console=ttyS0 quiet panic=-1 clocksource=tsc tsc=reliable mitigations=off 8250.nr_uarts=1 i8042.noaux i8042.nokbd"

say() { echo "build.sh: $*" >&2; }
die() { say "$*"; exit 1; }

# Everything the guest needs comes from these packages (never from this host's /boot or /lib),
# so a fresh CI machine builds the same guest. The libraries are qemu-ga's runtime closure.
meta_kernel=linux-image-cloud-amd64
libs_pkgs=(libc6 libglib2.0-0 libnuma1 liburing2 libudev1 libpcre2-8-0)

# The meta package only depends on the real, versioned kernel image package.
kernel_of() { apt-cache depends "$meta_kernel" 2>/dev/null | awk '/Depends: linux-image-/ { print $2; exit }'; }
kernel_pkg=$(kernel_of)
if [[ -z "$kernel_pkg" ]]; then
  say "apt does not know $meta_kernel; running apt-get update"
  apt-get update -qq >&2
  kernel_pkg=$(kernel_of)
fi
[[ -n "$kernel_pkg" ]] || die "cannot resolve the kernel package behind $meta_kernel"
pkgs=("$kernel_pkg" busybox-static qemu-guest-agent "${libs_pkgs[@]}")
# One apt-cache call for all candidates (each call costs most of a second): "name=version" lines.
mapfile -t pins < <(apt-cache policy "${pkgs[@]}" | awk '
  /^[^ ]/ { name = $1; sub(/:$/, "", name); sub(/:amd64$/, "", name) }
  /Candidate:/ && $2 != "(none)" { print name "=" $2 }')
[[ ${#pins[@]} -eq ${#pkgs[@]} ]] || die "no apt candidate for some of ${pkgs[*]} (got: ${pins[*]})"

hash=$( {
  cat "$here/build.sh" "$here/init" "$here/probe.c"
  printf '%s\n' "${pins[@]}"
  gcc --version | head -n1
  dpkg-query -W -f '${Version}\n' libc6-dev # the static libc linked into the probe
} | sha256sum | cut -c1-16)
out=$cache/$hash

if [[ -f "$out/manifest.json" ]]; then
  say "cached: $out"
  ln -sfn "$hash" "$cache/current"
  echo "$out"
  exit 0
fi

mkdir -p "$cache"
work=$(mktemp -d "$cache/.build-$hash.XXXXXX")
trap 'rm -rf "$work"' EXIT
say "building $hash in $work"

# --- fetch and unpack packages ---------------------------------------------------------------
mkdir -p "$work/debs" "$work/pkg"
(cd "$work/debs" && apt-get download -q "${pins[@]}" >&2)
for deb in "$work"/debs/*.deb; do dpkg-deb -x "$deb" "$work/pkg"; done
pkg=$work/pkg

# --- initramfs tree ---------------------------------------------------------------------------
root=$work/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,run,tmp,var,lib/modules,lib64,mnt/fs}
ln -s ../run "$root/var/run"
install -m 0755 "$here/init" "$root/init"
# qemu-ga's guest-shutdown (what `virsh shutdown` asks the agent for) runs /sbin/shutdown, which
# busybox lacks: power off (or reboot) at once, as a real guest's init would after its services.
printf '%s\n' '#!/bin/sh' 'case " $* " in *" -r "*) exec /bin/busybox reboot -f ;; *) exec /bin/busybox poweroff -f ;; esac' >"$root/sbin/shutdown"
chmod 0755 "$root/sbin/shutdown"
# `virsh shutdown` (ACPI) presses the power button: busybox acpid run-parts /etc/acpi/PWRF/00000080/.
mkdir -p "$root/etc/acpi/PWRF/00000080"
printf '%s\n' '#!/bin/sh' 'exec /bin/busybox poweroff -f' >"$root/etc/acpi/PWRF/00000080/poweroff"
chmod 0755 "$root/etc/acpi/PWRF/00000080/poweroff"

install -m 0755 "$pkg/bin/busybox" "$root/bin/busybox"
# Applet links made now from the busybox we ship (it is static, so it runs on the build host).
"$root/bin/busybox" --list-full | while read -r applet; do
  [[ -e "$root/$applet" ]] || ln -s /bin/busybox "$root/$applet"
done

gcc -O2 -static -Wall -Wextra -Werror -o "$root/usr/bin/ftvm-probe" "$here/probe.c" -lpthread
strip "$root/usr/bin/ftvm-probe"

# Kernel and modules. Virtio is modular in the cloud kernel; resolve each wanted module's
# dependencies (modinfo's depends field) depth-first so /etc/modules.order loads them in order.
kver=$(ls "$pkg/lib/modules")
[[ $(wc -w <<<"$kver") -eq 1 ]] || die "expected one kernel version in $kernel_pkg, got: $kver"
moddir=$pkg/lib/modules/$kver
install -m 0644 "$pkg/boot/vmlinuz-$kver" "$work/vmlinuz"
declare -A seen=()
order=()
add_module() {
  local name=${1//-/_} file dep
  [[ -n "${seen[$name]:-}" ]] && return 0
  seen[$name]=1
  if grep -qE "/${name}\.ko" "$moddir/modules.builtin"; then return 0; fi
  file=$(find "$moddir/kernel" -name "$name.ko" -o -name "${name//_/-}.ko" | head -n1)
  [[ -n "$file" ]] || die "module $name not found in $kernel_pkg"
  for dep in $(modinfo -F depends "$file" | tr ',' ' '); do add_module "$dep"; done
  install -m 0644 "$file" "$root/lib/modules/$name.ko"
  order+=("$name")
}
# virtio_blk, ext4 and crc32c (which ext4 and jbd2 ask the crypto API for) serve the disk
# workloads; ext4, jbd2, mbcache, crc16 and crc32c_generic are built into the cloud kernel, and
# add_module skips built-ins, so listing them only matters for a kernel that has them modular.
for m in virtio virtio_ring virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci \
  failover net_failover virtio_net virtio_console virtio_blk crc32c_generic crc16 mbcache jbd2 ext4 \
  evdev button; do
  add_module "$m"
done
printf '%s\n' "${order[@]}" >"$root/etc/modules.order"

# qemu-ga is dynamic: copy it with its library closure, resolved inside the unpacked packages
# (not against this host's libraries) by following DT_NEEDED, plus the dynamic loader.
install -m 0755 "$pkg/usr/sbin/qemu-ga" "$root/usr/sbin/qemu-ga"
libdirs=("$pkg/lib/x86_64-linux-gnu" "$pkg/usr/lib/x86_64-linux-gnu")
declare -A have=()
copy_needed() {
  local lib dir found
  for lib in $(readelf -d "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
    [[ -n "${have[$lib]:-}" ]] && continue
    found=
    for dir in "${libdirs[@]}"; do [[ -e "$dir/$lib" ]] && found=$dir/$lib && break; done
    [[ -n "$found" ]] || die "qemu-ga needs $lib, which none of ${libs_pkgs[*]} provides"
    have[$lib]=1
    install -D -m 0755 "$(readlink -f "$found")" "$root/lib/x86_64-linux-gnu/$lib"
    copy_needed "$found"
  done
}
copy_needed "$root/usr/sbin/qemu-ga"
install -m 0755 "$(readlink -f "$pkg/lib64/ld-linux-x86-64.so.2")" "$root/lib64/ld-linux-x86-64.so.2"
# guest-set-time runs /sbin/hwclock afterwards (busybox provides it, /dev/rtc0 is rtc_cmos).
[[ -e "$root/sbin/hwclock" ]] || die "busybox lacks hwclock, needed by guest-set-time"

(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0) |
  gzip -9 -n >"$work/initrd.img"

# --- manifest and publish ---------------------------------------------------------------------
{
  printf '{\n  "hash": "%s",\n  "kernelVersion": "%s",\n  "cmdline": "%s",\n' "$hash" "$kver" "$cmdline"
  printf '  "probePort": 5555,\n  "readyLine": "FTVM-PROBE-READY",\n'
  printf '  "modules": [%s],\n' "$(printf '"%s",' "${order[@]}" | sed 's/,$//')"
  printf '  "packages": {%s},\n' "$(printf '"%s",' "${pins[@]}" | sed 's/"\([^=]*\)=\([^"]*\)"/"\1": "\2"/g; s/,$//')"
  printf '  "built": "%s"\n}\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$work/manifest.json"

mkdir "$work/out"
mv "$work/vmlinuz" "$work/initrd.img" "$work/manifest.json" "$work/out/"
# Rename into place last, so a half-built directory is never mistaken for a cached one.
mv -T "$work/out" "$out" 2>/dev/null || say "another build won the race; using its result"
ln -sfn "$hash" "$cache/current"
say "built $out ($(du -h "$out/initrd.img" | cut -f1) initrd)"
echo "$out"
