#!/usr/bin/env bash
# Runs as the first process of a lab host's mount+UTS namespace (inside its network namespace):
# lays the host's own /run, /etc/libvirt, /var/lib/libvirt, /var/log over the machine's, starts
# its virtlogd, libvirtd and sshd, then stays as the namespace holder that later commands enter.
set -euo pipefail
name=$1 state=$2 keys=$3
hostname "$name"
mount --bind "$state/run" /run
mount --bind "$state/etc-libvirt" /etc/libvirt
mount --bind "$state/lib-libvirt" /var/lib/libvirt
mount --bind "$state/cache-libvirt" /var/cache/libvirt
mount --bind "$state/log" /var/log
ip link set lo up
mkdir -p /run/sshd /run/libvirt /run/ftvm /var/log/libvirt/qemu
virtlogd -d
libvirtd -d
/usr/sbin/sshd -f "$state/sshd_config" -E /var/log/sshd.log
echo $$ >"$state/holder.pid"
exec sleep infinity
