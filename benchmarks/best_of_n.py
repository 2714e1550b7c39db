"""Best-of-N against a reward model: gold score and instruction following against the KL bound.

    .venv/bin/python benchmarks/best_of_n.py --rm runs/demo/round1/rm/model
    .venv/bin/python benchmarks/best_of_n.py --model runs/demo/sft --rm RM_DIR --ns 1,2,4,8 --limit 30

For each N the helpful suite (gold judge, the built-in task's eval prompts) answers with the
reward model's best of N samples (``rlhfkit eval --best-of N --reward-model RM``; N = 1 is one
sample, the base policy); the baseline is the same model, greedy. Each row: N, the analytic
KL(best-of-N || policy) = log N - (N-1)/N (Stiennon et al. 2020), the gold score (mean rubric
total), the instruction-level following rate and the win-rate over the greedy baseline. Writes
``benchmarks/results/best_of_n.{json,md}`` (``--out`` elsewhere). The gold-vs-RM gap as N grows is
the overoptimisation curve of Gao et al. 2022 without any training.
"""

from __future__ import annotations

import argparse
import time

from common import md_table
from provenance import write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="the policy (any --model spec)")
    ap.add_argument("--rm", required=True, help="reward-model directory (saved by `rlhfkit rm`)")
    ap.add_argument("--ns", default="1,2,4,8", help="the N values, comma-separated")
    ap.add_argument("--limit", type=int, default=30, help="helpful prompts")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="results directory (default: benchmarks/results)")
    a = ap.parse_args()

    from rlhfkit.evals.runner import EvalConfig, run_eval

    rows = []
    for n in [int(x) for x in a.ns.split(",")]:
        t0 = time.time()
        cfg = EvalConfig(
            models=[f"bo{n}={a.model}"],
            baseline=f"greedy={a.model}",
            suites=["helpful"],
            judge="gold",
            help_limit=a.limit,
            help_max_new_tokens=a.max_new_tokens,
            best_of=n,
            best_of_temperature=a.temperature,
            reward_model=a.rm,
            precision=a.precision,
            seed=a.seed,
            show_progress=False,
        )
        h = run_eval(cfg)["helpful"][f"bo{n}"]
        rows.append(
            {
                "n": n,
                "kl_bound": cfg_kl(n),
                "gold_score": h["gold_score_model"],
                "instruction_following": h["instruction_following_model"],
                "win_rate_vs_greedy": h["win_rate"],
                "gold_score_greedy": h["gold_score_baseline"],
                "seconds": round(time.time() - t0, 1),
            }
        )
        print(rows[-1], flush=True)
    md = ["# Best-of-N against the reward model", ""]
    md += [f"Policy `{a.model}`, reward model `{a.rm}`, {a.limit} prompts of the built-in task, gold rubric.", ""]
    md += md_table(
        ["N", "KL bound (nats)", "gold score", "instr. following", "win-rate vs greedy", "s"],
        [
            [r["n"], f"{r['kl_bound']:.3f}", f"{r['gold_score']:.3f}", f"{r['instruction_following']:.3f}"]
            + [f"{r['win_rate_vs_greedy']:.3f}", r["seconds"]]
            for r in rows
        ],
        "rrrrrr",
    )
    data = {"config": vars(a), "rows": rows}
    print(write_result("best_of_n", data, "\n".join(md), a.out))


def cfg_kl(n: int) -> float:
    from rlhfkit.algos.best_of_n import kl_bound

    return kl_bound(n)


if __name__ == "__main__":
    main()
