#!/usr/bin/env bash
# Builds ftvm's patched QEMU (x86_64-softmmu) from Debian 12's qemu source package with the patches
# in ./patches, and caches the result by a hash of (source version, patches, build recipe).
#
#   bash packages/kvmclock/qemu/build.sh      # prints the binary path as its last stdout line
#
# A cache hit takes well under a second and needs nothing but the cache. A miss (as root, Debian 12):
# adds deb-src entries if apt has none, installs the build dependencies, `apt-get source qemu`
# (cached too), applies the patches, configures, builds with ninja under `nice` and publishes
# ${FTVM_CACHE:-/var/cache/ftvm}/qemu/<hash>/ atomically (built in a temporary directory, renamed).
# Progress goes to stderr; the full log is <hash>/build.log (or <hash>.failed.log on failure).
#
# The binary uses Debian's firmware (qemu-system-data, seabios, ipxe-qemu) through its built-in
# firmware path, exactly like /usr/bin/qemu-system-x86_64, so it needs no -L and libvirt can use it
# as <emulator> unchanged.
#
# Environment:
#   FTVM_CACHE                 cache root (default /var/cache/ftvm)
#   FTVM_QEMU_SOURCE_VERSION   Debian source version to build (default: the installed
#                              qemu-system-x86's, else the newest apt offers)
#   FTVM_QEMU_JOBS             ninja -j (default 2)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
patch_dir="$here/patches"
cache="${FTVM_CACHE:-/var/cache/ftvm}/qemu"
jobs="${FTVM_QEMU_JOBS:-2}"

