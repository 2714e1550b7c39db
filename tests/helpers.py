"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

ACCELERATE_CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "accelerate"
TORCHRUN = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2"]
"""2 processes with whole models (DDP over gloo on CPU): torchrun, since ``accelerate launch --cpu
--num_processes 2`` starts one process under accelerate 1.16 (docs/distributed.md)."""


def free_port() -> int:
    """A TCP port nobody listens on now, for a launcher's rendezvous (tests run side by side)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(config: str) -> list[str]:
    """``accelerate launch`` with ``examples/accelerate/<config>.yaml`` (2 processes) on a free port,
    as a user launches it; the script and its arguments follow."""
    accelerate = str(Path(sys.executable).parent / "accelerate")
    config_file = str(ACCELERATE_CONFIGS / f"{config}.yaml")
    return [accelerate, "launch", "--config_file", config_file, "--main_process_port", str(free_port())]


MACHINE_METRICS = frozenset(
    {"time", "time_generate", "time_score", "time_forward", "time_train", "time_iteration", "rss_mb", "peak_rss_mb"}
)
"""PPO metrics of the machine (seconds, memory): they differ between two runs of the same trajectory."""


def newline_reward(prompts, responses, finished) -> list[float]:
    """A synthetic reward for RL smoke tests: a quarter point per newline of the response."""
    return [r.count("\n") / 4 for r in responses]


class Crash(Exception):
    """A simulated crash, raised right after a checkpoint was (or would have been) written."""


def crash_after(monkeypatch, recipe, step: int) -> None:
    """Make ``recipe``'s run (the module ``rlhfkit.recipes.sft``, ``reward``, ``dpo``) die with
    ``Crash`` right after its periodic checkpoint of optimizer step ``step``: resume tests."""
    real = recipe.periodic_checkpoint

    def checkpoint_then_crash(acc, cfg, out, done, *args):
        real(acc, cfg, out, done, *args)
        if done >= step:
            raise Crash(done)

    monkeypatch.setattr(recipe, "periodic_checkpoint", checkpoint_then_crash)


FORCE_DEEPSPEED_ON_CPU = r"""
# accelerate starts DeepSpeed on CUDA devices only (AcceleratorState); DeepSpeed's own CPU
# accelerator runs over gloo: let accelerate's state say DEEPSPEED here, as it would on GPUs
import accelerate.state as state
from accelerate.utils import DistributedType

real_init = state.AcceleratorState.__init__


def init(self, mixed_precision=None, cpu=False, *args, **kwargs):
    real_init(self, mixed_precision, cpu, *args, **kwargs)
    plugin = kwargs.get("deepspeed_plugin")
    if self.distributed_type == DistributedType.MULTI_CPU and plugin is not None:
        plugin.set_mixed_precision(self._mixed_precision)
        plugin.select(_from_accelerator_state=True)
        self.deepspeed_plugins = plugin
        self.distributed_type = DistributedType.DEEPSPEED
        state.PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED


state.AcceleratorState.__init__ = init
"""
"""Worker code (``exec`` it) that makes a 2-process CPU launch of a DeepSpeed config run DeepSpeed."""
