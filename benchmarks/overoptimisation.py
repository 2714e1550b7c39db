"""Proxy against gold as the policy moves away from SFT: one reward model's mean score on the
held-out answers of several PPO runs that share its SFT model and RM, beside their gold score and
their KL to SFT (Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization", fig. 1: the
proxy keeps rising with KL while the gold reward peaks and falls).

    .venv/bin/python benchmarks/overoptimisation.py --run default=runs/demo-rr --run lr3e-5=runs/demo-lr3 \\
        --run beta0=runs/demo-b0lr3 --tag overoptimisation

Each ``--run NAME=DIR`` is a pipeline run directory with ``eval/ppo1.jsonl`` (its final policy's
greedy answers to the held-out prompts) and ``round1/ppo/metrics.jsonl``; ``base`` and ``sft``
come from the first run. The RM is the first run's ``round1/rm/model`` unless ``--rm`` says
otherwise; the runs must share it for the comparison to mean anything (the script checks the SFT
answers are the same). Writes benchmarks/results/TAG.{json,md}; asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common import write_result

from rlhfkit.data.jsonl import read_jsonl
from rlhfkit.recipes.common import read_metrics
from rlhfkit.recipes.pipeline_judge import judge, rm_means
from rlhfkit.tasks import load_task


def kl_of(run: Path) -> dict:
    rows = read_metrics(run / "round1" / "ppo")
    tail = rows[-10:]
    return {
        "kl_last": rows[-1]["kl"],
        "kl_last10": sum(r["kl"] for r in tail) / len(tail),
        "iterations": len(rows),
        "kl_coef": rows[-1]["beta"],
        "lr": rows[-1]["lr"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", required=True, help="NAME=RUN_DIR (repeat); the first gives base and sft")
    ap.add_argument("--rm", default="", help="reward model directory (default: the first run's round1/rm/model)")
    ap.add_argument("--limit", type=int, default=0, help="only the first N held-out prompts (a quick check)")
    ap.add_argument("--tag", default="overoptimisation")
    a = ap.parse_args()
    runs = {}
    for spec in a.run:
        name, sep, path = spec.partition("=")
        if not sep or not (Path(path) / "eval" / "ppo1.jsonl").exists():
            sys.exit(f"--run {spec}: expected NAME=DIR with DIR/eval/ppo1.jsonl")
        runs[name] = Path(path)
    first = next(iter(runs.values()))
    rm = a.rm or str(first / "round1" / "rm" / "model")
    held = load_task("eval")
    held = held[: a.limit] if a.limit else held
    n = len(held)
    answers = {
        "base": read_jsonl(first / "eval" / "base.jsonl")[:n],
        "sft": read_jsonl(first / "eval" / "sft.jsonl")[:n],
    }
    for name, run in runs.items():
        if read_jsonl(run / "eval" / "sft.jsonl")[:n] != answers["sft"]:
            sys.exit(f"{run}: its SFT answers differ from {first}'s; the runs must share the SFT model")
        answers[name] = read_jsonl(run / "eval" / "ppo1.jsonl")[:n]

    t0 = time.perf_counter()
    means = rm_means(rm, held, answers)
    rows = []
    for name, ans in answers.items():
        j = judge(held, ans)
        rows.append(
            {
                "version": name,
                "run": str(runs.get(name, first)),
                "rm_mean": means[name],
                "gold_mean": j["gold_mean"],
                "instruction_rate": j["instruction_rate"],
                "finished": sum(bool(r["finished"][0]) for r in ans),
                **(kl_of(runs[name]) if name in runs else {}),
            }
        )
    result = {"rm": rm, "held_out": n, "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    lines = [
        f"# Proxy against gold: {a.tag}",
        "",
        f"Produced by `python benchmarks/overoptimisation.py {' '.join('--run ' + s for s in a.run)} --tag {a.tag}`"
        f"{' --limit ' + str(a.limit) if a.limit else ''}. "
        f"Reward model: `{rm}`; {n} held-out prompts (never trained on), greedy answers, gold rubric.",
        "",
        "version | KL to SFT (last / mean of last 10 iterations) | RM score (proxy) | gold score "
        "| instructions followed | finished",
        "--- | --- | --- | --- | --- | ---",
    ]
    for r in rows:
        kl = (
            f"{r['kl_last']:.2f} / {r['kl_last10']:.2f} (β {r['kl_coef']:g}, lr {r['lr']:g})" if "kl_last" in r else "–"
        )
        lines.append(
            f"{r['version']} | {kl} | {r['rm_mean']:+.3f} | {r['gold_mean']:+.3f} | {r['instruction_rate']:.1%} | "
            f"{r['finished']}/{n}"
        )
    write_result(a.tag, result, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
