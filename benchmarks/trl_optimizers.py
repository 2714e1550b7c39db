"""DPO, GRPO and RLOO speed against TRL 1.16, at TRL's benchmark settings, in one run.

    .venv/bin/python benchmarks/trl_optimizers.py           # writes benchmarks/results/trl_optimizers.{json,md}
    .venv/bin/python benchmarks/trl_optimizers.py --only dpo --results /tmp/x

SmolLM2-135M-Instruct (the embedded model as an HF directory) is policy and frozen reference on both
sides, bf16 autocast (TRL: ``bf16=True`` with ``ACCELERATE_MIXED_PRECISION=bf16``, README of
``shared/peers/trl``), one process each, TRL from ``$TRL_VENV`` (default /work/trl-venv: trl 1.16.0).

- **GRPO, RLOO**: TRL's own script ``shared/peers/trl/grpo_rloo_bench.py`` (run through
  ``common.run_peer``): its 64 chat prompts, 16 prompts × 4 samples × ≤ 64 new tokens per step,
  β = 0.05, lr 1e-6, one optimizer step per 64 completions (16 × 4 accumulation), a reward model =
  SmolLM2 with a random 1-logit head, 4 steps. Ours: ``train_grpo`` / ``train_rloo`` with the same
  numbers (``batch_size=16, samples_per_prompt=4, max_new_tokens=64, temperature=1, kl_coef=0.05,
  num_minibatches=1, grad_accum=4``; the reward model = the same weights with a random head, as
  benchmarks/ppo.py). Seconds per step: the median of steps 2..N (the first warms up), TRL's between
  optimizer-step callbacks, ours between metrics lines.
- **DPO**: TRL has no benchmark script for it, so this file is one, run by TRL's Python with
  ``--trl-dpo`` (imports nothing of rlhfkit): ``DPOTrainer`` with ``DPOConfig`` defaults but
  ``per_device_train_batch_size=8``, lr 1e-6, β = 0.1, bf16, 1 epoch; TRL computes the reference
  log-probs each step (its default). The data: ``--pairs`` synthetic pairs (TRL's prompts, answers of
  88–100 words drawn as in its ``reward_bench.py``), conversational, so both sides apply the chat
  template. Ours: ``train_dpo`` at the same batch size, lr, β, precision, 1 epoch. Pairs/s: TRL's =
  pairs / ``train_runtime`` (its training loop, which computes the reference log-probs every step;
  loading and tokenising before it); ours = pairs / (the one reference pass + the training loop),
  loading, tokenising and saving excluded alike. ``pairs_per_s_wall`` is ours over the whole call.

Each side runs in its own subprocess with ``OMP_WAIT_POLICY=PASSIVE`` and ``--threads`` threads.
The machine may be shared: compare the ratios, which come from one run. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
TRL_PYTHON = Path(os.environ.get("TRL_VENV", "/work/trl-venv")) / "bin" / "python"
WORDS = (  # shared/peers/trl/reward_bench.py's word list
    "the a of and to in is was for on with as by at from that this it be are were an or which but not have has "
    "had will would can could should sea moon rain city river mountain village library clock robot cat coffee winter "
    "morning light shadow garden window story friend school road bridge forest quiet bright slowly under over "
    "between around people time water night day small old new warm cold green blue red golden silver"
).split()
DPO = dict(batch_size=8, lr=1e-6, beta=0.1)
RL = dict(prompts=16, samples=4, max_new_tokens=64, beta=0.05, lr=1e-6)


def dpo_pairs(prompts: list[str], n: int) -> list[dict]:
    """``n`` (prompt, chosen, rejected) rows, conversational: TRL's prompts, answers of 88–100 random words."""
    rng = random.Random(0)

    def text() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(88, 100))).capitalize() + "."

    rows = []
    for i in range(n):
        rows.append(
            {
                "prompt": [{"role": "user", "content": prompts[i % len(prompts)]}],
                "chosen": [{"role": "assistant", "content": text()}],
                "rejected": [{"role": "assistant", "content": text()}],
            }
        )
    return rows


# ---------------------------------------------------------------- TRL side (run by TRL's Python)


