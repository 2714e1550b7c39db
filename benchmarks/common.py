"""What the benchmark scripts share: paths, the environment of a timed child process, running a
peer's (TRL's) script from its own venv, timing, Markdown tables, and result files that collect
one row per variant.

Importing it puts the repository root first on ``sys.path``, so the scripts time this checkout's
rlhfkit, not an installed one. The scripts import it as ``common`` (``python benchmarks/X.py``
puts ``benchmarks/`` on the path).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from provenance import RESULTS, ROOT, provenance, write_result

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared"
DATA = SHARED / "data"
PEERS_TRL = SHARED / "peers" / "trl"
VENVS = ROOT / "benchmarks" / ".venvs"  # git-ignored: the peers' own virtualenvs


def bench_env(threads: int = 0, wait_policy: str = "PASSIVE", **extra: str) -> dict:
    """The environment for a timed child process: ``OMP_WAIT_POLICY`` (PASSIVE: idle OpenMP threads
    sleep instead of spinning on a shared machine; "default" leaves it as the caller has it),
    ``OMP_NUM_THREADS`` when ``threads`` is set, and ``extra``."""
    env = dict(os.environ, **extra)
    if wait_policy != "default":
        env["OMP_WAIT_POLICY"] = wait_policy
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def timed(fn: Callable, *args, **kwargs) -> tuple[object, float]:
    """``fn(*args, **kwargs)`` and its wall seconds."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def run_peer(
    python: Path | str,
    script: str,
    args: list[str],
    work: Path,
    result: str,
    env: dict | None = None,
    timeout: float | None = None,
    preexec_fn: Callable | None = None,
) -> dict:
    """Run a peer's benchmark ``script`` (from ``shared/peers/trl``, copied to ``work`` so that its
    outputs stay there) with the peer's own ``python``; returns its ``results/<result>.json``, or
    ``{"error": ...}`` when it is missing, fails or times out. ``wall_seconds`` is added."""
    if not Path(python).exists() or not (PEERS_TRL / script).exists():
        return {"error": f"{python} or {PEERS_TRL / script} missing"}
    shutil.copytree(PEERS_TRL, work, dirs_exist_ok=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [str(python), script, *args],
            cwd=work,
            env=env or dict(os.environ),
            capture_output=True,
            text=True,
            timeout=timeout,
            preexec_fn=preexec_fn,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        lines = proc.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"rc={proc.returncode}"}
    return {**json.loads((work / "results" / f"{result}.json").read_text()), "wall_seconds": time.perf_counter() - t0}


def median_ratio(pairs: Iterable[tuple[float, float]]) -> float | None:
    """Median of a / b over (a, b) pairs measured side by side (None without pairs): on a noisy
    shared machine only neighbouring runs compare."""
    ratios = [a / b for a, b in pairs]
    return statistics.median(ratios) if ratios else None


def quarter_means(rows: list[dict], key: str) -> tuple[float, float]:
    """Mean of ``key`` over the first and the last quarter of the rows that have it (per-iteration
    values are noisy; nan where none has it)."""
    vals = [r[key] for r in rows if key in r]
    if not vals:
        return float("nan"), float("nan")
    q = max(1, len(vals) // 4)
    return sum(vals[:q]) / q, sum(vals[-q:]) / q


def md_table(header: list[str], rows: Iterable[Iterable], align: str = "") -> list[str]:
    """A Markdown table's lines; ``align`` one character a column (``l`` or ``r``; default left)."""
    cols = [f"---{':' if a == 'r' else ''}" for a in align.ljust(len(header), "l")]
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(cols) + "|",
        *("| " + " | ".join(str(c) for c in row) + " |" for row in rows),
    ]


def save_row(
    name: str, tag: str, row: dict, render: Callable[[dict], str], out_dir: Path = RESULTS, fresh: bool = True
) -> None:
    """A result that collects one row per variant: add (or replace) ``tag``'s row of
    ``results/<name>.json`` (``{"rows": {tag: row}}``; each row keeps the provenance of the run that
    made it) and rewrite ``<name>.md`` from all rows with ``render``, keeping a hand-written
    "## Notes" section at its end; print the new row. ``fresh``: the row is a new run (False: an
    earlier row re-rendered, its provenance kept)."""
    path, md = out_dir / f"{name}.json", out_dir / f"{name}.md"
    rows = json.loads(path.read_text()).get("rows", {}) if path.exists() else {}
    prov = provenance() if fresh or "provenance" not in row else row["provenance"]
    rows[tag] = {**row, "provenance": prov}
    notes = md.read_text().partition("\n## Notes")[2] if md.exists() else ""  # hand-written notes stay
    data = {"provenance": prov, "rows": rows}
    write_result(name, data, render(rows), out_dir, fresh=False, notes=f"## Notes{notes}" if notes.strip() else "")
    print(render({tag: row}))
