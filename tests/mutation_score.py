"""Mutation score per module after `mutmut run` (run by `make mutate`; not a test module).

Reads mutmut 3's results (mutants/**/*.py.meta), prints killed/total per mutated file and for
rlhfkit/algos/ as a whole, and exits 1 when a target listed in MINIMUM falls below its score.
Killed includes timeouts (the mutant ran forever: caught); "no tests" counts as survived.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

# >= 90 % of the algos mutants killed, survivors explained in docs/testing.md
MINIMUM = {"rlhfkit/algos/": 90.0}


def main() -> int:
    per_file: dict[str, Counter] = {}
    for meta in sorted(Path("mutants").glob("rlhfkit/**/*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"].values()
        if codes:
            per_file[str(meta.relative_to("mutants"))[: -len(".meta")]] = Counter(status_by_exit_code[c] for c in codes)
    if not per_file:
        print("no mutmut results under mutants/: run `make mutate`", file=sys.stderr)
        return 1
    groups = {"rlhfkit/algos/": Counter()}
    print(f"{'module':32s} {'killed':>7s} {'total':>6s} {'score':>7s}  survived / no tests / other")
    for path, c in per_file.items():
        for prefix, total in groups.items():
            if path.startswith(prefix):
                total.update(c)
        _row(path, c)
    for prefix, c in groups.items():
        _row(prefix + " (all)", c)
    failed = [p for p, minimum in MINIMUM.items() if _score(groups[p]) < minimum]
    for p in failed:
        print(f"FAIL: {p} mutation score {_score(groups[p]):.1f} % < {MINIMUM[p]} %", file=sys.stderr)
    return 1 if failed else 0


def _killed(c: Counter) -> int:
    return c["killed"] + c["timeout"]


def _score(c: Counter) -> float:
    total = sum(c.values())
    return 100.0 * _killed(c) / total if total else 0.0


def _row(name: str, c: Counter) -> None:
    other = sum(c.values()) - _killed(c) - c["survived"] - c["no tests"]
    print(
        f"{name:32s} {_killed(c):7d} {sum(c.values()):6d} {_score(c):6.1f} %  "
        f"{c['survived']} / {c['no tests']} / {other}"
    )


if __name__ == "__main__":
    sys.exit(main())
