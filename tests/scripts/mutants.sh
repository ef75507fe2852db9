#!/usr/bin/env bash
# Mutation testing of the security-critical code: how many small changes to the code (a
# condition inverted, a check returning Ok, an offset off by one) the tests notice.
#
#   tests/scripts/mutants.sh                  every group below, from scratch
#   tests/scripts/mutants.sh vmgs ring        only these groups
#   tests/scripts/mutants.sh --iterate vmgs   re-test only what the last run did not catch
#   tests/scripts/mutants.sh --summary        print the table of the last runs, run nothing
#
# Each group runs cargo-mutants (https://mutants.rs) on its files with its crate's tests, with
# the `mutants` cargo profile (see Cargo.toml), in a scratch copy of this tree at
# target/mutation/tree-<package> (this tree is never modified; the copy keeps its path and its
# build between runs, so only what changed is rebuilt). Results go to target/mutation/<group>/. At the end it prints, per file, the
# mutants caught, missed, timed out and unviable, and the score: caught / (caught + missed),
# where a miss listed in tests/scripts/mutants-equivalent.txt (reviewed: no behaviour can tell
# it from the original, each with its reason) does not count. Every other miss is printed as a
# SURVIVOR, and the script exits 1: write the test that catches it, or, if it truly is
# equivalent, add it to that list with the reason.
#
# Not run by CI: a full run takes hours on two cores (each mutant is a build and a test run).
# Needs cargo-mutants (`cargo install --locked cargo-mutants`, tested with 27.1) and rsync.
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
out="$root/target/mutation"
equivalent="$root/tests/scripts/mutants-equivalent.txt"

# name | package | test selection (cargo test arguments; empty: the package's own tests) |
# files, each optionally with ::REGEX (no spaces) to mutate only the mutants whose names match
# (the regex applies to the whole group).
groups=(
    "vmgs|pv-vmgs||services/vmgs/src/crypto.rs services/vmgs/src/format.rs services/vmgs/src/store.rs"
    # With the hosted half: its channel tests drive the ring too, as every service does.
    "ring|ipc-defs|-p ipc-defs --features hosted|ipc-defs/src/ring.rs"
    "intercept|pv-intercept||services/intercept/src/policy.rs services/intercept/src/server.rs"
    # The exit router and the privilege plan (uids, securebits), by the microkernel's unit
    # tests. (platform:: is skipped here and below: it generates RSA keys for a minute and
    # uses none of these files.)
    "router|microkernel|-p microkernel --lib -- --skip platform::|microkernel/src/partition/router.rs microkernel/src/privilege.rs"
    # The sandbox's plan: the root a service sees, where its binary sits, its namespaces.
    "sandbox|microkernel|-p microkernel --lib -- --skip platform::|microkernel/src/sandbox.rs::(root_view|binary_slot|Namespaces::names|Identity::of)"
    # The manifest's validation, tested through `paravisor check` (pv-tests' bad_manifests)
    # as well as by unit tests. (Its serialisation for audit and the measured configuration
    # are left to the measure and audit tests.)
    "manifest|microkernel|-p microkernel -p pv-tests --lib --test cli --test bad_manifests -- --skip platform::|microkernel/src/manifest/**/*.rs::(Validator|capability_slots|guest_interrupts|valid_name|parse_size|parse_duration|line_col|Restart::delay|DeviceRange::end|parse_key_release|manifest/(mod|values).rs:[0-9]+:[0-9]+:\sreplace\s<<)"
)

iterate=false
summary_only=false
wanted=()
for arg in "$@"; do
    case "$arg" in
        --iterate) iterate=true ;;
        --summary) summary_only=true ;;
        -h | --help) sed -n '2,22p' "$0"; exit 0 ;;
        -*) echo "mutants.sh: unknown option $arg (see --help)" >&2; exit 64 ;;
        *) wanted+=("$arg") ;;
    esac
done
known=" $(for g in "${groups[@]}"; do printf '%s ' "${g%%|*}"; done)"
for w in "${wanted[@]}"; do
    [[ "$known" == *" $w "* ]] || { echo "mutants.sh: no group \"$w\" (groups:$known)" >&2; exit 64; }
