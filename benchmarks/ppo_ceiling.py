"""How far can PPO go at the demo's budget? PPO on a pipeline run's SFT model with the reward
model of that run, or with the gold rubric itself as the reward (``--reward gold``: a perfect
reward model, what no learned one can beat), then the held-out judge of the pipeline.

If PPO against the gold rubric gains little on the held-out prompts, the reward model is not
what holds the demo back: the policy cannot learn more from ``ppo.max_steps x ppo.batch_size``
rollouts. Each variant is one PPO run at the demo's settings (the `ppo` settings of
that run), with ``key=value`` overrides of PPOConfig fields on top.

Usage (after `make demo`):
    python benchmarks/ppo_ceiling.py --run runs/demo --out runs/ceiling_gold --reward gold --tag gold
    python benchmarks/ppo_ceiling.py --run runs/demo --out runs/ceiling_group --reward gold --tag gold_group \
        samples_per_prompt=4 batch_size=4 score_baseline=group

Each call adds (or replaces) its tag's row in benchmarks/results/ppo_ceiling.json and rewrites
ppo_ceiling.md with all rows (a hand-written "## Notes" section at its end is kept). A finished
variant directory is reused (its PPO is not rerun).
Never asserts anything.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import yaml
from common import quarter_means, save_row

from rlhfkit.config import PPOConfig
from rlhfkit.data.jsonl import read_jsonl, write_jsonl
from rlhfkit.feedback import rubric
from rlhfkit.recipes.common import read_metrics
from rlhfkit.recipes.pipeline import ppo_config, read_run_config, sample_answers
from rlhfkit.recipes.pipeline_judge import compare, judge
from rlhfkit.recipes.ppo import train_ppo
from rlhfkit.tasks import load_task


def gold_reward(prompts, texts, finished) -> list[float]:
    """The gold rubric's total score: the reward a perfect reward model would give."""
    return [rubric.score(p, t, f).total for p, t, f in zip(prompts, texts, finished)]


def parse_overrides(items: list[str]) -> dict:
    fields = {f: type(v) for f, v in vars(PPOConfig()).items()}
    out = {}
    for item in items:
        key, _, text = item.partition("=")
        if key not in fields:
            raise SystemExit(f"{key}: not a PPOConfig field")
        value = yaml.safe_load(text)
        out[key] = float(value) if fields[key] is float else value
    return out


def round1_ppo_config(run: Path, out: Path, reward: str, overrides: dict) -> PPOConfig:
    """The pipeline's round-1 PPO settings of ``run`` (recipes/pipeline.py: ppo_config), then overrides."""
    pc = read_run_config(run)
    rm = str(run / "round1" / "rm" / "model") if reward == "rm" else ""
    cfg = ppo_config(pc, str(run / "sft" / "model"), rm, str(out / "ppo"), 1)
    return dataclasses.replace(cfg, **overrides)


def render(rows: dict) -> str:
    lines = [
        "# PPO ceiling: PPO at the demo's budget against its reward model or the gold rubric",
        "",
        "Produced by `python benchmarks/ppo_ceiling.py` (see its docstring); one row per variant. Each PPO starts",
        "from the SFT model of the run named in the row; `reward`: `gold` = the gold rubric's score is the reward",
        "(a perfect reward model), `rm` = that run's round-1 reward model (what the demo does). Held-out: the",
        "108 eval prompts, greedy answers, judged by the gold rubric against the same SFT model's answers.",
        "",
        "tag | run | reward | overrides | held-out instructions (SFT) | gold score (SFT) | win-rate vs SFT (W/T/L) "
        "| train gold score, first → last quarter | KL last quarter | PPO s",
        "---|---|---|---|---|---|---|---|---|---",
    ]
    for tag, r in rows.items():
        o = " ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "—"
        v = r["vs_sft"]
        lines.append(
            f"{tag} | {r['run']} | {r['reward']} | {o} | {100 * r['ppo']['instruction_rate']:.1f} % "
            f"({100 * r['sft']['instruction_rate']:.1f} %) "
            f"| {r['ppo']['gold_mean']:+.3f} ({r['sft']['gold_mean']:+.3f}) "
            f"| {100 * v['win_rate']:.1f} % ({v['wins']}/{v['ties']}/{v['losses']}) "
            f"| {r['train_gold'][0]:+.3f} → {r['train_gold'][1]:+.3f} | {r['kl_last_quarter']:.2f} "
            f"| {r['ppo_seconds']:.0f}"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a finished pipeline run directory (pipeline.json, sft/, round1/rm/)")
    ap.add_argument("--out", required=True, help="this variant's directory (PPO model, held-out answers)")
    ap.add_argument("--reward", choices=("gold", "rm"), default="gold")
    ap.add_argument("--tag", required=True)
    ap.add_argument("overrides", nargs="*", help="PPOConfig key=value")
    args = ap.parse_args()
    run, out = Path(args.run), Path(args.out)
    overrides = parse_overrides(args.overrides)
    cfg = round1_ppo_config(run, out, args.reward, overrides)
    if not (out / "ppo" / "model" / "config.json").exists():
        train_ppo(cfg, reward_fn=gold_reward if args.reward == "gold" else None, rollout_metrics=rubric.gold_metrics)
    metrics = read_metrics(out / "ppo")
    held = load_task("eval")
    answers = out / "eval.jsonl"
    if not answers.exists():
        pc = read_run_config(run)
        write_jsonl(answers, sample_answers(str(out / "ppo" / "model"), held, 1, pc, 0.0))
    mine, sft = judge(held, read_jsonl(answers)), judge(held, read_jsonl(run / "eval" / "sft.jsonl"))
    row = {
        "run": str(run),
        "reward": args.reward,
        "overrides": overrides,
        "config": vars(cfg),
        "ppo": {k: v for k, v in mine.items() if k != "scores"},
        "sft": {k: v for k, v in sft.items() if k != "scores"},
        "vs_sft": compare(mine["scores"], sft["scores"]),
        "train_gold": quarter_means(metrics, "gold_score"),
        "kl_last_quarter": quarter_means(metrics, "kl")[1],
        "ppo_seconds": sum(m["time_iteration"] for m in metrics),
    }
    save_row("ppo_ceiling", args.tag, row, render)


if __name__ == "__main__":
    main()
