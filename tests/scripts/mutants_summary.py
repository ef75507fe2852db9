#!/usr/bin/env python3
"""The tables of tests/scripts/mutants.sh (see there).

  mutants_summary.py merge GROUP_DIR
      adds GROUP_DIR/mutants.out/outcomes.json to GROUP_DIR/record.json (each mutant's last
      outcome: an --iterate run re-tests only what was missed, so its own output is partial)
  mutants_summary.py report EQUIVALENT_LIST GROUP_DIR...
      prints the score per file and every survivor not in the reviewed list; exits 1 if any
"""

import json
import os
import re
import sys
from collections import defaultdict

LINE_COL = re.compile(r"^([^:]+):\d+:\d+: ")
KINDS = ("caught", "missed", "timeout", "unviable")
OUTCOME = {
    "CaughtMutant": "caught",
    "MissedMutant": "missed",
    "Timeout": "timeout",
    "Unviable": "unviable",
}


def without_line_col(name):
    """The name as the equivalence list spells it: stable when code above it moves."""
    return LINE_COL.sub(r"\1: ", name)


def merge(group_dir):
    record_path = os.path.join(group_dir, "record.json")
    outcomes_path = os.path.join(group_dir, "mutants.out", "outcomes.json")
    record = {}
    if os.path.exists(record_path):
        with open(record_path) as f:
            record = json.load(f)
    if os.path.exists(outcomes_path):
        with open(outcomes_path) as f:
            outcomes = json.load(f)["outcomes"]
        for o in outcomes:
            scenario = o["scenario"]
            if not isinstance(scenario, dict) or "Mutant" not in scenario:
                continue
            kind = OUTCOME.get(o["summary"])
            if kind is None:
                continue
            m = scenario["Mutant"]
            if kind == "caught":
                # Caught means the test command failed. Only cargo test's exit status for a
                # failing test (101) counts: a usage error (1) would "catch" every mutant.
                test = [p for p in o["phase_results"] if p["phase"] == "Test"]
                status = test[-1]["process_status"] if test else None
                if status != {"Failure": 101}:
                    kind = "broken"
            record[m["name"]] = {"file": m["file"], "outcome": kind}
    with open(record_path + ".new", "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    os.replace(record_path + ".new", record_path)


def read_equivalent(path):
    """name -> reason. One entry covers every identical mutation in that function."""
    entries = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            name, sep, reason = line.partition(" # ")
            if not sep or not reason.strip():
                sys.exit(f"{path}:{number}: an entry needs ' # ' and the reason it is equivalent")
            entries[name.strip()] = reason.strip()
    return entries


def report(equivalent_path, group_dirs):
    equivalent = read_equivalent(equivalent_path)
    used = set()
    per_file = defaultdict(lambda: defaultdict(int))
    survivors = []
    not_run = []
    broken = []
    for group_dir in group_dirs:
        record_path = os.path.join(group_dir, "record.json")
        current_path = os.path.join(group_dir, "current.txt")
        if not os.path.exists(record_path) or not os.path.exists(current_path):
            print(f"(no results in {group_dir}: run that group first)")
            continue
        with open(record_path) as f:
            record = json.load(f)
        with open(current_path) as f:
            current = [line.strip() for line in f if line.strip()]
        for name in current:
            short = without_line_col(name)
            file = short.split(": ", 1)[0]
            entry = record.get(name)
            if entry is None:
                not_run.append(name)
                per_file[file]["not run"] += 1
                continue
            kind = entry["outcome"]
            if kind == "broken":
                broken.append(name)
                per_file[file]["not run"] += 1
                continue
            if kind == "missed" and short in equivalent:
                used.add(short)
                per_file[file]["equivalent"] += 1
            else:
                per_file[file][kind] += 1
                if kind == "missed":
                    survivors.append(name)

    if not per_file:
        print("no results: run the groups first")
        return 1
    header = ("file", "caught", "missed", "equivalent", "timeout", "unviable", "not run", "score")
    rows = []
    for file in sorted(per_file):
        c = per_file[file]
        # A timeout is a mutant the tests did not let pass (it hung them): counted as caught.
        caught = c["caught"] + c["timeout"]
        judged = caught + c["missed"]
        score = f"{100.0 * caught / judged:.1f}% ({caught}/{judged})" if judged else "-"
        rows.append((file, c["caught"], c["missed"], c["equivalent"], c["timeout"],
                     c["unviable"], c["not run"], score))
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print()
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))
    print("(score: caught incl. timeouts / (caught + missed), reviewed-equivalent misses excluded)")

    stale = sorted(n for n in set(equivalent) - used if n.split(": ", 1)[0] in per_file)
    if stale:
        print(f"\n{len(stale)} entries of {equivalent_path} match no surviving mutant of the "
              "groups run (caught now, or the code changed; remove them if so):")
        for name in stale:
            print(f"  {name}")
    if not_run:
        print(f"\n{len(not_run)} mutants have no result (run interrupted?)")
    if broken:
        print(f"\n{len(broken)} mutants were 'caught' by a test command that did not run the "
              "tests (its exit status was not a test failure's): see their logs in "
              "mutants.out/log. They are counted as not run.")
        for name in broken[:10]:
            print(f"  BROKEN {name}")
        return 1
    if survivors:
        print(f"\n{len(survivors)} SURVIVORS: no test notices these changes. Write the test, or "
              f"if no behaviour can tell one from the original, add it to {equivalent_path}:")
        for name in survivors:
            print(f"  SURVIVOR {name}")
        return 1
    print("\nno survivors beyond the reviewed equivalent mutants")
    return 0


def main(argv):
    if len(argv) >= 2 and argv[0] == "merge":
        merge(argv[1])
        return 0
    if len(argv) >= 2 and argv[0] == "report":
        return report(argv[1], argv[2:])
    print(__doc__, file=sys.stderr)
    return 64


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