def trl_dpo(model: str, data: Path, result: Path) -> None:
    """TRL 1.16's DPOTrainer, one epoch over ``data``; writes pairs/s and the step times."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in data.read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(model)
    steps: list[float] = []

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            steps.append(time.perf_counter())

    t0 = time.perf_counter()
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32),
        args=DPOConfig(
            output_dir=tempfile.mkdtemp(prefix="dpo"),
            use_cpu=True,
            bf16=True,
            per_device_train_batch_size=8,
            gradient_accumulation_steps=1,
            num_train_epochs=1,
            learning_rate=DPO["lr"],
            beta=DPO["beta"],
            save_strategy="no",
            report_to="none",
            logging_steps=1,
            seed=0,
            dataloader_num_workers=0,
        ),  # fmt: skip
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        callbacks=[Steps()],
    )
    setup = time.perf_counter() - t0
    out = trainer.train()
    walls = [b - a for a, b in zip(steps, steps[1:])]
    result.write_text(
        json.dumps(
            {
                "trl": trl.__version__,
                "pairs": len(rows),
                "setup_s": setup,
                "train_runtime_s": out.metrics["train_runtime"],
                "pairs_per_s": len(rows) / out.metrics["train_runtime"],
                "median_step_s": statistics.median(walls) if walls else None,
                "mixed_precision": str(trainer.accelerator.mixed_precision),
                "threads": torch.get_num_threads(),
            }
        )
    )


# ---------------------------------------------------------------- our side (a child process each)


def ours(algo: str, model: str, data: Path, out: Path, result: Path, steps: int) -> None:
    """Our ``train_dpo`` / ``train_grpo`` / ``train_rloo`` at the settings above; writes the timings."""
    import torch

    from rlhfkit.recipes.common import read_metrics

    t0 = time.perf_counter()
    if algo == "dpo":
        from rlhfkit.config import DPOConfig
        from rlhfkit.recipes.dpo import train_dpo

        cfg = DPOConfig(
            model=model, data=str(data), out=str(out), batch_size=DPO["batch_size"], lr=DPO["lr"], beta=DPO["beta"],
            precision="bf16", eval_fraction=0.0, epochs=1.0, warmup_steps=0,
        )  # fmt: skip
        res = train_dpo(cfg, say=lambda *a: None)
        wall = time.perf_counter() - t0
        n = sum(1 for _ in data.read_text().splitlines())
        rows = [r for r in read_metrics(out) if "loss" in r]
        walls = [b["time"] - a["time"] for a, b in zip(rows, rows[1:])]
        busy = res["reference_seconds"] + res["train_seconds"]  # as TRL's train_runtime: no loading, no saving
        stats = {"pairs": n, "wall_s": wall, "pairs_per_s": n / busy, "pairs_per_s_wall": n / wall}
        stats |= {"train_seconds": res["train_seconds"], "reference_seconds": res["reference_seconds"]}
        stats["median_step_s"] = statistics.median(walls) if walls else None
    else:
        from rlhfkit.config import GRPOConfig, RLOOConfig
        from rlhfkit.recipes.critic_free import train_grpo, train_rloo

        cls, train = (GRPOConfig, train_grpo) if algo == "grpo" else (RLOOConfig, train_rloo)
        cfg = cls(
            model=model, reward_model=model, data=str(data), out=str(out), batch_size=RL["prompts"],
            samples_per_prompt=RL["samples"], max_new_tokens=RL["max_new_tokens"], temperature=1.0,
            kl_coef=RL["beta"], lr=RL["lr"], num_minibatches=1, grad_accum=4, ppo_epochs=1, forward_batch_size=16,
            precision="bf16", max_steps=steps, missing_eos_penalty=None,
        )  # fmt: skip
        train(cfg, say=lambda *a: None)
        rows = read_metrics(out)
        walls = [b["time"] - a["time"] for a, b in zip(rows, rows[1:])]
        stats = {"steps": len(rows), "median_step_s": statistics.median(walls), "wall_s": time.perf_counter() - t0}
        stats["response_length"] = [r["response_length"] for r in rows]
        stats["split_median_s"] = {
            k.removeprefix("time_"): statistics.median(r[k] for r in rows[1:])
            for k in ("time_generate", "time_score", "time_forward", "time_train")
        }
    stats["threads"] = torch.get_num_threads()
    result.write_text(json.dumps(stats))


def spawn_ours(algo: str, model: str, data: Path, tmp: Path, steps: int, env: dict) -> dict:
    result = tmp / f"ours-{algo}.json"
    cmd = [sys.executable, __file__, "--child", algo, "--model", model, "--data", str(data), "--out"]
    cmd += [str(tmp / f"ours-{algo}"), "--result", str(result), "--steps", str(steps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"rc={proc.returncode}"])[-1]}
    return json.loads(result.read_text())


def spawn_trl_dpo(model: str, data: Path, tmp: Path, env: dict) -> dict:
    if not TRL_PYTHON.exists():
        return {"error": f"{TRL_PYTHON} missing (set TRL_VENV)"}
    result = tmp / "trl-dpo.json"
    cmd = [str(TRL_PYTHON), __file__, "--trl-dpo", "--model", model, "--data", str(data), "--result", str(result)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
        return {"error": (proc.stderr.strip().splitlines() or [f"rc={proc.returncode}"])[-1]}
    return json.loads(result.read_text())


def render(r: dict) -> str:
    lines = [
        "# DPO, GRPO and RLOO against TRL 1.16 at TRL's settings",
        "",
        "Produced by `python benchmarks/trl_optimizers.py` (its docstring gives the settings). One run, both sides in",
        f"turn, {r['threads'] or 'default'} thread(s) each; {r['note']}",
        "",
        "| optimiser | settings | ours | TRL 1.16 | ours / TRL | target |",
        "|---|---|---:|---:|---:|---|",
    ]
    for name, row in r["rows"].items():
        o, t, ratio = row["ours"], row["trl"], row.get("ratio")
        key, unit = ("pairs_per_s", "pairs/s") if name == "dpo" else ("median_step_s", "s/step")
        cell = [f"{x[key]:.2f} {unit}" if x.get(key) is not None else x.get("error", "–") for x in (o, t)]
        lines.append(
            f"| {name} | {row['settings']} | {cell[0]} | {cell[1]} | "
            + (f"{ratio:.3f}×" if ratio is not None else "–")
            + f" | {row['target']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", choices=["dpo", "grpo", "rloo"], help=argparse.SUPPRESS)
    ap.add_argument("--trl-dpo", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="", help="HF directory of SmolLM2-135M-Instruct (default: the embedded one)")
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=4, help="GRPO/RLOO steps on each side (the first is excluded)")
    ap.add_argument("--pairs", type=int, default=128, help="DPO pairs (one epoch, 8 per step)")
    ap.add_argument("--only", default="dpo,grpo,rloo", help="comma list of dpo, grpo, rloo")
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of both sides (0 = torch's default)")
    ap.add_argument("--note", default="", help="a line for the result (e.g. what else ran on the machine)")
    ap.add_argument("--results", default="", help="where trl_optimizers.{json,md} go (default benchmarks/results)")
    a = ap.parse_args()
    if a.trl_dpo:
        return trl_dpo(a.model, Path(a.data), Path(a.result))
    if a.child:
        return ours(a.child, a.model, Path(a.data), Path(a.out), Path(a.result), a.steps)

    from common import bench_env, run_peer, write_result
    from ppo import trl_prompts

    from rlhfkit.models.loading import embedded_model_dir

    model = a.model or str(embedded_model_dir())
    names = [n.strip() for n in a.only.split(",") if n.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="trl_optimizers"))
    prompts = trl_prompts()
    env = bench_env(a.threads, "PASSIVE", BENCH_MODEL=model, ACCELERATE_MIXED_PRECISION="bf16")
    rows = {}
    if "dpo" in names:
        data = tmp / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in dpo_pairs(prompts, a.pairs)))
        print(f"DPO: {a.pairs} pairs, ours then TRL", flush=True)
        o, t = spawn_ours("dpo", model, data, tmp, a.steps, env), spawn_trl_dpo(model, data, tmp, env)
        ratio = o["pairs_per_s"] / t["pairs_per_s"] if "pairs_per_s" in o and "pairs_per_s" in t else None
        settings = f"{a.pairs} pairs (88–100 words a side), 8 per step, β 0.1, lr 1e-6, bf16, 1 epoch"
        rows["dpo"] = {"settings": settings, "ours": o, "trl": t, "ratio": ratio, "target": "≥ 2× TRL's pairs/s"}
    prompts_file = tmp / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    for algo in [n for n in names if n in ("grpo", "rloo")]:
        print(f"{algo.upper()}: {a.steps} steps, ours then TRL", flush=True)
        o = spawn_ours(algo, model, prompts_file, tmp, a.steps, env)
        t = run_peer(TRL_PYTHON, "grpo_rloo_bench.py", ["--algo", algo, "--steps", str(a.steps), "--tag", algo],
                     tmp / f"trl-{algo}", algo, env=env)  # fmt: skip
        ratio = o["median_step_s"] / t["median_step_s"] if "median_step_s" in o and t.get("median_step_s") else None
        settings = "16 prompts × 4 samples × ≤ 64 tokens, β 0.05, lr 1e-6, bf16, RM = SmolLM2 + random head"
        rows[algo] = {"settings": settings, "ours": o, "trl": t, "ratio": ratio, "target": "≤ 0.25× TRL's s/step"}
    res = {"threads": a.threads, "note": a.note or "a quiet machine.", "model": model, "rows": rows}
    md = render(res)
    print(md)
    print(write_result("trl_optimizers", res, md, a.results or None))


if __name__ == "__main__":
    sys.path[:0] = [str(BENCH), str(BENCH.parent)]  # common.py, ppo.py; this checkout's rlhfkit
    main()
