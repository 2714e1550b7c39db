"""A2C, RLOO and GRPO on several processes: ``torchrun --nproc_per_node 2`` (gloo on CPU) takes the
steps one process takes, as tests/test_ppo_processes.py checks for PPO.

What is compared: the per-iteration metrics (losses, KL, scores, β, gradient norm) and the final
policy (and A2C's critic) weights of a 1-process and a 2-process run with the same global batch and
seed, within 1e-5 (fp32; relative above 1: A2C's gradient norms of 10-15 differ by 4e-6 relative
under FSDP2, whose reduce-scatter averages and the step multiplies back). RLOO and GRPO run 2
epochs of 2 minibatches, so a minibatch holds rows of both processes in some steps and of one in
others; their group baselines need each prompt's k samples on one process (the prompts are shared,
not the rows).

Sampling is stubbed: the recipe's ``generate`` is replaced by a stub whose samples are a pure
function of (seed, iteration, query, sample index). The real engine samples each prompt alike on
any process too (per-prompt seeds), but the policy of iteration 2 differs between the runs in the
last bits, which can flip a sampled token; everything after generation is the real code.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhfkit.recipes.common import read_metrics

WORKER = r"""
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
import rlhfkit.recipes.ppo as ppo
from rlhfkit.config import A2CConfig, GRPOConfig, RLOOConfig
from rlhfkit.rollout import Completion

import rlhfkit.recipes.engines as engines

out, model, expect, algo, engine = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
if algo.startswith("a2c"):
    import rlhfkit.recipes.a2c as recipe
else:
    import rlhfkit.recipes.critic_free as recipe
make = recipe.make_accelerator
if engine == "deepspeed" and not torch.cuda.is_available():
    from helpers import FORCE_DEEPSPEED_ON_CPU

    exec(FORCE_DEEPSPEED_ON_CPU)


def checked(cfg):  # inside each worker: there really are `expect` processes, and this is one of them
    acc = make(cfg)
    assert acc.num_processes == expect == int(os.environ.get("WORLD_SIZE", "1")), acc.num_processes
    assert engines.engine(acc) == engine, (engines.engine(acc), engine)
    Path(f"{out}.rank{acc.process_index}").write_text(str(acc.num_processes))
    return acc


def stub_generate(m, cfg, queries, it, keys=None):  # the samples of a query do not depend on who samples it
    if engine == "deepspeed":  # policy (and critic) in one engine, the generator samples from a whole copy
        assert m.whole is not None and m.generator.model is m.whole
        Path(f"{out}.sharded{os.environ['RANK']}").write_text("yes")
    if engine == "fsdp":  # this process holds a part of the policy (and critic), the generator a whole copy
        from torch.distributed.tensor import DTensor

        local = [p.to_local() for p in m.policy.parameters() if isinstance(p, DTensor)]
        assert local and m.whole is not None and m.generator.model is m.whole
        assert m.critic.kind != "policy_head" or isinstance(m.critic.head.weight, DTensor)  # the value head too
        Path(f"{out}.sharded{os.environ['RANK']}").write_text("yes")
    eos = min(m.generator.eos_ids)
    comps = []
    for i, q in enumerate(queries):
        for j in range(cfg.samples_per_prompt):
            g = torch.Generator().manual_seed(ppo._seed(cfg.seed, it, j, *q))
            n = 1 + int(torch.randint(cfg.max_new_tokens - 1, (1,), generator=g))
            toks = torch.randint(100, 2000, (n,), generator=g).tolist()
            if int(torch.randint(2, (1,), generator=g)):
                toks.append(eos)
            comps.append(Completion(i, j, q, toks, [0.0] * len(toks), "", "stop" if toks[-1] == eos else "length"))
    return comps


recipe.make_accelerator = checked
recipe.generate = stub_generate
common = dict(
    model=model, out=out, batch_size=4, samples_per_prompt=2, max_new_tokens=6, temperature=1.0, lr=3e-4,
    precision="fp32", limit=16, max_steps=2, missing_eos_penalty=-1.0, grad_accum=2, warmup_steps=0,
)
reward_fn = lambda p, r, f: [len(x) / 10 for x in r]
if algo == "a2c":
    cfg = A2CConfig(**common, critic_model=model, kl_coef=0.1, entropy_coef=0.01)
    recipe.train_a2c(cfg, reward_fn=reward_fn, say=lambda *a: None)
elif algo == "a2c_head":  # the critic a value head on the policy's trunk (its own learning rate)
    cfg = A2CConfig(**common, critic="policy_head", value_head_lr=1e-2, kl_coef=0.1)
    recipe.train_a2c(cfg, reward_fn=reward_fn, say=lambda *a: None)