done
selected() { [[ ${#wanted[@]} -eq 0 ]] || [[ " ${wanted[*]} " == *" $1 "* ]]; }

if ! $summary_only && ! cargo mutants --version >/dev/null 2>&1; then
    echo "mutants.sh: cargo-mutants is not installed: cargo install --locked cargo-mutants" >&2
    exit 69
fi
if ! $summary_only && ! command -v rsync >/dev/null; then
    echo "mutants.sh: rsync is not installed: apt-get install -y rsync" >&2
    exit 69
fi

run_group() {
    local name="$1" package="$2" tests="$3" files="$4"
    local dir="$out/$name"
    # A mutant can make a test loop for hours (an id search that never finds a free id):
    # the tests of every group run in seconds, so a minute without an end is a hang.
    local args=(--in-place --profile mutants --line-col false
        --timeout "${MUTANTS_TIMEOUT:-60}" -o "$dir")
    local selection=(-p "$package")
    local f file_list
    read -r -a file_list <<<"$files"
    for f in "${file_list[@]}"; do
        selection+=(-f "${f%%::*}")
        [[ "$f" == *::* ]] && selection+=(-F "${f#*::}")
    done
    args+=("${selection[@]}")
    local test_args=() harness=()
    if [[ -n "$tests" ]]; then
        # Which packages' tests run, and which of their targets. cargo-mutants' own baseline
        # would run these arguments against the mutated package alone, so the unmutated tree
        # is checked here instead: a test failing without any mutant would count every mutant
        # as caught.
        read -r -a test_args <<<"$tests"
        # Tests that run `paravisor check` need the service executables next to it (each
        # mutant's build then replaces paravisor beside them).
        if [[ "$tests" == *"--test "* ]]; then
            echo "== $name: building the workspace's executables"
            (cd "$tree" && cargo build --profile mutants --workspace --bins) >"$out/$name.build.log" 2>&1 || {
                echo "mutants.sh: the workspace does not build: see $out/$name.build.log" >&2
                exit 1
            }
        fi
        echo "== $name: the selected tests must pass on the unmutated tree"
        (cd "$tree" && cargo test --profile mutants "${test_args[@]}") >"$out/$name.baseline.log" 2>&1 || {
            echo "mutants.sh: the tests of group $name fail without a mutant: see $out/$name.baseline.log" >&2
            echo "  (if they name another directory, the tree moved: rm -rf $out/tree-*)" >&2
            exit 1
        }
        args+=(--baseline skip)
        local packages=() i=0
        for ((i = 0; i < ${#test_args[@]}; i++)); do
            if [[ "${test_args[$i]}" == -- ]]; then
                harness=("${test_args[@]:$((i + 1))}")
                break
            elif [[ "${test_args[$i]}" == -p ]]; then
                packages+=("${test_args[$((i + 1))]}")
                i=$((i + 1))
            else
                args+=("--cargo-test-arg=${test_args[$i]}")
            fi
        done
        for p in "${packages[@]}"; do args+=(--test-package "$p"); done
    fi
    if $iterate; then
        args+=(--iterate)
    else
        rm -rf "$dir"
    fi
    # The record of every mutant's last outcome: --iterate re-tests only what was not caught,
    # so its own output lists only those.
    if [[ -f "$dir/mutants.out/outcomes.json" ]]; then
        python3 "$root/tests/scripts/mutants_summary.py" merge "$dir"
    fi
    mkdir -p "$dir"
    # cargo-mutants appends what follows its `--` to cargo test's own arguments: the test
    # harness's need a second `--`.
    [[ ${#harness[@]} -gt 0 ]] && args+=(-- -- "${harness[@]}")
    echo "== $name: cargo mutants ${args[*]}"
    # Exit 2: some mutant was missed; 3: some timed out. The summary judges those.
    local status=0
    (cd "$tree" && cargo mutants "${args[@]}") || status=$?
    if [[ $status -ne 0 && $status -ne 2 && $status -ne 3 ]]; then
        echo "mutants.sh: cargo mutants failed for group $name (exit $status)" >&2
        exit 1
    fi
    python3 "$root/tests/scripts/mutants_summary.py" merge "$dir"
    # What exists now (a record of an --iterate run may name mutants of code since changed).
    (cd "$tree" && cargo mutants --list "${selection[@]}") >"$dir/current.txt"
}

mkdir -p "$out"
# The scratch copy of this tree (as it is now, committed or not, without build output) that
# cargo-mutants mutates in place, one mutant at a time, restoring each file. One per package:
# groups of different packages can run at the same time, and each keeps its build.
scratch_copy() {
    local tree="$out/tree-$1"
    mkdir -p "$tree"
    # By content, and without the source's times: a file copied with its old time would look
    # older than what the copy's last build (of a mutant) made from it, and cargo would keep
    # that mutant's build. Files that did not change keep their time in the copy.
    rsync -rlpD --checksum --delete --exclude /target/ --exclude /.git/ --exclude 'fuzz/target/' \
        --exclude 'fuzz/corpus/' "$root/" "$tree/"
    echo "$tree"
}

if ! $summary_only; then
    for g in "${groups[@]}"; do
        IFS='|' read -r name package tests files <<<"$g"
        if selected "$name"; then
            tree="$(scratch_copy "$package")"
            run_group "$name" "$package" "$tests" "$files"
        fi
    done
fi
names=()
for g in "${groups[@]}"; do
    name="${g%%|*}"
    selected "$name" && names+=("$name")
done
exec python3 "$root/tests/scripts/mutants_summary.py" report "$equivalent" "${names[@]/#/$out/}"