log() { printf 'ftvm-qemu: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---- the recipe (everything here is part of the cache key) -----------------------------------
firmware_path=/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu
# --without-default-features: the result must not depend on which -dev packages happen to be
# installed; everything the ftvm and libvirt command lines need is enabled explicitly
# (-netdev user: slirp; -sandbox: seccomp; -object memory-backend-ram, -msg timestamp=on: core),
# plus what keeps libvirt's domain capabilities close to Debian's binary (VNC, TPM, 9p and
# virtiofs, vhost, io='native'). Left out: SPICE/QXL, SDL/GTK, OpenGL, USB redirection, and
# block drivers other than the built-in ones (raw, qcow2, ...).
configure_opts=(
  --target-list=x86_64-softmmu
  --firmwarepath="$firmware_path"
  --without-default-features
  --enable-tcg --enable-kvm
  --enable-slirp --enable-seccomp --enable-cap-ng --enable-attr --enable-fdt=system
  --enable-vnc --enable-tpm --enable-virtfs --enable-linux-aio
  --enable-vhost-kernel --enable-vhost-net --enable-vhost-user
  --enable-malloc-trim --enable-avx2
  --disable-docs --disable-tools --disable-guest-agent --disable-user
  --disable-install-blobs --disable-werror --with-git-submodules=ignore
)
build_deps=(
  dpkg-dev patch gcc make pkg-config ninja-build meson python3-venv flex bison
  libglib2.0-dev libpixman-1-dev libslirp-dev libseccomp-dev libcap-ng-dev libattr1-dev
  zlib1g-dev libfdt-dev libaio-dev
)
runtime_deps=(qemu-system-data seabios ipxe-qemu)
recipe_version=1

# ---- cache key ----------------------------------------------------------------------------------
shopt -s nullglob
patches=("$patch_dir"/*.patch)
shopt -u nullglob
((${#patches[@]})) || die "no patches in $patch_dir"

version="${FTVM_QEMU_SOURCE_VERSION:-}"
if [[ -z $version ]]; then
  version="$(dpkg-query -W -f='${source:Version}' qemu-system-x86 2>/dev/null || true)"
fi
if [[ -z $version ]]; then
  version="$( (apt-cache showsrc qemu 2>/dev/null || true) | awk '/^Version:/ { print $2 }' | sort -V | tail -n 1)"
fi
[[ -n $version ]] || die "cannot tell which qemu source version to build: install qemu-system-x86, add deb-src entries, or set FTVM_QEMU_SOURCE_VERSION"

hash="$(
  {
    echo "recipe $recipe_version"
    echo "arch $(dpkg --print-architecture)"
    echo "source qemu=$version"
    printf 'configure %s\n' "${configure_opts[@]}"
    for p in "${patches[@]}"; do
      echo "patch $(basename "$p") $(sha256sum <"$p" | cut -d' ' -f1)"
    done
  } | sha256sum | cut -c1-16
)"
out="$cache/$hash"
binary="$out/bin/qemu-system-x86_64"

if [[ -x $binary ]]; then
  log "cache hit: qemu $version + ${#patches[@]} patches ($hash)"
  echo "$binary"
  exit 0
fi

# ---- cache miss: build --------------------------------------------------------------------------
[[ $(id -u) -eq 0 ]] || die "cache miss ($out): building needs root (apt); run as root once"
mkdir -p "$cache"
exec 9>"$cache/.lock-$hash"
flock 9
if [[ -x $binary ]]; then # built by a concurrent run while we waited
  echo "$binary"
  exit 0
fi

started=$(date +%s)
tmp="$(mktemp -d "$cache/.build-$hash.XXXXXX")"
build_log="$tmp/build.log"
cleanup() { rm -rf "$tmp"; }
trap cleanup EXIT
log "cache miss: building qemu $version + ${#patches[@]} patches ($hash); log: $build_log"

# shellcheck source=../../../scripts/lib/cached-build.sh
source "$(dirname "${BASH_SOURCE[0]}")/../../../scripts/lib/cached-build.sh" # fail, run, install_missing

export DEBIAN_FRONTEND=noninteractive
install_missing "${build_deps[@]}" "${runtime_deps[@]}"

# Debian source, extracted with Debian's own patches applied, cached per version.
src_cache="$cache/src/qemu_${version//:/_}"
if [[ ! -f $src_cache/.complete ]]; then
  # (apt-cache output is captured first: grep -q closing the pipe early would fail pipefail)
  offered() { apt-cache showsrc qemu 2>/dev/null | awk '/^Version:/ { print $2 }' || true; }
  if [[ -z $(offered) ]]; then
    log "adding deb-src entries for apt"
    if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
      # deb822: the same repositories (URIs, suites, keys) with Types: deb-src.
      sed -E 's/^Types:.*/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
        >/etc/apt/sources.list.d/ftvm-deb-src.sources
    elif [[ -f /etc/apt/sources.list ]]; then
      sed -n -E 's/^deb[[:space:]]/deb-src /p' /etc/apt/sources.list >/etc/apt/sources.list.d/ftvm-deb-src.list
    else
      die "no apt sources found to derive deb-src entries from"
    fi
    run apt-get update -q
  elif ! grep -qxF "$version" <<<"$(offered)"; then
    run apt-get update -q
  fi
  grep -qxF "$version" <<<"$(offered)" ||
    fail "apt offers no qemu source version $version (offers: $(offered | tr '\n' ' ')); set FTVM_QEMU_SOURCE_VERSION"
  log "fetching the Debian source (apt-get source qemu=$version)"
  fetch="$(mktemp -d "$cache/.src-fetch.XXXXXX")"
  (cd "$fetch" && apt-get source -q "qemu=$version") >>"$build_log" 2>&1 ||
    { rm -rf "$fetch"; fail "apt-get source qemu=$version failed"; }
  extracted=("$fetch"/qemu-*/)
  [[ -d ${extracted[0]} && -f ${extracted[0]}/configure ]] || { rm -rf "$fetch"; fail "apt-get source left no source tree"; }
  touch "${extracted[0]}/.complete"
  mkdir -p "$cache/src"
  rm -rf "$src_cache"
  mv -T "${extracted[0]}" "$src_cache"
  rm -rf "$fetch"
fi

log "applying ${#patches[@]} patches"
cp -a "$src_cache" "$tmp/src"
for p in "${patches[@]}"; do
  echo "== applying $(basename "$p")" >>"$build_log"
  patch -d "$tmp/src" -p1 --batch --forward --no-backup-if-mismatch <"$p" >>"$build_log" 2>&1 ||
    fail "patch $(basename "$p") does not apply to qemu $version"
done

log "configuring"
mkdir -p "$tmp/build"
(cd "$tmp/build" && "$tmp/src/configure" --prefix="$out" \
  --with-pkgversion="ftvm-$hash Debian $version" "${configure_opts[@]}") >>"$build_log" 2>&1 ||
  fail "configure failed"

log "building with ninja -j$jobs under nice (about 10 minutes on 2 cores)"
(
  cd "$tmp/build"
  nice -n 10 ninja -j"$jobs" qemu-system-x86_64 >>"$build_log" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 30
    step="$(grep -o '^\[[0-9]*/[0-9]*\]' "$build_log" | tail -n 1 || true)"
    [[ -n $step ]] && printf 'ftvm-qemu: ninja %s\n' "$step" >&2
  done
  wait "$pid"
) || fail "ninja failed"

log "installing into $out"
stage="$tmp/out"
mkdir -p "$stage/bin" "$stage/share" "$stage/patches"
install -m 0755 "$tmp/build/qemu-system-x86_64" "$stage/bin/qemu-system-x86_64"
# The data directory QEMU derives from its own location (-L default, keymaps): Debian's.
ln -s /usr/share/qemu "$stage/share/qemu"
cp "${patches[@]}" "$stage/patches/"

# Smoke test before publishing: answers like a libvirt-usable QEMU, has ftvm's command, finds
# real firmware (no empty placeholder ROM anywhere on its path).
probe="$(printf '%s\n' '{"execute":"qmp_capabilities"}' '{"execute":"query-commands"}' '{"execute":"quit"}' |
  timeout 60 "$stage/bin/qemu-system-x86_64" -machine none -nodefaults -display none -sandbox on \
    -msg timestamp=on -qmp stdio 2>>"$build_log")" || fail "the built QEMU failed its QMP smoke test"
grep -q '"x-ftvm-clock-compensate"' <<<"$probe" || fail "the built QEMU lacks x-ftvm-clock-compensate"
"$stage/bin/qemu-system-x86_64" -version >>"$build_log" 2>&1 || fail "-version failed"
for rom in bios-256k.bin linuxboot_dma.bin kvmvapic.bin efi-virtio.rom vgabios-stdvga.bin; do
  found=""
  for dir in ${firmware_path//:/ }; do
    [[ -s $dir/$rom ]] && { found="$dir/$rom"; break; }
    [[ -e $dir/$rom ]] && fail "$dir/$rom is empty: it would shadow the real ROM"
  done
  [[ -n $found ]] || fail "firmware $rom not found in $firmware_path (install ${runtime_deps[*]})"
done

finished=$(date +%s)
{
  echo "hash=$hash"
  echo "source=qemu $version (apt-get source, Debian patches applied)"
  echo "patches=$(cd "$patch_dir" && echo *.patch)"
  echo "configure=${configure_opts[*]}"
  echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ) in $((finished - started)) s on $(nproc) cores"
  echo "version=$("$stage/bin/qemu-system-x86_64" -version | head -n 1)"
} >"$stage/BUILDINFO"
cp "$build_log" "$stage/build.log"

rm -rf "$out" # a leftover without a binary (we hold the lock and saw no binary)
mv -T "$stage" "$out" || fail "could not publish $out"
rm -f "$cache/$hash.failed.log"
log "built in $((finished - started)) s: $binary"
echo "$binary"
