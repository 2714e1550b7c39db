"""Every optimiser on one budget: from the same SFT model and the same rankings of one pipeline run,
each optimiser gets the same wall-clock budget as the demo's PPO stage, then the pipeline's judge.

    python benchmarks/optimizers.py --run runs/demo                 # a finished `make demo` run
    python benchmarks/optimizers.py --run runs/opt-base             # made first (optimizer=none) if missing
    python benchmarks/optimizers.py --run runs/demo --only dpo,rloo --seeds 0
    python benchmarks/optimizers.py --quick                         # tiny random model, ~1 minute
    python benchmarks/optimizers.py --run runs/opt-base --finished-only   # the table of what has run

What each optimiser starts from (recipes/pipeline.py's layout of the run): ``sft/model``, round 1's
reward model ``round1/rm/model`` and the rankings it learned from ``round1/rm_data.jsonl`` (round 0's
and, with rank_sft, round 1's). PPO, A2C, RLOO and GRPO sample against that RM (the run's ``ppo``
settings; the others with PPO's rollout sizes, KL and learning rate, ``SAME_AS_PPO``), DPO and ILQL
learn from those rankings (their settings; DPO with PPO's learning rate),
best-of-N trains nothing: the RM picks the best of ``best_of_n`` SFT samples per prompt. Each trained
optimiser runs with ``max_seconds = --budget`` (default 562 s: the demo's PPO stage in
benchmarks/results/demo.md, loading included, as here) and a step plan longer than the budget (RL:
``max_steps = --max-steps``; DPO: its epochs), in a child process of its own as the pipeline runs it,
without periodic checkpoints (save_every = 0; the demo's PPO wrote 3 within its 562 s).

Judged as the pipeline judges (``judge``, ``compare``, ``sample_answers``): greedy answers to the
held-out prompts of the built-in task (108), the gold rubric. Per optimiser and seed: gold win-rate
vs SFT (95 % interval), instruction-following rate, gold score, KL to SFT, mean answer length in
words, repetition (the rubric's measure: mean, and the share of answers at >= 0.2 where its penalty
starts), time and steps. KL to SFT: Σ_t log π − log π_SFT of one answer per held-out prompt sampled
from the policy at T = 1, averaged (a Monte-Carlo estimate of KL per answer); best-of-N: the bound
log N − (N−1)/N. Length and repetition are there to show a method that wins by format tricks:
shorter answers, or one sentence looped.

Writes ``optimizers.{json,md}`` to ``--results`` (default benchmarks/results; ``--quick``: its
``--out``). A finished optimiser/seed directory under ``--out`` is reused. Never asserts anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import time
from pathlib import Path

from common import ROOT, md_table
from provenance import write_result

DEMO_PPO_SECONDS = 562.0  # benchmarks/results/demo.md: round1_ppo 562.1 s (2-core AMX Xeon, 2026-12-05)

# name -> (stage config class, train function, what it learns from); "module:attribute" so that an
# optimiser not merged yet is skipped with a line. The stage's settings are the run's PipelineConfig
# field of the same name where it has one, else the class's defaults.
OPTIMIZERS: dict[str, tuple[str, str, str]] = {
    "ppo": ("rlhfkit.config:PPOConfig", "rlhfkit.recipes.ppo:train_ppo", "rm"),
    "rloo": ("rlhfkit.config:RLOOConfig", "rlhfkit.recipes.critic_free:train_rloo", "rm"),
    "grpo": ("rlhfkit.config:GRPOConfig", "rlhfkit.recipes.critic_free:train_grpo", "rm"),
    "a2c": ("rlhfkit.config:A2CConfig", "rlhfkit.recipes.a2c:train_a2c", "rm"),
    "dpo": ("rlhfkit.config:DPOConfig", "rlhfkit.recipes.dpo:train_dpo", "rankings"),
    "ilql": ("rlhfkit.config:ILQLConfig", "rlhfkit.recipes.ilql:train_ilql", "rankings"),
    "best_of_n": ("", "", "bon"),  # no training: recipes/pipeline.py's best_of_n_answers
}

# The online optimisers sample and step as the run's PPO does (the demo tunes only PPO's section): the
# same prompts x samples per iteration, answer length, temperature, KL coefficient and learning rate;
# A2C, PPO's peer, also its critic. Without this RLOO/GRPO ran their class defaults (16 prompts, 64
# tokens, lr 1e-6) and moved the policy ~8x less (KL 0.12 vs PPO's 0.91) in the same seconds.
# DPO steps with PPO's learning rate too (ILQL's default is the same, 1e-5): at its class default, TRL's
# 1e-6, it moved the policy a KL of 0.03 in the budget (85 steps; win-rate 48.1 %, seed 0).
SAME_AS_PPO = ("batch_size", "samples_per_prompt", "max_new_tokens", "temperature", "kl_coef", "lr")
A2C_SAME_AS_PPO = ("critic", "lam", "score_baseline")
DPO_SAME_AS_PPO = ("lr",)

QUICK = [  # the pipeline on the tiny random model, made small (tests/test_pipeline.py's sizes)
    "model=tiny-random", "train_prompts=6", "eval_prompts=6", "k=3", "max_new_tokens=10", "precision=fp32",
    "min_demo_score=-9.0", "round_prompts=3", "fresh_process=false", "best_of_n=3", "sft.batch_size=4",
    "ppo.batch_size=2", "ppo.max_new_tokens=10", "rloo.batch_size=2", "rloo.max_new_tokens=10",
    "grpo.batch_size=2", "grpo.max_new_tokens=10", "a2c.batch_size=2", "a2c.max_new_tokens=10", "dpo.batch_size=4",
    "dpo.max_length=96", "ilql.batch_size=4", "ilql.max_length=96",
]  # fmt: skip


def load(spec: str):
    """``module:attribute`` imported, or None where the module or attribute is not there (yet)."""
    module, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None


def ensure_run(run: Path, overrides: list[str]):
    """The run's PipelineConfig; a run without an SFT model and round-1 RM is made first (optimizer=none)."""
    from rlhfkit.config import PipelineConfig, build_config
    from rlhfkit.recipes.pipeline import read_run_config, run_pipeline

    if not (run / "round1" / "rm" / "model" / "config.json").exists() or not (run / "eval" / "sft.jsonl").exists():
        print(f"{run}: no finished SFT model and round-1 reward model; running the pipeline (optimizer=none)")
        run_pipeline(build_config(PipelineConfig, "demo", [*overrides, f"out={run}", "optimizer=none"]))
    return read_run_config(run)


