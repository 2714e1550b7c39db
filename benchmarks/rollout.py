"""Rollout engine vs ``transformers.generate`` vs the forward-only ceiling, in one run.

    .venv/bin/python benchmarks/rollout.py            # writes benchmarks/results/rollout.{json,md}

Settings (issue 3): SmolLM2-135M-Instruct in bf16; real prompts (self-instruct seed instructions
in the chat template); (a) 32 prompts × K=4 samples × 128 new tokens at temperature 1.0 (no
top-k/top-p), (b) batch 8 greedy × 128 new tokens. Both sides produce exactly 128 new tokens per
sample (the engine with ignore_eos, generate with min_new_tokens=128), and we count the tokens
each returned. The ceiling is a plain bf16 forward of 8 × 256 tokens (tokens/s processed).
Timings are noisy on a shared 2-core machine: compare the ratios, which come from one run.
Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

# Threads that wait passively: on a shared, oversubscribed CPU, OpenMP's default spin-waiting
# made every small op ~100x slower (13 ms for a 128x576 add under load 7 on 2 cores). Set before
# torch loads its OpenMP runtime; applies to both sides of the comparison.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from rlhfkit.models.loading import load_causal_lm  # noqa: E402
from rlhfkit.rollout import Engine, SamplingParams  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEED_TASKS = ROOT.parent / "shared" / "data" / "self-instruct-seed" / "seed_tasks.jsonl"


def chat_prompts(tok, n: int) -> list[list[int]]:
    rows = [json.loads(line) for line in SEED_TASKS.read_text().splitlines() if line.strip()][:n]
    out = []
    for r in rows:
        text = r["instruction"] + ("\n\n" + r["instances"][0]["input"] if r["instances"][0]["input"] else "")
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def hf_generate(model, tok, prompts, new, n, sample):
    """transformers.generate on the left-padded batch; returns the number of new tokens."""
    tok.padding_side = "left"
    batch = tok.pad({"input_ids": prompts}, return_tensors="pt")
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
    with torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=new, min_new_tokens=new, num_return_sequences=n, pad_token_id=tok.pad_token_id, **kw
        )
    return (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]


def engine_generate(engine, prompts, new, n, sample):
    sp = SamplingParams(max_new_tokens=new, temperature=1.0 if sample else 0.0, ignore_eos=True, seed=0)
    return sum(len(c.token_ids) for c in engine.generate(prompts, sp, n=n))


def forward_ceiling(model, reps: int = 3) -> float:
    x = torch.randint(100, 40000, (8, 256))
    with torch.no_grad():
        model(x)
        t = time.perf_counter()
        for _ in range(reps):
            model(x)
    return 8 * 256 * reps / (time.perf_counter() - t)


def matmul_rows_per_s(reps: int = 20) -> dict[str, float]:
    """bf16 x @ W.T for SmolLM2's MLP weight (1536 x 576) at M rows: how batch size bounds decode."""
    w = torch.randn(1536, 576, dtype=torch.bfloat16)
    out = {}
    for m in (8, 128, 2048):
        x = torch.randn(m, 576, dtype=torch.bfloat16)
        torch.nn.functional.linear(x, w)
        t = time.perf_counter()
        for _ in range(reps):
            torch.nn.functional.linear(x, w)
        out[str(m)] = m * reps / (time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--skip-hf", action="store_true", help="engine and ceiling only (quick iterations)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rollout"))
    args = ap.parse_args()

    loaded = load_causal_lm(args.model, torch.bfloat16)
    model, tok = loaded.model, loaded.tokenizer
    engine = Engine(model, tok, precision="bf16", max_batch=args.prompts * args.k)
    prompts = chat_prompts(tok, args.prompts)
    res: dict = {
        "model": args.model,
        "dtype": "bf16",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "cpu": platform.processor() or platform.machine(),
        "load_avg_start": os.getloadavg(),
        "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts),
        "cases": {},
    }
    # warm-up (first calls allocate, pick kernels)
    engine_generate(engine, prompts[:8], 8, 2, True)
    if not args.skip_hf:
        hf_generate(model, tok, prompts[:8], 4, 1, True)
    ceiling = forward_ceiling(model)
    res["forward_ceiling_tok_s"] = ceiling

    cases = [
        (f"{args.prompts} prompts x K={args.k}, T=1.0", prompts, args.k, True),
        ("batch 8 greedy", prompts[:8], 1, False),
    ]
    for name, ps, n, sample in cases:
        row = {"sequences": len(ps) * n, "new_tokens_per_seq": args.new_tokens}
        toks, dt = timed(lambda: engine_generate(engine, ps, args.new_tokens, n, sample))
        row["engine_tok_s"] = toks / dt
        row["engine_s"] = dt
        if not args.skip_hf:
            toks_hf, dt_hf = timed(lambda: hf_generate(model, tok, ps, args.new_tokens, n, sample))
            row["hf_generate_tok_s"] = toks_hf / dt_hf
            row["hf_generate_s"] = dt_hf
            row["speedup_vs_hf"] = row["engine_tok_s"] / row["hf_generate_tok_s"]
        row["fraction_of_ceiling"] = row["engine_tok_s"] / ceiling
        res["cases"][name] = row
        print(name, json.dumps(row, indent=1))
    res["forward_ceiling_after_tok_s"] = forward_ceiling(model)
    res["matmul_rows_per_s"] = matmul_rows_per_s()
    res["load_avg_end"] = os.getloadavg()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [
        "# Rollout engine benchmark",
        "",
        f"SmolLM2-135M-Instruct, bf16, {res['threads']} threads (OMP_WAIT_POLICY={res['omp_wait_policy']}), "
        f"torch {res['torch']}, load average {res['load_avg_start'][0]:.1f} at start; prompts: self-instruct seed "
        f"instructions in the chat template (mean {res['prompt_tokens_mean']:.0f} tokens); "
        f"{args.new_tokens} new tokens per sample on both sides. One run; the machine is shared, so compare ratios.",
        "",
        f"Forward-only ceiling (bf16 forward, 8 × 256 tokens): {ceiling:,.0f} tok/s before, "
        f"{res['forward_ceiling_after_tok_s']:,.0f} tok/s after.",
        "",
        "| case | engine tok/s | transformers.generate tok/s | speedup | fraction of ceiling |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in res["cases"].items():
        hf = f"{row['hf_generate_tok_s']:,.0f}" if "hf_generate_tok_s" in row else "—"
        sp = f"{row['speedup_vs_hf']:.2f}×" if "speedup_vs_hf" in row else "—"
        lines.append(f"| {name} | {row['engine_tok_s']:,.0f} | {hf} | {sp} | {row['fraction_of_ceiling']:.0%} |")
    mm = res["matmul_rows_per_s"]
    lines += [
        "",
        "Why the fraction of the ceiling stays low here: a decode step multiplies every weight by only",
        "as many rows as there are live sequences, and bf16 matmuls on this CPU are far less efficient",
        f"at few rows — rows/s through the 1536 × 576 MLP weight: {mm['8']:,.0f} at M=8, {mm['128']:,.0f} at",
        f"M=128, {mm['2048']:,.0f} at M=2048 (the ceiling's forward runs M=2048). At batch 8 both engines",
        "stream all 270 MB of weights per token step and are bound by memory bandwidth, so they tie;",
        "the engine's gain comes from decoding every sample at once (128 rows) with one prefill per prompt,",
        "a preallocated cache and no per-step framework overhead.",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
