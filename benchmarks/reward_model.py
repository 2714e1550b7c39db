"""Reward-model benchmark: quality on HH-harmless and speed against TRL's RewardTrainer, one run.

1. speed  — TRL's own settings (shared/peers/trl/reward_bench.py): 256 synthetic chosen/rejected
            pairs of ~95 tokens a side, SmolLM2-135M + scalar head, batch 8 pairs, 1 epoch, bf16.
            Ours and TRL's (from its own venv) run back to back; we report pairs/s and the ratio.
2. quality — from smollm2-135m-instruct, train on hh-rlhf-harmless/train.jsonl (1,850 pairs),
            evaluate pairwise accuracy on test.jsonl (462 pairs), beside a length heuristic.

Writes benchmarks/results/reward_model.json and .md. Never asserts a time.

usage: python benchmarks/reward_model.py [--trl-venv benchmarks/.venvs/trl] [--skip-quality] [--skip-speed]
       [--precision auto|bf16|fp32] [--shared-prompt-pairs N]

3. shared prompt (``--shared-prompt-pairs N``) — N real HH pairs trained with the conversation once
            per pair and with one row per answer: what sharing the prompt is worth on real data.

``--precision auto`` (default): bf16 where the CPU has bf16 instructions (the benchmark's setting), fp32
elsewhere (on an AVX2-only CPU bf16 is emulated, slower than fp32), on both sides alike; fp32 results
go to ``reward_model_fp32.{json,md}`` so the two machines' numbers never overwrite each other.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
from pathlib import Path

from common import DATA, RESULTS, VENVS, bench_env, md_table, run_peer, timed, write_result

from rlhfkit.config import RewardConfig
from rlhfkit.data.loaders import load_records
from rlhfkit.models.loading import embedded_model_dir, resolve_precision
from rlhfkit.recipes.reward import train_reward_model

HH = DATA / "hh-rlhf-harmless"
# the speed runs' training settings (TRL's reward_bench.py): one epoch of batch 8, no warm-up, no
# held-out split, raw scores
SPEED_SETTINGS = dict(batch_size=8, epochs=1, lr=1e-5, warmup_steps=0, eval_fraction=0.0, normalize=False)

# the word list and lengths of TRL's reward_bench.py synthetic pairs (the same generator, seed 0)
WORDS = (
    "the a of and to in is was for on with as by at from that this it be are were an or which but not have has "
    "had will would can could should sea moon rain city river mountain village library clock robot cat coffee winter "
    "morning light shadow garden window story friend school road bridge forest quiet bright slowly under over "
    "between around people time water night day small old new warm cold green blue red golden silver"
).split()


def synthetic_pairs(n: int) -> list[tuple[str, str]]:
    rng = random.Random(0)

    def text(n_words: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize() + "."

    return [(text(rng.randint(88, 100)), text(rng.randint(88, 100))) for _ in range(n)]


def run_ours_speed(model_dir: str, work: Path, pairs: int, precision: str) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    data = work / "synthetic.jsonl"
    # no chat template, a 3-token prompt: the same tokens as TRL's implicit-prompt text format (+3)
    data.write_text(
        "".join(json.dumps({"prompt": "Text:", "chosen": c, "rejected": r}) + "\n" for c, r in synthetic_pairs(pairs))
    )
    cfg = RewardConfig(
        model=model_dir,
        data=str(data),
        out=str(work / "ours_speed"),
        precision=precision,
        chat_template=False,
        max_length=1024,
        **SPEED_SETTINGS,
    )
    res, wall = timed(train_reward_model, cfg)
    return {
        "pairs": pairs,
        "pairs_per_s": res["prompts_per_second"],
        "train_seconds": res["train_seconds"],
        "wall_seconds": wall,
        "compiled": res["compiled"],
        "first_step_seconds": res["first_step_seconds"],
    }


def run_trl_speed(model_dir: str, work: Path, trl_python: str, pairs: int, precision: str) -> dict:
    env = bench_env(
        wait_policy="default", BENCH_MODEL=model_dir, ACCELERATE_MIXED_PRECISION="bf16" if precision == "bf16" else "no"
    )
    tag = f"trl_reward_{precision}"
    res = run_peer(
        trl_python,
        "reward_bench.py",
        ["--precision", precision, "--pairs", str(pairs), "--tag", tag],
        work / "trl_peer",
        tag,
        env=env,
    )
    if "error" in res:
        return res
    return {
        "pairs": pairs,
        "pairs_per_s": res["pairs_per_s_overall"],
        "pairs_per_s_median_step": res["pairs_per_s_median_step"],
        "train_seconds": res["train_total_s"],
        "wall_seconds": res["wall_seconds"],
        "peak_rss_mib": res["ru_maxrss_mib"],
        "trl": res["settings"]["trl"],
    }


def length_baseline(path: Path) -> dict:
    """Accuracy of 'the longer answer wins' and of 'the shorter answer wins' (ties half)."""
    recs = load_records(str(path), "ranking").records
    longer = sum(
        1.0 if len(r.responses[0]) > len(r.responses[1]) else 0.5 if len(r.responses[0]) == len(r.responses[1]) else 0.0
        for r in recs
    ) / len(recs)
    return {"longer_wins": longer, "shorter_wins": 1 - longer}


def run_quality(model_dir: str, work: Path, args) -> dict:
    cfg = RewardConfig(
        model=model_dir,
        data=str(HH / "train.jsonl"),
        eval_data=str(HH / "test.jsonl"),
        out=str(work / "ours_hh"),
        batch_size=args.batch_size,
        epochs=args.epochs,
        lr=args.lr,
        warmup_steps=10,
        precision=args.precision,
        max_length=args.max_length,
        eval_every=0,
    )
    res, wall = timed(train_reward_model, cfg)
    return {
        "train_pairs": 1850,
        "test_pairs": 462,
        "accuracy": res["eval_accuracy"],
        "accuracy_before": res.get("eval_accuracy_before"),
        "train_seconds": res["train_seconds"],
        "pairs_per_s": res["prompts_per_second"],
        "wall_seconds": wall,
        "settings": {
            "batch_size": args.batch_size,
            "epochs": args.epochs,
            "lr": args.lr,
            "max_length": args.max_length,
            "precision": "bf16 autocast" if args.precision == "bf16" else args.precision,
        },
        "length_baseline": length_baseline(HH / "test.jsonl"),
    }


def run_shared_prompt(model_dir: str, work: Path, pairs: int, precision: str) -> dict:
    """The first ``pairs`` HH-harmless training pairs, trained twice with the same settings: the two
    answers after one copy of their conversation (``share_prompt``, the default) and one row each."""
    hh = HH / "train.jsonl"
    runs = {}
    for share in (True, False, True, False):  # alternate: on a noisy machine compare neighbours
        cfg = RewardConfig(
            model=model_dir,
            data=str(hh),
            limit=pairs,
            out=str(work / f"share_{share}_{len(runs)}"),
            precision=precision,
            max_length=512,
            share_prompt=share,
            **SPEED_SETTINGS,
        )
        res = train_reward_model(cfg)
        runs.setdefault(share, []).append(res["prompts_per_second"])
        print(f"HH pairs, share_prompt={share}: {res['prompts_per_second']:.3f} pairs/s", flush=True)
    on, off = max(runs[True]), max(runs[False])
    return {"pairs": pairs, "shared_pairs_per_s": on, "separate_pairs_per_s": off, "ratio": on / off, "runs": runs}


def markdown(res: dict) -> str:
    lines = [
        "# Reward model benchmark",
        "",
        "Produced by `python benchmarks/reward_model.py`"
        + (f"; {res['threads']} thread(s) per side" if res.get("threads") else "")
        + f"; load average {res['load_average_at_start']:.1f} at start.",
        "",
    ]
    if res.get("kept"):
        lines += [
            "Kept from earlier runs (not rerun in this one): "
            + "; ".join(f"{k} ({(p or {}).get('date', 'date unknown')})" for k, p in res["kept"].items())
            + ".",
            "",
        ]
    if "speed" in res:
        s = res["speed"]
        lines += [
            f"## Speed at TRL's settings ({s['ours']['pairs']} synthetic pairs, ~95 tokens a side, batch 8, "
            f"{res.get('precision', 'bf16')}, 1 epoch)",
            "",
            *md_table(
                ["trainer", "pairs/s", "train s"],
                [["rlhfkit rm", f"{s['ours']['pairs_per_s']:.2f}", f"{s['ours']['train_seconds']:.0f}"]],
            ),
        ]
        if "pairs_per_s" in s.get("trl", {}):
            lines += [
                f"| TRL {s['trl']['trl']} RewardTrainer | {s['trl']['pairs_per_s']:.2f} "
                f"| {s['trl']['train_seconds']:.0f} |",
                "",
                f"Ratio rlhfkit / TRL: **{s['ratio']:.2f}×** (median of {len(s.get('ratios', [1]))} alternating "
                f"pairs of runs in one benchmark run: {', '.join(f'{r:.2f}' for r in s.get('ratios', []))}; "
                "best run of each side in the table).",
            ]
        else:
            lines += ["", f"TRL not measured: {s.get('trl', {}).get('error', 'no venv')[:300]}"]
        o = s["runs"][0]["ours"] if s.get("runs") else s["ours"]
        if o.get("compiled"):
            warm = [x["ours"]["pairs_per_s"] for x in s["runs"][1:]]
            lines += [
                "",
                "Ours runs each transformer block through `torch.compile` (`compile=auto` in bf16). The first "
                f"run compiles from an empty cache (its first step took {o['first_step_seconds']:.1f} s, inside its "
                f"train time: {o['pairs_per_s']:.2f} pairs/s)"
                + (f"; later runs reuse the cache ({', '.join(f'{w:.2f}' for w in warm)} pairs/s)." if warm else "."),
            ]
        lines.append("")
    if "shared_prompt" in res:
        sp = res["shared_prompt"]
        lines += [
            f"## One copy of the conversation per pair: {sp['pairs']} HH-harmless training pairs, batch 8, "
            f"{res.get('precision', 'bf16')}",
            "",
            "Real preference data shares its prompt: both answers of an HH pair follow the same conversation, "
            "which is most of the tokens. `share_prompt=true` puts the conversation once in a row, then both "
            "answers (each attends to the conversation and to itself; the same scores as separate rows).",
            "",
            "| layout | pairs/s (best of 2) |",
            "|---|---|",
            "| conversation once, both answers after it (`share_prompt=true`, default) "
            f"| {sp['shared_pairs_per_s']:.3f} |",
            f"| one row per answer (`share_prompt=false`, what TRL does) | {sp['separate_pairs_per_s']:.3f} |",
            "",
            f"Speed-up from sharing: **{sp['ratio']:.2f}×** (runs: {sp['runs']}).",
            "",
        ]
    if "quality" in res:
        q = res["quality"]
        lines += [
            "## Quality: HH-RLHF harmless, train 1,850 pairs -> test 462 pairs",
            "",
            "| model | test pairwise accuracy |",
            "|---|---|",
            f"| rlhfkit rm from smollm2-135m-instruct | **{q['accuracy']:.3f}** |",
            f"| same model before training (random head) | {q['accuracy_before']:.3f} |",
            f"| length heuristic: shorter answer wins | {q['length_baseline']['shorter_wins']:.3f} |",
            f"| length heuristic: longer answer wins | {q['length_baseline']['longer_wins']:.3f} |",
            "",
            f"Training: {q['train_seconds']:.0f} s, {q['pairs_per_s']:.2f} pairs/s; settings {q['settings']}.",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trl-venv", default=str(VENVS / "trl"))
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--repeats", type=int, default=2, help="speed: alternate ours/TRL this many times (median ratio)")
    ap.add_argument(
        "--shared-prompt-pairs",
        type=int,
        default=0,
        help="also train this many HH pairs with and without share_prompt (0 = skip)",
    )
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--out", default=str(RESULTS), help="directory of the results files")
    ap.add_argument(
        "--precision", default="auto", help="auto (bf16 where the CPU has bf16 instructions, else fp32), bf16 or fp32"
    )
    args = ap.parse_args()
    args.precision = resolve_precision(args.precision)
    name = "reward_model" if args.precision == "bf16" else "reward_model_fp32"

    model_dir = str(embedded_model_dir())
    work = Path(tempfile.mkdtemp(prefix="rm-bench-"))
    # a fresh torch.compile cache: our first run pays the one-time compile, as on a new machine
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / "torchinductor")
    res: dict = {
        "load_average_at_start": os.getloadavg()[0],
        "precision": args.precision,
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or os.cpu_count(),
    }
    out = Path(args.out)
    earlier = json.loads((out / f"{name}.json").read_text()) if (out / f"{name}.json").exists() else {}
    if not args.skip_speed:
        # ours and TRL alternate (ours, TRL, ours, TRL, ...): on a noisy machine each ratio is taken
        # between neighbours, and the median over repeats is reported
        trl_py = Path(args.trl_venv) / "bin" / "python"
        runs = []
        for r in range(args.repeats):
            ours = run_ours_speed(model_dir, work / f"r{r}", args.pairs, args.precision)
            trl = (
                run_trl_speed(model_dir, work / f"r{r}", str(trl_py), args.pairs, args.precision)
                if trl_py.exists()
                else {"error": f"no TRL venv at {args.trl_venv}"}
            )
            runs.append({"ours": ours, "trl": trl, "load_average": os.getloadavg()[0]})
            print(
                f"repeat {r}: ours {ours['pairs_per_s']:.2f} pairs/s, TRL {trl.get('pairs_per_s', float('nan')):.2f}",
                flush=True,
            )
        ratios = sorted(x["ours"]["pairs_per_s"] / x["trl"]["pairs_per_s"] for x in runs if "pairs_per_s" in x["trl"])
        best = max(runs, key=lambda x: x["ours"]["pairs_per_s"])
        res["speed"] = {
            "ours": best["ours"],
            "trl": max((x["trl"] for x in runs), key=lambda t: t.get("pairs_per_s", 0)),
            "runs": runs,
        }
        if ratios:
            res["speed"]["ratio"] = statistics.median(ratios)
            res["speed"]["ratios"] = ratios
    if args.shared_prompt_pairs:
        res["shared_prompt"] = run_shared_prompt(model_dir, work, args.shared_prompt_pairs, args.precision)
    if not args.skip_quality:
        res["quality"] = run_quality(model_dir, work, args)
    for section in ("speed", "shared_prompt", "quality"):  # an earlier run's sections stay, with their provenance
        if section not in res and section in earlier:
            res[section] = earlier[section]
            res.setdefault("kept", {})[section] = earlier.get("kept", {}).get(section) or earlier.get("provenance")
    write_result(name, res, markdown(res), out)
    print(markdown(res))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
