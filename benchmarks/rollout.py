"""Rollout engine vs ``transformers.generate`` vs the forward-only ceiling, in one run.

    .venv/bin/python benchmarks/rollout.py            # writes benchmarks/results/rollout.{json,md}

Settings: SmolLM2-135M-Instruct in bf16; real prompts (self-instruct seed instructions
in the chat template); (a) 32 prompts × K=4 samples × 128 new tokens at temperature 1.0 (no
top-k/top-p), (b) batch 8 greedy × 128 new tokens. Both sides produce exactly 128 new tokens per
sample (the engine with ignore_eos, generate with min_new_tokens=128), and we count the tokens
each returned. The forward-only ceiling is the tokens/s of a plain bf16 forward (HF ``model(x)``,
logits included) of 2,048 tokens — 8 × 256 as the benchmark defines it, also tried as 4 × 512, 16 × 128
and 32 × 64, best of 3 repetitions each, measured before and after the generation cases; the
ceiling used is the maximum of all of these (best effort, so the fraction is conservative).
Engine timings include everything a caller pays: the per-call weight preparation (bf16 weights
fused and prepacked for oneDNN from the live modules), prefill, decode and sampling. No
torch.compile is used, so there is no warm-up to hide. The engine runs each case twice, before
and after ``transformers.generate`` (the load drifts), and its mean is what the ratios use.
Timings are noisy on a shared 2-core machine: compare the ratios, which come from one run.
Nothing here asserts a time.

``--vllm`` (run it with a Python that has vLLM, e.g. vLLM's CPU build, see docs/performance.md)
compares three generators in one process instead, writing ``results/rollout_vllm.{json,md}``: our
engine, vLLM through ``rlhfkit.rollout.vllm.VLLMGenerator`` (what ``rollout_backend=vllm`` runs:
in-process, enforce_eager on a CPU, with the per-token log-probs PPO's generators return) and
``transformers.generate``, at the same two cases, plus vLLM's start-up seconds (saving the model
to /dev/shm and starting the engine) and the seconds of a weight push. vLLM is also timed bare
(``vllm.LLM.generate`` without log-probs) to show what the wrapper costs. The ceiling and kernel
microbenchmarks are skipped there (``rollout.md`` has them), to keep the run within minutes.

``--precision auto`` (the default) runs bf16 where the CPU has bf16 matmul instructions (AMX-bf16 /
AVX512-bf16) and fp32 elsewhere (an AVX2-only CPU emulates bf16, slower than
fp32), as the engine's own ``precision=auto`` does; the results go to ``rollout.{json,md}`` for bf16
and ``rollout_fp32.{json,md}`` for fp32, so the two machines' numbers never overwrite each other.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from pathlib import Path

# Threads that wait passively: on a shared, oversubscribed CPU, OpenMP's default spin-waiting
# made every small op ~100x slower (13 ms for a 128x576 add under load 7 on 2 cores). Set before
# torch loads its OpenMP runtime; applies to both sides of the comparison.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from common import DATA, RESULTS, timed, write_result  # noqa: E402

from rlhfkit.models.loading import load_causal_lm, resolve_precision  # noqa: E402
from rlhfkit.rollout import Engine, SamplingParams, attention_cpu  # noqa: E402

SEED_TASKS = DATA / "self-instruct-seed" / "seed_tasks.jsonl"


def chat_prompts(tok, n: int) -> list[list[int]]:
    rows = [json.loads(line) for line in SEED_TASKS.read_text().splitlines() if line.strip()][:n]
    out = []
    for r in rows:
        text = r["instruction"] + ("\n\n" + r["instances"][0]["input"] if r["instances"][0]["input"] else "")
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


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


CEILING_SHAPES = ((8, 256), (4, 512), (16, 128), (32, 64))  # 8 × 256 is the reference shape


def forward_ceiling(model, reps: int = 3) -> dict[str, float]:
    """tokens/s of a forward (the model's dtype) of 2,048 tokens at a few batch shapes, best of ``reps`` each."""
    out = {}
    with torch.no_grad():
        for b, t in CEILING_SHAPES:
            x = torch.randint(100, 40000, (b, t))
            model(x)  # warm-up (kernel selection, allocations)
            best = float("inf")
            for _ in range(reps):
                t0 = time.perf_counter()
                model(x)
                best = min(best, time.perf_counter() - t0)
            out[f"{b}x{t}"] = b * t / best
    return out


def decode_attention_ms(reps: int = 10, layers: int = 30) -> dict[str, dict[str, float]]:
    """Decode attention per layer at the benchmark's shapes (128 rows, 9 heads over 3 kv heads, head
    dim 64, row lengths uniform in a range, sorted as the engine admits them): the C++ kernel vs
    SDPA with the engine's additive mask, alternated in one process. Each repetition runs all
    ``layers`` layers, each over its own cache, as a decode step does (the caches then stream from
    memory, not from the CPU's caches); ms per layer, best and median of ``reps``."""
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, D = 128, 9, 3, 64
    out: dict[str, dict[str, float]] = {}
    for lo, hi in ((64, 128), (64, 192), (128, 256)):
        L = hi + 8
        n = torch.sort(torch.randint(lo, hi, (B,), generator=g))[0]
        q = torch.randn(B, 1, H + Hkv, D, generator=g).bfloat16()[:, :, :H].transpose(1, 2)
        caches = [[torch.randn(B, Hkv, L, D, generator=g).bfloat16() for _ in range(2)] for _ in range(layers)]
        span = int(n.max())
        mask = torch.zeros(B, 1, 1, span, dtype=torch.bfloat16)
        mask.masked_fill_(~(torch.arange(span)[None] < n[:, None])[:, None, None], float("-inf"))

        fns = {  # partial binds this shape's tensors (no closure over the loop's variables)
            "sdpa": functools.partial(_sdpa_layers, q, caches, mask, span, D**-0.5),
            "kernel": functools.partial(_kernel_layers, q, caches, n, D**-0.5),
        }
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(reps):
            for name, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t) / layers)
        row = {"kv_mb": n.sum().item() * Hkv * D * 2 * 2 / 1e6}
        for name, ts in times.items():
            ts.sort()
            row[f"{name}_best_ms"], row[f"{name}_median_ms"] = ts[0] * 1e3, ts[len(ts) // 2] * 1e3
        out[f"{lo}..{hi}"] = row
        del caches, fns  # free this shape's 30 layers of caches before the next shape's
    return out


def _sdpa_layers(q, caches, mask, span: int, scale: float) -> None:
    """SDPA decode attention over each layer's cache, with the engine's additive mask."""
    for kc, vc in caches:
        torch.nn.functional.scaled_dot_product_attention(
            q, kc[:, :, :span], vc[:, :, :span], attn_mask=mask, scale=scale, enable_gqa=True
        )


def _kernel_layers(q, caches, n, scale: float) -> None:
    """The C++ decode attention over each layer's cache (``n``: valid positions per row)."""
    for kc, vc in caches:
        attention_cpu.decode_attention(q, kc, vc, n, scale)


def prepare_seconds(engine, reps: int = 3) -> float:
    """Seconds the engine spends per call taking the fast path's weights from the live modules."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        engine.runner.bind(128)
        best = min(best, time.perf_counter() - t0)
        engine.runner.unbind()
    return best


def matmul_rows_per_s(reps: int = 20, dtype=torch.bfloat16) -> dict[str, dict[str, float]]:
    """bf16 x @ W.T for SmolLM2's MLP weight (1536 x 576) at M rows: how batch size bounds decode.

    'linear': F.linear (what HF and the ceiling's forward use); 'prepacked': the weight reordered
    once for oneDNN (what the engine's decode uses), best of 3 × ``reps``.
    """
    w = torch.randn(1536, 576, dtype=dtype)
    packed = (
        torch.ops.mkldnn._reorder_linear_weight(w, 128) if hasattr(torch.ops.mkldnn, "_reorder_linear_weight") else None
    )
    fns = {"linear": lambda x: torch.nn.functional.linear(x, w)}
    if packed is not None:
        fns["prepacked"] = lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    out: dict[str, dict[str, float]] = {k: {} for k in fns}
    for m in (8, 128, 2048):
        x = torch.randn(m, 576, dtype=dtype)
        for name, fn in fns.items():
            fn(x)
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                for _ in range(reps):
                    fn(x)
                best = min(best, time.perf_counter() - t)
            out[name][str(m)] = m * reps / best
    return out


# What was measured while optimising the engine (microbenchmarks on this machine, under load;
# best of several runs). Kept here so the results file explains itself.
NOTES = """\
How the engine gets there, per decode step of 128 rows (one token for each of the 128 samples):

- **A C++ decode step** (`rlhfkit/rollout/attention_cpu.py`, built once per machine with
  `torch.utils.cpp_extension.load_inline`, -O3 -march=native, cached under
  `$RLHFKIT_CACHE/torch_extensions/` by a hash of source, flags, CPU and torch/Python versions;
  SDPA is the automatic fallback when it cannot be built, off-CPU or outside bf16). Decode
  attention: one task per (row, kv head) reads that row's own valid positions once for its 3
  query heads — scores with AVX512-BF16 dot products (16 keys reduced together), softmax in fp32,
  values accumulated in fp32, software prefetch of the keys ahead and of the values — and needs no
  mask. For a bf16 model everything between the matmuls is fused too: RoPE on q/k + the cache
  write + attention in one call, residual add + RMSNorm in one, SiLU·up in one (HF's bf16
  roundings). Measured in one process while developing (load 4–10): per layer at 128 rows over
  lengths 64..192, 0.95 ms vs SDPA's 2.05 ms with one cache, hot in the CPU's caches (2.2×); with
  30 layers' caches streaming from memory, as in a real step, both are bound by how fast the reads
  come and the gap depends on the load: 1.06–1.18× in one benchmark run, 1.76–2.00× in the next
  (the table above is this run's); the software prefetch made the kernel ~20 % faster there
  (1.7–2.1 ms → 1.5–1.7 ms). A decode step at 128 rows × ~130 positions: 190 ms fused vs 217 ms
  with the attention kernel alone vs 259 ms on SDPA — the fused small ops are half of the gain.
  The fused step's outputs match the SDPA path within bf16 noise (tests compare the
  kernel with fp32 attention, each fused op with the PyTorch ops it replaces, and a decode step
  with and without it).
- **Weights prepared once per call** (`Runner.bind`): q/k/v and gate/up concatenated into one
  matmul each, and every projection and the lm_head reordered into oneDNN's blocked bf16 layout.
  `F.linear` reorders the weight inside every call; prepacked, the 1536 × 576 matmul at 128 rows
  took 222 µs instead of 344 µs and the lm_head 6.2 ms instead of 11.7 ms (bitwise equal outputs).
  It is redone at every `generate` call from the live modules (see `weight_prepare_s_per_call`),
  so PPO's optimizer steps are always seen; LoRA projections (PEFT) are called as modules.
- **Fused small ops** on the PyTorch path (SDPA fallback, fp32 models under bf16 autocast):
  RMSNorm as one `F.rms_norm`, RoPE on q and k together in 3 ops.
- **Sampling without full-vocabulary temporaries**: the fp32 probabilities are made in place in a
  buffer reused across steps, and the log-prob comes from the inverse CDF's total instead of a
  `log_softmax` pass. Fresh 25 MB tensors every step cost 43 ms against 8 ms in place (page faults).
  For bf16 logits on a CPU the upcast, max, exp and block sums are one pass of the same C++
  extension (2.7 vs 6.9 ms per 128-row step).

Tried and not kept (they did not help here):

- **Prompt-shared decode attention in PyTorch** (the K samples of a prompt read its keys/values
  once, the two partial softmaxes combined through their log-sum-exps): 7–9 % slower per step —
  SDPA's cost at one query per head was per-(row, head) work, not reading keys. With the C++
  kernel the attention is now memory-bound (see below), so sharing the prompt's keys inside the
  kernel is the next attention lever; it needs the engine to track which slot holds each row's
  prompt prefix through compaction, and was not done.
- **torch.compile**: a compiled attention (scores, softmax, weighted sum) was slower than SDPA
  (2.4 vs 1.8 ms at span 136); compiling the glue ops saves ~50 µs per RMSNorm+residual
  (≈ 3 ms per step, < 3 %) for 5–20 s of compile per shape family, so it is not used.
- fp32 matmuls (4× slower than bf16 at 128 rows), an fp32 or fp16 KV cache (SDPA 1.5× / 3× slower),
  SDPA's math backend (4× slower); in the kernel, keys 8 blocks ahead instead of 4 (no better).

Where the time goes now (cProfile over a 32 × 4 × 64-token call with the fused step, load ≈ 4.5,
605 tok/s, before the prefetch): the prepacked matmuls 45 % (incl. prefill), RoPE + cache write +
attention 25 % (1.8 ms per layer per step: the keys and values of 30 layers stream from memory at
~5 GB/s, about what this machine's cores reach for it under the shared load), add + RMSNorm and
SiLU·up 8 %, sampling ≈ 9 %, the rest
Python and prefill. Before the kernel (torch.profiler, 32 × 4 × 96): SDPA ≈ 40 %, matmuls ≈ 31 %,
small ops ≈ 20 %, sampling ≈ 5 %. The remaining gap to 50 % of the ceiling is mostly the matmuls:
at 128 rows a bf16 matmul runs at ~55–70 % of the rows/s of the ceiling's 2,048-row ones (table
above), and the decode batch cannot be larger than the 128 samples in flight.

Earlier before/after in one process (old engine from git vs the pre-kernel engine, 32 × 4 × 128,
T = 1, load ≈ 4): 432 → 567 tok/s (1.31×); at 64 new tokens under load 7–10: 1.5–1.75×.
"""


FP32_NOTES = """\
On a CPU without bf16 matmul instructions (here an AVX2-only AMD EPYC) the engine runs fp32: the
bf16 fast path and the C++ decode step are not used (they are bf16-only), and decode attention is
SDPA over the preallocated cache with the engine's additive mask. What remains of the engine's
gain over `transformers.generate` is structural: all 128 samples decode in one batch with one
prefill per prompt (the K samples share it), a preallocated KV cache instead of a growing one,
continuous batching, sampling in place in a reused buffer, and no per-step framework overhead.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--skip-hf", action="store_true", help="engine and ceiling only (quick iterations)")
    ap.add_argument(
        "--precision", default="auto", help="auto (bf16 where the CPU has bf16 instructions, else fp32), bf16 or fp32"
    )
    ap.add_argument(
        "--out", default=None, help="results path without suffix (default: results/rollout, or rollout_fp32 in fp32)"
    )
    ap.add_argument("--render", action="store_true", help="only rewrite the .md from the existing .json")
    ap.add_argument("--vllm", action="store_true", help="engine vs vLLM vs transformers.generate (rollout_vllm.*)")
    ap.add_argument("--runs", type=int, default=2, help="--vllm: runs of the engine and of vLLM per case")
    args = ap.parse_args()
    precision = resolve_precision(args.precision)
    if args.vllm:
        out = Path(args.out or RESULTS / "rollout_vllm")
        if args.render:
            res = json.loads(out.with_suffix(".json").read_text())
            write_result(out.name, res, markdown_vllm(res), out.parent, fresh=False)
        else:
            compare_vllm(args, precision, out)
        return
    out = Path(args.out or RESULTS / ("rollout" if precision == "bf16" else "rollout_fp32"))
    if args.render:
        res = json.loads(out.with_suffix(".json").read_text())
        write_result(out.name, res, markdown(res), out.parent, fresh=False)
        return

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    loaded = load_causal_lm(args.model, dtype)
    model, tok = loaded.model, loaded.tokenizer
    engine = Engine(model, tok, precision=precision, max_batch=args.prompts * args.k)
    prompts = chat_prompts(tok, args.prompts)
    res: dict = {
        "model": args.model,
        "dtype": precision,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_avg_start": os.getloadavg(),
        "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts),
        "cases": {},
    }
    # warm-up (first calls allocate, pick kernels)
    engine_generate(engine, prompts[:8], 8, 2, True)
    if not args.skip_hf:
        hf_generate(model, tok, prompts[:8], 4, 1, True)
    run = engine.runner
    res["engine_path"] = {
        "fast_path": run.uses_fast_path,
        "onednn_prepacked": run._can_pack(),
        "torch_compile": False,
        "weight_prepare_s_per_call": prepare_seconds(engine),
        # the C++ decode step (rollout/attention_cpu.py): built on first use, cached on disk
        "decode_kernel": run.last_decode_kernel,
        "decode_kernel_fused_step": run.last_decode_fused,
        "decode_kernel_build_s": attention_cpu.build_seconds,
        "decode_kernel_compiled_in_this_run": attention_cpu.built_now,
    }
    if run.last_decode_kernel:
        res["decode_attention_ms_per_layer"] = decode_attention_ms()
    ceilings = [forward_ceiling(model)]

    cases = [
        (f"{args.prompts} prompts x K={args.k}, T=1.0", prompts, args.k, True),
        ("batch 8 greedy", prompts[:8], 1, False),
    ]
    for name, ps, n, sample in cases:
        row = {"sequences": len(ps) * n, "new_tokens_per_seq": args.new_tokens}
        runs = []
        toks, dt = timed(engine_generate, engine, ps, args.new_tokens, n, sample)
        runs.append(toks / dt)
        if not args.skip_hf:
            toks_hf, dt_hf = timed(hf_generate, model, tok, ps, args.new_tokens, n, sample)
            row["hf_generate_tok_s"] = toks_hf / dt_hf
            row["hf_generate_s"] = dt_hf
        toks, dt = timed(engine_generate, engine, ps, args.new_tokens, n, sample)
        runs.append(toks / dt)
        row["engine_runs_tok_s"] = runs
        row["engine_tok_s"] = sum(runs) / len(runs)
        if sample and run.last_decode_kernel:
            # the same engine with the C++ decode step off (the SDPA path it falls back to)
            run.decode_kernel = False
            toks, dt = timed(engine_generate, engine, ps, args.new_tokens, n, sample)
            run.decode_kernel = True
            row["engine_sdpa_path_tok_s"] = toks / dt
        if not args.skip_hf:
            row["speedup_vs_hf"] = row["engine_tok_s"] / row["hf_generate_tok_s"]
        res["cases"][name] = row
        print(name, json.dumps(row, indent=1))
    ceilings.append(forward_ceiling(model))
    res["forward_ceiling_tok_s_by_shape"] = {"before": ceilings[0], "after": ceilings[1]}
    ceiling = max(v for c in ceilings for v in c.values())
    res["forward_ceiling_tok_s"] = ceiling
    for row in res["cases"].values():
        row["fraction_of_ceiling"] = row["engine_tok_s"] / ceiling
    res["matmul_rows_per_s"] = matmul_rows_per_s(dtype=dtype)
    res["load_avg_end"] = os.getloadavg()

    write_result(out.name, res, markdown(res), out.parent)
    print(markdown(res))


VLLM_INPROC = "VLLM_ENABLE_V1_MULTIPROCESSING"


def vllm_bare(gen, prompts, new, n, sample):
    """vLLM's own ``LLM.generate`` on token prompts, no log-probs (what vLLM alone costs)."""
    import vllm
    from vllm.inputs import TokensPrompt

    sp = vllm.SamplingParams(n=n, temperature=1.0 if sample else 0.0, max_tokens=new, ignore_eos=True)
    outs = gen.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
    return sum(len(c.token_ids) for o in outs for c in o.outputs)


def compare_vllm(args, precision: str, out: Path) -> None:
    """Engine vs vLLM (VLLMGenerator, and bare) vs transformers.generate in one process (--vllm)."""
    t0 = time.perf_counter()
    import vllm

    from rlhfkit.rollout.vllm import VLLMGenerator

    import_s = time.perf_counter() - t0
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    loaded = load_causal_lm(args.model, dtype)
    model, tok = loaded.model, loaded.tokenizer
    engine = Engine(model, tok, precision=precision, max_batch=args.prompts * args.k)
    gen = VLLMGenerator(model, tok, precision=precision)
    prompts = chat_prompts(tok, args.prompts)
    res: dict = {
        "model": args.model,
        "dtype": precision,
        "vllm_version": vllm.__version__,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "vllm_env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_CPU_") or k == VLLM_INPROC},
        "load_avg_start": os.getloadavg(),
        "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts),
        "vllm_import_s": import_s,
        "vllm_start_s": gen.start_seconds,
        "cases": {},
    }
    # warm-ups: first calls allocate and pick kernels (and build/load the engine's C++ step)
    engine_generate(engine, prompts[:8], 8, 2, True)
    engine_generate(gen, prompts[:8], 8, 2, True)
    if not args.skip_hf:
        hf_generate(model, tok, prompts[:8], 4, 1, True)
    pushes = [gen.push_weights(model) for _ in range(3)]
    res["vllm_push_s"] = pushes
    cases = [
        (f"{args.prompts} prompts x K={args.k}, T=1.0", prompts, args.k, True),
        ("batch 8 greedy", prompts[:8], 1, False),
    ]
    for name, ps, n, sample in cases:
        row: dict = {"sequences": len(ps) * n, "new_tokens_per_seq": args.new_tokens}
        runs: dict[str, list[float]] = {"engine": [], "vllm": []}
        for r in range(args.runs):  # engine and vLLM alternate (the load drifts); transformers once, between
            for side, g in (("engine", engine), ("vllm", gen)):
                toks, dt = timed(engine_generate, g, ps, args.new_tokens, n, sample)
                assert toks == len(ps) * n * args.new_tokens, (side, toks)
                runs[side].append(toks / dt)
            if r == 0:
                toks, dt = timed(vllm_bare, gen, ps, args.new_tokens, n, sample)
                row["vllm_bare_tok_s"] = toks / dt
                if not args.skip_hf:
                    toks, dt = timed(hf_generate, model, tok, ps, args.new_tokens, n, sample)
                    row["hf_generate_tok_s"] = toks / dt
        for side, rs in runs.items():
            row[f"{side}_runs_tok_s"] = rs
            row[f"{side}_tok_s"] = sum(rs) / len(rs)
        row["engine_over_vllm"] = row["engine_tok_s"] / row["vllm_tok_s"]
        res["cases"][name] = row
        print(name, json.dumps(row, indent=1), flush=True)
    res["load_avg_end"] = os.getloadavg()
    write_result(out.name, res, markdown_vllm(res), out.parent)
    print(markdown_vllm(res))


def markdown_vllm(res: dict) -> str:
    """benchmarks/results/rollout_vllm.md from the --vllm results dict."""
    new_tokens = next(iter(res["cases"].values()))["new_tokens_per_seq"]
    pushes = res["vllm_push_s"]
    env = ", ".join(f"{k}={v}" for k, v in sorted(res["vllm_env"].items()))
    n_runs = len(next(iter(res["cases"].values()))["engine_runs_tok_s"])
    lines = [
        "# Rollout: our engine vs vLLM vs transformers.generate",
        "",
        f"SmolLM2-135M-Instruct, {res['dtype']}, one process, {res['threads']} threads; vLLM {res['vllm_version']} "
        f"(the CPU build, in-process, enforce_eager; {env}); load average {res['load_avg_start'][0]:.1f} at "
        f"start, {res['load_avg_end'][0]:.1f} at end (a shared 2-core machine: compare the ratios). Prompts: "
        f"self-instruct seed instructions in the chat template (mean {res['prompt_tokens_mean']:.0f} tokens); "
        f"exactly {new_tokens} new tokens per sample on every side (ignore_eos / min_new_tokens).",
        "",
        f"vLLM start-up: {res['vllm_start_s']:.1f} s (save the model to /dev/shm, start the engine; importing "
        f"vllm took another {res['vllm_import_s']:.1f} s). Weight push (`VLLMGenerator.push_weights`: "
        "`reload_weights` from the live tensors + re-packing the tied lm_head): "
        + ", ".join(f"{p:.2f}" for p in pushes)
        + " s.",
        "",
        f"Engine and vLLM: mean of {n_runs} runs each, alternated; vLLM bare (its own `LLM.generate`, no "
        "log-probs) and transformers.generate: one run each, after the first pair.",
        "",
        "| case | engine tok/s (runs) | vLLM tok/s (runs) | vLLM bare | transformers.generate | engine / vLLM |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in res["cases"].items():
        e = ", ".join(f"{r:,.0f}" for r in row["engine_runs_tok_s"])
        v = ", ".join(f"{r:,.0f}" for r in row["vllm_runs_tok_s"])
        hf = f"{row['hf_generate_tok_s']:,.0f}" if "hf_generate_tok_s" in row else "—"
        lines.append(
            f"| {name} | {row['engine_tok_s']:,.0f} ({e}) | {row['vllm_tok_s']:,.0f} ({v}) | "
            f"{row['vllm_bare_tok_s']:,.0f} | {hf} | {row['engine_over_vllm']:.2f}× |"
        )
    lines += [
        "",
        "vLLM through `VLLMGenerator` asks for the sampled token's log-prob at every step "
        '(`logprobs=1`, `logprobs_mode="processed_logprobs"`: one log-softmax over the vocabulary per '
        "step) and converts vLLM's outputs to `Completion`s; the bare column is vLLM without either.",
    ]
    return "\n".join(lines) + "\n"


def markdown(res: dict) -> str:
    """benchmarks/results/rollout.md from the results dict (``--render`` redoes it from the JSON)."""
    ceiling = res["forward_ceiling_tok_s"]
    dt = res.get("dtype", "bf16")
    new_tokens = next(iter(res["cases"].values()))["new_tokens_per_seq"]
    lines = [
        "# Rollout engine benchmark",
        "",
        f"SmolLM2-135M-Instruct, {dt}, {res['threads']} threads (OMP_WAIT_POLICY={res['omp_wait_policy']}), "
        f"load average {res['load_avg_start'][0]:.1f} at start; prompts: self-instruct seed "
        f"instructions in the chat template (mean {res['prompt_tokens_mean']:.0f} tokens); "
        f"{new_tokens} new tokens per sample on both sides. One run; the machine is shared, so compare ratios.",
        "",
        f"Forward-only ceiling: {ceiling:,.0f} tok/s — the best {dt} forward of 2,048 tokens over the batch "
        "shapes below, best of 3 each, measured before and after the generation cases (defined as 8 × 256; "
        "the maximum over all of them is used, so the fraction is conservative):",
        "",
        "| forward shape | before | after |",
        "|---|---:|---:|",
    ]
    by = res["forward_ceiling_tok_s_by_shape"]
    for shape in by["before"]:
        lines.append(f"| {shape} | {by['before'][shape]:,.0f} | {by['after'][shape]:,.0f} |")
    ep = res["engine_path"]
    lines += [
        "",
        f"Engine: {dt}, bf16 fast path: {ep['fast_path']}, weights prepacked for oneDNN: {ep['onednn_prepacked']}; "
        "torch.compile: "
        f"{ep['torch_compile']} (no warm-up to count); weight preparation from the live modules "
        f"{ep['weight_prepare_s_per_call']:.2f} s per call, included in the engine's times. Engine tok/s "
        "is the mean of two runs, one before and one after transformers.generate.",
        "",
    ]
    if "decode_kernel" in ep:
        kernel = "used" if ep["decode_kernel"] else "NOT used (SDPA fallback)"
        fused = (
            " (the fused decode step: RoPE + cache write + attention, add + RMSNorm, SiLU·up)"
            if ep.get("decode_kernel_fused_step")
            else ""
        )
        build = ep["decode_kernel_build_s"] or 0.0
        how = (
            f"compiled in this run in {build:.0f} s (once per machine; later runs load it from the cache)"
            if ep["decode_kernel_compiled_in_this_run"]
            else f"loaded from the build cache in {build:.1f} s (the one-time compile took ~40 s on this machine)"
        )
        lines += [
            f"C++ decode kernel (`rlhfkit/rollout/attention_cpu.py`): {kernel}{fused}; {how}. The build happens "
            "in the warm-up call and is not inside the timed runs.",
            "",
        ]
    lines += [
        "| case | engine tok/s (runs) | transformers.generate tok/s | speedup | fraction of ceiling |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in res["cases"].items():
        hf = f"{row['hf_generate_tok_s']:,.0f}" if "hf_generate_tok_s" in row else "—"
        sp = f"{row['speedup_vs_hf']:.2f}×" if "speedup_vs_hf" in row else "—"
        runs = ", ".join(f"{r:,.0f}" for r in row["engine_runs_tok_s"])
        lines.append(
            f"| {name} | {row['engine_tok_s']:,.0f} ({runs}) | {hf} | {sp} | {row['fraction_of_ceiling']:.0%} |"
        )
    main_case = next(iter(res["cases"].values()))
    if "engine_sdpa_path_tok_s" in main_case:
        lines += [
            "",
            f"Same run, first case with the C++ decode step switched off (the SDPA path it falls back to): "
            f"{main_case['engine_sdpa_path_tok_s']:,.0f} tok/s (one run, after the others).",
        ]
    if "decode_attention_ms_per_layer" in res:
        lines += [
            "",
            "Decode attention per layer (128 rows, 9 heads / 3 kv heads, head dim 64, row lengths uniform "
            "in the range, sorted; 30 layers with a cache each, as in a decode step, so keys and values come "
            "from memory), kernel and SDPA alternated in one process, ms (best / median of 10):",
            "",
            "| row lengths | K+V read | SDPA | kernel | speedup (best) |",
            "|---|---:|---:|---:|---:|",
        ]
        for rng, r in res["decode_attention_ms_per_layer"].items():
            lines.append(
                f"| {rng} | {r['kv_mb']:.1f} MB | {r['sdpa_best_ms']:.2f} / {r['sdpa_median_ms']:.2f} | "
                f"{r['kernel_best_ms']:.2f} / {r['kernel_median_ms']:.2f} "
                f"| {r['sdpa_best_ms'] / r['kernel_best_ms']:.2f}× |"
            )
    if "speedup_vs_hf" in main_case:
        before, after = (max(by[k].values()) for k in ("before", "after"))
        if max(before, after) > 1.3 * min(before, after):
            lines += [
                "",
                f"The ceiling moved with the load during this run ({before:,.0f} tok/s before the generation cases, "
                f"{after:,.0f} after): against each, the first case is {main_case['engine_tok_s'] / before:.0%} / "
                f"{main_case['engine_tok_s'] / after:.0%}. The fraction below uses the larger one.",
            ]
        met = lambda ok: "met" if ok else "NOT met"  # noqa: E731
        lines += [
            "",
            "Targets at 32 × 4 × 128, T = 1: ≥ 4× transformers.generate — "
            f"{met(main_case['speedup_vs_hf'] >= 4)} "
            f"({main_case['speedup_vs_hf']:.2f}×); ≥ 50 % of the forward-only ceiling — "
            f"{met(main_case['fraction_of_ceiling'] >= 0.5)} ({main_case['fraction_of_ceiling']:.0%}).",
        ]
    mm = res["matmul_rows_per_s"]
    lines += [
        "",
        f"Load average {res['load_avg_start'][0]:.1f} at start, {res['load_avg_end'][0]:.1f} at end "
        "(other engineers' jobs share the 2 cores).",
        "",
        "Why a decode step stays below the ceiling: it multiplies every weight by only as many rows as",
        f"there are live sequences, and {dt} matmuls on this CPU are far less efficient at few rows —",
        "rows/s through the 1536 × 576 MLP weight: "
        + "; ".join(f"{kind}: " + ", ".join(f"{v:,.0f} at M={m}" for m, v in d.items()) for kind, d in mm.items())
        + " (the ceiling's forward runs M=2048). At batch 8 both engines stream all 270 MB of weights",
        "per token step and are bound by memory bandwidth, so they are close; the engine's gain comes",
        "from decoding every sample at once (128 rows) with one prefill per prompt, a preallocated cache,",
        ("prepacked weights and " if dt == "bf16" else "") + "no per-step framework overhead.",
        "",
        NOTES if dt == "bf16" else FP32_NOTES,
        "llama.cpp reference: not measured. Building llama-cpp-python compiles llama.cpp from source;",
        "on this shared 2-core machine (load 5–30 during this work) that was estimated well over the",
        "15-minute budget and would have disturbed the other engineers' runs, so it was skipped.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
