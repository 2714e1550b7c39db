"""PPO iteration time and peak memory, ours against TRL's PPOTrainer, in one run.

    .venv/bin/python benchmarks/ppo.py        # writes benchmarks/results/ppo.{json,md}

Settings (TRL's): SmolLM2-135M-Instruct as policy, reference, reward model and critic
(the RM and the critic a random scalar head on the same weights — fine for timing); TRL's 64 chat
prompts (``shared/peers/trl/common.py``), 16 prompts per iteration × 64 new tokens, generation
never stopping at EOS (TRL's default without ``stop_token``: ``ignore_eos=true`` here, and our
responses are then still cut after the first EOS for training, as they must be), temperature 0.7,
1 PPO epoch, 2 minibatches, no gradient accumulation, no-grad forwards 16 rows at a time, lr 1e-6, bf16
autocast; 4 iterations, the first excluded (warm-up).

Ours and TRL alternate (``--rounds`` rounds of: each of our variants, then TRL), each side in its
own subprocess with ``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP threads sleep instead of spinning on
a shared machine; ``--wait-policy default`` leaves it unset, as a user's run does); the ratio of
a round compares runs minutes apart, and the reported ratio is the median over rounds.

Seconds per iteration = wall time between the ends of consecutive iterations (TRL: between
optimizer-step callbacks), median over iterations 2–4. Peak RSS = ``ru_maxrss`` of the process
that trained (each side runs in its own subprocess). TRL runs from the venv
``benchmarks/.venvs/trl-ppo`` (trl 1.12, the last with PPOTrainer) when it exists, with the peer
scripts copied to a temporary directory. The machine is shared and noisy (±15 % run to run):
compare the ratio, which comes from one run. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import PEERS_TRL, RESULTS, ROOT, VENVS, bench_env, median_ratio, run_peer, write_result

TRL_VENV = VENVS / "trl-ppo"


def trl_prompts() -> list[str]:
    """TRL benchmark's 64 instructions (16 topics × 4 forms), read from the peer script."""
    src = (PEERS_TRL / "common.py").read_text()
    ns: dict = {}
    start, end = src.index("_TOPICS = ["), src.index("assert len(INSTRUCTIONS) == 64")
    exec(src[start:end], ns)  # only the two literal lists and the comprehension
    return ns["INSTRUCTIONS"]


def run_ours(
    out: Path,
    iterations: int,
    variant: str,
    prompts_file: Path,
    precision: str = "bf16",
    backend: str = "engine",
    model: str | None = None,
    **overrides,
) -> dict:
    """Child process: one PPO run; returns per-iteration timings and this process's peak RSS.

    ``variant``: 'rm' (critic = a copy of the RM, full fine-tuning: the like-for-like setting),
    'policy_head' (value head on the policy trunk), either with '+lora' (LoRA r=16 on all linear
    layers of policy and critic; the reference is the policy with adapters disabled). ``backend``:
    the rollout backend (``benchmarks/ppo_vllm.py`` compares engine and vllm). ``model`` (default
    the embedded SmolLM2) and ``overrides`` of PPOConfig fields: ``benchmarks/gpu_check.py``'s dry
    run on the tiny model.
    """
    critic = variant.split("+")[0]
    from rlhfkit.config import PPOConfig
    from rlhfkit.models.loading import embedded_model_dir
    from rlhfkit.recipes.common import read_metrics
    from rlhfkit.recipes.ppo import train_ppo

    model = model or str(embedded_model_dir())
    settings = dict(
        model=model,
        reward_model=model,
        critic=critic,
        data=str(prompts_file),
        out=str(out),
        batch_size=16,
        max_new_tokens=64,
        ignore_eos=True,
        temperature=0.7,
        ppo_epochs=1,
        num_minibatches=2,
        lr=1e-6,
        precision=precision,
        max_steps=iterations,
        missing_eos_penalty=None,
        lora="+lora" in variant,
        # TRL's gradient_accumulation_steps=1 and local_rollout_forward_batch_size=16; our defaults
        # (2 and 4) are memory knobs for longer rows, and at these rows they were ~10 % slower
        # (12.6 vs 11.4 s per iteration, 4.2 vs 3.9 GiB peak, one run each on the Zen 5 EPYC)
        grad_accum=1,
        forward_batch_size=16,
        rollout_backend=backend,
    )
    cfg = PPOConfig(**(settings | overrides))
    t0 = time.perf_counter()
    result = train_ppo(cfg, say=lambda *a: None)
    rows = read_metrics(out)
    walls = [b["time"] - a["time"] for a, b in zip(rows, rows[1:])]  # iteration 2.. end-to-end
    keys = ("time_generate", "time_push", "time_score", "time_forward", "time_train", "time_iteration")
    keys = tuple(k for k in keys if k in rows[0])
    measured = rows[1:]
    return {
        "variant": variant,
        "critic": critic,
        "lora": "+lora" in variant,
        "iterations": len(rows),
        "backend": backend,
        "total_s": time.perf_counter() - t0,
        "setup_s": time.perf_counter() - t0 - result["train_seconds"],  # loading models (and starting vLLM)
        "median_step_s": statistics.median(walls),
        "split_median_s": {k.removeprefix("time_"): statistics.median(r[k] for r in measured) for k in keys},
        "steps": [{k: r[k] for k in ("step", "time", *keys, "response_length", "kl", "score")} for r in rows],
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": __import__("torch").get_num_threads(),
    }


