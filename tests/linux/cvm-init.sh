#!/bin/sh
# pv-cvm-init: the confidential-VM half of the Linux guest's /init (busybox sh; installed as
# /usr/sbin/pv-cvm-init by build-image.sh). Driven by the kernel command line, it brings up
# the NIC, attests the guest to a key broker with pv-attest, and unlocks and mounts the LUKS2
# data disk with the secret the broker released. Every step is optional; without any pv.*
# parameter it does nothing and prints nothing.
#
#   pv-cvm-init boot                      the flow /proc/cmdline asks for (called by /init)
#   pv-cvm-init unlock DISK KEYFILE [provision]
#                                         opens DISK with KEYFILE and mounts it on /mnt/data;
#                                         with `provision`, a disk without a LUKS header is
#                                         formatted first (by hand, or by a test)
#   pv-cvm-init stop                      unmounts /mnt/data and closes the mapping (called
#                                         by /init before it powers off)
#
# The command line (docs/linux-harness.md):
#   pv.ip=ADDR/PREFIX   eth0 gets that address (and lo comes up)
#   pv.gw=ADDR          the default route, with pv.ip
#   pv.kbs=HOST:PORT    pv-attest --kbs HOST:PORT --secret-out /run/pv/disk.key
#   pv.disk=DEVICE      the LUKS2 data disk, opened with that secret as /dev/mapper/pvdata
#                       and mounted on /mnt/data
#   pv.provision=1      a data disk with no LUKS header is formatted first (LUKS2, then ext4)
#
# Each step asked for prints one `pv-init: <step>: ...` line with its outcome and writes it to
# a status file a test script (or a person) reads, its first word the outcome:
#   /run/pv/net      up eth0 ADDR [via GW] | error WHY
#   /run/pv/attest   released | refused CHECK: MESSAGE | error WHY
#   /run/pv/disk     mounted [provisioned] | locked WHY | error WHY
# A failed step never stops the boot: /init runs the test script (or a shell) either way, and
# the disk stays locked.

# The secret the broker released; removed as soon as the disk is open (it is kept only when
# no pv.disk uses it).
KEY=/run/pv/disk.key
# The device-mapper name of the opened data disk, and where it is mounted.
MAPPING=pvdata
MOUNTPOINT=/mnt/data
# pv-attest's exit statuses (its interface, tools/guest/pv-attest.sh).
ATTEST_REFUSED=3
ATTEST_RETRYABLE=75
# A retryable failure (the broker not reachable yet, a nonce that expired) is tried again this
# many times in all, this many seconds apart: 20 s for a broker that is still starting, and a
# boot that ends rather than waits for ever.
ATTEST_ATTEMPTS=6
ATTEST_RETRY_SECONDS=4
# How long a device (the NIC, the disk) may take to appear after its module loaded.
DEVICE_WAIT_TENTHS=100

say() { echo "pv-init: $*"; }

# status STEP TEXT: the step's status file.
status() { echo "$2" >"/run/pv/$1"; }

# wait_for PATH: whether PATH appears within DEVICE_WAIT_TENTHS tenths of a second.
wait_for() {
	n=$DEVICE_WAIT_TENTHS
	while [ ! -e "$1" ] && [ "$n" -gt 0 ]; do
		usleep 100000
		n=$((n - 1))
	done
	[ -e "$1" ]
}

# net ADDR/PREFIX [GW]
net() {
	if ! wait_for /sys/class/net/eth0; then
		status net "error no eth0"
		say "network: no eth0 (is there a NIC?)"
		return 1
	fi
	ip link set lo up
	if ! out="$(ip link set eth0 up 2>&1 && ip addr add "$1" dev eth0 2>&1)"; then
		status net "error ip addr add $1: $out"
		say "network: eth0 $1 failed: $out"
		return 1
	fi
	if [ -n "$2" ] && ! out="$(ip route add default via "$2" 2>&1)"; then
		status net "error ip route add default via $2: $out"
		say "network: eth0 $1 is up, but the route via $2 failed: $out"
		return 1
	fi
	status net "up eth0 $1${2:+ via $2}"
	say "network: eth0 $1 up${2:+, default route via $2}"
}

