#!/usr/bin/env bash
# Checks the simulated platform's SEV-SNP evidence with AMD's independent verifier,
# `snpguest` (virtee): the ARK -> ASK -> VCEK chain (`verify certs`), and a report's TCB,
# chip ID, VCEK signature, measurement and report data (`verify attestation`). Then the
# cases it must reject: a report with one bit flipped in its signed part, a report checked
# against the wrong nonce or measurement, a second platform's report against the first
# platform's chain, and a chain whose VCEK comes from the second platform.
#
# Prints every command it runs and its output, "PASS name" or "FAIL name: why" per check,
# and exits non-zero if any check did not go as expected (2 if it cannot run at all).
# Used by tests/tests/snpguest.rs; install snpguest with tests/scripts/install-snpguest.sh.
#
# Usage: snpguest_verify.sh PARAVISOR_BIN [SNPGUEST_BIN]
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "usage: $0 PARAVISOR_BIN [SNPGUEST_BIN]" >&2
  exit 2
fi
paravisor=$1
snpguest=${2:-${PV_SNPGUEST:-$(command -v snpguest || echo /work/tools/snpguest/bin/snpguest)}}
if [ ! -x "$snpguest" ]; then
  echo "snpguest not found at $snpguest (run tests/scripts/install-snpguest.sh)" >&2
  exit 2
fi
# snpguest reports errors through anyhow, which appends a stack backtrace when this is set.
export RUST_BACKTRACE=0 RUST_LIB_BACKTRACE=0

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Runs a setup command (printed first); any failure ends the script.
setup() {
  echo "+ $*"
  "$@"
}

passed=0
failed=0
# check NAME EXPECT PATTERN COMMAND...: runs COMMAND, printing it and its output; EXPECT is
# "accept" (exit 0) or "reject" (non-zero exit); PATTERN must appear in the output, so that
# a rejection is for the reason we expect and not, say, an unreadable file.
check() {
  local name=$1 expect=$2 pattern=$3
  shift 3
  echo "+ $*"
  local out rc=0
  out=$("$@" 2>&1) || rc=$?
  printf '%s\n' "$out" | sed 's/^/    /'
  local why=""
  if [ "$expect" = accept ] && [ "$rc" -ne 0 ]; then
    why="rejected (exit $rc), expected to accept"
  elif [ "$expect" = reject ] && [ "$rc" -eq 0 ]; then
    why="accepted, expected to reject"
  elif ! grep -qF -- "$pattern" <<<"$out"; then
    why="exit $rc as expected, but the output lacks \"$pattern\""
  fi
  if [ -z "$why" ]; then
    echo "PASS $name"
    passed=$((passed + 1))
  else
    echo "FAIL $name: $why"
    failed=$((failed + 1))
  fi
}

random_hex() {
  od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'
}

# Flips bit 0 of the byte at OFFSET in FILE.
flip_bit() {
  local file=$1 offset=$2 byte
  byte=$(od -An -tu1 -j"$offset" -N1 "$file" | tr -d ' ')
  # shellcheck disable=SC2059 # the format is the escaped byte itself
  printf "$(printf '\\%03o' $((byte ^ 1)))" |
    dd of="$file" bs=1 seek="$offset" conv=notrunc status=none
}

"$snpguest" --version

# Platform A: the one whose evidence must be accepted. Platform B: another chip.
setup "$paravisor" platform init --platform-dir "$work/a"
setup "$paravisor" platform init --platform-dir "$work/b"
setup "$paravisor" attest certs --platform-dir "$work/a" --out "$work/a-certs"
setup "$paravisor" attest certs --platform-dir "$work/b" --out "$work/b-certs"

nonce=$(random_hex 32)
measurement=$(random_hex 48)
# The report data is the nonce zero-padded to 64 bytes (see `paravisor platform report`).
report_data=$nonce$(printf '0%.0s' $(seq $((128 - ${#nonce}))))
setup "$paravisor" platform report --platform-dir "$work/a" --nonce "$nonce" \
  --measurement "$measurement" -o "$work/a-report.bin"
setup "$paravisor" platform report --platform-dir "$work/b" --nonce "$nonce" \
  --measurement "$measurement" -o "$work/b-report.bin"

# snpguest reads -m/-r/-d as hex only with a 0x prefix (without it, as the string's own
# bytes, which never match); its --help does not say so.
check chain-accepted accept "The VCEK was signed by the AMD ASK!" \
  "$snpguest" verify certs "$work/a-certs"
# Without -p snpguest takes the processor model from the report's CPUID fields (version 3).
check report-accepted accept "VEK signed the Attestation Report!" \
  "$snpguest" verify attestation "$work/a-certs" "$work/a-report.bin"
check report-accepted-milan-measurement-report-data accept "Report Data verified successfully." \
  "$snpguest" verify attestation -p milan -m "0x$measurement" -r "0x$report_data" \
  "$work/a-certs" "$work/a-report.bin"

# One bit of the measurement (offset 0x90, inside the signed bytes 0x000..0x2A0).
cp "$work/a-report.bin" "$work/flipped.bin"
flip_bit "$work/flipped.bin" $((0x90))
check flipped-bit-rejected reject "VEK did NOT sign the Attestation Report!" \
  "$snpguest" verify attestation -p milan "$work/a-certs" "$work/flipped.bin"

other_nonce=$(random_hex 64)
check other-nonce-rejected reject "Report Data did not match" \
  "$snpguest" verify attestation -p milan -r "0x$other_nonce" "$work/a-certs" "$work/a-report.bin"
other_measurement=$(random_hex 48)
check other-measurement-rejected reject "Measurement did not match" \
  "$snpguest" verify attestation -p milan -m "0x$other_measurement" \
  "$work/a-certs" "$work/a-report.bin"

# Platform B's report against A's chain: the chip ID differs, and so does the key.
check other-platform-report-rejected reject "Report TCB ID and Certificate ID mismatch" \
  "$snpguest" verify attestation -p milan "$work/a-certs" "$work/b-report.bin"
check other-platform-report-signature-rejected reject "VEK did NOT sign the Attestation Report!" \
  "$snpguest" verify attestation -p milan -s "$work/a-certs" "$work/b-report.bin"

# A's ARK and ASK with B's VCEK.
mkdir "$work/mixed-certs"
cp "$work/a-certs/ark.pem" "$work/a-certs/ask.pem" "$work/b-certs/vcek.pem" "$work/mixed-certs/"
check mixed-chain-rejected reject "The VCEK was not signed by the AMD ASK!" \
  "$snpguest" verify certs "$work/mixed-certs"

echo "snpguest: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
