"""PPO on several processes: ``torchrun --nproc_per_node 2`` (gloo on CPU) takes the step one process takes.

What is compared: the per-iteration metrics (losses, KL, scores, β, gradient norm, PPO-ptx loss)
and the final policy and critic weights of a 1-process and a 2-process run with the same global
batch and seed, within 1e-5 (fp32).

Two tests. ``test_ppo_two_processes_sample_what_one_process_samples``: one iteration with the real
rollout engine; each prompt has its own seed (run seed, iteration, its index in the data set) and
each of its samples its own stream (``SamplingParams.seed``, ``rollout.sampling.stream_key``), so
the 2 processes, each sampling its half of the prompts, sample the tokens the 1 process samples
for all of them (compared token for token), and the iteration's metrics agree.

``test_ppo_two_processes_equal_one_process``: two iterations and a crash/resume, with sampling
stubbed by a pure function of (seed, iteration, query, sample index). Why a stub there: after the
first update the two runs' weights differ in the last bits (gradients summed in another order),
and inverse-CDF sampling turns last-bit logit differences into a different token whenever the
random number lies that close to a boundary of the CDF: about 1 % of tokens over the tiny random
model's flat 49k-token distributions (seen: 1 to 7 of 16 samples differed in iteration 2). Exact
equality after an update needs sampling that is insensitive to last-bit differences (Gumbel-max
over per-row noise), not done yet. Everything after generation — scoring with a ``reward_fn``, the
no-grad forwards, the global advantage whitening, minibatches, gradient sums, the KL controller,
metrics, checkpoints and the final save — is the real code in both tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TORCHRUN, accelerate_launch

from rlhfkit.recipes.common import read_metrics

WORKER = r"""
import json
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
import rlhfkit.recipes.engines as engines
import rlhfkit.recipes.ppo as ppo
from rlhfkit.config import PPOConfig
from rlhfkit.rollout import Completion

out, model, expect, corpus, mode, engine = sys.argv[1:7]
expect = int(expect)
make = ppo.make_accelerator
if engine == "deepspeed" and not torch.cuda.is_available():
    from helpers import FORCE_DEEPSPEED_ON_CPU

    exec(FORCE_DEEPSPEED_ON_CPU)


def checked(cfg):  # inside each worker: there really are `expect` processes, and this is one of them
    acc = make(cfg)
    assert acc.num_processes == expect == int(os.environ.get("WORLD_SIZE", "1")), acc.num_processes
    assert engines.engine(acc) == engine, (engines.engine(acc), engine)
    Path(f"{out}.rank{acc.process_index}").write_text(f"{acc.num_processes} {engine}")
    return acc


real_update = ppo.update


