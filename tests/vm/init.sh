#!/bin/busybox sh
# PID 1 of the VM lane's guest (built into the initramfs by builder.py).
#
# Mounts the host's / (virtio-9p tag "hostroot", read-only) under a tmpfs
# overlay at /newroot, the project folder (tag "project", read-write) at the
# same path inside it, a pure cgroup v2 hierarchy with every controller
# enabled in the root's subtree_control, then runs RUN/command.sh there
# (chroot) and writes its exit status to RUN/status. RUN and the project path
# come from the kernel command line (oomwarden.run=, oomwarden.project=).
# Any failure on the way reboots (qemu runs with -no-reboot, so it exits)
# without a status file: the runner then fails and prints this console's tail.

/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

say() { echo "oomwarden-vm: $*"; }
fail() { say "$*"; sync; reboot -f; sleep 10; exit 1; }

mount -t proc proc /proc || fail "cannot mount /proc"
mount -t sysfs sysfs /sys || fail "cannot mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "cannot mount /dev"
for m in $(cat /modules.load); do
    insmod "/lib/modules/$m.ko" || fail "insmod $m failed"
done

run=
project=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        oomwarden.run=*) run="${arg#*=}" ;;
        oomwarden.project=*) project="${arg#*=}" ;;
    esac
done
[ -n "$run" ] && [ -n "$project" ] || fail "no oomwarden.run= or oomwarden.project= in /proc/cmdline"

R=/newroot
nine=trans=virtio,version=9p2000.L,msize=512000,cache=loose
mount -t 9p -o "$nine,ro" hostroot /lower || fail "cannot mount the host's / (9p tag hostroot)"
mount -t tmpfs -o mode=755 rw /rw || fail "cannot mount the overlay's tmpfs"
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay $R \
    || fail "cannot mount the overlay on the host's /"
mount -t proc proc $R/proc || fail "cannot mount $R/proc"
mount -t sysfs sysfs $R/sys || fail "cannot mount $R/sys"
mount -t cgroup2 -o nsdelegate,memory_recursiveprot cgroup2 $R/sys/fs/cgroup \
    || fail "cannot mount cgroup2"
mount -t devtmpfs devtmpfs $R/dev || fail "cannot mount $R/dev"
mkdir -p $R/dev/pts $R/dev/shm $R/tmp $R/run
mount -t devpts devpts $R/dev/pts
mount -t tmpfs -o mode=1777 shm $R/dev/shm
mount -t tmpfs -o mode=1777 tmp $R/tmp
mount -t tmpfs -o mode=755 run $R/run
# After the fresh /tmp: the project may live below /tmp on the host.
mkdir -p "$R$project"
mount -t 9p -o "$nine" project "$R$project" || fail "cannot mount the project (9p tag project)"

cg=$R/sys/fs/cgroup
for c in $(cat $cg/cgroup.controllers); do
    echo "+$c" > $cg/cgroup.subtree_control || say "cannot enable the $c controller"
done
grep -qw memory $cg/cgroup.subtree_control || fail "the memory controller is not enabled"
[ -f "$R$run/command.sh" ] || fail "no $run/command.sh in the project share"
# Only emergencies (a panic) reach the console from now on: the tests' OOM
# kills would interleave with their output (they read /dev/kmsg themselves).
echo 1 > /proc/sys/kernel/printk

echo "OOMWARDEN-VM-START"
chroot $R /bin/sh "$run/command.sh" < /dev/null
status=$?
echo "$status" > "$R$run/status"
echo "OOMWARDEN-VM-EXIT $status"
sync
umount "$R$project" 2> /dev/null
sync
reboot -f
sleep 10
