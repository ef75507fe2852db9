#!/usr/bin/env bash
# Builds the Linux test guest from Debian packages: Debian's cloud kernel (`vmlinuz`) and an
# uncompressed initramfs (`initrd.img`, cpio newc), which is also the confidential VM image
# of issue 18. It holds:
# - busybox, fio and e2fsprogs (mke2fs, e2fsck);
# - Debian's stock tpm2-tools (the `tpm2` program and its `tpm2_*` names, over the kernel's
#   own TPM driver: /dev/tpmrm0) and cryptsetup (LUKS2 on dm-crypt);
# - the virtio modules, loaded at boot, and the device-mapper and crypto ones, loaded for the
#   data disk (see `modules` and `disk_modules` below);
# - /init (init.sh beside this file), which brings the NIC up, attests, unlocks and mounts the
#   data disk when the kernel command line asks (pv-cvm-init, from cvm-init.sh beside this
#   file), then runs the test script a host appends as a second cpio archive;
# - every file of the repository's tools/guest/ (the attestation client pv-attest, ...) in
#   /usr/sbin, without its .sh suffix (none when the directory is absent or empty).
# See docs/linux-harness.md.
#
# Usage: build-image.sh            (as root, on Debian 12, with `apt-get update` done or doable)
# Prints the kernel's and the initrd's paths as its last two lines. Exits 2 when this machine
# cannot build it (no apt, the mirror unreachable and nothing cached).
#
# Everything is kept in a cache outside the work tree, ${PV_LINUX_CACHE:-$HOME/.cache/pv-linux}:
# the downloaded .debs in debs/ (a second run downloads nothing), the image in out/ with the
# key it was built for (the sha256 of this script, init.sh, cvm-init.sh and each tools/guest/
# file with its name, and every package's version). A run whose key matches prints the
# cached paths at once; when the mirror cannot be asked (no package lists, no network) a
# cached image is used as it is.
#
# Only the Debian mirror is reached, through `apt-get download`. The files come out of the
# downloaded packages, not from the host's installed ones, so the image does not depend on
# what this machine happens to have installed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
cache="${PV_LINUX_CACHE:-$HOME/.cache/pv-linux}"
debs="$cache/debs"
out="$cache/out"

# The repository's guest programs (tools/guest/*), staged as /usr/sbin/NAME.
guest_tools="$(cd "$here/../.." && pwd)/tools/guest"

# The packages the image is made of. The programs' shared libraries are found by following
# their library dependencies (see resolve_libraries). libtss2-tcti-device0 is named here
# because nothing links it: libtss2-tctildr loads the TCTI with dlopen.
kernel_meta=linux-image-cloud-amd64
tools=(busybox-static fio e2fsprogs libc6 tpm2-tools libtss2-tcti-device0 cryptsetup-bin)
# The programs (and the dlopened TCTI) whose shared libraries the image must hold. Of
# tpm2-tools only `tpm2`: `tss2` (the FAPI tool) would bring libtss2-fapi's closure.
tcti_device=usr/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0
elf_programs=(usr/bin/fio sbin/mke2fs sbin/e2fsck usr/bin/tpm2 sbin/cryptsetup "$tcti_device")
# Everything else these packages install that the guest uses: mke2fs' defaults and its
# mkfs.ext*/fsck.ext* names.
extra_files=(etc/mke2fs.conf sbin/mkfs.ext2 sbin/mkfs.ext3 sbin/mkfs.ext4
  sbin/fsck.ext2 sbin/fsck.ext3 sbin/fsck.ext4)
# Kernel modules /init loads, with what they depend on. In this kernel all of virtio is
# modular while ext4 (which also mounts ext2), jbd2 and crc32c are built in. virtio_net,
# virtio_console and vsock are for the NIC, serial and socket tests that come later.
modules=(virtio_pci virtio_blk virtio_scsi sd_mod virtio_net virtio_console
  vmw_vsock_virtio_transport)
# Kernel modules pv-cvm-init loads before it opens a LUKS2 (aes-xts-plain64) data disk, listed
# in /etc/pv-modules-disk: device-mapper and dm-crypt, the xts template over ecb(aes) (AES
# itself, CBC, SHA-256 and HMAC are built in, as are the TPM's CRB and TIS drivers), and
# algif_skcipher, through which cryptsetup encrypts the keyslot area (without it, cryptsetup
# falls back to a temporary dm-crypt mapping). Loaded explicitly, since the kernel's own
# module requests look for /sbin/modprobe, which the image does not have; and only then,
# since loading them costs every boot 0.1-0.2 s under TCG.
disk_modules=(dm_mod dm_crypt xts ecb algif_skcipher)