else:
    cls, train = (RLOOConfig, recipe.train_rloo) if algo == "rloo" else (GRPOConfig, recipe.train_grpo)
    # grpo1: one epoch over one minibatch, on-policy: old log-probs from the training pass, gathered after it
    passes = 1 if algo == "grpo1" else 2
    cfg = cls(**common, ppo_epochs=passes, num_minibatches=passes)
    train(cfg, reward_fn=reward_fn, say=lambda *a: None)
"""

KEYS = ["score", "score_raw", "kl", "kl_k3", "entropy", "reward", "beta", "response_length", "no_eos_fraction"]
KEYS += ["lr", "policy_loss", "grad_norm"]
ALGO_KEYS = {
    "a2c": ["pg_loss", "value_loss", "explained_variance", "value_mean", "return_mean"],
    "a2c_head": ["value_loss", "explained_variance", "value_mean", "return_mean"],
    "rloo": ["clipfrac", "approx_kl"],
    "grpo": ["kl_loss", "loss", "clipfrac", "approx_kl"],
    "grpo1": ["kl_loss", "loss", "clipfrac", "approx_kl"],
}


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    weights = load_file(str(path / "model" / "model.safetensors"))
    for name in ("model.safetensors", "value_head.safetensors"):  # critic rm, policy_head
        if (path / "critic" / name).exists():
            weights |= {f"critic.{k}": v for k, v in load_file(str(path / "critic" / name)).items()}
    return weights


@pytest.mark.parametrize(
    "algo, launcher",
    [(a, x) for a in ("a2c", "a2c_head", "rloo", "grpo", "grpo1") for x in ("ddp", "fsdp2", "zero2", "zero3")],
)
def test_two_processes_equal_one_process(algo, launcher, tiny_path, tmp_path):
    """2 processes x half the prompts == 1 process x all of them: the same metrics and weights;
    with DDP (torchrun), FSDP2 and DeepSpeed ZeRO-2 / ZeRO-3 (accelerate launch, examples/accelerate/; DeepSpeed
    where it is installed, forced onto the CPU processes: ``helpers.FORCE_DEEPSPEED_ON_CPU``). grpo1:
    GRPO on-policy (one epoch, one minibatch), whose KL and entropy come from the training pass."""
    from test_ppo_processes import LAUNCHERS

    if launcher.startswith("zero"):
        pytest.importorskip("deepspeed")
    (tmp_path / "worker.py").write_text(WORKER)
    root = str(Path(__file__).resolve().parents[1])  # the worker script lives in tmp_path: import this checkout
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([root, str(Path(root) / "tests"), os.environ.get("PYTHONPATH", "")]),
    }

    def run(command: list[str], name: str, n: int) -> subprocess.CompletedProcess:
        engine = (
            "single"
            if n == 1
            else {"ddp": "ddp", "fsdp2": "fsdp", "zero2": "deepspeed", "zero3": "deepspeed"}[launcher]
        )
        args = [*command, str(tmp_path / "worker.py"), str(tmp_path / name), tiny_path, str(n), algo, engine]
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)

    one = run([sys.executable], "one", 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(LAUNCHERS[launcher](), "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("two.rank*")) == ["two.rank0", "two.rank1"]
    assert len(list(tmp_path.glob("two.sharded*"))) == (0 if launcher == "ddp" else 2)
    rows = [read_metrics(tmp_path / r) for r in ("one", "two")]
    assert len(rows[0]) == len(rows[1]) == 2
    for key in KEYS + ALGO_KEYS[algo]:
        a, b = [r[key] for r in rows[0]], [r[key] for r in rows[1]]
        assert max(abs(x - y) / max(1.0, abs(x)) for x, y in zip(a, b)) < 1e-5, (key, a, b)  # relative above 1
    assert all(r["grad_norm"] > 0 for r in rows[0])  # the runs did something
    w_one, w_two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert w_one.keys() == w_two.keys() and any(k.startswith("critic.") for k in w_one) == algo.startswith("a2c")
    tol = 3e-5 if launcher == "zero3" else 1e-5  # ZeRO-3's fp32 reduce-scatter: 1.2e-5 seen after 2 steps
    assert max((w_one[k] - w_two[k]).abs().max().item() for k in w_one) < tol


def test_a_batch_that_leaves_a_process_without_prompts_is_refused():
    from rlhfkit.errors import UserError
    from rlhfkit.recipes.ppo_processes import check_sharing

    for batch_size, n_proc in [(4, 4), (3, 2), (7, 3)]:
        check_sharing(batch_size, n_proc)  # shares 1+1+1+1, 2+1, 3+3+1
    for batch_size, n_proc in [(5, 4), (1, 2)]:  # 2+2+1+0, 1+0
        with pytest.raises(UserError, match=f"batch_size={batch_size} prompts cannot be shared by {n_proc}"):
            check_sharing(batch_size, n_proc)
    check_sharing(6, 3, even=True)  # FSDP2's lockstep: equal shares only
    with pytest.raises(UserError, match="batch_size=7 prompts cannot be shared by 3 .* leave the last one fewer"):
        check_sharing(7, 3, even=True)