def stage_cfg(pc, name: str, cls, run: Path, out: Path, seed: int, budget: float, max_steps: int):
    """The stage config of optimiser ``name`` as the pipeline would run it in round 1, with this seed and budget."""
    from rlhfkit.recipes.pipeline import stage_config

    settings = getattr(pc, name, None)
    settings = settings if isinstance(settings, cls) else cls()
    if OPTIMIZERS[name][2] == "rm" and name != "ppo":  # the run's PPO rollouts and step size, for a fair budget
        shared = SAME_AS_PPO + (A2C_SAME_AS_PPO if name == "a2c" else ())
        settings = dataclasses.replace(settings, **{f: getattr(pc.ppo, f) for f in shared})
    if name == "dpo":
        settings = dataclasses.replace(settings, **{f: getattr(pc.ppo, f) for f in DPO_SAME_AS_PPO})
    sft = str(run / "sft" / "model")
    if OPTIMIZERS[name][2] == "rm":
        where = dict(reward_model=str(run / "round1" / "rm" / "model"), rollout_backend=pc.rollout_backend)
        where |= {"max_steps": max_steps}  # plan past the budget: the clock stops it
        cfg = stage_config(pc, settings, model=sft, out=str(out), **where)
    else:
        cfg = stage_config(pc, settings, model=sft, data=str(run / "round1" / "rm_data.jsonl"), out=str(out))
    return dataclasses.replace(cfg, seed=seed, max_seconds=budget)


