#!/bin/sh
# /init of the stand-in guest (`cargo xtask xen-lab --stand-in-guest`): Debian's kernel and
# busybox instead of the project's guest image, for debugging the lab itself. It follows
# the guest agent's contract: runs the workload (/etc/vgpu-run), prints its output on hvc0,
# writes data/vgpu/state and data/vgpu/exit-status to xenstore, and powers the domain off.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec >/dev/hvc0 2>&1 </dev/null
for m in xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xenfs; do
    ko=/lib/modules/$(uname -r)/$m.ko
    [ -e "$ko" ] && insmod "$ko"
done
mkdir -p /proc/xen
mount -t xenfs xenfs /proc/xen
RUN=$(cat /etc/vgpu-run)
xenstore-write data/vgpu/state running || echo "stand-in agent: cannot write to xenstore"
echo "stand-in agent: running: $RUN"
sh -c "$RUN"
status=$?
echo "stand-in agent: exit status $status"
xenstore-write data/vgpu/exit-status "$status" data/vgpu/state exited
sync
poweroff -f
