"""Compiled transformer blocks: finding a model's blocks, ``torch.compile`` on each, a visible
fallback to eager when compiling fails, and forgetting compiled variants between stages.
"""

from __future__ import annotations

import os
import shutil

import torch

from rlhfkit.config import TrainConfig
from rlhfkit.errors import UserError
from rlhfkit.models.loading import resolve_precision

_failed: list[str] = []  # the first compile error since fresh_compile_cache; every block then runs eagerly


def transformer_blocks(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The model's stack of identical transformer blocks (``model.layers`` for LLaMA-likes,
    ``transformer.h`` for GPT-2 ...): the ModuleList of ``config.num_hidden_layers`` modules of one class."""
    n = None
    for m in model.modules():
        n = getattr(getattr(m, "config", None), "num_hidden_layers", None)
        if n:
            break
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and n and len(m) == n and len({type(b) for b in m}) == 1:
            return m
    return None


def compile_choice(cfg: TrainConfig, device) -> str | None:
    """None when ``cfg.compile`` asks for compiled blocks on ``device``, else why not (a few words).

    ``auto`` compiles for bf16 training of all weights (not LoRA, not gradient checkpointing) on a
    CPU with a C++ compiler; ``on`` / ``off`` force it."""
    choice = str(cfg.compile).lower()
    if choice not in ("auto", "on", "off", "true", "false"):
        raise UserError(f"compile={cfg.compile!r}: expected auto, on or off")
    if choice in ("on", "true"):
        return None
    if choice in ("off", "false"):
        return "compile=off"
    if torch.device(device).type != "cpu":
        return torch.device(device).type
    if resolve_precision(cfg.precision, device) != "bf16":
        return "fp32"
    if cfg.lora:
        return "LoRA"
    if cfg.gradient_checkpointing:
        return "gradient checkpointing"
    if not (shutil.which("g++") or shutil.which("c++")):
        return "no C++ compiler"
    return None


def compile_blocks(model: torch.nn.Module, cfg: TrainConfig, device, say=print) -> int:
    """``torch.compile`` each transformer block of ``model`` in place, for training speed; returns
    how many blocks it compiled (0: none, see ``compile_choice``).

    Why: in an eager bf16 step most of the time outside the matmuls goes to small elementwise
    kernels and dtype casts (RMSNorm in fp32, RoPE, SiLU·up, residual adds, autocast's casts), which
    Inductor fuses. One block's graph serves all blocks (parameters are graph inputs) with dynamic
    shapes; Inductor's cache lives under ``$RLHFKIT_CACHE/torchinductor``. Parameter names,
    checkpoints and ``save_pretrained`` are unchanged.

    Compiling happens at a block's first call. If it fails, ``say`` reports the error once and every
    compiled block of the process runs its eager forward from then on (same numbers, slower).
    """
    if compile_choice(cfg, device) is not None:
        return 0
    blocks = transformer_blocks(model)
    if blocks is None:
        if str(cfg.compile).lower() == "auto":
            return 0
        raise UserError("compile=on: could not find the model's transformer blocks")
    from rlhfkit.models.loading import cache_dir

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "torchinductor"))
    from torch import _dynamo  # not `import torch._dynamo`: that would make `torch` local to this function

    _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 16)
    for b in blocks:
        b._compiled_call_impl = _eager_on_failure(b, torch.compile(b._call_impl, dynamic=True), say)
    return len(blocks)


def _eager_on_failure(block: torch.nn.Module, compiled, say):
    """``block``'s compiled forward, which on a compile error says so (once per process, see
    ``_failed``) and runs the eager forward instead, for this call and every later one.

    Why not ``torch._dynamo.config.suppress_errors``: it is process-wide and silent, so a stage
    would run several times slower without a word. ``TorchDynamoException`` covers Inductor's
    failures (``BackendCompilerFailed``) and tracing errors; an error of the model itself is raised
    again by the eager forward."""
    from torch._dynamo.exc import TorchDynamoException

    def forward(*args, **kwargs):
        if not _failed:
            try:
                return compiled(*args, **kwargs)
            except TorchDynamoException as e:
                cause = getattr(e, "inner_exception", None) or e  # BackendCompilerFailed wraps the backend's error
                first = (str(cause).strip().splitlines() or [""])[0][:300]
                _failed.append(f"{type(cause).__name__}: {first}")
                say(f"accel: torch.compile failed ({_failed[0]}); the transformer blocks run eagerly")
        block._compiled_call_impl = None  # nn.Module.__call__ takes the eager forward from now on
        return block._call_impl(*args, **kwargs)

    return forward


def fresh_compile_cache() -> None:
    """Forget the variants ``torch.compile`` made for the models of an earlier stage, and an
    earlier compile failure.

    Dynamo keeps compiled variants per code object, and every transformer block of every model in
    the process runs the same ``forward`` code, which holds at most ``cache_size_limit`` (16)
    variants: training and no-grad, fp32 and bf16 weights, with and without a mask, ... A variant
    beyond the limit runs eagerly, and an eager forward beside compiled ones differs by bf16
    rounding (a spurious KL in PPO). ``rlhfkit pipeline`` runs SFT, the reward model and PPO in one
    process, so each stage starts from an empty cache (``prepare_for_training``).
    """
    from torch import _dynamo

    _dynamo.reset()
    _failed.clear()