def child(args) -> None:
    result = run_ours(Path(args.out), args.iterations, args.critic, Path(args.prompts), args.precision, args.backend)
    Path(args.result).write_text(json.dumps(result, indent=1))


THREADS = 0
WAIT_POLICY = "PASSIVE"
TRL_TIMEOUT_S = 1800
TRL_NEEDS_GIB = 9.0  # its peak RSS is 8.0-8.3 GiB
OURS_NEEDS_GIB = {"rm": 8.0, "policy_head": 6.0}  # peak RSS about 7.3 and 5 GiB (children are OOM-killed first)


def _expendable() -> None:
    """In a benchmark child: if the shared machine runs out of memory, the kernel kills us first."""
    Path("/proc/self/oom_score_adj").write_text("1000")


def _mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def wait_for_memory(gib: float, timeout_s: float = 900) -> bool:
    """Wait until ``gib`` GiB are available (other jobs share this machine); False on timeout."""
    t0 = time.time()
    while _mem_available_gib() < gib:
        if time.time() - t0 > timeout_s:
            return False
        time.sleep(10)
    return True


def spawn_ours(
    tmp: Path,
    critic: str,
    iterations: int,
    prompts_file: Path,
    tag: str = "",
    precision: str = "bf16",
    backend: str = "engine",
) -> dict:
    name = f"{critic}-{backend}{tag}".replace("+", "-")
    res = tmp / f"ours-{name}.json"
    need = OURS_NEEDS_GIB[critic.split("+")[0]]
    if not wait_for_memory(need):
        raise SystemExit(f"{critic}: less than {need} GiB available for 15 minutes (a shared machine); try later")
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--critic",
        critic,
        "--iterations",
        str(iterations),
        "--prompts",
        str(prompts_file),
        "--out",
        str(tmp / f"run-{name}"),
        "--result",
        str(res),
        "--precision",
        precision,
        "--backend",
        backend,
    ]
    subprocess.run(cmd, check=True, cwd=ROOT, env=bench_env(THREADS, WAIT_POLICY), preexec_fn=_expendable)
    return json.loads(res.read_text())


def spawn_trl(tmp: Path, model_dir: str, tag: str = "", precision: str = "bf16") -> dict | None:
    py = TRL_VENV / "bin" / "python"
    if not py.exists() or not (PEERS_TRL / "ppo_bench.py").exists():
        print(f"TRL skipped: {py} or {PEERS_TRL}/ppo_bench.py missing")
        return None
    if not wait_for_memory(TRL_NEEDS_GIB):
        return {"error": f"skipped: less than {TRL_NEEDS_GIB} GiB available for 15 minutes"}
    return run_peer(
        py,
        "ppo_bench.py",
        ["--precision", precision, "--tag", "ppo_bench"],
        tmp / f"trl{tag}",
        "ppo_bench",
        env=bench_env(THREADS, WAIT_POLICY, BENCH_MODEL=model_dir),
        timeout=TRL_TIMEOUT_S,
        preexec_fn=_expendable,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--critic", default="rm")
    ap.add_argument("--backend", default="engine", help=argparse.SUPPRESS)
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--prompts")
    ap.add_argument("--out")
    ap.add_argument("--result")
    ap.add_argument("--no-trl", action="store_true")
    ap.add_argument(
        "--variants",
        default="rm,policy_head",
        help="settings to time (comma-separated): critic kind, optionally +lora (rm+lora, policy_head+lora)",
    )
    ap.add_argument("--rounds", type=int, default=2, help="rounds of (our variants, then TRL), alternating")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="OMP_NUM_THREADS for both sides (0 = torch's default: 2 here). 1 by default: this "
        "2-core machine is shared with other jobs that keep one core busy, and a second "
        "thread then waits for it (2 threads measured no faster, 13.4 vs 12.6 s per iteration)",
    )
    ap.add_argument(
        "--wait-policy",
        default="PASSIVE",
        choices=["PASSIVE", "default"],
        help="OMP_WAIT_POLICY for both sides: PASSIVE (idle OpenMP threads sleep: fair on a shared machine) or "
        "default (they spin a while first, as a user's run does; measured on a quiet 2-core Xeon: "
        "our bf16 decode 2.9 s vs 4.4 s under PASSIVE for the benchmark's 16 x 64 tokens)",
    )
    ap.add_argument(
        "--precision",
        default="bf16",
        choices=["bf16", "fp32"],
        help="both sides (bf16 by default; fp32 for a CPU without bf16 instructions: writes ppo_fp32.*)",
    )
    args = ap.parse_args()
    if args.child:
        return child(args)
    global THREADS, WAIT_POLICY
    THREADS = args.threads
    WAIT_POLICY = args.wait_policy

    from rlhfkit.models.loading import embedded_model_dir

    model_dir = str(embedded_model_dir())
    tmp = Path(tempfile.mkdtemp(prefix="ppo-bench-"))
    prompts_file = tmp / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in trl_prompts()))
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    variants = args.variants.split(",")
    rounds = []
    for k in range(args.rounds):
        load = os.getloadavg()[0]
        ours = {
            c: spawn_ours(tmp, c, args.iterations, prompts_file, tag=f"-r{k}", precision=args.precision)
            for c in variants
        }
        trl = None if args.no_trl else spawn_trl(tmp, model_dir, tag=f"-r{k}", precision=args.precision)
        rounds.append({"loadavg_start": load, "loadavg_end": os.getloadavg()[0], "ours": ours, "trl": trl})
        print(
            f"round {k + 1}: "
            + ", ".join(f"{c} {o['median_step_s']:.1f} s" for c, o in ours.items())
            + (f", TRL {trl['median_step_s']:.1f} s" if trl and "median_step_s" in trl else ""),
            flush=True,
        )

    result = {
        "benchmark": "PPO iteration, SmolLM2-135M-Instruct as policy/ref/RM/critic, 16 prompts x 64 new tokens, "
        f"1 epoch, 2 minibatches, {args.precision}",
        "started": started,
        "omp_num_threads": args.threads or "default",
        "omp_wait_policy": WAIT_POLICY,
        "rounds": rounds,
    }
    # per variant: median over rounds of (ours / TRL of the same round)
    ok = [r for r in rounds if r["trl"] and "median_step_s" in r["trl"]]
    if ok:
        result["ratios"] = {
            c: {
                "time": median_ratio((r["ours"][c]["median_step_s"], r["trl"]["median_step_s"]) for r in ok),
                "rss": median_ratio((r["ours"][c]["ru_maxrss_mib"], r["trl"]["ru_maxrss_mib"]) for r in ok),
            }
            for c in variants
        }
    name = "ppo" if args.precision == "bf16" else f"ppo_{args.precision}"
    result["name"] = name
    notes = RESULTS / f"{name}.notes.md"  # written by hand after a run: what the numbers mean, what was tried
    write_result(name, result, markdown(result), notes=notes.read_text() if notes.exists() else "")
    print(markdown(result))
    shutil.rmtree(tmp, ignore_errors=True)


