"""The RLHF loop on the built-in task, end to end — what ``make demo`` runs.

  0. prompts       the built-in task (rlhfkit/tasks): train prompts for learning, held-out eval
                   prompts only for judging
  1. sample        K answers per train prompt from the base model (the rollout engine)
  2. label         a labeler ranks each prompt's K answers (simulated: gold rubric + noise)
  3. SFT           best-of-K rejection sampling: the labeler's top answer of each prompt becomes
                   a demonstration, and the base model is fine-tuned on them
  4. RM            a reward model, initialised from the SFT model, learns from the rankings
  5. judge         every model version answers the held-out prompts; the gold rubric judges them:
                   mean gold score, instruction-following rate, win-rates, Bradley–Terry ratings

Everything a stage produces stays in the run directory (samples, rankings, demonstrations,
models, metrics) and a finished stage is not redone when the pipeline is run again.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch

from rlhfkit.config import PipelineConfig, RewardConfig, SFTConfig
from rlhfkit.data.records import Prompt
from rlhfkit.data.tokenize import encode_prompt
from rlhfkit.errors import UserError
from rlhfkit.feedback import rubric
from rlhfkit.feedback.labelers import GoldLabeler, SimulatedLabeler, SimulatedLabelerConfig
from rlhfkit.models.loading import load_causal_lm
from rlhfkit.rollout.engine import Engine
from rlhfkit.rollout.sampling import SamplingParams
from rlhfkit.tasks import load_task


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Atomic: a crash never leaves half a file where a finished one is expected."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sample_answers(model_spec: str, prompts: list[Prompt], k: int, cfg: PipelineConfig, temperature: float,
                   say=print) -> list[dict]:
    """K answers per prompt from ``model_spec`` with the rollout engine; one row per prompt."""
    loaded = load_causal_lm(model_spec)
    loaded.model.eval()
    engine = Engine(loaded.model, loaded.tokenizer, precision=cfg.precision)
    ids = [encode_prompt(loaded.tokenizer, p.messages) for p in prompts]
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=temperature, seed=cfg.seed)
    t0 = time.perf_counter()
    with torch.no_grad():
        outs = engine.generate(ids, params, n=k, progress=True)
    seconds = time.perf_counter() - t0
    new_tokens = sum(len(c.token_ids) for c in outs)
    say(f"sampled {len(outs)} answers from {model_spec} in {seconds:.0f} s ({new_tokens / seconds:.0f} new tokens/s)")
    rows = []
    for i, p in enumerate(prompts):
        mine = [c for c in outs if c.prompt_index == i]
        rows.append({"id": p.meta.get("id", i), "prompt": p.text, "responses": [c.text.strip() for c in mine],
                     "finished": [c.finish_reason == "stop" for c in mine]})
    return rows


def judge(prompts: list[Prompt], rows: list[dict]) -> dict:
    """Gold-rubric summary of one answer per prompt."""
    scores = [rubric.score(p, r["responses"][0], r["finished"][0]) for p, r in zip(prompts, rows)]
    return {"gold_mean": sum(s.total for s in scores) / len(scores),
            "instruction_rate": rubric.instruction_following_rate(scores, "instruction"),
            "prompt_rate": rubric.instruction_following_rate(scores, "prompt"),
            "scores": [s.total for s in scores]}


def compare(a: list[float], b: list[float]) -> dict:
    """Win-rate of version a over version b on the same prompts (ties count half), with a 95% CI."""
    from rlhfkit.algos.ratings import win_rate

    outcomes = [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)]
    wr = win_rate(outcomes, seed=0)
    return {"win_rate": wr.rate, "ci95": [wr.lower, wr.upper], "wins": wr.wins, "ties": wr.ties, "losses": wr.losses}


def run_pipeline(cfg: PipelineConfig, say=print) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline.json").write_text(json.dumps(asdict(cfg), indent=2))
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    # 0. prompts: a seeded subset of the train split; held-out prompts only for judging
    train_all, eval_all = load_task("train"), load_task("eval")
    rng = random.Random(cfg.seed)
    train = rng.sample(train_all, min(cfg.train_prompts, len(train_all)))
    held_out = eval_all[: cfg.eval_prompts] if cfg.eval_prompts else eval_all
    say(f"built-in task: {len(train)} train prompts, {len(held_out)} held-out prompts")

    labeler = GoldLabeler() if cfg.labeler == "gold" else SimulatedLabeler(SimulatedLabelerConfig(
        temperature=cfg.labeler_temperature, length_bias=cfg.labeler_length_bias,
        random_share=cfg.labeler_random_share, seed=cfg.seed))
    if cfg.labeler not in ("gold", "simulated"):
        raise UserError(f"labeler={cfg.labeler!r}: expected simulated or gold (humans arrive with the web app)")

    # 1. sample K answers per train prompt from the base model
    t = time.perf_counter()
    samples_path = out / "round0" / "samples.jsonl"
    samples_path.parent.mkdir(parents=True, exist_ok=True)
    if not samples_path.exists():
        write_jsonl(samples_path, sample_answers(cfg.model, train, cfg.k, cfg, cfg.temperature, say))
    samples = read_jsonl(samples_path)
    timings["sample"] = time.perf_counter() - t

    # 2. label: one ranking per prompt
    rankings = []
    for p, row in zip(train, samples):
        r = labeler.rank(p, row["responses"], row["finished"])
        rankings.append({"prompt": p.text, "responses": r.responses, "ranks": r.ranks, "meta": r.meta})
    write_jsonl(out / "round0" / "rankings.jsonl", rankings)

    # 3. SFT on the labeler's best answer of each prompt (best-of-K rejection sampling)
    demos = []
    for r in rankings:
        best = r["ranks"].index(0)
        if max(r["meta"]["gold"]) > cfg.min_demo_score and r["responses"][best]:
            demos.append({"prompt": r["prompt"], "response": r["responses"][best]})
    write_jsonl(out / "round0" / "demos.jsonl", demos)
    say(f"{len(demos)} demonstrations (best of {cfg.k}, gold > {cfg.min_demo_score}) from {len(rankings)} prompts")
    t = time.perf_counter()
    sft_dir = out / "sft"
    if not (sft_dir / "model" / "config.json").exists():
        from rlhfkit.recipes.sft import train_sft

        train_sft(SFTConfig(model=cfg.model, data=str(out / "round0" / "demos.jsonl"), out=str(sft_dir),
                            epochs=cfg.sft_epochs, lr=cfg.sft_lr, batch_size=cfg.batch_size, precision=cfg.precision,
                            max_length=cfg.max_length, eval_fraction=0.1, seed=cfg.seed, warmup_steps=2), say=say)
    timings["sft"] = time.perf_counter() - t

    # 4. reward model from the rankings, initialised from the SFT model
    t = time.perf_counter()
    rm_dir = out / "rm"
    if not (rm_dir / "model" / "config.json").exists():
        from rlhfkit.recipes.reward import train_reward_model

        train_reward_model(RewardConfig(model=str(sft_dir / "model"), data=str(out / "round0" / "rankings.jsonl"),
                                        out=str(rm_dir), epochs=cfg.rm_epochs, lr=cfg.rm_lr, batch_size=cfg.batch_size,
                                        precision=cfg.precision, max_length=cfg.max_length, eval_fraction=0.15,
                                        seed=cfg.seed, warmup_steps=2), say=say)
    rm_metrics = [m for m in _metrics(rm_dir) if "eval_accuracy" in m]
    timings["rm"] = time.perf_counter() - t

    # 5. judge every version on the held-out prompts with the gold rubric (greedy answers)
    t = time.perf_counter()
    versions = {"base": cfg.model, "sft": str(sft_dir / "model")}
    judged = {}
    for name, spec in versions.items():
        path = out / "eval" / f"{name}.jsonl"
        path.parent.mkdir(exist_ok=True)
        if not path.exists():
            write_jsonl(path, sample_answers(spec, held_out, 1, cfg, 0.0, say))
        judged[name] = judge(held_out, read_jsonl(path))
    timings["judge"] = time.perf_counter() - t

    summary = {
        "prompts": {"train": len(train), "held_out": len(held_out), "k": cfg.k},
        "demonstrations": len(demos),
        "versions": {n: {k: v for k, v in j.items() if k != "scores"} for n, j in judged.items()},
        "sft_vs_base": compare(judged["sft"]["scores"], judged["base"]["scores"]),
        "rm": {"held_out_accuracy_before": rm_metrics[0].get("eval_accuracy") if rm_metrics else None,
               "held_out_accuracy": rm_metrics[-1].get("eval_accuracy") if rm_metrics else None},
        "seconds": {**{k: round(v, 1) for k, v in timings.items()}, "total": round(time.perf_counter() - t_start, 1)},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    say(render_summary(summary))
    return summary


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return read_jsonl(path) if path.exists() else []


def render_summary(s: dict) -> str:
    lines = ["", "version | gold score | instructions followed | answers following all",
             "--- | --- | --- | ---"]
    for name, v in s["versions"].items():
        lines.append(f"{name} | {v['gold_mean']:+.3f} | {v['instruction_rate']:.1%} | {v['prompt_rate']:.1%}")
    w = s["sft_vs_base"]
    lines.append(f"\nSFT vs base on {s['prompts']['held_out']} held-out prompts: win-rate {w['win_rate']:.1%} "
                 f"(95% CI {w['ci95'][0]:.1%}–{w['ci95'][1]:.1%}; {w['wins']} wins, {w['ties']} ties, {w['losses']} losses)")
    rm = s["rm"]
    if rm["held_out_accuracy"] is not None:
        lines.append(f"reward model held-out pairwise accuracy: {rm['held_out_accuracy_before']:.3f} -> {rm['held_out_accuracy']:.3f}")
    lines.append(f"time: {s['seconds']}")
    return "\n".join(lines)