def sharded_update(m, *args, **kwargs):  # FSDP2, DeepSpeed: this process holds a part of policy and critic
    if engine == "deepspeed":
        import deepspeed

        acc = args[-1].acc  # the Share
        ds = acc.deepspeed_engine_wrapped.engine
        stage = int(os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
        assert isinstance(ds, deepspeed.DeepSpeedEngine) and ds.zero_optimization_stage() == stage
        assert ds.module["policy"] is m.policy and m.whole is not None and m.generator.model is m.whole
        if stage == 3:  # each process holds a partition of each parameter
            params = [p for model in (m.policy, m.critic) for p in model.parameters()]
            assert sum(p.ds_tensor.numel() for p in params) < sum(p.ds_numel for p in params)
        Path(f"{out}.sharded{os.environ['RANK']}").write_text("yes")
    if engine == "fsdp":
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        models = [m.policy, m.critic]
        for module in (x for model in models for x in model.modules() if isinstance(x, FSDPModule)):
            module.reshard()  # groups kept whole after a forward (reshard_after_forward=False) hold shards again
        params = [p for model in models for p in model.parameters()]
        assert all(isinstance(p, DTensor) for p in params)
        assert sum(p.to_local().numel() for p in params) < sum(p.numel() for p in params)
        Path(f"{out}.sharded{os.environ['RANK']}").write_text("yes")
    return real_update(m, *args, **kwargs)


def stub_generate(m, cfg, queries, it, keys=None):  # the samples of a query do not depend on who samples it
    # what the generator would sample from: the first 64 weights of each of its model's tensors
    seen = torch.cat([p.detach().flatten()[:64] for p in m.generator.model.parameters()])
    torch.save(seen, f"{out}.generator{os.environ.get('RANK', '0')}-{it}.pt")
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


log_and_checkpoint = ppo.log_and_checkpoint


def crash_after_first(*args, **kwargs):  # mode 'crash': die right after iteration 1's checkpoint
    last = log_and_checkpoint(*args, **kwargs)
    raise SystemExit(3)


real_generate = ppo.generate


def recorded_generate(m, cfg, queries, it, keys=None):  # mode 'real': the engine's samples, written down
    comps = real_generate(m, cfg, queries, it, keys)
    with open(f"{out}.samples{os.environ.get('RANK', '0')}", "a") as f:
        for c in comps:
            f.write(json.dumps([it, queries[c.prompt_index], c.sample_index, c.token_ids]) + "\n")
    return comps


ppo.make_accelerator = checked
ppo.update = sharded_update
ppo.generate = recorded_generate if mode == "real" else stub_generate
if mode == "crash":
    ppo.log_and_checkpoint = crash_after_first
head = os.environ.get("TEST_CRITIC") == "policy_head"  # a value head on the policy's trunk, not a copy of the RM
critic = dict(critic="policy_head", value_head_lr=1e-2) if head else dict(critic_model=model)
cfg = PPOConfig(
    model=model, **critic, out=out, batch_size=4, samples_per_prompt=2, max_new_tokens=6,
    temperature=1.0, lr=3e-4, kl_coef=0.1, precision="fp32", limit=16, max_steps=1 if mode == "real" else 2,
    missing_eos_penalty=-1.0,
    num_minibatches=2, ppo_epochs=2, grad_accum=2, warmup_steps=0, save_every=0 if engine == "deepspeed" else 1,
    ptx_data=corpus, ptx_coef=0.5, ptx_batch_size=2, ptx_length=16, resume=mode == "resume",
)
ppo.train_ppo(cfg, reward_fn=lambda p, r, f: [len(x) / 10 for x in r], say=lambda *a: None)
"""


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    weights = load_file(str(path / "model" / "model.safetensors"))
    for name in ("model.safetensors", "value_head.safetensors"):  # critic rm, policy_head
        if (path / "critic" / name).exists():
            weights |= {f"critic.{k}": v for k, v in load_file(str(path / "critic" / name)).items()}
    return weights


def _runner(tmp_path: Path, model: str, critic: str = "rm"):
    """run(launcher, name, n, mode): the worker under ``launcher`` (python, or torchrun with 2 processes),
    PPO with ``critic`` (rm: a copy of the reward model; policy_head)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    (tmp_path / "worker.py").write_text(WORKER)
    root = str(Path(__file__).resolve().parents[1])  # the worker script lives in tmp_path: import this checkout
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([root, str(Path(root) / "tests"), os.environ.get("PYTHONPATH", "")]),
        "TEST_CRITIC": critic,
    }

    def run(launcher: list[str], name: str, n: int, mode: str = "full") -> subprocess.CompletedProcess:
        config = " ".join(launcher)
        engine = "ddp" if n > 1 else "single"
        engine = "fsdp" if "fsdp2.yaml" in config else "deepspeed" if "deepspeed_zero" in config else engine
        args = [*launcher, str(tmp_path / "worker.py"), str(tmp_path / name), model, str(n), str(corpus), mode, engine]
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)

    return run