log() { echo "build-image: $*" >&2; }
die() { log "$*"; exit 1; }
print_outputs() {
  echo "$out/vmlinuz"
  echo "$out/initrd.img"
}
# This machine cannot build the image now (no apt, the mirror unreachable): an image built
# before is used as it is; with none, exit status 2, on which tests say SKIPPED. Any other
# failure is a bug here.
unavailable() {
  if [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.img" ]; then
    log "$*; using the cached image as it is"
    print_outputs
    exit 0
  fi
  log "$*"
  exit 2
}

for tool in apt-get apt-cache dpkg-deb flock; do
  command -v "$tool" >/dev/null || unavailable "$tool is not installed: the image is built from Debian packages"
done

# apt runs its downloads as the unprivileged _apt user when started as root, and _apt may
# not write to our cache: keep root (the files come from the signed mirror either way).
apt_opts=(-q -o APT::Sandbox::User=root)

# "package version architecture" for each package's candidate version (nothing for a name
# apt does not know).
candidates() {
  { apt-cache show --no-all-versions "$@" 2>/dev/null || true; } |
    awk '/^Package: /{p=$2} /^Version: /{v=$2} /^Architecture: /{a=$2}
         /^$/{if (p != "") print p, v, a; p=""} END{if (p != "") print p, v, a}'
}

# The .deb file name apt-get download gives a package version (an epoch's colon is escaped).
deb_name() { echo "${1}_${2//:/%3a}_${3}.deb"; }

# The mirror's package lists: without them (a fresh machine before `apt-get update`) apt
# knows no candidate. Returns non-zero if they cannot be had.
lists_ready() {
  [ -n "$(candidates "$kernel_meta")" ] && return 0
  log "no package lists: running apt-get update"
  apt-get update -qq >&2 || return 1
  [ -n "$(candidates "$kernel_meta")" ]
}

# The concrete kernel package the cloud meta-package depends on now.
kernel_package() {
  apt-cache depends "$kernel_meta" 2>/dev/null |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-/ {print $2; exit}'
}

# Downloads into the cache the candidate versions of the given packages not there yet, and
# sets `fetched` to the .deb paths of all of them. When the download fails, the package
# lists may be older than the mirror (which drops superseded versions): they are updated and
# the download tried once more.
fetch() {
  local lines missing=() p v a tmp try
  fetched=()
  for try in 1 2; do
    lines="$(candidates "$@")"
    [ "$(wc -l <<<"$lines")" -eq "$#" ] || die "apt knows no candidate of some of: $*"
    missing=()
    while read -r p v a; do
      [ -f "$debs/$(deb_name "$p" "$v" "$a")" ] || missing+=("$p=$v")
    done <<<"$lines"
    [ "${#missing[@]}" -eq 0 ] && break
    log "downloading ${missing[*]}"
    tmp="$(mktemp -d "$debs/.download.XXXXXX")"
    if (cd "$tmp" && apt-get download "${apt_opts[@]}" "${missing[@]}" >/dev/null); then
      mv "$tmp"/*.deb "$debs/"
      rmdir "$tmp"
      break
    fi
    rm -rf "$tmp"
    [ "$try" -eq 1 ] && apt-get update -qq >&2 && continue
    unavailable "apt-get download ${missing[*]} failed"
  done
  while read -r p v a; do
    fetched+=("$debs/$(deb_name "$p" "$v" "$a")")
  done <<<"$lines"
}

# The files of tools/guest/ the image holds (not hidden ones such as a .gitkeep). The
# attestation client must be among them: an image without it boots, but can never attest.
guest_files() {
  [ -f "$guest_tools/pv-attest.sh" ] || die "no $guest_tools/pv-attest.sh: run this script from the repository it belongs to"
  find "$guest_tools" -maxdepth 1 -type f ! -name '.*' | LC_ALL=C sort
}

# The key an image is built for: the scripts, each guest program with its name (the name is
# the command in the guest) and every package version that went into it.
image_key() {
  {
    sha256sum "$here/build-image.sh" "$here/init.sh" "$here/cvm-init.sh" | awk '{print $1}'
    guest_files | while read -r f; do echo "$(sha256sum <"$f" | awk '{print $1}') ${f##*/}"; done
    candidates "$@" | sort
  } | sha256sum | awk '{print $1}'
}

mkdir -p "$debs" "$out"
# One build at a time: test processes that start side by side (cargo nextest) share the cache.
exec 9>"$cache/lock"
flock 9

lists_ready || unavailable "cannot resolve Debian packages (no package lists and apt-get update failed)"

kernel_pkg="$(kernel_package)"
[ -n "$kernel_pkg" ] || die "$kernel_meta depends on no linux-image package"
kver="${kernel_pkg#linux-image-}"

