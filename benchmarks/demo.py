"""The main job's acceptance numbers: `make demo` (the default pipeline on the embedded model),
and the same run's PPO repeated with beta = 0 to show reward over-optimisation.

    .venv/bin/python benchmarks/demo.py                    # runs the demo into runs/demo-bench
    .venv/bin/python benchmarks/demo.py --run runs/demo    # or reads a finished `make demo` run
    .venv/bin/python benchmarks/demo.py --beta0            # + PPO with kl_coef = 0 from the same SFT and RM
    .venv/bin/python benchmarks/demo.py --run runs/x --tag demo_x   # an experiment's run -> demo_x.{json,md}

Writes benchmarks/results/demo.{json,md} (summary, the exact config, where it ran) and, with
--beta0, demo_beta0.{json,md}: RM score against gold score per PPO iteration. The report with
plots stays in the run directory (``<run>/report.html``), not in the results. The
beta = 0 run copies the demo's round 0, SFT and reward model, so only PPO and judging differ.
Never asserts a number: it records them (the quality targets are in the README).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
from pathlib import Path

from common import ROOT, bench_env, quarter_means, timed, write_result

from rlhfkit.recipes.pipeline_judge import render_summary


def run_pipeline(out: Path, overrides: list[str]) -> float:
    """``rlhfkit demo`` (the pipeline with the demo preset) in a child process, as a user runs it;
    returns its wall seconds."""
    cmd = [str(ROOT / ".venv" / "bin" / "rlhfkit"), "demo", "--out", str(out), *overrides]
    print("+", " ".join(cmd), flush=True)
    env = bench_env(wait_policy=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    return timed(subprocess.run, cmd, check=True, env=env)[1]


def ppo_table(rows: list[dict], every: int = 5) -> list[str]:
    lines = [
        "| iteration | RM score (raw) | gold score | KL to SFT | no-EOS share | length |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["step"] == 1 or r["step"] % every == 0 or r is rows[-1]:
            lines.append(
                f"| {r['step']} | {r['score_raw']:+.3f} | {r.get('gold_score', float('nan')):+.3f} | {r['kl']:.3f} | "
                f"{r['no_eos_fraction']:.2f} | {r['response_length']:.0f} |"
            )
    return lines


def write_results(tag: str, run: Path, wall: float | None, title: str, notes: list[str]) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    config = json.loads((run / "pipeline.json").read_text())
    final = summary["final"]
    ppo_rows = [r for r in summary["training"].get(final, []) if "score_raw" in r]
    res = {"run": str(run), "wall_seconds": wall, "config": config, "summary": summary}
    if ppo_rows:
        res["rm_score_first_last_quarter"] = quarter_means(ppo_rows, "score_raw")
        res["gold_score_first_last_quarter"] = quarter_means(ppo_rows, "gold_score")
    v = summary["versions"]
    lines = [
        f"# {title}",
        "",
        *notes,
        "",
        f"Pipeline wall time {summary['seconds']['total']:.0f} s. Config: `{tag}.json` → `config`; "
        f"report with plots: `{run / 'report.html'}` (written by the run, not kept here).",
        "",
        f"Held-out prompts: {summary['prompts']['held_out']} (never used in training), answered greedily, "
        "judged by the gold rubric.",
        render_summary(summary),
        "",
        f"Instruction-following rate, {final} against SFT: {v['sft']['instruction_rate']:.1%} → "
        f"{v[final]['instruction_rate']:.1%} "
        f"({(v[final]['instruction_rate'] - v['sft']['instruction_rate']) * 100:+.1f} points).",
    ]
    if ppo_rows:
        (a, b), (g0, g1) = res["rm_score_first_last_quarter"], res["gold_score_first_last_quarter"]
        lines += [
            "",
            f"PPO ({len(ppo_rows)} iterations, sampled answers to train prompts): RM score {a:+.3f} → {b:+.3f}, "
            f"gold score {g0:+.3f} → {g1:+.3f} (means of the first and last quarter of the iterations).",
            "",
            *ppo_table(ppo_rows),
        ]
    write_result(tag, res, "\n".join(lines))
    print("\n".join(lines))
    return res


def overrides_of(config: dict) -> dict:
    """The settings of a run's pipeline.json that differ from the demo's recipe (presets/demo.yaml),
    as ``key`` / ``stage.key`` names."""
    from dataclasses import asdict

    from rlhfkit.config import PipelineConfig, build_config

    def flat(d: dict, prefix: str = "") -> dict:
        return {
            k2: v2
            for k, v in d.items()
            for k2, v2 in (flat(v, f"{prefix}{k}.").items() if isinstance(v, dict) else [(prefix + k, v)])
        }

    defaults = flat(asdict(build_config(PipelineConfig, "demo")))
    return {k: v for k, v in flat(config).items() if k in defaults and k != "out" and defaults[k] != v}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--run", default=None, help="a finished pipeline run to report (default: run the demo into runs/demo-bench)"
    )
    ap.add_argument("--beta0", action="store_true", help="also PPO with kl_coef = 0 from the same SFT and reward model")
    ap.add_argument("--beta0-only", action="store_true", help="only the beta = 0 run (the demo run must exist)")
    ap.add_argument(
        "--tag", default="demo", help="results name: benchmarks/results/TAG.{json,md} (e.g. an experiment's run)"
    )
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the pipeline config (both runs)")
    a = ap.parse_args()
    run = Path(a.run or ROOT / "runs" / "demo-bench")
    wall = None
    if not a.beta0_only:
        if not (run / "summary.json").exists():
            wall = run_pipeline(run, a.overrides)
        if a.tag == "demo":
            write_results(
                "demo",
                run,
                wall,
                "make demo: the RLHF pipeline on SmolLM2-135M-Instruct",
                ["Produced by `python benchmarks/demo.py` (the demo's recipe, i.e. `make demo`)."],
            )
        else:
            config = json.loads((run / "pipeline.json").read_text()) if (run / "pipeline.json").exists() else {}
            shown = run.relative_to(ROOT) if run.is_relative_to(ROOT) else run
            write_results(
                a.tag,
                run,
                wall,
                f"Experiment: {a.tag}",
                [
                    f"Produced by `python benchmarks/demo.py --run {shown} "
                    f"--tag {a.tag}`; the pipeline's config is in `{a.tag}.json` → `config` "
                    f"({', '.join(f'{k}={v}' for k, v in overrides_of(config).items()) or 'the defaults'})."
                ],
            )
    if a.beta0 or a.beta0_only:
        b0 = run.parent / (run.name + "-beta0")
        if not (b0 / "summary.json").exists():
            b0.mkdir(parents=True, exist_ok=True)
            for part in (
                "round0",
                "sft",
                "round1/rm",
                "round1/rm_data.jsonl",
                "round1/samples.jsonl",
                "round1/rankings.jsonl",
            ):
                src, dst = run / part, b0 / part  # round 1's SFT answers too (rank_sft): nothing is sampled again
                if src.exists() and not dst.exists():
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    (shutil.copytree if src.is_dir() else shutil.copyfile)(src, dst)
            (b0 / "eval").mkdir(exist_ok=True)
            for name in ("base", "sft"):  # the same greedy answers: judging differs only for the new policy
                shutil.copyfile(run / "eval" / f"{name}.jsonl", b0 / "eval" / f"{name}.jsonl")
            run_pipeline(b0, [*a.overrides, "ppo.kl_coef=0.0"])
        write_results(
            "demo_beta0",
            b0,
            None,
            "Reward over-optimisation: the demo's PPO with beta = 0",
            [
                "Produced by `python benchmarks/demo.py --beta0`: the demo run's samples, SFT model and reward model, "
                "then PPO with `kl_coef=0` (no KL penalty) and otherwise the same settings. Without the penalty the "
                "policy drifts as far from SFT as the reward model lets it: watch the RM score against the gold score."
            ],
        )


if __name__ == "__main__":
    main()
