"""PPO with rollout_backend=vllm against rollout_backend=engine, at TRL's settings, in one run.

    /path/to/vllm-venv/bin/python benchmarks/ppo_vllm.py    # writes benchmarks/results/ppo_vllm.{json,md}

Run it with a Python that has vLLM (on a CPU its CPU build, see docs/performance.md). The
settings are ``benchmarks/ppo.py``'s (TRL's): SmolLM2-135M-Instruct as policy, reference and
reward model, 16 of TRL's prompts per iteration × 64 new tokens never stopping at EOS,
temperature 0.7, 1 epoch, 2 minibatches, bf16; the critic a value head on the policy
(``--critic``). ``--iterations`` (3) iterations, the first excluded (warm-up): the split is the
median of iterations 2.. of each phase — generate, push (the policy's weights into vLLM before each
rollout; 0 for the engine, which runs on the live modules), score, forward, train. Each side runs
in its own subprocess (``OMP_WAIT_POLICY=PASSIVE``); each round runs both, engine first in odd
rounds and vLLM first in even ones (the load of a shared machine drifts). Start-up
(loading the models, and for vLLM saving the policy and starting the engine) is reported apart.
The machine is shared and noisy: compare the two sides within a round. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import ppo
from common import write_result

BACKENDS = ("engine", "vllm")
PHASES = ("generate", "push", "score", "forward", "train")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="rounds of both sides (the order alternates)")
    ap.add_argument("--critic", default="policy_head", help="policy_head or rm (benchmarks/ppo.py's variants)")
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS (0 = torch's default: all cores)")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    args = ap.parse_args()
    ppo.THREADS = args.threads

    tmp = Path(tempfile.mkdtemp(prefix="ppo-vllm-bench-"))
    prompts_file = tmp / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ppo.trl_prompts()))
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    rounds = []
    for k in range(args.rounds):
        row = {"loadavg_start": os.getloadavg()[0]}
        for backend in BACKENDS if k % 2 == 0 else BACKENDS[::-1]:  # the order alternates: the load drifts
            row[backend] = ppo.spawn_ours(
                tmp, args.critic, args.iterations, prompts_file, f"-r{k}", args.precision, backend
            )
            print(f"round {k + 1} {backend}: {row[backend]['median_step_s']:.2f} s / iteration", flush=True)
        row["loadavg_end"] = os.getloadavg()[0]
        rounds.append(row)
    result = {
        "benchmark": f"PPO iteration, SmolLM2-135M-Instruct, critic={args.critic}, 16 prompts x 64 new tokens, "
        f"1 epoch, 2 minibatches, {args.precision}, {args.iterations} iterations",
        "started": started,
        "omp_num_threads": args.threads or "default",
        "rounds": rounds,
        "engine_over_vllm_step_time": statistics.median(
            r["engine"]["median_step_s"] / r["vllm"]["median_step_s"] for r in rounds
        ),
    }
    write_result("ppo_vllm", result, markdown(result))
    print(markdown(result))
    shutil.rmtree(tmp, ignore_errors=True)


def markdown(r: dict) -> str:
    lines = [
        "# PPO iteration: rollout_backend=vllm vs engine",
        "",
        f"{r['benchmark']} (TRL's settings, as `benchmarks/ppo.py`). Started {r['started']}; "
        f"OMP_NUM_THREADS={r['omp_num_threads']}, OMP_WAIT_POLICY=PASSIVE; each side in its own process. "
        "Seconds per iteration: median over iterations 2.. (the first is warm-up); the phases likewise. "
        "Each round runs both sides, engine first in odd rounds and vLLM first in even ones.",
        "",
        "| round | load avg | backend | start-up s | s / iteration | "
        + " | ".join(PHASES)
        + " | peak RSS (GiB) | KL it. 1 |",
        "|---|---|---|---:|---:|" + "---:|" * len(PHASES) + "---:|---:|",
    ]
    for k, rd in enumerate(r["rounds"], 1):
        load = f"{rd['loadavg_start']:.1f}-{rd['loadavg_end']:.1f}"
        for backend in BACKENDS:
            o = rd[backend]
            s = o["split_median_s"]
            phases = " | ".join(f"{s.get(p, 0.0):.2f}" for p in PHASES)
            lines.append(
                f"| {k} | {load} | {backend} | {o['setup_s']:.1f} | {o['median_step_s']:.2f} | {phases} | "
                f"{o['ru_maxrss_mib'] / 1024:.2f} | {o['steps'][0]['kl']:.2g} |"
            )
    lines += [
        "",
        f"Engine time / vLLM time per iteration (median over rounds): {r['engine_over_vllm_step_time']:.2f}. "
        "Start-up: loading policy, reference and reward model, plus for vLLM saving the policy to /dev/shm "
        "and starting its engine in-process. The log-probs PPO trains on are recomputed by the policy on either "
        "side, so KL at iteration 1 is 0 up to bf16 rounding.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
