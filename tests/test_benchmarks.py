"""benchmarks/: the provenance helper every result is written with, the shared helpers of
benchmarks/common.py, the committed results (each with its provenance, no HTML) and every script's
--help."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import provenance  # noqa: E402

SCRIPTS = sorted(p for p in BENCH.glob("*.py") if p.name not in ("common.py", "provenance.py"))
CPUINFO = """processor\t: 0
model name\t: Test CPU 9000
flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 amx_tile amx_bf16 avx512_fp16

processor\t: 1
model name\t: Another CPU
flags\t\t: fpu
"""


def test_machine_reads_the_first_cpu_the_flags_that_matter_and_the_ram(tmp_path):
    (tmp_path / "cpuinfo").write_text(CPUINFO)
    (tmp_path / "meminfo").write_text("MemTotal:       24641536 kB\nMemFree:        1 kB\n")
    m = provenance.machine(str(tmp_path / "cpuinfo"), str(tmp_path / "meminfo"))
    assert m["cpu_model"] == "Test CPU 9000"
    assert m["cpu_flags"] == ["avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"]  # CPU_FLAGS' order
    assert m["ram_gib"] == 23.5
    missing = provenance.machine(str(tmp_path / "none"), str(tmp_path / "none"))
    assert missing["cpu_flags"] == [] and missing["ram_gib"] is None and missing["cpu_model"]


def test_provenance_records_commit_date_and_versions():
    p = provenance.provenance()
    assert p["recorded"] == "at run time" and p["date"].endswith("+00:00")
    if (ROOT / ".git").exists():  # a checkout (a copied tree has no commit to name)
        assert len(p["git"]["commit"]) == 40 and isinstance(p["git"]["dirty"], bool)
    assert p["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert p["versions"]["torch"] and p["machine"]["cores"] >= 1


def test_write_result_puts_provenance_first_and_its_line_before_the_notes(tmp_path):
    data = {"provenance": {"date": "stale"}, "score": 0.5}
    path = provenance.write_result("x", data, "# X\n\nscore 0.5\n", tmp_path, notes="## Notes\n\nby hand")
    saved = json.loads(path.read_text())
    assert list(saved) == ["provenance", "score"] and saved["provenance"]["date"] != "stale"
    assert data == saved  # the caller's dict got it too
    md = (tmp_path / "x.md").read_text()
    assert md.startswith("# X\n\nscore 0.5\n\nProvenance: " + saved["provenance"]["date"])
    assert md.endswith("\n\n## Notes\n\nby hand\n")
    # a re-render of an earlier result keeps its provenance
    old = {"provenance": {"recorded": "afterwards from git history", "date": "2026-01-01", "machine": {}}, "v": 1}
    provenance.write_result("y", old, "# Y", tmp_path, fresh=False)
    assert json.loads((tmp_path / "y.json").read_text())["provenance"]["date"] == "2026-01-01"
    assert "recorded afterwards from git history" in (tmp_path / "y.md").read_text()


def test_describe_says_unknown_for_what_was_not_recorded():
    line = provenance.describe(
        {
            "recorded": "afterwards from git history",
            "date": "2026-12-01T09:46:55+00:00",
            "machine": {"cpu_model": "unknown", "cores": "unknown", "ram_gib": "unknown", "cpu_flags": "unknown"},
            "git": {"commit": "8b1ff4703c4c9a4246c3abebb5b8a4e9a7be7c27", "dirty": "unknown"},
            "versions": {"python": "unknown", "torch": "2.13.0+cpu", "transformers": "unknown"},
        }
    )
    assert line == (
        "Provenance: 2026-12-01T09:46:55+00:00, unknown; commit 8b1ff4703c; torch 2.13.0+cpu; "
        "recorded afterwards from git history."
    )


def test_save_row_keeps_each_rows_provenance_and_the_hand_written_notes(tmp_path):
    def render(rows: dict) -> str:
        return "# T\n\n" + "\n".join(f"{t}: {r['v']}" for t, r in rows.items()) + "\n"

    common.save_row("t", "a", {"v": 1}, render, tmp_path)
    md = tmp_path / "t.md"
    md.write_text(md.read_text() + "\n## Notes (by hand)\n\nkeep me\n")
    first = json.loads((tmp_path / "t.json").read_text())["rows"]["a"]["provenance"]
    common.save_row("t", "b", {"v": 2}, render, tmp_path)
    saved = json.loads((tmp_path / "t.json").read_text())
    assert list(saved["rows"]) == ["a", "b"] and saved["rows"]["a"]["provenance"] == first
    assert saved["provenance"] == saved["rows"]["b"]["provenance"]
    text = md.read_text()
    assert text.startswith("# T\n\na: 1\nb: 2\n\nProvenance: ") and text.endswith("## Notes (by hand)\n\nkeep me\n")
    assert text.count("Provenance:") == 1 and text.count("## Notes") == 1


def test_small_helpers():
    assert common.md_table(["a", "b"], [[1, "x"]], "lr") == ["| a | b |", "|---|---:|", "| 1 | x |"]
    rows = [{"k": 1.0}, {"k": 2.0}, {}, {"k": 3.0}, {"k": 5.0}, {"k": 7.0}, {"k": 11.0}, {"k": 13.0}, {"k": 17.0}]
    assert common.quarter_means(rows, "k") == (1.5, 15.0)  # 8 rows have it: quarters of 2
    assert common.median_ratio([(2.0, 4.0), (3.0, 3.0), (1.0, 4.0)]) == 0.5 and common.median_ratio([]) is None
    assert common.timed(sum, [1, 2])[0] == 3
    env = common.bench_env(2, BENCH_MODEL="m")
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["OMP_NUM_THREADS"] == "2" and env["BENCH_MODEL"] == "m"


def test_run_peer_reports_a_missing_peer_instead_of_raising(tmp_path):
    out = common.run_peer(tmp_path / "no-python", "no_such_bench.py", [], tmp_path / "w", "r")
    assert "missing" in out["error"] and not (tmp_path / "w").exists()


def test_committed_results_have_provenance_and_no_html():
    results = BENCH / "results"
    files = sorted(results.iterdir())
    # one current result per benchmark: a .json and its .md each (+ the index), nothing superseded kept
    assert not [f.name for f in files if f.suffix == ".html"]
    stems = {f.stem for f in files if f.name != "README.md"}
    assert all((results / f"{s}.json").exists() and (results / f"{s}.md").exists() for s in stems), stems
    assert len(files) <= 34
    jsons = [f for f in files if f.suffix == ".json"]
    assert jsons
    for f in jsons:
        p = json.loads(f.read_text())["provenance"]
        assert p["recorded"] in ("at run time", "afterwards from git history"), f.name
        assert p["date"] and p["machine"], f.name
        assert p["machine"]["cpu_model"] and len(p["git"]["commit"]) == 40, f.name
        md = f.with_suffix(".md").read_text()
        assert provenance.describe(p) in md, f.name
    readme = (results / "README.md").read_text()
    for f in jsons:
        assert f"]({f.stem}.md" in readme, f.name  # the file, or an anchor in it


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_script_answers_help(script):
    p = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith("usage: ")


def test_gpu_check_dry_run_writes_its_result_with_every_skip_explained(tmp_path):
    """``bash benchmarks/gpu_check.sh --dry-run``: the GPU check's code paths on the CPU (the gpu
    tier with RLHFKIT_GPU_DRY_RUN=1, PPO at TRL's settings and the rollout benchmark on the tiny
    model) into a temp dir, never into benchmarks/results; what cannot run here is skipped with a
    reason, in the result too."""
    import os

    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_OUT": str(tmp_path)}
    p = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-3000:]
    assert sorted(f.name for f in tmp_path.iterdir()) == ["gpu_check.json", "gpu_check.md"]
    assert not (BENCH / "results" / "gpu_check.json").exists()
    r = json.loads((tmp_path / "gpu_check.json").read_text())
    assert r["device"] == {"device": "cpu", "dry_run": True} and r["provenance"]["git"]["commit"]
    tier = r["tier"]
    assert tier["rc"] == 0 and not tier["failed"] and len(tier["passed"]) >= 7, tier
    stages = ("sft", "rm", "dpo", "ppo", "rloo", "grpo")  # tests/test_gpu.py's
    assert {t["test"] for t in tier["passed"]} >= {f"test_stage_runs_on_the_gpu[{s}-fp32]" for s in stages}
    assert all(s["reason"] for s in tier["skipped"])
    ours = r["ppo"]["ours"]
    assert ours["iterations"] == 2 and ours["median_step_s"] > 0 and ours["backend"] == "engine"
    assert r["ppo"]["trl"]["skipped"].startswith("TRL: ")
    rollout = r["rollout"]["backends"]
    assert rollout["engine"]["tok_s"] > 0 and rollout["hf"]["tok_s"] > 0
    assert "vllm" in rollout or r["rollout"]["vllm"]["skipped"].startswith("vLLM: ")
    md = (tmp_path / "gpu_check.md").read_text()
    assert md.startswith("# GPU check (dry run: CPU, tiny model)") and provenance.describe(r["provenance"]) in md
    assert "gpu tier: " in md and "## PPO at TRL's settings" in md and "| engine |" in md


def test_optimizers_quick_has_a_row_per_optimiser_with_sane_numbers(tmp_path):
    """benchmarks/optimizers.py --quick: the pipeline (optimizer=none) on the tiny random model, then
    every optimiser in this checkout from its SFT model and round-1 RM on a 2 s budget, judged."""
    import os

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run(
        [sys.executable, str(BENCH / "optimizers.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=900, env=env,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    data = json.loads((tmp_path / "optimizers.json").read_text())
    assert data["provenance"]["recorded"] == "at run time" and data["budget"] == 2.0
    ran = {r["optimizer"] for r in data["rows"]}
    assert ran == {"ppo", "a2c", "rloo", "grpo", "dpo", "ilql", "best_of_n"}, data["skipped"]
    for r in data["rows"]:
        lo, hi = r["vs_sft"]["ci95"]
        assert 0 <= lo <= r["vs_sft"]["win_rate"] <= hi <= 1, r
        assert sum(r["vs_sft"][k] for k in ("wins", "ties", "losses")) == data["held_out"] == 6
        assert 0 <= r["judged"]["instruction_rate"] <= 1 and -2 <= r["judged"]["gold_mean"] <= 2
        assert 0 <= r["repetition"] <= 1 and r["words"] >= 0 and r["seconds"] > 0
        if r["optimizer"] == "best_of_n":
            assert r["kl"] == pytest.approx(math.log(3) - 2 / 3)  # the bound at the quick N = 3
        else:  # the 2 s budget (loading included) stops the RL ones long before their 1000 planned iterations
            done, planned = (int(x) for x in r["steps"].split(" of "))
            assert 1 <= done <= planned and abs(r["kl"]) < 5, r
            assert done < planned or r["optimizer"] in ("dpo", "ilql"), r  # offline: a few epochs may fit in 2 s
    md = (tmp_path / "optimizers.md").read_text()
    for name in ran:
        assert f"| {name} | 0 |" in md
    assert "Provenance:" in md