def markdown(r: dict) -> str:
    lines = [
        "# PPO iteration: rlhfkit vs TRL PPOTrainer",
        "",
        f"{r['benchmark']}. Started {r['started']} (a shared machine: compare ratios within a round).",
        "Generation never stops at EOS (TRL's default), temperature 0.7; median of iterations 2-4; "
        f"OMP_NUM_THREADS={r['omp_num_threads']}, OMP_WAIT_POLICY={r['omp_wait_policy']} on both sides; "
        "rounds alternate ours and TRL.",
        "",
        "| round | load avg | run | s / iteration | generate | score | forwards | train | peak RSS (GiB) "
        "| time x TRL | RSS x TRL |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, rd in enumerate(r["rounds"], 1):
        t = rd["trl"]
        ok = bool(t and "median_step_s" in t)
        load = f"{rd['loadavg_start']:.1f}-{rd['loadavg_end']:.1f}"
        for variant, o in rd["ours"].items():
            s = o["split_median_s"]
            ratios = (
                f"{o['median_step_s'] / t['median_step_s']:.3f} | {o['ru_maxrss_mib'] / t['ru_maxrss_mib']:.3f}"
                if ok
                else "– | –"
            )
            lines.append(
                f"| {k} | {load} | rlhfkit, critic={variant} | {o['median_step_s']:.2f} | {s['generate']:.2f} | "
                f"{s['score']:.2f} | {s['forward']:.2f} | {s['train']:.2f} | {o['ru_maxrss_mib'] / 1024:.2f} "
                f"| {ratios} |"
            )
        if ok:
            lines.append(
                f"| {k} | {load} | TRL {t['settings']['trl']} PPOTrainer | {t['median_step_s']:.2f} | "
                f"{t.get('median_gen_s', float('nan')):.2f} | – | – | {t.get('median_nongen_s', float('nan')):.2f} "
                f"(all but generate) | {t['ru_maxrss_mib'] / 1024:.2f} | 1 | 1 |"
            )
        elif t:
            lines.append(f"| {k} | {load} | TRL failed: {t.get('error')} | | | | | | | | |")
    if r.get("ratios"):
        lines += ["", "Median over rounds (targets: time <= 0.25 x TRL, peak RSS <= 0.6 x TRL):", ""]
        lines += [
            f"- critic={c}: time {x['time']:.3f} x TRL, peak RSS {x['rss']:.3f} x TRL" for c, x in r["ratios"].items()
        ]
    else:
        lines += ["", "TRL not run (venv benchmarks/.venvs/trl-ppo missing or --no-trl)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
