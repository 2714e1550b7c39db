"""Where a benchmark result came from: the machine, its CPU flags, the git commit, the date and the
versions, recorded beside the numbers.

The runs happen on 2-core cloud CPUs whose kind changes between sessions (AMX Xeon, AVX512-bf16 and
AVX2-only EPYCs), and the same benchmark differs several-fold between them, so a number without its
machine cannot be compared with anything. Every script in ``benchmarks/`` writes its result with
``write_result``: ``results/<name>.json`` gets a ``provenance`` object and ``results/<name>.md`` ends
with the same in one line.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parents[1]
# the instructions that decide which code paths run and how fast: bf16 matmuls (AMX, AVX512-bf16)
# against an AVX2-only CPU where bf16 is emulated and rlhfkit runs fp32
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
PROVENANCE_LINE = "Provenance:"  # how the .md's closing line starts


def _cpuinfo(path: str = "/proc/cpuinfo") -> dict[str, str]:
    """The first processor's ``key: value`` lines of /proc/cpuinfo ({} where there is none)."""
    info: dict[str, str] = {}
    try:
        text = Path(path).read_text()
    except OSError:
        return info
    for line in text.splitlines():
        if not line.strip():
            if info:
                break
            continue
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return info


def _ram_gib(path: str = "/proc/meminfo") -> float | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine(cpuinfo: str = "/proc/cpuinfo", meminfo: str = "/proc/meminfo") -> dict:
    """CPU model, core count, RAM and the CPU flags in ``CPU_FLAGS`` that this CPU has."""
    info = _cpuinfo(cpuinfo)
    flags = set(info.get("flags", "").split())
    return {
        "cpu_model": info.get("model name") or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "ram_gib": _ram_gib(meminfo),
        "cpu_flags": [f for f in CPU_FLAGS if f in flags],
    }


def git_state(repo: Path = ROOT) -> dict:
    """The checked-out commit and whether tracked files differ from it (None where git cannot tell)."""

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def versions() -> dict:
    """Python's version and the installed torch and transformers (None where one is missing)."""
    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def provenance() -> dict:
    """Everything above, taken now, with the date in UTC (ISO 8601)."""
    return {
        "recorded": "at run time",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "git": git_state(),
        "versions": versions(),
    }


def describe(prov: dict) -> str:
    """One line for the .md: the machine, the commit and the date of a ``provenance`` object (one
    recorded afterwards may say "unknown" for what nobody wrote down)."""
    m, g, v = prov.get("machine") or {}, prov.get("git") or {}, prov.get("versions") or {}
    where = str(m.get("cpu_model") or "unknown machine")
    if isinstance(m.get("cores"), int):
        where += f", {m['cores']} cores"
    if isinstance(m.get("ram_gib"), int | float):
        where += f", {m['ram_gib']:g} GiB RAM"
    if isinstance(m.get("cpu_flags"), list) and m["cpu_flags"]:
        where += f" ({' '.join(m['cpu_flags'])})"
    commit = g.get("commit")
    code = (
        (f"commit {commit[:10]}" + (" with local changes" if g.get("dirty") is True else ""))
        if commit
        else "commit unknown"
    )
    libs = ", ".join(f"{k} {val}" for k, val in v.items() if val and val != "unknown")
    recorded = "" if prov.get("recorded", "at run time") == "at run time" else f"; recorded {prov['recorded']}"
    line = f"{PROVENANCE_LINE} {prov.get('date') or 'date unknown'}, {where}; {code}"
    return line + (f"; {libs}" if libs else "") + recorded + "."


def write_result(
    name: str, data: dict, markdown: str, out_dir: Path | str | None = None, *, fresh: bool = True, notes: str = ""
) -> Path:
    """Write ``<out_dir>/<name>.json`` (``data`` with its ``provenance`` first; ``data`` gets it in
    place) and ``<name>.md`` (``markdown``, the provenance line, then ``notes``); returns the JSON's path.

    ``fresh``: record this run's provenance (replacing any in ``data``); False re-renders an earlier
    result and keeps the provenance it has. ``out_dir`` defaults to ``benchmarks/results``.
    """
    out = Path(out_dir) if out_dir is not None else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    rest = {k: v for k, v in data.items() if k != "provenance"}
    prov = provenance() if fresh or "provenance" not in data else data["provenance"]
    data.clear()
    data.update({"provenance": prov, **rest})
    path = out / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)
    md = markdown.rstrip("\n") + "\n\n" + describe(prov) + "\n"
    if notes.strip():
        md += "\n" + notes.strip("\n") + "\n"
    (out / f"{name}.md").write_text(md)
    return path
