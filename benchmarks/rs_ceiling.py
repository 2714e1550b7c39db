"""Rejection-sampling ceiling: how far does the demo's SFT model move on the held-out prompts when
it is fine-tuned on its own best answers, picked by the gold rubric itself (a perfect reward
model / labeler) or by the run's round-1 reward model?

This is the other policy-improvement operator of RLHF (best-of-K rejection sampling, as in Llama 2's
iterated RLHF, or ReST / RAFT), measured beside PPO (benchmarks/ppo_ceiling.py). Picking with the
gold rubric gives an upper bound for any learned reward model at that budget: if even those
demonstrations move the greedy held-out answers little, no reward model would make the same
budget move them more.

Steps: K answers per train prompt from the run's SFT model (first ``--prompts`` of the built-in
train split, ``--temperature``), the best of each prompt by ``--pick`` (gold: the rubric's total
score; rm: the round-1 reward model's score), SFT from the SFT model on those (``--lr``,
``--epochs``, the pipeline's batch settings), greedy answers to the 108 held-out prompts judged by
the gold rubric against the same SFT model's answers (the run's ``eval/sft.jsonl``).

Usage (after `make demo`):
    python benchmarks/rs_ceiling.py --run runs/demo --out runs/rs_gold --pick gold --k 8 --prompts 256 \
        --lr 1e-4 --epochs 2 --tag gold_k8_256_lr1e-4

Each call adds (or replaces) its tag's row in benchmarks/results/rs_ceiling.json and rewrites
rs_ceiling.md with all rows (a hand-written "## Notes" section at its end is kept). Samples and
a finished fine-tune in ``--out`` are reused. Never asserts anything.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import save_row, timed

from rlhfkit.config import SFTConfig
from rlhfkit.feedback import rubric
from rlhfkit.recipes.pipeline import read_jsonl, read_run_config, sample_answers, write_jsonl
from rlhfkit.recipes.pipeline_judge import compare, judge
from rlhfkit.recipes.sft import train_sft
from rlhfkit.tasks import load_task


def pick_best(prompts, rows: list[dict], gold: list[list], pick: str, rm_dir: str) -> list[int]:
    """Index of each prompt's best answer: the highest gold-rubric total (``gold``: each prompt's
    GoldScores) or the highest reward-model score."""
    if pick == "gold":
        return [max(range(len(g)), key=lambda j: g[j].total) for g in gold]
    from rlhfkit.evals.helpful import hf_reward_fn

    reward = hf_reward_fn(rm_dir)
    flat = reward(
        [p.messages for p, r in zip(prompts, rows) for _ in r["responses"]], [x for r in rows for x in r["responses"]]
    )
    best, i = [], 0
    for r in rows:
        k = len(r["responses"])
        best.append(max(range(k), key=lambda j: flat[i + j]))
        i += k
    return best


def render(rows: dict) -> str:
    lines = [
        "# Rejection-sampling ceiling: the SFT model fine-tuned on its own best-of-K answers",
        "",
        "Produced by `python benchmarks/rs_ceiling.py` (see its docstring); one row per variant. `pick`: `gold` = each",
        "train prompt's best answer by the gold rubric (a perfect reward model), `rm` = by the run's round-1 reward",
        "model. Held-out: the 108 eval prompts, greedy answers, judged by the gold rubric against the same SFT",
        "model's answers.",
        "",
        "tag | run | pick | K × prompts (T) | picked answers' instructions (all K) | lr × epochs "
        "| held-out instructions (SFT) | gold score (SFT) | win-rate vs SFT (W/T/L) | sample s | fine-tune s",
        "---|---|---|---|---|---|---|---|---|---|---",
    ]
    for tag, r in rows.items():
        v = r["vs_sft"]
        lines.append(
            f"{tag} | {r['run']} | {r['pick']} | {r['k']} × {r['prompts']} ({r['temperature']}) "
            f"| {100 * r['picked_rate']:.1f} % ({100 * r['sample_rate']:.1f} %) | {r['lr']:g} × {r['epochs']:g} "
            f"| {100 * r['tuned']['instruction_rate']:.1f} % ({100 * r['sft']['instruction_rate']:.1f} %) "
            f"| {r['tuned']['gold_mean']:+.3f} ({r['sft']['gold_mean']:+.3f}) "
            f"| {100 * v['win_rate']:.1f} % ({v['wins']}/{v['ties']}/{v['losses']}) "
            f"| {r['sample_seconds'] or 0:.0f} | {r['tune_seconds'] or 0:.0f}"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--run", required=True, help="a finished pipeline run directory (pipeline.json, sft/, round1/rm/, eval/)"
    )
    ap.add_argument("--out", required=True, help="this variant's directory (samples, demonstrations, model, answers)")
    ap.add_argument("--pick", choices=("gold", "rm"), default="gold")
    ap.add_argument("--k", type=int, default=8, help="answers sampled per train prompt")
    ap.add_argument("--prompts", type=int, default=256, help="the first N prompts of the train split")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--tag", required=True)
    args = ap.parse_args()
    run, out = Path(args.run), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pc = read_run_config(run)
    train, held = load_task("train")[: args.prompts], load_task("eval")
    sft = str(run / "sft" / "model")

    timing_path = out / "seconds.json"  # kept with the files, so that a rerun that reuses them reports their times
    seconds = json.loads(timing_path.read_text()) if timing_path.exists() else {}
    samples = out / "samples.jsonl"
    if not samples.exists():
        answers, seconds["sample"] = timed(sample_answers, sft, train, args.k, pc, args.temperature)
        write_jsonl(samples, answers)
        timing_path.write_text(json.dumps(seconds))
    rows = read_jsonl(samples)
    if len(rows) != len(train) or any(len(r["responses"]) != args.k for r in rows):
        raise SystemExit(f"{samples} holds other samples than --prompts {args.prompts} --k {args.k}: use another --out")
    gold = [[rubric.score(p, x, f) for x, f in zip(r["responses"], r["finished"])] for p, r in zip(train, rows)]
    best = pick_best(train, rows, gold, args.pick, str(run / "round1" / "rm" / "model"))
    write_jsonl(
        out / "demos.jsonl", [{"prompt": p.text, "response": r["responses"][b]} for p, r, b in zip(train, rows, best)]
    )

    if not (out / "model" / "model" / "config.json").exists():
        cfg = SFTConfig(
            model=sft,
            data=str(out / "demos.jsonl"),
            out=str(out / "model"),
            epochs=args.epochs,
            lr=args.lr,
            batch_size=pc.sft.batch_size,
            grad_accum=pc.sft.grad_accum,
            precision=pc.precision,
            max_length=pc.sft.max_length,
            eval_fraction=0.0,
            seed=pc.seed,
            warmup_steps=2,
        )
        seconds["tune"] = timed(train_sft, cfg)[1]
        timing_path.write_text(json.dumps(seconds))
    answers = out / "eval.jsonl"
    if not answers.exists():
        write_jsonl(answers, sample_answers(str(out / "model" / "model"), held, 1, pc, 0.0))
    mine, base = judge(held, read_jsonl(answers)), judge(held, read_jsonl(run / "eval" / "sft.jsonl"))
    row = {
        "run": str(run),
        "pick": args.pick,
        "k": args.k,
        "prompts": len(train),
        "temperature": args.temperature,
        "lr": args.lr,
        "epochs": args.epochs,
        "picked_rate": rubric.instruction_following_rate(g[b] for g, b in zip(gold, best)),
        "sample_rate": rubric.instruction_following_rate(s for g in gold for s in g),
        "tuned": {k: v for k, v in mine.items() if k != "scores"},
        "sft": {k: v for k, v in base.items() if k != "scores"},
        "vs_sft": compare(mine["scores"], base["scores"]),
        "sample_seconds": seconds.get("sample"),
        "tune_seconds": seconds.get("tune"),
    }
    save_row("rs_ceiling", args.tag, row, render)


if __name__ == "__main__":
    main()