# attest HOST:PORT: runs pv-attest until the secret is in $KEY, the broker refuses, or it
# fails for good; the secret is there (mode 0600) only on success.
attest() {
	if ! command -v pv-attest >/dev/null; then
		status attest "error no pv-attest in this image"
		say "attestation: error: there is no pv-attest in this image"
		return 1
	fi
	err=/run/pv/attest.stderr
	attempt=1
	while :; do
		rm -f "$KEY"
		(umask 077 && pv-attest --kbs "$1" --secret-out "$KEY" 2>"$err")
		rc=$?
		# Its messages on the console too, after its own output.
		cat "$err"
		case $rc in
			0)
				if [ -s "$KEY" ]; then
					chmod 0600 "$KEY"
					status attest released
					say "attestation: released"
					rm -f "$err"
					return 0
				fi
				why="pv-attest exited 0 but wrote no secret to $KEY"
				;;
			"$ATTEST_REFUSED")
				what="$(sed -n 's/^pv-attest: refused: //p' "$err" | tail -n 1)"
				status attest "refused ${what:-(no reason given)}"
				say "attestation: refused: ${what:-(pv-attest gave no reason)}"
				rm -f "$err"
				return 1
				;;
			"$ATTEST_RETRYABLE")
				why="$(sed -n 's/^pv-attest: retryable: //p' "$err" | tail -n 1)"
				if [ "$attempt" -lt "$ATTEST_ATTEMPTS" ]; then
					say "attestation: retryable (attempt $attempt of $ATTEST_ATTEMPTS): ${why:-(no reason given)}; again in $ATTEST_RETRY_SECONDS s"
					attempt=$((attempt + 1))
					sleep "$ATTEST_RETRY_SECONDS"
					continue
				fi
				why="still retryable after $ATTEST_ATTEMPTS attempts: ${why:-(no reason given)}"
				;;
			*)
				why="pv-attest exited $rc: $(tail -n 1 "$err")"
				;;
		esac
		rm -f "$KEY" "$err"
		status attest "error $why"
		say "attestation: error: $why"
		return 1
	done
}

# unlock DISK KEYFILE PROVISION CONSUME: opens DISK with the key in KEYFILE as
# /dev/mapper/$MAPPING and mounts it on $MOUNTPOINT. With PROVISION=1 a disk without a LUKS
# header is formatted first, and gets an ext4 file system once open. With CONSUME=1 the key
# file is removed as soon as cryptsetup no longer needs it.
unlock() {
	disk=$1 key=$2 provision=$3 consume=$4 provisioned=
	if ! wait_for "$disk" || [ ! -b "$disk" ]; then
		status disk "error no block device $disk"
		say "data disk: $disk is not a block device"
		return 1
	fi
	if [ ! -s "$key" ]; then
		status disk "locked no secret"
		say "data disk: left locked: there is no secret to open $disk with"
		return 1
	fi
	mkdir -p /run/cryptsetup
	# dm-crypt and the ciphers, only now: /init does not load them (it would cost every boot).
	# shellcheck disable=SC2046 # one module a word
	if ! out="$(modprobe -a $(cat /etc/pv-modules-disk) 2>&1)"; then
		status disk "error modprobe: $out"
		say "data disk: loading dm-crypt failed: $out"
		return 1
	fi
	if ! cryptsetup isLuks "$disk" 2>/dev/null; then
		if [ "$provision" != 1 ]; then
			[ "$consume" = 1 ] && rm -f "$key"
			status disk "locked no LUKS header on $disk"
			say "data disk: left locked: $disk holds no LUKS header (pv.provision=1 would format it)"
			return 1
		fi
		say "data disk: $disk holds no LUKS header: formatting it (pv.provision=1)"
		# The key file is a high-entropy random secret from the broker, not a passphrase:
		# stretching it adds nothing, and argon2id's default memory cost (up to 1 GiB, at
		# least what the guest has free) would not fit a 512 MiB guest. So PBKDF2 with the
		# fewest iterations cryptsetup accepts.
		if ! out="$(cryptsetup luksFormat --batch-mode --type luks2 --cipher aes-xts-plain64 \
			--key-size 512 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
			--key-file "$key" "$disk" 2>&1)"; then
			[ "$consume" = 1 ] && rm -f "$key"
			status disk "error luksFormat: $out"
			say "data disk: formatting $disk failed: $out"
			return 1
		fi
		provisioned=1
	fi
	out="$(cryptsetup open --type luks2 --key-file "$key" "$disk" "$MAPPING" 2>&1)"
	rc=$?
	[ "$consume" = 1 ] && rm -f "$key"
	case $rc in
		0) ;;
		# cryptsetup's "no permission (bad passphrase)": the secret is not this disk's key.
		2)
			status disk "locked the secret does not open $disk"
			say "data disk: left locked: the secret does not open $disk ($out)"
			return 1
			;;
		*)
			status disk "error cryptsetup open: $out"
			say "data disk: opening $disk failed: $out"
			return 1
			;;
	esac
	# By its path: busybox sh runs its own applet of a name before looking in PATH, and its
	# mke2fs makes no ext4.
	if [ -n "$provisioned" ] && ! out="$(/sbin/mke2fs -q -t ext4 -L "$MAPPING" "/dev/mapper/$MAPPING" 2>&1)"; then
		status disk "error mke2fs: $out"
		say "data disk: making its file system failed: $out"
		return 1
	fi
	mkdir -p "$MOUNTPOINT"
	if ! out="$(mount -t ext4 "/dev/mapper/$MAPPING" "$MOUNTPOINT" 2>&1)"; then
		status disk "error mount: $out"
		say "data disk: unlocked, but mounting it failed: $out"
		return 1
	fi
	status disk "mounted${provisioned:+ provisioned}"
	say "data disk: ${provisioned:+provisioned, }unlocked and mounted at $MOUNTPOINT"
}