def kl_to_sft(model: str, sft: str, rows: list[dict], prompts: list, precision: str = "fp32") -> float:
    """Mean over the rows of Σ_t log π(y_t) − log π_SFT(y_t) for answers y sampled from ``model`` at T = 1:
    a Monte-Carlo estimate of KL(π ‖ π_SFT) per answer (the texts are tokenised again, as DPO does). For
    a model with ILQL heads π is the policy it samples from, log_softmax(logits + β Q̂)."""
    import torch

    from rlhfkit.algos.dpo import sequence_logprobs
    from rlhfkit.data.tokenize import Encoded, collate, encode_prompt, encode_response
    from rlhfkit.models.ilql import load_ilql_heads
    from rlhfkit.models.layout import trunk
    from rlhfkit.models.loading import load_causal_lm

    def logps(spec: str) -> torch.Tensor:
        loaded = load_causal_lm(spec)
        tok, lm = loaded.tokenizer, loaded.model.eval()
        ilql = load_ilql_heads(spec)  # ILQL's policy is log π + β (Q̂ − V): its samples came from that
        seqs = []
        for p, r in zip(prompts, rows):
            q = encode_prompt(tok, p.messages)
            seqs.append(Encoded(q + encode_response(tok, r["responses"][0]), len(q)))
        out = []
        with torch.no_grad():
            for i in range(0, len(seqs), 8):
                b = collate(seqs[i : i + 8], tok.pad_token_id)
                hidden: list[torch.Tensor] = []
                hook = trunk(lm).register_forward_hook(lambda m, a, o, keep=hidden: keep.append(o[0]))
                logits = lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
                hook.remove()
                if ilql is not None:  # V(s) shifts every token's logit alike: only Q̂ changes log-probs
                    heads, beta = ilql
                    q = heads.target_q(hidden[0].float(), lm.get_output_embeddings().weight.float())
                    logits = logits.float() + beta * q
                out.append(sequence_logprobs(logits, b["input_ids"], b["loss_mask"]))
        return torch.cat(out)

    return float((logps(model) - logps(sft)).mean())


def answer_stats(rows: list[dict]) -> dict:
    """Mean words per answer and the rubric's repetition measure (mean; share of answers >= 0.2)."""
    from rlhfkit.feedback import rubric

    texts = [r["responses"][0] for r in rows]
    rep = [rubric.repetition(t) for t in texts]
    return {
        "words": sum(len(rubric.words(t)) for t in texts) / len(texts),
        "repetition": sum(rep) / len(rep),
        "repetitive_share": sum(x >= 0.2 for x in rep) / len(rep),
    }


def run_one(pc, name: str, run: Path, out: Path, seed: int, budget: float, max_steps: int, held: list) -> dict:
    """Train (or, for best_of_n, sample) one optimiser with one seed; judge it. Returns its row."""
    from rlhfkit.algos.best_of_n import kl_bound
    from rlhfkit.data.jsonl import read_jsonl, write_jsonl
    from rlhfkit.feedback import rubric
    from rlhfkit.recipes.common import read_metrics
    from rlhfkit.recipes.pipeline import best_of_n_answers, run_stage, sample_answers
    from rlhfkit.recipes.pipeline_judge import judge

    cfg_path, train_path, _ = OPTIMIZERS[name]
    sft = str(run / "sft" / "model")
    pcs = dataclasses.replace(pc, seed=seed)
    answers = out / "eval.jsonl"
    info: dict = {}
    if name == "best_of_n":
        if not answers.exists():
            t0 = time.perf_counter()
            rows, stats = best_of_n_answers(pcs, sft, str(run / "round1" / "rm" / "model"), held, pc.best_of_n)
            out.mkdir(parents=True, exist_ok=True)
            write_jsonl(answers, rows)
            info = {"seconds": time.perf_counter() - t0, "n": pc.best_of_n, **stats}
            (out / "bon.json").write_text(json.dumps(info))
        info = json.loads((out / "bon.json").read_text())
        kl, seconds, steps = kl_bound(pc.best_of_n), info["seconds"], f"N = {pc.best_of_n}"
    else:
        cfg = stage_cfg(pc, name, load(cfg_path), run, out, seed, budget, max_steps)
        if not (out / "model" / "config.json").exists():
            train = load(train_path)
            if OPTIMIZERS[name][2] == "rm":
                train = functools.partial(train, rollout_metrics=rubric.gold_metrics)
            t0 = time.perf_counter()
            result = run_stage(dataclasses.replace(pcs, save_every=0), train, cfg, print)  # no checkpoints
            info = {"seconds": time.perf_counter() - t0, "result": result}
            (out / "stage.json").write_text(json.dumps(info, default=str))
        info = json.loads((out / "stage.json").read_text())
        res = info["result"]
        seconds = info["seconds"]
        steps = f"{res.get('step', '?')} of {res.get('planned_steps', res.get('step', '?'))}"
        if not answers.exists():
            write_jsonl(answers, sample_answers(str(out / "model"), held, 1, pcs, 0.0))
        sampled = out / "eval_t1.jsonl"
        if not sampled.exists():
            write_jsonl(sampled, sample_answers(str(out / "model"), held, 1, pcs, 1.0))
        if not (out / "kl.json").exists():  # kept: a table of finished cells is made without a forward pass
            kl = kl_to_sft(str(out / "model"), sft, read_jsonl(sampled), held)
            (out / "kl.json").write_text(json.dumps({"kl": kl}))
        kl = json.loads((out / "kl.json").read_text())["kl"]
        info["train_kl_last"] = next((m["kl"] for m in reversed(read_metrics(out)) if "kl" in m), None)
    rows = read_jsonl(answers)
    return {"judged": judge(held, rows), "kl": kl, "seconds": seconds, "steps": steps, **answer_stats(rows)} | {
        "info": info
    }


