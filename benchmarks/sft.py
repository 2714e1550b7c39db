"""SFT benchmark: held-out loss before/after and training tokens/s in fp32 and bf16, one run.

Data: ../shared/data/self-instruct-seed/seed_tasks.jsonl (175 tasks -> one demonstration per
instance), 15 % held out (seeded). Model: the embedded smollm2-135m-instruct.

  - throughput: batch 8 rows, packing on, max_length 256 (8 × 256 tokens per step), fp32 then bf16
    autocast, a fixed number of steps each;
  - quality: 3 epochs at batch 8 in bf16, held-out loss (mean NLL per response token) before/after.

Writes benchmarks/results/sft.json and sft.md. Never asserts a time.

usage: python benchmarks/sft.py [--steps 12] [--epochs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from common import DATA, RESULTS, md_table, write_result

from rlhfkit.config import SFTConfig
from rlhfkit.models.loading import embedded_model_dir
from rlhfkit.recipes.sft import train_sft

SEED_TASKS = DATA / "self-instruct-seed" / "seed_tasks.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per throughput run")
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--out", default=str(RESULTS), help="directory of sft.{json,md}")
    args = ap.parse_args()
    model = str(embedded_model_dir())
    work = Path(tempfile.mkdtemp(prefix="sft-bench-"))
    res: dict = {
        "load_average_at_start": os.getloadavg()[0],
        "data": "self-instruct seed_tasks.jsonl (175)",
        "throughput": {},
    }
    for precision in ("fp32", "bf16"):
        cfg = SFTConfig(
            model=model,
            data=str(SEED_TASKS),
            out=str(work / f"tp_{precision}"),
            batch_size=8,
            packing=True,
            max_length=256,
            max_steps=args.steps,
            lr=2e-5,
            warmup_steps=0,
            precision=precision,
            eval_fraction=0.15,
        )
        r = train_sft(cfg)
        res["throughput"][precision] = {
            "tokens_per_second": r["tokens_per_second"],
            "steps": args.steps,
            "train_seconds": r["train_seconds"],
        }
    cfg = SFTConfig(
        model=model,
        data=str(SEED_TASKS),
        out=str(work / "quality"),
        batch_size=8,
        epochs=args.epochs,
        lr=2e-5,
        warmup_steps=5,
        precision="bf16",
        eval_fraction=0.15,
        max_length=512,
    )
    r = train_sft(cfg)
    res["quality"] = {
        "held_out_loss_before": r["eval_loss_before"],
        "held_out_loss_after": r["eval_loss"],
        "epochs": args.epochs,
        "steps": r["step"],
        "train_seconds": r["train_seconds"],
        "tokens_per_second": r["tokens_per_second"],
        "precision": "bf16 autocast",
        "lr": 2e-5,
        "batch_size": 8,
    }
    t, q = res["throughput"], res["quality"]
    md = [
        "# SFT benchmark",
        "",
        "Produced by `python benchmarks/sft.py`; "
        f"load average {res['load_average_at_start']:.1f} at start (2 cores: other jobs make tokens/s a lower bound).",
        "",
        "## Training throughput (SmolLM2-135M, 8 packed rows × 256 tokens, forward + backward + AdamW)",
        "",
        *md_table(
            ["precision", "tokens/s"],
            [
                ["fp32", f"{t['fp32']['tokens_per_second']:.0f}"],
                ["bf16 autocast", f"{t['bf16']['tokens_per_second']:.0f}"],
            ],
            "lr",
        ),
        "",
        "## Held-out loss (self-instruct seeds, 15 % held out, mean NLL per response token)",
        "",
        f"{q['held_out_loss_before']:.4f} before -> **{q['held_out_loss_after']:.4f}** after {q['epochs']} epochs "
        f"({q['steps']} steps, {q['train_seconds']:.0f} s, bf16 autocast, lr 2e-5, batch 8).",
    ]
    write_result("sft", res, "\n".join(md), args.out)
    print("\n".join(md))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