# The libraries of the last build are part of its key: a security update of any of them
# rebuilds the image.
roots=("$kernel_pkg" "${tools[@]}")
if [ -f "$out/key" ] && [ -f "$out/libraries" ] && [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.img" ]; then
  mapfile -t last_libs <"$out/libraries"
  if [ "$(image_key "${roots[@]}" "${last_libs[@]}")" = "$(cat "$out/key")" ]; then
    log "up to date ($kver)"
    print_outputs
    exit 0
  fi
fi

work="$(mktemp -d "$cache/.work.XXXXXX")"
trap 'rm -rf "$work"' EXIT
x="$work/extracted" # every package unpacked, as dpkg would install it
root="$work/root"   # the initramfs tree
mkdir -p "$x" "$root"

extract() {
  local deb
  for deb in "$@"; do dpkg-deb -x "$deb" "$x"; done
}

log "kernel $kver"
fetch "${roots[@]}"
extract "${fetched[@]}"
[ -x "$x/lib64/ld-linux-x86-64.so.2" ] || die "libc6 has no /lib64/ld-linux-x86-64.so.2"

# Every shared library the programs load, as the package's loader resolves it: prints
# "soname path" for each, with path empty when the library is not in $x yet.
library_closure() {
  local dirs prog
  # Every directory of $x holding a library, so that RUNPATHs into subdirectories
  # (librados' ceph/) resolve as well.
  dirs="$(find "$x" -name '*.so*' -printf '%h\n' | sort -u | paste -sd:)"
  for prog in "${elf_programs[@]}"; do
    # The loader falls back to the host's directories for what $x lacks: such a path (or
    # "not found", or a load error naming the library) marks a library still missing.
    "$x/lib64/ld-linux-x86-64.so.2" --inhibit-cache --library-path "$dirs" --list "$x/$prog" 2>&1 || true
  done | awk -v x="$x/" '
    $2 == "=>" && index($3, x) == 1 { print $1, substr($3, length(x) + 1); next }
    $2 == "=>" { print $1, ""; next }
    /error while loading shared libraries/ { sub(/:$/, "", $7); print $7, "" }' | sort -u
}

# fio links every engine's library (ceph, gluster, nbd, pmem, rdma, ...), so the closure is
# large. The libraries are found breadth first along the packages' dependencies: each round
# downloads the library packages the previous round's packages depend on, until no soname
# is missing. (The soname does not name its package reliably: libcrypto.so.3 is in libssl3.)
resolve_libraries() {
  local frontier=("${tools[@]}") have=" ${tools[*]} " missing deps next p round=0
  while :; do
    missing="$(library_closure | awk '$2 == "" {print $1}')"
    [ -z "$missing" ] && return 0
    round=$((round + 1))
    [ "$round" -le 10 ] || break
    deps="$(apt-cache depends --no-recommends --no-suggests "${frontier[@]}" 2>/dev/null |
      awk '($1 == "Depends:" || $1 == "PreDepends:") && $2 !~ /^</ {print $2}' | sort -u)"
    next=()
    for p in $deps; do
      [[ "$have" == *" $p "* ]] && continue
      have+="$p "
      next+=("$p")
    done
    # Library packages only (fio also depends on python3 for its helper scripts).
    [ "${#next[@]}" -gt 0 ] &&
      mapfile -t next < <(apt-cache show --no-all-versions "${next[@]}" 2>/dev/null |
        awk '/^Package: /{p=$2} /^Section: /{if ($2 == "libs") print p}' | sort -u)
    [ "${#next[@]}" -gt 0 ] || break
    log "libraries: round $round: $(echo "$missing" | paste -sd' ') missing; fetching ${#next[@]} packages"
    fetch "${next[@]}"
    extract "${fetched[@]}"
    printf '%s\n' "${next[@]}" >>"$work/libraries"
    frontier=("${next[@]}")
  done
  # Not reached with Debian 12's fio; kept so that a library no package of the closure
  # ships still gives a working image: it is copied from this host, which then must have it.
  local soname host
  for soname in $missing; do
    host="$(ldconfig -p | awk -v s="$soname" '$1 == s && /x86-64/ {print $NF; exit}')"
    [ -n "$host" ] || die "no package and not the host provides $soname"
    log "WARNING: $soname is copied from this host ($host)"
    mkdir -p "$x/usr/lib/x86_64-linux-gnu"
    cp -L "$host" "$x/usr/lib/x86_64-linux-gnu/$soname"
  done
}

