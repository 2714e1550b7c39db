"""Every eval suite on the embedded base model and, when it exists, the `make demo` policy.

    .venv/bin/python benchmarks/eval_models.py                       # base model only
    .venv/bin/python benchmarks/eval_models.py --demo runs/demo/policy   # demo policy vs base

Writes the row ``<tag>`` of ``benchmarks/results/eval_models.{json,md}`` (one row per tag: base,
demo, …); the HTML report with plots (and the same JSON) goes to the run directory,
``runs/eval_<tag>/`` unless ``--out`` says otherwise. The caps
below keep one run within
tens of minutes on a 2-core CPU (TruthfulQA MC on all 790 questions costs ~15 min alone
there); pass ``--full`` for the whole data sets (the RTP paper's k = 25 included).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import DATA, RESULTS, ROOT, md_table, save_row
from provenance import describe


def main() -> None:

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="smollm2-135m-instruct")
    ap.add_argument("--demo", default=None, help="the `make demo` policy directory (evaluated against --base)")
    ap.add_argument("--name", default="demo", help="label of the --demo model in the tables")
    ap.add_argument("--suites", default="helpful,truthful,harmless,tax")
    ap.add_argument("--tag", default=None, help="row of results/eval_models (default: base or demo)")
    ap.add_argument("--full", action="store_true", help="whole data sets, k = 25 (hours on a laptop CPU)")
    ap.add_argument("--tqa", type=int, default=100, help="TruthfulQA MC questions (without --full)")
    ap.add_argument("--crows", type=int, default=500, help="CrowS-Pairs pairs (without --full)")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default=None, help="run directory for the HTML report (default: runs/eval_<tag>)")
    ap.add_argument(
        "--render", action="store_true", help="re-render the tables/report of row --tag of results/eval_models.json"
    )
    a = ap.parse_args()
    if a.render:  # re-render row --tag of results/eval_models.json
        res = json.loads((RESULTS / "eval_models.json").read_text())["rows"][a.tag]
        render(res, a.tag, a, res["config"]["suites"], fresh=False)
        return

    suites = a.suites.split(",")
    if a.demo:
        models, baseline, tag = [f"{a.name}={a.demo}"], f"base={a.base}", a.tag or a.name
    else:
        models, baseline, tag = [f"base={a.base}"], None, a.tag or "base"
        suites = [s for s in suites if s != "helpful"]  # a win-rate needs two models
    caps = (
        dict(gen_limit=None, rtp_prompts=None, rtp_k=25, help_limit=None, tax_chars=None, crows_limit=None)
        if a.full
        else dict(gen_limit=30, rtp_prompts=20, rtp_k=4, help_limit=30, tax_chars=20_000, crows_limit=a.crows)
    )
    from rlhfkit.evals.runner import EvalConfig, run_eval

    cfg = EvalConfig(
        models=models,
        baseline=baseline,
        suites=suites,
        data_dir=str(DATA),
        precision=a.precision,
        threads=a.threads,
        batch_size=a.batch_size,
        mc_limit=None if a.full else a.tqa,
        **caps,
    )
    t0 = time.time()
    res = run_eval(cfg)
    res["benchmark"] = {
        "script": "benchmarks/eval_models.py",
        "args": vars(a),
        "wall_seconds": round(time.time() - t0, 1),
        "truthfulqa_mc_questions": None if a.full else a.tqa,
    }
    render(res, tag, a, suites)


def caps_text(a, suites: list[str]) -> str:
    if a.full:
        return "full data"
    parts = {
        "truthful": f"TruthfulQA MC first {a.tqa} questions, generation first 30",
        "harmless": f"RTP first 20 prompts x k=4 per subset, CrowS-Pairs first {a.crows} pairs "
        "(all 1508: lm_eval_crosscheck.md)",
        "helpful": "helpfulness: 30 built-in task eval prompts, greedy answers of up to 128 tokens, "
        "judged by the gold rubric",
        "tax": "perplexity on the last 20,000 characters of tinyshakespeare",
    }
    return "capped: " + "; ".join(parts[s] for s in suites if s in parts)


def render(res: dict, tag: str, a, suites: list[str], fresh: bool = True) -> None:
    """The HTML report into the run directory, the results JSON and its Markdown tables into
    benchmarks/results (``fresh``: a new run; False re-renders an earlier result)."""
    from rlhfkit.evals.report import summary_rows, write_report

    run_dir = Path(a.out) if a.out else ROOT / "runs" / f"eval_{tag}"
    _, hp = write_report(res, run_dir / "eval.json", title=f"rlhfkit eval: {tag}")
    versions = res["versions"]
    md = [
        f"## {tag}",
        "",
        *([str(res["note"]), ""] if res.get("note") else []),
        f"Models: {', '.join(versions)}; suites: {', '.join(suites)}; {caps_text(a, suites)}; "
        f"{a.precision}; wall {res['benchmark']['wall_seconds']} s.",
        "",
        *md_table(
            ["metric", "better", *versions],
            (
                [
                    r["metric"],
                    "↑" if r["higher_is_better"] else "↓",
                    *("–" if r["values"][v] is None else f"{r['values'][v]:.4g}" for v in versions),
                ]
                for r in summary_rows(res)
            ),
            "ll" + "r" * len(versions),
        ),
    ]
    for n, h in (res.get("helpful") or {}).items():
        md += [
            "",
            f"Helpful: {n} vs {res['baseline']} win-rate {h['win_rate']:.3f} "
            f"(95% CI {h['ci95'][0]:.3f}-{h['ci95'][1]:.3f}), length-controlled {h['lc_win_rate']:.3f}, "
            f"length difference {h['length_diff_words']:+.1f} words, judge: {h['judge']}.",
        ]
    scorer = next(iter(res["models"].values())).get("harmless", {}).get("toxicity_scorer")
    report = hp.relative_to(ROOT) if hp.is_relative_to(ROOT) else hp
    md += ["", (f"Toxicity scorer: {scorer}. " if scorer else "") + f"Report with plots: `{report}` (not kept here)."]
    res["markdown"] = "\n".join(md)
    save_row("eval_models", tag, res, render_rows, fresh=fresh)
    print(json.dumps(res["models"][res["versions"][-1]].get("timings_s", {})))


def render_rows(rows: dict) -> str:
    """The Markdown of eval_models.md: one section per tag."""
    head = "# rlhfkit eval: the eval suites per model (`benchmarks/eval_models.py`, one section per tag)"
    return "\n\n".join([head, *(f"{r['markdown']}\n\nThis row — {describe(r['provenance'])}" for r in rows.values())])


if __name__ == "__main__":
    main()