boot() {
	ip='' gw='' kbs='' disk='' provision=''
	# Word by word, without globbing what the command line holds.
	set -f
	# shellcheck disable=SC2013 # words, not lines
	for arg in $(cat /proc/cmdline); do
		case $arg in
			pv.ip=*) ip=${arg#pv.ip=} ;;
			pv.gw=*) gw=${arg#pv.gw=} ;;
			pv.kbs=*) kbs=${arg#pv.kbs=} ;;
			pv.disk=*) disk=${arg#pv.disk=} ;;
			pv.provision=*) provision=${arg#pv.provision=} ;;
		esac
	done
	set +f
	[ -n "$ip$kbs$disk" ] || return 0
	mkdir -p /run/pv
	chmod 0700 /run/pv
	[ -n "$ip" ] && net "$ip" "$gw"
	[ -n "$kbs" ] && attest "$kbs"
	if [ -n "$disk" ]; then
		if [ -z "$kbs" ]; then
			status disk "locked no pv.kbs to ask for the secret"
			say "data disk: left locked: no pv.kbs on the command line to ask for its secret"
		elif [ ! -s "$KEY" ]; then
			status disk "locked no secret (attestation: $(cat /run/pv/attest))"
			say "data disk: left locked: the broker released no secret"
		else
			unlock "$disk" "$KEY" "$provision" 1
			# Gone on every path, also where unlock returned before using it.
			rm -f "$KEY"
		fi
	fi
	return 0
}

stop() {
	if grep -q " $MOUNTPOINT " /proc/mounts; then
		umount "$MOUNTPOINT" || say "data disk: unmounting $MOUNTPOINT failed"
	fi
	if [ -e "/dev/mapper/$MAPPING" ]; then
		cryptsetup close "$MAPPING" || say "data disk: closing $MAPPING failed"
	fi
	return 0
}

case $1 in
	boot) boot ;;
	unlock)
		[ $# -ge 3 ] || { echo "usage: pv-cvm-init unlock DISK KEYFILE [provision]" >&2; exit 1; }
		mkdir -p /run/pv
		unlock "$2" "$3" "$([ "$4" = provision ] && echo 1)" 0
		;;
	stop) stop ;;
	*)
		echo "usage: pv-cvm-init boot | unlock DISK KEYFILE [provision] | stop" >&2
		exit 1
		;;
esac
