"""The one call each training stage makes per model: ``prepare_for_training`` for the models it
trains, ``prepare_for_inference`` for frozen ones compared with them (PPO's reference and reward
model). Each applies what fits the device and the config and says so in one line.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhfkit.accel.attention import training_attention_mismatch, use_training_attention
from rlhfkit.accel.compile import compile_blocks, compile_choice, fresh_compile_cache
from rlhfkit.accel.swiglu import use_swiglu_function
from rlhfkit.accel.weights import bf16_matmul_weights
from rlhfkit.config import TrainConfig
from rlhfkit.models.loading import resolve_precision


@dataclass
class Applied:
    """What ``prepare_for_*`` applied to one model."""

    skipped: str = ""  # why nothing was applied (the device type), or ""
    attention: bool = False  # CPU training attention (accel/attention.py)
    no_attention: str = ""  # why not, on a CPU (training_attention_mismatch), or ""
    blocks: int = 0  # transformer blocks compiled (accel/compile.py)
    not_compiled: str = ""  # why the blocks were not compiled, or ""
    swiglu: int = 0  # MLPs routed through SwiGLU's hand-written backward (accel/swiglu.py)
    no_swiglu: str = ""  # why none were, where compiled bf16 blocks would have used it, or ""
    bf16_weights: int = 0  # Linear layers whose weights are stored in bf16 (accel/weights.py)

    def __str__(self) -> str:
        if self.skipped:
            return f"none ({self.skipped})"
        parts = ["CPU attention"] if self.attention else []
        if self.no_attention:
            parts.append(f"no CPU attention ({self.no_attention})")
        if self.blocks:
            parts.append(f"compiled {self.blocks} blocks (torch.compile at first use; cached on disk)")
        elif self.not_compiled:
            parts.append(f"not compiled ({self.not_compiled})")
        if self.swiglu:
            parts.append(f"SwiGLU backward in {self.swiglu} MLPs")
        elif self.no_swiglu:
            parts.append(f"no SwiGLU backward ({self.no_swiglu})")
        if self.bf16_weights:
            parts.append(f"bf16 matmul weights in {self.bf16_weights} layers")
        return ", ".join(parts) or "none"


def prepare_for_training(model: torch.nn.Module, cfg: TrainConfig, device, say=print, name: str = "model") -> Applied:
    """Apply the CPU speed techniques to ``model``, which a stage is about to train (LoRA-wrapped
    already, if at all): the CPU training attention (where it gives the model's own logits, see
    ``training_attention_mismatch``), compiled blocks (``cfg.compile``, see ``compile_choice``) and,
    in compiled bf16 blocks, SwiGLU's backward (LLaMA-style MLPs only). What a family cannot take is
    skipped, and the line says why. On other devices nothing, unless compile=on asks for compiled
    blocks there.

    It forgets the compiled variants of an earlier stage in this process (``fresh_compile_cache``):
    call it for each model of a stage before the first forward of any of them.
    """
    kind = torch.device(device).type
    if kind != "cpu" and compile_choice(cfg, device) is not None:
        return _say(Applied(skipped=kind), name, say)
    fresh_compile_cache()
    applied = Applied(no_attention=(training_attention_mismatch(model) or "") if kind == "cpu" else "")
    applied.attention = not applied.no_attention and use_training_attention(model, device)
    applied.blocks = compile_blocks(model, cfg, device, say)
    applied.not_compiled = "" if applied.blocks else compile_choice(cfg, device) or "no transformer blocks found"
    if applied.blocks and kind == "cpu" and resolve_precision(cfg.precision, device) == "bf16":
        applied.swiglu = _use_swiglu(model)
        if not applied.swiglu:
            applied.no_swiglu = f"{_model_type(model)}: no LLaMA-style SiLU-gated MLP"
    return _say(applied, name, say)


def prepare_for_inference(
    model: torch.nn.Module, cfg: TrainConfig, device, like: Applied, say=print, name: str = "model"
) -> Applied:
    """Give a frozen ``model`` the forward of the trained model it is compared with (``like``, what
    ``prepare_for_training`` applied to it): the same attention, compiled blocks and SwiGLU, and
    under bf16 its Linear weights stored in bf16.

    Why the same kernels: a compiled and an eager bf16 forward of the same weights differ by bf16
    rounding on every token (Inductor fuses elementwise work without rounding in between); for
    PPO's reference that is a spurious KL at step 0, with the policy's kernels it is exactly 0.
    """
    kind = torch.device(device).type
    if kind != "cpu" and not like.blocks:
        return _say(Applied(skipped=kind), name, say)
    applied = Applied(
        attention=like.attention and use_training_attention(model, device), no_attention=like.no_attention
    )
    if kind == "cpu" and resolve_precision(cfg.precision, device) == "bf16":
        applied.bf16_weights = bf16_matmul_weights(model)
    if like.blocks:
        applied.blocks = compile_blocks(model, cfg, device, say)
        if like.swiglu:
            applied.swiglu = _use_swiglu(model)
        applied.no_swiglu = like.no_swiglu
    return _say(applied, name, say)


def _model_type(model: torch.nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def _say(applied: Applied, name: str, say) -> Applied:
    say(f"accel ({name}): {applied}")
    return applied


def _use_swiglu(model: torch.nn.Module) -> int:
    # AOTAutograd's on-disk cache skips graphs with custom autograd functions unless told: dynamo
    # traces SwiGLU's forward and backward into the graph, so their ops are part of its key.
    from torch._functorch import config as functorch_config

    functorch_config.autograd_cache_allow_custom_autograd_functions = True
    return use_swiglu_function(model)
