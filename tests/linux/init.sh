#!/bin/sh
# /init of the Linux test guest (busybox sh, PID 1). Mounts the kernel file systems, loads
# the modules in /etc/pv-modules, runs the confidential-VM steps the kernel command line asks
# for (pv-cvm-init: the NIC, attestation, the LUKS data disk; nothing without pv.*
# parameters), then runs the host's test script /pv/test.sh (appended to the initrd as a
# second cpio archive) and prints `PV-EXIT <status>` on the console, the line the host reads
# the result from; then unmounts the data disk and powers off. Without a test script it gives
# the console a shell, for a person booting the image by hand.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
# tpm2-tools talk to the kernel's TPM resource manager (libtss2-tctildr would otherwise try
# tpm2-abrmd first, which the image does not have, and say so).
export TPM2TOOLS_TCTI=device:/dev/tpmrm0
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mkdir -p /dev/pts /root
mount -t devpts devpts /dev/pts

# Every device driver at once: loading one whose device is absent costs nothing.
# shellcheck disable=SC2046
modprobe -a $(cat /etc/pv-modules) || echo "pv-init: some modules did not load"

# Helpers for test scripts.
# pv_wait_dev PATH [SECONDS]: waits for a device node (SCSI disks are found asynchronously).
pv_wait_dev() {
	n=$((${2:-30} * 10))
	while [ ! -e "$1" ] && [ "$n" -gt 0 ]; do
		usleep 100000
		n=$((n - 1))
	done
	[ -e "$1" ] || { echo "pv_wait_dev: no $1"; return 1; }
}

# The NIC, attestation and the data disk, as /proc/cmdline asks (status in /run/pv/).
pv-cvm-init boot

if [ -f /pv/test.sh ]; then
	# A subshell, so that the script's `exit N` ends it with N and not PID 1.
	# shellcheck disable=SC1091 # the host adds it
	(. /pv/test.sh)
	status=$?
	# A line of its own, even after output without a newline.
	echo
	echo "PV-EXIT $status"
else
	echo "pv-init: no /pv/test.sh; a shell (exit powers off)"
	setsid cttyhack sh -l
fi
pv-cvm-init stop
sync
poweroff -f
