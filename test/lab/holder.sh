#!/usr/bin/env bash
# The first process of a lab host's mount+UTS namespace, started (by host.ts) as
#   nsenter --net=/run/netns/<netns> -- unshare --mount --uts --propagation private --fork -- holder.sh …
# It lays the host's own directories over the machine's, starts the host's virtlogd, libvirtd and
# sshd (they daemonize and outlive this script's shell), writes holder.pid as the "ready" mark and
# stays as the namespace holder that `nsenter -t <holder> -m -n -u` enters.
set -euo pipefail
name=$1 state=$2 ssh_config=$3

# unshare copied the root namespace's /run/netns/* mounts; each would keep that network namespace
# (and its veth) alive for as long as this host lives.
umount --recursive --lazy /run/netns 2>/dev/null || true
# A sysfs of this network namespace, as `ip netns exec` mounts: /sys/class/net shows the host's own
# links. The machine's cgroup mounts go with the old /sys, so libvirtd runs QEMU without cgroups
# rather than three daemons sharing (and colliding in) one machine-wide cgroup tree.
umount --lazy /sys
mount -t sysfs -o nosuid,nodev,noexec "ftvm-$name" /sys

hostname "$name"
mount --bind "$state/run" /run # /var/run is a symlink to /run on Debian
mount --bind "$state/etc-libvirt" /etc/libvirt
mount --bind "$state/lib-libvirt" /var/lib/libvirt
mount --bind "$state/cache-libvirt" /var/cache/libvirt
mount --bind "$state/log" /var/log
mount --bind "$state/hosts" /etc/hosts
mount --bind "$ssh_config" /etc/ssh/ssh_config
# A server's root shell rc, not this machine's: sshd runs every command through bash, which reads
# ~/.bashrc; the machine's (pyenv init and rehash, with a lock that a killed host leaves behind)
# would make each SSH command of the lab slow, or hang it.
if [ -e /root/.bashrc ]; then
  printf '# ftvm lab host: minimal root shell rc\n' >"$state/root-bashrc"
  mount --bind "$state/root-bashrc" /root/.bashrc
fi
ip link set lo up

install -d -m 0755 /run/sshd # sshd's privilege-separation dir
mkdir -p /run/lock /run/ftvm /var/log/libvirt/qemu
virtlogd -d
libvirtd -d
/usr/sbin/sshd -f "$state/sshd_config" -E /var/log/sshd.log

echo $$ >"$state/holder.pid.tmp"
mv "$state/holder.pid.tmp" "$state/holder.pid"
exec sleep infinity
