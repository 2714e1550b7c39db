"""Cross-check rlhfkit's log-likelihood evals against lm-evaluation-harness on the same local data.

TruthfulQA MC1 / MC2 and CrowS-Pairs (English) on SmolLM2-135M-Instruct, computed twice:
  1. by ``lm_eval`` (the PyPI package ``lm-eval``), installed in a separate virtualenv so that
     rlhfkit never depends on it, with custom task YAMLs that ``include`` the harness's own
     ``truthfulqa_mc1`` / ``truthfulqa_mc2`` / ``crows_pairs_english`` tasks and only swap the
     hub dataset for the local files in ``../shared/data`` (converted to the hub's schema);
  2. by ``rlhfkit.evals`` on the same files.
Acceptance: every metric within 0.5 points. Results go to
``benchmarks/results/lm_eval_crosscheck.{json,md}``.

Steps (each resumable; the lm-eval outputs are cached in --work)::

    python -m venv benchmarks/.venvs/lm-eval
    benchmarks/.venvs/lm-eval/bin/pip install torch==2.13.0 "lm-eval[hf]==0.4.13" transformers==5.24.0
    .venv/bin/python benchmarks/lm_eval_crosscheck.py prepare   # task YAMLs + converted data
    .venv/bin/python benchmarks/lm_eval_crosscheck.py lm-eval   # TruthfulQA: ~80 min of one CPU core
    .venv/bin/python benchmarks/lm_eval_crosscheck.py ours
    .venv/bin/python benchmarks/lm_eval_crosscheck.py compare
    # or all of them: .venv/bin/python benchmarks/lm_eval_crosscheck.py all

``--limit N`` evaluates the first N documents of each task in both (a quick check).
To redo TruthfulQA only, run ``lm-eval-tqa`` and ``ours --skip-crows``: ``compare`` then keeps the
CrowS-Pairs rows of the committed results JSON (dated by the run that measured them).
Both sides run in fp32 with right padding, so they agree to float noise; in bf16 near-ties can
flip and the numbers drift by a few tenths of a point.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from common import DATA, RESULTS, VENVS, write_result

LM_EVAL_VENV = VENVS / "lm-eval"
WORK = VENVS / "lm-eval-work"  # git-ignored

TASKS_TQA = ["rlhfkit_truthfulqa_mc1", "rlhfkit_truthfulqa_mc2"]
TASKS_CROWS = ["rlhfkit_crows_pairs_english"]
UNDATED_RUN = "2026-11-22"  # the run behind result rows written before rows carried a "measured" date


def harness_task_dir() -> Path:
    hits = glob.glob(str(LM_EVAL_VENV / "lib" / "python3*" / "site-packages" / "lm_eval" / "tasks"))
    if not hits:
        sys.exit(f"lm-eval is not installed in {LM_EVAL_VENV} (see this file's docstring)")
    return Path(hits[0])


def prepare(work: Path) -> None:
    """Convert the local data to the hub schema the harness tasks expect and write task YAMLs."""
    work.mkdir(parents=True, exist_ok=True)
    tasks = harness_task_dir()
    # TruthfulQA MC: the hub's `truthful_qa/multiple_choice` stores {choices: [...], labels: [...]};
    # the shared file stores {answer: label} dicts in the same order (true answers first).
    tqa = json.loads((DATA / "truthfulqa" / "mc_task.json").read_text())
    with open(work / "truthfulqa_mc.jsonl", "w") as f:
        for d in tqa:
            row = {"question": d["question"]}
            for key in ("mc1_targets", "mc2_targets"):
                row[key] = {"choices": list(d[key]), "labels": list(d[key].values())}
            f.write(json.dumps(row) + "\n")
    # CrowS-Pairs: the hub copy has the same columns as the upstream CSV.
    with open(DATA / "crows-pairs" / "crows_pairs_anonymized.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(work / "crows_pairs_english.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({k: r[k] for k in ("sent_more", "sent_less", "stereo_antistereo", "bias_type")}) + "\n")

    def yaml(name: str, include: Path, split: str, data: Path) -> None:
        (work / f"{name}.yaml").write_text(
            f"include: {include}\n"
            f"task: {name}\n"
            "dataset_path: json\n"
            "dataset_name: null\n"
            "dataset_kwargs:\n"
            "  data_files:\n"
            f"    {split}: {data}\n"
        )

    yaml(
        "rlhfkit_truthfulqa_mc1",
        tasks / "truthfulqa" / "truthfulqa_mc1.yaml",
        "validation",
        work / "truthfulqa_mc.jsonl",
    )
    yaml(
        "rlhfkit_truthfulqa_mc2",
        tasks / "truthfulqa" / "truthfulqa_mc2.yaml",
        "validation",
        work / "truthfulqa_mc.jsonl",
    )
    yaml(
        "rlhfkit_crows_pairs_english",
        tasks / "crows_pairs" / "crows_pairs_english.yaml",
        "test",
        work / "crows_pairs_english.jsonl",
    )
    print(f"prepared {len(tqa)} TruthfulQA questions and {len(rows)} CrowS pairs in {work}")


def model_dir() -> str:
    from rlhfkit.models.loading import embedded_model_dir

    return str(embedded_model_dir())


def run_lm_eval(
    work: Path, tasks: list[str], tag: str, limit: int | None, batch_size: int, doc_range: tuple[int, int] | None = None
) -> Path:
    out = work / f"lm_eval_{tag}"
    cmd = [
        str(LM_EVAL_VENV / "bin" / "lm_eval"),
        "--model", "hf",
        "--model_args", f"pretrained={model_dir()},dtype=float32",
        "--device", "cpu",
        "--tasks", ",".join(tasks),
        "--include_path", str(work),
        "--batch_size", str(batch_size),
        "--output_path", str(out),
        "--log_samples",
    ]  # fmt: skip
    if doc_range:  # documents [a, b) only, e.g. to extend an earlier --limit run
        cmd += ["--samples", json.dumps({t: list(range(*doc_range)) for t in tasks})]
    elif limit:
        cmd += ["--limit", str(limit)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    print("+", " ".join(cmd), flush=True)
    t0, r0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, check=True, env=env)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    (out / "wall_seconds.txt").write_text(f"{time.time() - t0:.1f}\n")
    (out / "cpu_seconds.txt").write_text(f"{r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime:.1f}\n")
    return out


def run_ours(
    work: Path, crows_limit: int | None, tqa_limit: int | None, batch_size: int, skip_crows: bool = False
) -> dict:
    import torch

    from rlhfkit.evals.crows_pairs import crows_pairs_eval, load_crows_pairs
    from rlhfkit.evals.loglik import LoglikScorer
    from rlhfkit.evals.truthfulqa import load_truthfulqa_mc, truthfulqa_mc_eval
    from rlhfkit.models.loading import load_causal_lm

    torch.manual_seed(0)
    loaded = load_causal_lm(model_dir(), dtype=torch.float32)
    scorer = LoglikScorer(loaded.model, loaded.tokenizer, batch_size=batch_size)
    out: dict = {}
    t0, c0 = time.time(), time.process_time()
    if skip_crows:  # keep an earlier run's CrowS-Pairs result in --work; without one, compare keeps the committed rows
        prev = json.loads((work / "ours.json").read_text()) if (work / "ours.json").exists() else {}
        if "crows_pairs" in prev:
            out["crows_pairs"] = prev["crows_pairs"]
    else:
        crows = load_crows_pairs(DATA / "crows-pairs" / "crows_pairs_anonymized.csv")[:crows_limit]
        out["crows_pairs"] = crows_pairs_eval(scorer, crows)
        out["crows_pairs"]["wall_seconds"] = round(time.time() - t0, 1)
        out["crows_pairs"]["cpu_seconds"] = round(time.process_time() - c0, 1)
        out["crows_pairs"]["threads"] = torch.get_num_threads()
    t0, c0 = time.time(), time.process_time()
    tqa = load_truthfulqa_mc(DATA / "truthfulqa" / "mc_task.json")[:tqa_limit]
    out["truthfulqa_mc"] = truthfulqa_mc_eval(scorer, tqa)
    out["truthfulqa_mc"]["wall_seconds"] = round(time.time() - t0, 1)
    out["truthfulqa_mc"]["cpu_seconds"] = round(time.process_time() - c0, 1)
    out["truthfulqa_mc"]["threads"] = torch.get_num_threads()
    tmp = work / "ours.json.tmp"
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(work / "ours.json")
    return out


def lm_eval_samples(work: Path, tag: str, task: str) -> list[dict]:
    """Per-document lm-eval outputs of ``task`` from every run tagged ``tag*`` (merged by doc_id);
    only the leading run of consecutive doc ids 0, 1, 2, ... is returned."""
    files = sorted(glob.glob(str(work / f"lm_eval_{tag}*" / "**" / f"samples_{task}_*.jsonl"), recursive=True))
    by_id = {}
    for f in files:
        for line in open(f):
            r = json.loads(line)
            by_id[r["doc_id"]] = r
    rows = []
    while len(rows) in by_id:
        rows.append(by_id[len(rows)])
    return rows


def compare(work: Path) -> dict:
    """Metrics side by side on the documents both evaluated, plus per-request log-likelihood gaps."""
    import numpy as np

    ours = json.loads((work / "ours.json").read_text())
    table, ll_gaps = [], {}
    ran = date.fromtimestamp((work / "ours.json").stat().st_mtime).isoformat()  # date of our run
    # CrowS-Pairs: measured when both sides have it in --work, else the committed rows are kept
    s = lm_eval_samples(work, "crows", "rlhfkit_crows_pairs_english")
    kept = None
    if s and "crows_pairs" in ours:
        n = min(len(s), ours["crows_pairs"]["n"])
        theirs = np.array([[float(x[0]) for x in r["filtered_resps"]] for r in s[:n]])  # (n, 2)
        mine = np.stack(
            [ours["crows_pairs"]["per_pair"]["ll_more"][:n], ours["crows_pairs"]["per_pair"]["ll_less"][:n]], 1
        )
        ll_gaps["crows_pairs"] = float(np.abs(theirs - mine).max())
        table.append(
            (
                "CrowS-Pairs English pct_stereotype",
                n,
                float((mine[:, 0] > mine[:, 1]).mean()),
                float(np.mean([r["pct_stereotype"] for r in s[:n]])),
                True,
            )
        )
        table.append(
            (
                "CrowS-Pairs English likelihood_diff",
                n,
                float(np.abs(mine[:, 0] - mine[:, 1]).mean()),
                float(np.mean([r["likelihood_diff"] for r in s[:n]])),
                False,
            )
        )
    else:
        kept = json.loads((RESULTS / "lm_eval_crosscheck.json").read_text())
        kept["rows"] = [
            dict(r, measured=r.get("measured", UNDATED_RUN)) for r in kept["rows"] if r["metric"].startswith("CrowS")
        ]
        if not kept["rows"]:
            raise SystemExit("no CrowS-Pairs rows in --work nor in the committed results: run the CrowS steps")
        ll_gaps["crows_pairs"] = kept["max_abs_loglik_gap_per_request"]["crows_pairs"]
    # TruthfulQA
    pq = ours["truthfulqa_mc"]["per_question"]
    for key in ("mc1", "mc2"):
        s = lm_eval_samples(work, "tqa", f"rlhfkit_truthfulqa_{key}")
        n = min(len(s), ours["truthfulqa_mc"]["n"])
        gaps = [
            abs(float(x[0]) - y)
            for r, mine_ll in zip(s[:n], pq[f"{key}_ll"][:n])
            for x, y in zip(r["filtered_resps"], mine_ll)
        ]
        ll_gaps[f"truthfulqa_{key}"] = float(max(gaps))
        table.append(
            (
                f"TruthfulQA {key.upper()} acc",
                n,
                float(np.mean(pq[key][:n])),
                float(np.mean([r["acc"] for r in s[:n]])),
                True,
            )
        )
    rows = kept["rows"] if kept else []
    for name, n, mine_v, theirs_v, pct in table:
        d = (mine_v - theirs_v) * (100 if pct else 1)
        rows.append(
            {
                "metric": name,
                "n_docs": n,
                "rlhfkit": mine_v,
                "lm_eval": theirs_v,
                "diff_points" if pct else "diff": d,
                "within_0.5_points": abs(d) <= 0.5 if pct else None,
                "measured": ran,
            }
        )
    crows_date = rows[0]["measured"]
    result = {
        "model": "SmolLM2-135M-Instruct (embedded GGUF Q4_1, de-quantised to fp32)",
        "dtype": "float32",
        "lm_eval_version": _lm_eval_version(),
        "data": {
            "truthfulqa_mc": "../shared/data/truthfulqa/mc_task.json (790 questions, Jan 2025 TruthfulQA)",
            "crows_pairs": "../shared/data/crows-pairs/crows_pairs_anonymized.csv (1508 pairs)",
        },
        "rows": rows,
        "all_within_0.5_points": all(r["within_0.5_points"] for r in rows if r["within_0.5_points"] is not None),
        "max_abs_loglik_gap_per_request": ll_gaps,
    }
    for kind in ("wall_seconds", "cpu_seconds", "threads"):  # CrowS-Pairs ones from the kept run (None: not recorded)
        result[f"rlhfkit_{kind}"] = {
            "truthfulqa_mc": ours["truthfulqa_mc"].get(kind),
            "crows_pairs": kept.get(f"rlhfkit_{kind}", {}).get("crows_pairs")
            if kept
            else ours["crows_pairs"].get(kind),
        }
        if kind != "threads":
            result[f"lm_eval_{kind}"] = {
                "tqa": _seconds(work, "tqa", kind),
                "crows": kept.get(f"lm_eval_{kind}", {}).get("crows") if kept else _seconds(work, "crows", kind),
            }
    result["crows_pairs_by_bias_type_rlhfkit"] = (
        kept["crows_pairs_by_bias_type_rlhfkit"] if kept else ours["crows_pairs"]["by_bias_type"]
    )
    md = [
        "# rlhfkit vs lm-evaluation-harness",
        "",
        f"SmolLM2-135M-Instruct, fp32, CPU; lm-eval {result['lm_eval_version']} with its own "
        "`truthfulqa_mc1`, `truthfulqa_mc2`, `crows_pairs_english` task definitions, pointed at the same local "
        f"data ({result['data']['truthfulqa_mc']}; {result['data']['crows_pairs']}).",
        "",
        "| metric | documents | rlhfkit | lm-eval | difference | measured |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r["within_0.5_points"] is None:
            md.append(
                f"| {r['metric']} | {r['n_docs']} | {r['rlhfkit']:.4f} | {r['lm_eval']:.4f} | {r['diff']:+.4f} "
                f"| {r['measured']} |"
            )
        else:
            md.append(
                f"| {r['metric']} | {r['n_docs']} | {100 * r['rlhfkit']:.2f} | {100 * r['lm_eval']:.2f} "
                f"| {r['diff_points']:+.2f} pts | {r['measured']} |"
            )
    md += [
        "",
        f"All within 0.5 points: **{result['all_within_0.5_points']}**. "
        f"Largest per-request log-likelihood gap (nats): {ll_gaps}.",
        "",
    ]
    md += [
        "Notes:",
        "- The shared TruthfulQA file is the January 2025 revision with 790 questions (the hub copy that "
        "lm-eval downloads by default, `truthfulqa/truthful_qa`, has the original 817); both sides read the 790 "
        "here, converted to the hub's `{choices, labels}` schema for lm-eval.",
        "- Documents: those both sides scored, the first N of each task (all of them unless `--limit` / "
        f"`--tqa-limit`). TruthfulQA rows: measured {ran}."
        + (
            f" CrowS-Pairs rows: kept from the {crows_date} run (same script, same lm-eval version), not rerun "
            "in this one."
            if kept
            else f" CrowS-Pairs rows: measured {crows_date}."
        ),
        "- Per-request agreement: lm-eval's per-sample log-likelihoods (`--log_samples`) against ours, request "
        "by request; rlhfkit scores TruthfulQA with the few-shot context run once per question and its KV "
        "cache shared by the answers (same numbers, fewer FLOPs than lm-eval's one forward per answer).",
        f"- Time: TruthfulQA rlhfkit {_secs(result, 'rlhfkit', 'truthfulqa_mc')}, "
        f"lm-eval {_secs(result, 'lm_eval', 'tqa')}; "
        f"CrowS-Pairs rlhfkit {_secs(result, 'rlhfkit', 'crows_pairs')}, lm-eval {_secs(result, 'lm_eval', 'crows')}. "
        "On a shared machine, wall time well above CPU time means the process waited "
        "for a core or was paused while other benchmarks ran. lm-eval's time includes loading the model; its "
        "threads come from OMP_NUM_THREADS (which `--threads` sets).",
        "",
        "Regenerate: see `benchmarks/lm_eval_crosscheck.py` (docstring).",
    ]
    write_result("lm_eval_crosscheck", result, "\n".join(md))
    print("\n".join(md))
    return result


def _secs(result: dict, side: str, key: str) -> str:
    wall, cpu = result[f"{side}_wall_seconds"][key], result[f"{side}_cpu_seconds"][key]
    threads = result.get(f"{side}_threads", {}).get(key)
    if wall is None:
        return "not recorded"
    extra = ([f"{cpu:.0f} s CPU"] if cpu is not None else []) + (
        [f"{threads} thread{'s' * (threads > 1)}"] if threads else []
    )
    return f"{wall:.0f} s wall" + (f" ({', '.join(extra)})" if extra else "")


def _seconds(work: Path, tag: str, kind: str) -> float | None:
    p = work / f"lm_eval_{tag}" / f"{kind}.txt"
    return float(p.read_text()) if p.exists() else None


def _lm_eval_version() -> str:
    hits = glob.glob(str(LM_EVAL_VENV / "lib" / "python3*" / "site-packages" / "lm_eval-*.dist-info"))
    return Path(hits[0]).name.split("-")[1].removesuffix(".dist") if hits else "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["prepare", "lm-eval", "lm-eval-crows", "lm-eval-tqa", "ours", "compare", "all"])
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--limit", type=int, default=None, help="first N documents of each task (quick check)")
    ap.add_argument("--tqa-limit", type=int, default=None, help="first N TruthfulQA questions (overrides --limit)")
    ap.add_argument("--skip-crows", action="store_true", help="ours: keep the earlier CrowS-Pairs result")
    ap.add_argument("--tqa-range", default=None, help="A:B -- lm-eval-tqa on TruthfulQA documents A..B-1 only")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch threads for our run (1 is fastest on a busy CPU)")
    a = ap.parse_args()
    tqa_limit = a.tqa_limit or a.limit
    if a.threads:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(a.threads)  # for the lm-eval subprocess
        torch.set_num_threads(a.threads)
    if a.step in ("prepare", "all"):
        prepare(a.work)
    if a.step in ("lm-eval", "lm-eval-crows", "all"):
        run_lm_eval(a.work, TASKS_CROWS, "crows", a.limit, a.batch_size)
    if a.step in ("lm-eval", "lm-eval-tqa", "all"):
        rng = tuple(int(x) for x in a.tqa_range.split(":")) if a.tqa_range else None
        tag = f"tqa_{rng[0]}_{rng[1]}" if rng else "tqa"
        run_lm_eval(a.work, TASKS_TQA, tag, tqa_limit, a.batch_size, rng)
    if a.step in ("ours", "all"):
        run_ours(a.work, a.limit, tqa_limit, a.batch_size, a.skip_crows)
    if a.step in ("compare", "all"):
        compare(a.work)


if __name__ == "__main__":
    main()