def finished(cell: Path) -> bool:
    """Whether ``run_one`` finished training (or sampling) this optimiser/seed directory."""
    return (cell / "model" / "config.json").exists() and (cell / "stage.json").exists() or (cell / "bon.json").exists()


def render(data: dict) -> str:
    sft = data["sft"]
    lines = [
        "# Every optimiser on one budget",
        "",
        f"Produced by `python benchmarks/optimizers.py {data['command']}` (its docstring says how). From the SFT "
        f"model, round-1 reward model and rankings of `{data['run']}`; each trained optimiser had "
        f"{data['budget']:.0f} s of wall-clock (the demo's PPO stage, loading included), then answered the "
        f"{data['held_out']} held-out prompts greedily, judged by the gold rubric against SFT's answers. KL: "
        "Σ log π − log π_SFT of one T = 1 sample per held-out prompt (best-of-N: the bound log N − (N−1)/N). "
        "Repetition: the rubric's measure (mean; share of answers ≥ 0.2, where its penalty starts).",
        "",
    ]
    header = ["optimiser", "seed", "win-rate vs SFT (95 % CI)", "W/T/L", "instructions followed", "gold score"]
    header += ["KL to SFT", "words", "repetition (≥ 0.2)", "s", "steps"]
    table = [
        ["sft", "–", "–", "–", f"{sft['instruction_rate']:.1%}", f"{sft['gold_mean']:+.3f}", "0", f"{sft['words']:.0f}"]
        + [f"{sft['repetition']:.3f} ({sft['repetitive_share']:.0%})", "–", "–"]
    ]
    for r in data["rows"]:
        v, j = r["vs_sft"], r["judged"]
        table.append(
            [r["optimizer"], r["seed"], f"{v['win_rate']:.1%} ({v['ci95'][0]:.1%}–{v['ci95'][1]:.1%})"]
            + [f"{v['wins']}/{v['ties']}/{v['losses']}", f"{j['instruction_rate']:.1%}", f"{j['gold_mean']:+.3f}"]
            + [f"{r['kl']:.2f}" + (" (bound)" if r["optimizer"] == "best_of_n" else ""), f"{r['words']:.0f}"]
            + [f"{r['repetition']:.3f} ({r['repetitive_share']:.0%})", f"{r['seconds']:.0f}", r["steps"]]
        )
    lines += md_table(header, table, "llrrrrrrrrr")
    if data["skipped"]:
        lines += ["", "Not run: " + "; ".join(f"{n} ({why})" for n, why in data["skipped"].items()) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=str(ROOT / "runs" / "demo"), help="pipeline run: SFT model, round-1 RM, rankings")
    ap.add_argument("--out", default="", help="the optimisers' directories (default: RUN-optimizers)")
    ap.add_argument("--budget", type=float, default=DEMO_PPO_SECONDS, help="wall-clock seconds per optimiser")
    ap.add_argument("--max-steps", type=int, default=1000, help="RL iterations planned (the budget stops them)")
    ap.add_argument("--seeds", default="", help="comma list (default 0,1; --quick: 0)")
    ap.add_argument("--only", default="", help="comma list of optimisers (default: all of OPTIMIZERS)")
    ap.add_argument("--results", default="", help="where optimizers.{json,md} go (default benchmarks/results)")
    ap.add_argument(
        "--quick", action="store_true", help="the tiny random model, tiny settings, 2 s budget, seed 0 (~1 min)"
    )
    ap.add_argument(
        "--finished-only", action="store_true", help="train nothing: the table of the cells already finished"
    )
    ap.add_argument("overrides", nargs="*", help="pipeline key=value settings for a run made here")
    a = ap.parse_args()

    from rlhfkit.data.jsonl import read_jsonl
    from rlhfkit.errors import UserError
    from rlhfkit.recipes.pipeline import sample_answers
    from rlhfkit.recipes.pipeline_judge import compare, judge
    from rlhfkit.tasks import load_task

    if a.quick:
        run = Path(a.out or ROOT / "runs" / "optimizers-quick") / "run"
        out, overrides = run.parent, QUICK + a.overrides
        budget = 2.0 if a.budget == DEMO_PPO_SECONDS else a.budget
        results = Path(a.results or out)
    else:
        run, overrides, budget = Path(a.run), a.overrides, a.budget
        out = Path(a.out or f"{run}-optimizers")
        results = Path(a.results) if a.results else None
    names = [n.strip() for n in a.only.split(",") if n.strip()] or list(OPTIMIZERS)
    if bad := [n for n in names if n not in OPTIMIZERS]:
        raise SystemExit(f"--only: unknown {', '.join(bad)} (choose from {', '.join(OPTIMIZERS)})")
    seeds = [int(s) for s in (a.seeds or ("0" if a.quick else "0,1")).split(",") if s.strip()]

    pc = ensure_run(run, overrides)
    all_held = load_task("eval")
    held = all_held[: pc.eval_prompts] if pc.eval_prompts else all_held
    sft_rows = read_jsonl(run / "eval" / "sft.jsonl")
    if len(sft_rows) != len(held):  # judged on other prompts: answer them again
        sft_rows = sample_answers(str(run / "sft" / "model"), held, 1, pc, 0.0)
    sft = judge(held, sft_rows) | answer_stats(sft_rows)

    rows, skipped = [], {}
    for name in names:
        cfg_path, train_path, _ = OPTIMIZERS[name]
        if cfg_path and (load(cfg_path) is None or load(train_path) is None):
            skipped[name] = f"{train_path} not in this checkout"
            print(f"skipping {name}: {cfg_path} or {train_path} is not in this checkout")
            continue
        for seed in seeds:
            if a.finished_only and not finished(out / f"{name}_s{seed}"):
                skipped[f"{name} seed {seed}"] = "not run yet"
                continue
            print(f"--- {name}, seed {seed}, budget {budget:g} s", flush=True)
            try:
                row = run_one(pc, name, run, out / f"{name}_s{seed}", seed, budget, a.max_steps, held)
            except UserError as e:
                skipped[f"{name} seed {seed}"] = str(e)
                print(f"{name} seed {seed} failed: {e}")
                continue
            row = {"optimizer": name, "seed": seed, "vs_sft": compare(row["judged"]["scores"], sft["scores"]), **row}
            rows.append(row)
            print({k: v for k, v in row.items() if k not in ("judged", "info")}, flush=True)

    strip = {"scores"}
    data = {
        "command": " ".join(["--quick"] * a.quick + [f"--run {a.run}"] * (not a.quick) + [f"--budget {budget:g}"]),
        "run": str(run),
        "budget": budget,
        "seeds": seeds,
        "held_out": len(held),
        "config": dataclasses.asdict(pc),
        "sft": {k: v for k, v in sft.items() if k not in strip},
        "rows": [r | {"judged": {k: v for k, v in r["judged"].items() if k not in strip}} for r in rows],
        "skipped": skipped,
    }
    md = render(data)
    print(md)
    print(write_result("optimizers", data, md, results))


if __name__ == "__main__":
    main()
