#!/usr/bin/env bash
# Installs AMD's SEV-SNP guest tool `snpguest` (virtee, from crates.io) into ROOT
# (default /work/tools/snpguest): the binary lands in ROOT/bin/snpguest, where
# tests/tests/snpguest.rs looks for it (or set PV_SNPGUEST to its path).
#
# snpguest 0.11.0 builds OpenSSL from source (its `openssl` dependency is `vendored`), so the
# build needs a C compiler, make and perl, not libssl-dev. Default features only: the
# optional `hyperv`/`tss-esapi` feature is not needed to verify evidence. The build takes
# about 4 minutes on 2 cores.
#
# Usage: install-snpguest.sh [ROOT]
set -euo pipefail
root=${1:-/work/tools/snpguest}
version=${SNPGUEST_VERSION:-0.11.0}

if [ -x "$root/bin/snpguest" ] && "$root/bin/snpguest" --version | grep -qx "snpguest $version"; then
  echo "snpguest $version is already installed in $root"
  exit 0
fi

if command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  # Debian's lists may be missing on a fresh machine; a failed update leaves the install
  # below to say what is missing.
  apt-get update -qq || true
  apt-get install -y --no-install-recommends gcc libc6-dev make perl
fi

# Never the project's target directory (this build must not wait on or evict it): cargo
# install's own temporary one, or SNPGUEST_TARGET_DIR to keep the build for a later version.
if [ -n "${SNPGUEST_TARGET_DIR:-}" ]; then
  export CARGO_TARGET_DIR=$SNPGUEST_TARGET_DIR
else
  unset CARGO_TARGET_DIR
fi
cargo install snpguest --version "$version" --locked --root "$root"
"$root/bin/snpguest" --version
