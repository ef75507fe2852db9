#!/usr/bin/env bash
# Checks that the VMGS library (pv-vmgs without its default `std` feature) stays `no_std` +
# `alloc`, as the metal platform builds it (a ring-3 task over a RAM disk):
# - clippy (a `cargo check` with lints) of every target: `#![no_std]` makes any `std::` path in
#   the library a compile error;
# - no dependency turns on a `std` feature or brings a hosted-only crate (the host target
#   always has std, so a dependency that uses it would still compile here);
# - the library's no_std unit test runs: keys and nonces come only from the random source the
#   platform installs, and without one every operation that needs them fails.
# About 30 s on 2 cores from a cold target directory. Usage: vmgs-no-std.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo clippy -p pv-vmgs --no-default-features --all-targets -- -D warnings
tree=$(cargo tree -p pv-vmgs --no-default-features -e features --prefix none)
if grep -E 'feature "std"|^(getrandom|tracing|libc|std) ' <<<"$tree"; then
  echo "pv-vmgs without its std feature depends on std through the dependencies above" >&2
  exit 1
fi
cargo test -p pv-vmgs --no-default-features --lib