LAUNCHERS = {
    "ddp": lambda: TORCHRUN,  # every process holds whole models
    "fsdp2": lambda: accelerate_launch("fsdp2"),  # as a user launches FSDP2: policy and critic sharded
    "zero2": lambda: accelerate_launch("deepspeed_zero2"),  # DeepSpeed: policy and critic in one engine
    "zero3": lambda: accelerate_launch("deepspeed_zero3"),
}


KEYS = ["score", "score_raw", "kl", "kl_k3", "entropy", "reward", "beta", "explained_variance"]
KEYS += ["value_mean", "return_mean", "response_length", "no_eos_fraction", "lr"]
KEYS += ["policy_loss", "value_loss", "clipfrac", "approx_kl", "ratio_mean", "grad_norm", "ptx_loss"]


def _same(a: list[float], b: list[float], tol: float) -> bool:
    """Equal within tol, relative for values above 1 (an explained variance of -88 in fp32)."""
    return len(a) == len(b) and max(abs(x - y) / max(1.0, abs(x)) for x, y in zip(a, b)) < tol


@pytest.mark.parametrize("launcher", ["ddp", "fsdp2"])
def test_ppo_two_processes_sample_what_one_process_samples(launcher, tiny_path, tmp_path):
    """One iteration with the real engine: every (prompt, sample) has the same tokens whether one
    process generates all prompts or two processes generate half each (under FSDP2 from the whole
    copy gathered from the shards), and the metrics agree."""
    run = _runner(tmp_path, tiny_path)
    one = run([sys.executable], "one", 1, "real")
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(LAUNCHERS[launcher](), "two", 2, "real")
    assert two.returncode == 0, two.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("two.rank*")) == ["two.rank0", "two.rank1"]
    assert len(list(tmp_path.glob("two.sharded*"))) == (2 if launcher == "fsdp2" else 0)

    def samples(*files):
        rows = [json.loads(line) for f in files for line in f.read_text().splitlines()]
        return {(it, tuple(query), s): tokens for it, query, s, tokens in rows}

    a = samples(tmp_path / "one.samples0")
    b = samples(tmp_path / "two.samples0", tmp_path / "two.samples1")
    assert len(a) == 8 and a == b  # 4 prompts x 2 samples, split 2 + 2 prompts over the processes
    assert len({tuple(t) for t in a.values()}) == 8  # real, different samples
    rows = [read_metrics(tmp_path / r) for r in ("one", "two")]
    assert len(rows[0]) == len(rows[1]) == 1
    for key in KEYS:
        assert _same([r[key] for r in rows[0]], [r[key] for r in rows[1]], 1e-5), key