# Copies $x/REL into the initramfs at the same path; a symbolic link brings its target.
stage() {
  local rel="$1" target
  [ -e "$root/$rel" ] || [ -L "$root/$rel" ] && return 0
  [ -e "$x/$rel" ] || [ -L "$x/$rel" ] || die "$rel is in no package"
  mkdir -p "$root/$(dirname "$rel")"
  cp -a "$x/$rel" "$root/$rel"
  if [ -L "$x/$rel" ]; then
    target="$(readlink "$x/$rel")"
    case "$target" in
      /*) stage "${target#/}" ;;
      *) stage "$(cd "$(dirname "$x/$rel")" && realpath -m -s --relative-to="$x" "$target")" ;;
    esac
  fi
}

: >"$work/libraries"
resolve_libraries
mapfile -t libraries <"$work/libraries"

log "staging the initramfs"
for rel in bin/busybox "${elf_programs[@]}" "${extra_files[@]}" lib64/ld-linux-x86-64.so.2; do
  stage "$rel"
done
# tpm2-tools' programs are links to the one `tpm2`.
for link in "$x"/usr/bin/tpm2_*; do
  [ "$(readlink "$link")" = tpm2 ] || die "${link#"$x"/} is not a link to tpm2"
  stage "usr/bin/${link##*/}"
done
while read -r _ rel; do stage "$rel"; done < <(library_closure)
# busybox's applets as links, in /bin: fio and e2fsprogs' programs in /usr/bin and /sbin come
# first in /init's PATH (but busybox sh runs an applet of its own before it looks in PATH:
# e2fsprogs' mke2fs is /sbin/mke2fs, or mkfs.ext4).
for applet in $("$root/bin/busybox" --list); do
  [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done
mkdir -p "$root"/{dev,proc,sys,tmp,run,mnt,pv,etc,usr/sbin}
install -m 0755 "$here/init.sh" "$root/init"
install -m 0755 "$here/cvm-init.sh" "$root/usr/sbin/pv-cvm-init"
guest_programs=()
while read -r f; do
  name="${f##*/}"
  name="${name%.sh}"
  [ -e "$root/usr/sbin/$name" ] && die "tools/guest/${f##*/}: /usr/sbin/$name is in the image already"
  install -m 0755 "$f" "$root/usr/sbin/$name"
  guest_programs+=("$name")
done < <(guest_files)

# The modules and everything they depend on, with a modules.dep for busybox's modprobe
# (Debian's .deb ships none: busybox depmod writes it, here over the whole tree to find the
# dependencies, then over the subset the image holds).
moddir="lib/modules/$kver"
"$x/bin/busybox" depmod -b "$x" "$kver"
# Stages the module file $1 (relative to $moddir) and, first, the modules it needs.
stage_module() {
  local ko
  [ -e "$root/$moddir/$1" ] && return 0
  # shellcheck disable=SC2013 # the words of its line are module files
  for ko in $(awk -F': *' -v f="$1" '$1 == f { print $2; exit }' "$x/$moddir/modules.dep"); do
    stage_module "$ko"
  done
  stage "$moddir/$1"
}
for m in "${modules[@]}" "${disk_modules[@]}"; do
  # The module's file, named with - or _.
  file="$(awk -F: -v m="$m" '{ f = $1; sub(/.*\//, "", f); sub(/\.ko$/, "", f); gsub(/-/, "_", f)
                               if (f == m) { print $1; exit } }' "$x/$moddir/modules.dep")"
  [ -n "$file" ] || die "module $m is not in $kernel_pkg"
  stage_module "$file"
done
cp "$x/$moddir/modules.builtin" "$x/$moddir/modules.order" "$root/$moddir/"
"$x/bin/busybox" depmod -b "$root" "$kver"
printf '%s\n' "${modules[@]}" >"$root/etc/pv-modules"
printf '%s\n' "${disk_modules[@]}" >"$root/etc/pv-modules-disk"

log "writing the images"
# Owned by root, in a stable order. Not compressed: under TCG the kernel unpacks gzip at
# ~50 MB/s, which made every boot 0.9 s slower (3.4 s instead of 2.5 s) for 56 MB of disk.
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | "$x/bin/busybox" cpio -o -H newc -R 0:0 2>/dev/null) \
  >"$work/initrd.img"
cp "$x/boot/vmlinuz-$kver" "$work/vmlinuz"
mv "$work/vmlinuz" "$out/vmlinuz"
mv "$work/initrd.img" "$out/initrd.img"
printf '%s\n' "${libraries[@]}" >"$out/libraries"
image_key "${roots[@]}" "${libraries[@]}" >"$out/key"
log "built: kernel $kver, initrd $(du -h "$out/initrd.img" | cut -f1), ${#libraries[@]} library packages, guest programs: ${guest_programs[*]:-none}"
print_outputs
