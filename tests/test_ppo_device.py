"""PPO makes every tensor on the policy's device — checked without a GPU.

The bug this guards against: PPO built its batch tensors (``make_batch``, ``cut_responses``,
``ptx_loss``, the reward_fn scores, the minibatch permutations …) with ``torch.full`` /
``torch.tensor`` / ``torch.arange`` and no ``device=``, i.e. on the *default* device (the CPU),
while the policy lived on the GPU: the first CUDA user would have crashed. On a CPU-only CI the
default device and the policy's device are the same, so a plain run cannot see it.

How the test sees it anyway: ``ElsewhereByDefault`` is a ``TorchFunctionMode`` that makes the
default device *differ* from the policy's, for PPO's own code only. Every tensor factory
(``torch.tensor``, ``zeros``, ``full``, ``arange``, ``randperm`` …) called from
``rlhfkit/recipes/ppo.py``, ``ppo_models.py``, ``ppo_processes.py``, ``pretrain.py`` (PPO-ptx) or
``rlhfkit/algos/ppo.py`` without an explicit ``device=`` is redirected to the ``meta`` device —
what a CUDA run does to it (it lands on the CPU, away from the model) — and its call site is
recorded. A meta tensor mixed with the model's CPU tensors fails like a CPU tensor mixed with CUDA
ones (stricter: ``.tolist()`` and ``.item()`` of it fail too), and any redirect that happens not to
crash is still reported by the assertion on the recorded call sites. Tensors derived from others
(``x + y``, ``zeros_like``, indexing) follow their inputs, so a factory with ``device=`` at the one
boundary where rollout data enters (``cut_responses``) keeps the whole iteration on the policy's
device. Library code PPO calls (transformers, the rollout engine) is not redirected: only PPO's own
files are under test.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import rlhfkit.algos.ppo as algos_ppo
import rlhfkit.recipes.ppo as recipe_ppo
import rlhfkit.recipes.ppo_models as ppo_models
import rlhfkit.recipes.ppo_processes as ppo_processes
import rlhfkit.recipes.pretrain as pretrain
from rlhfkit.config import PPOConfig
from rlhfkit.recipes.common import read_metrics

PPO_FILES = {str(Path(mod.__file__).resolve()) for mod in (algos_ppo, recipe_ppo, ppo_models, ppo_processes, pretrain)}
TORCH_DIR = str(Path(torch.__file__).resolve().parent)
FACTORIES = {
    torch.tensor,
    torch.as_tensor,
    torch.zeros,
    torch.ones,
    torch.full,
    torch.empty,
    torch.arange,
    torch.randperm,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.linspace,
    torch.eye,
}


class ElsewhereByDefault(TorchFunctionMode):
    """Redirects PPO's device-less tensor factories to ``meta`` and records their call sites."""

    def __init__(self):
        super().__init__()
        self.redirected: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in FACTORIES and kwargs.get("device") is None:
            keeps_device = func is torch.as_tensor and args and isinstance(args[0], torch.Tensor)
            site = _caller()
            if site is not None and not keeps_device:
                self.redirected.append(site)
                kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _caller() -> str | None:
    """``file:line`` of the factory's caller when it is one of PPO's files, else None."""
    frame = sys._getframe(2)
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(TORCH_DIR):
        frame = frame.f_back
    if frame is None:
        return None
    path = str(Path(frame.f_code.co_filename).resolve())
    return f"{Path(path).name}:{frame.f_lineno}" if path in PPO_FILES else None


def _sites(mode: ElsewhereByDefault) -> list[str]:
    return sorted(set(mode.redirected))


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_the_check_catches_a_device_less_factory_in_ppo_code():
    """The mode redirects (and records) ``torch.zeros(2)`` written in ppo_models.py, and leaves
    factories with ``device=`` and calls from other files alone."""
    code = compile("a = torch.zeros(2)\nb = torch.zeros(2, device='cpu')\n", ppo_models.__file__, "exec")
    scope = {"torch": torch}
    with ElsewhereByDefault() as mode:
        exec(code, scope)
        c = torch.zeros(2)  # this test file: not PPO's
    assert scope["a"].device.type == "meta" and scope["b"].device.type == "cpu" and c.device.type == "cpu"
    assert mode.redirected == ["ppo_models.py:1"]


def _cfg(tiny_path: str, out: Path, **kw) -> PPOConfig:
    base = dict(
        model=tiny_path,
        critic_model=tiny_path,
        out=str(out),
        batch_size=2,
        samples_per_prompt=2,
        max_new_tokens=4,
        temperature=1.0,
        precision="fp32",
        limit=8,
        max_steps=1,
        missing_eos_penalty=-1.0,
    )
    return PPOConfig(**(base | kw))


@pytest.mark.parametrize("variant", ["reward_fn+policy_head+group", "reward_model+rm_critic+ptx"])
def test_ppo_makes_every_tensor_on_the_policy_device(tiny_path, tmp_path, variant):
    """One PPO iteration (generate, score, forwards, advantages, update, log) with PPO's
    device-less factories sent elsewhere: it must run and none may have been redirected."""
    out = tmp_path / "ppo"
    if variant.startswith("reward_fn"):
        cfg = _cfg(tiny_path, out, critic="policy_head", score_baseline="group", num_minibatches=2)
        kwargs = {"reward_fn": lambda p, r, f: [float(len(x)) for x in r]}
    else:
        corpus = tmp_path / "corpus.txt"
        corpus.write_text("The quick brown fox jumps over the lazy dog. " * 20)
        cfg = _cfg(
            tiny_path,
            out,
            critic_model="",
            reward_model=tiny_path,
            ptx_data=str(corpus),
            ptx_coef=0.5,
            ptx_batch_size=2,
            ptx_length=16,
            grad_accum=2,
        )
        kwargs = {}
    mode = ElsewhereByDefault()
    try:
        with mode:
            result = recipe_ppo.train_ppo(cfg, say=lambda *a: None, **kwargs)
    except Exception as e:  # a tensor off the policy's device was mixed in: say where it was made
        raise AssertionError(f"PPO failed ({e!r}); tensors made without device= at {_sites(mode)}") from e
    assert mode.redirected == [], f"tensors made without device= in PPO code at {_sites(mode)}"
    row = read_metrics(out)[0]
    assert math.isfinite(result["score"]) and math.isfinite(row["policy_loss"])
