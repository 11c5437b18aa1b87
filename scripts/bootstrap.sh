#!/usr/bin/env bash
# Brings a fresh Debian 12 machine (run as root) to the point where ftvm builds, tests and runs:
# Debian packages, pnpm and the workspace's dependencies, the TypeScript build, the test guest.
# Idempotent: every step checks before it works, so a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\033[1m[bootstrap]\033[0m %s\n' "$*"; }

[ "$(id -u)" = 0 ] || { echo "bootstrap: run as root (it installs packages and creates network namespaces)" >&2; exit 1; }
grep -q '^12' /etc/debian_version 2>/dev/null || log "warning: not Debian 12 ($(cat /etc/debian_version 2>/dev/null || echo unknown)); continuing"

APT_PACKAGES=(
  # the VMM and the control plane
  qemu-system-x86 qemu-utils libnbd-bin libvirt-daemon-system libvirt-clients libvirt-dev pkg-config libxml2-utils  # libnbd-bin: nbdinfo cross-checks the NBD client (#15)
  # lab hosts: namespaces, their sshd, the witness's etcd (iptables: the heartbeat test drops UDP)
  iproute2 iptables openssh-server openssh-client etcd-server etcd-client procps psmisc
  # the test guest: static busybox + our static clock probe, initramfs tools
  busybox-static qemu-guest-agent gcc libc6-dev cpio gzip zstd kmod
  # benchmark plots (SVG → PNG)
  librsvg2-bin fonts-dejavu-core
  # native node modules (@unraid/libvirt, ssh2)
  g++ make python3
  # provisioning (ansible/, vagrant/): the playbook's controller and lint, python3-apt for its apt
  # tasks on the lab hosts (which have no route to a mirror: what the roles install must be here),
  # Vagrant with the libvirt provider (vagrant/lab.sh: dnsmasq for its libvirt networks, rsync for
  # its synced folder)
  ansible ansible-lint python3-apt vagrant vagrant-libvirt git ca-certificates dnsmasq-base rsync
  # bench:workload builds a Debian root file system for its guest
  debootstrap
)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/tmp/ftvm-apt.log 2>&1 \
    || { tail -30 /tmp/ftvm-apt.log >&2; exit 1; }
fi
# Debian starts these through systemd, which a container or CI runner may not have; the lab runs
# its own copies inside namespaces, so the machine-wide ones are not needed and must not hold ports.

node_major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
[ "$node_major" -ge 20 ] || { echo "bootstrap: Node.js 20 or newer is required (found: $(node --version 2>/dev/null || echo none))" >&2; exit 1; }
PNPM_VERSION=$(node -p 'require("./package.json").packageManager.split("@")[1]')
if [ "$(pnpm --version 2>/dev/null || true)" != "$PNPM_VERSION" ]; then
  log "installing pnpm $PNPM_VERSION"
  npm install -g "pnpm@$PNPM_VERSION" >/dev/null
fi

log "installing workspace dependencies"
CI=true pnpm install --frozen-lockfile --reporter=append-only | tail -3
log "building TypeScript"
pnpm -s build

log "building the test guest (cached by content hash)"
bash test/guest/build.sh | tail -1

log "building ftvm's patched QEMU (cached by patch hash; ~10 minutes on 2 cores when the patches change)"
bash packages/kvmclock/qemu/build.sh | tail -1