@pytest.mark.parametrize("launcher", ["ddp", "fsdp2", "fsdp2-head"])
def test_ppo_two_processes_equal_one_process(launcher, tiny_path, tmp_path):
    """2 processes x half the prompts == 1 process x all of them (sampling stubbed, see the module
    docstring): the same metrics and weights; and a 2-process run killed after iteration 1 and
    resumed ends as the uninterrupted one. Under FSDP2 the checkpoints hold whole weights and
    optimizer state, gathered from the shards, and the resumed run shards them again. fsdp2-head:
    critic=policy_head, the value head an FSDP2 unit of its own (a DTensor: asserted in the workers)."""
    launcher, _, head = launcher.partition("-")
    run = _runner(tmp_path, tiny_path, "policy_head" if head else "rm")
    torchrun = LAUNCHERS[launcher]()
    one = run([sys.executable], "one", 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(torchrun, "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("two.rank*")) == ["two.rank0", "two.rank1"]
    assert len(list(tmp_path.glob("two.sharded*"))) == (2 if launcher == "fsdp2" else 0)
    rows = [read_metrics(tmp_path / r) for r in ("one", "two")]
    assert len(rows[0]) == len(rows[1]) == 2
    keys = KEYS
    for key in keys:
        a, b = [r[key] for r in rows[0]], [r[key] for r in rows[1]]
        assert _same(a, b, 1e-5), (key, a, b)
    assert rows[0][0]["policy_loss"] != rows[0][1]["policy_loss"]  # the runs did something
    # the generator samples from the current policy on every process (FSDP2: a whole copy, refreshed)
    seen = {f.name[: -len(".pt")]: torch.load(f) for f in tmp_path.glob("*.generator*.pt")}
    assert len(seen) == 6 and (seen["one.generator0-1"] - seen["one.generator0-0"]).abs().max() > 1e-4  # stepped
    for rank, it in [(r, i) for r in (0, 1) for i in (0, 1)]:
        assert (seen[f"two.generator{rank}-{it}"] - seen[f"one.generator0-{it}"]).abs().max() < 1e-5, (rank, it)
    w_one, w_two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert w_one.keys() == w_two.keys()
    assert max((w_one[k] - w_two[k]).abs().max().item() for k in w_one) < 1e-5
    assert (tmp_path / "two" / "checkpoints").exists()

    crashed = run(torchrun, "resumed", 2, "crash")
    assert crashed.returncode != 0 and not (tmp_path / "resumed" / "model").exists(), crashed.stderr[-3000:]
    assert len(read_metrics(tmp_path / "resumed")) == 1
    resumed = run(torchrun, "resumed", 2, "resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = read_metrics(tmp_path / "resumed")
    for key in keys:
        a, b = [r[key] for r in rows[1]], [r[key] for r in again]
        assert len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < 1e-6, (key, a, b)
    w_resumed = _weights(tmp_path / "resumed")
    assert max((w_two[k] - w_resumed[k]).abs().max().item() for k in w_two) < 1e-6


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_ppo_under_deepspeed_equals_one_process(stage, tiny_path, tmp_path):
    """PPO (critic = a reward-model copy, PPO-ptx on) under ``deepspeed_zero2.yaml`` / ``_zero3.yaml``,
    2 processes: policy and critic in one DeepSpeed engine (its stage asserted inside each process),
    which reduces, clips and steps; the generator samples from a whole copy refreshed every iteration;
    the same metrics, generator weights and final weights as 1 process. ZeRO-3 copies a gradient
    partition in a step's first backward and adds in the later ones: the critic's and the policy's
    losses go into one backward there (a critic-only first backward made the policy's gradients add
    to the last step's: grad_norm 3.6 vs 2.9). DeepSpeed runs on CPUs through its own CPU
    accelerator; accelerate starts it on CUDA only, so the worker makes its state say DEEPSPEED
    (``helpers.FORCE_DEEPSPEED_ON_CPU``). Skips where ``deepspeed`` is not installed (CI)."""
    pytest.importorskip("deepspeed")
    run = _runner(tmp_path, tiny_path)
    one = run([sys.executable], "one", 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(LAUNCHERS[stage](), "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("two.rank*")) == ["two.rank0", "two.rank1"]
    assert len(list(tmp_path.glob("two.sharded*"))) == 2
    rows = [read_metrics(tmp_path / r) for r in ("one", "two")]
    assert len(rows[0]) == len(rows[1]) == 2
    tol = 3e-5 if stage == "zero3" else 1e-5  # ZeRO-3's fp32 reduce-scatter (as tests/test_rl_processes.py)
    for key in KEYS:
        a, b = [r[key] for r in rows[0]], [r[key] for r in rows[1]]
        assert _same(a, b, tol), (key, a, b)
    seen = {f.name[: -len(".pt")]: torch.load(f) for f in tmp_path.glob("*.generator*.pt")}
    for rank, it in [(r, i) for r in (0, 1) for i in (0, 1)]:
        assert (seen[f"two.generator{rank}-{it}"] - seen[f"one.generator0-{it}"]).abs().max() < tol, (rank, it)
    w_one, w_two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert w_one.keys() == w_two.keys()
    assert max((w_one[k] - w_two[k]).abs().max().item() for k in w_one) < tol
