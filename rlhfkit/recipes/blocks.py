"""The transformer blocks of a model in training: finding them, compiling them (``torch.compile``
per block), forgetting compiled variants between stages, and the attention that is fast on CPU
for short rows (``short_row_attention``, registered with transformers by
``use_training_attention``). Used by the SFT, reward-model and PPO recipes and by
``rlhfkit.models.heads`` (additive masks).
"""

from __future__ import annotations

import os
import shutil

import torch

from rlhfkit.config import TrainConfig
from rlhfkit.errors import UserError
from rlhfkit.models.loading import resolve_precision

SHORT_ROWS = 384  # tokens: up to here training on CPU uses short_row_attention's plain attention
ATTENTION_NAME = "rlhfkit_cpu"


def short_row_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                        **kwargs) -> tuple[torch.Tensor, None]:
    """Attention for training on CPU: plain ``softmax(q kᵀ · scale + mask) v`` for rows of up to
    ``SHORT_ROWS`` tokens, PyTorch's SDPA (flash kernel) beyond; GPUs always take SDPA.

    Why: the training stages ``torch.compile`` each block (``compile_blocks``). Inside a compiled
    block, plain attention becomes two batched matmuls and one fused softmax kernel, while SDPA's
    CPU kernels are slow for short rows (flash's backward) or compile to a slow masked
    ``_safe_softmax`` (math). A SmolLM2-135M training step was 9–15 % faster up to 320 tokens; at
    512 only 4 %, for over 1 GB more resident memory (the (T, T) scores of every layer are kept for
    the backward), hence the limit.

    Masks are additive: transformers builds them with its eager-attention builder (``eager_mask``:
    0 where a query attends, the dtype's lowest value elsewhere, not -inf, so a fully masked padding
    row gives finite, ignored values instead of NaN). Inductor's softmax kernel adds a float mask
    far faster than it applies a boolean one (per-lane mask conversions; ~25 % less attention time
    per layer). A boolean (B, 1, T, S) mask (True = attend) or None (plain causal) still works.
    Registered with transformers' ``AttentionInterface`` (``use_training_attention``); the model's
    saved config is unchanged.
    """
    if query.device.type != "cpu" or key.shape[2] > SHORT_ROWS:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    groups = query.shape[1] // key.shape[1]  # grouped-query attention: each k/v head serves `groups` q heads
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)).float() * scale  # (B, H, T, S)
    lowest = torch.finfo(scores.dtype).min
    if attention_mask is None:
        t, s = scores.shape[-2:]
        causal = torch.ones(t, s, dtype=torch.bool, device=scores.device).tril(s - t)
        scores = scores.masked_fill(~causal, lowest)
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, lowest)
    else:
        scores = scores + attention_mask[..., : key.shape[2]]
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    if dropout > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def additive_attention_mask(model: torch.nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """A ready 4-D boolean mask (True = attend; transformers passes such masks on unchanged) as
    the additive float mask ``short_row_attention`` is fast with, when ``model`` attends with it;
    otherwise ``mask`` itself."""
    if mask.dim() != 4 or mask.dtype != torch.bool or getattr(model.config, "_attn_implementation", None) != ATTENTION_NAME:
        return mask
    return torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, torch.finfo(torch.float32).min)


def use_training_attention(model: torch.nn.Module, device) -> bool:
    """Route ``model``'s attention through ``short_row_attention`` when training on CPU (GPUs keep
    their default). Call before LoRA wraps the model. Returns whether it did."""
    if torch.device(device).type != "cpu" or not hasattr(model, "set_attn_implementation"):
        return False
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    AttentionInterface.register(ATTENTION_NAME, short_row_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)  # additive masks (see short_row_attention)
    model.set_attn_implementation(ATTENTION_NAME)
    return model.config._attn_implementation == ATTENTION_NAME


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


def compile_blocks(model: torch.nn.Module, cfg: TrainConfig, device, say=print) -> bool:
    """``torch.compile`` each transformer block of ``model`` in place, for training speed.

    Why: in an eager bf16 step most of the time outside the matmuls goes to small elementwise
    kernels and dtype casts (RMSNorm in fp32, RoPE, SiLU·up, residual adds, autocast's casts).
    Inductor fuses them: a SmolLM2-135M training step ~1.4x faster. One block's graph serves
    all blocks (parameters are graph inputs), with dynamic shapes, so the one-time compile is
    ~10–30 s; Inductor's cache lives under ``$RLHFKIT_CACHE/torchinductor`` and later runs
    reuse it. Parameter names, checkpoints and ``save_pretrained`` are unchanged.

    ``cfg.compile``: ``auto`` compiles for bf16 training of all weights (not LoRA, not gradient
    checkpointing) where a C++ compiler exists; ``on`` / ``off`` force it. Returns whether it did.
    """
    choice = str(cfg.compile).lower()
    if choice not in ("auto", "on", "off", "true", "false"):
        raise UserError(f"compile={cfg.compile!r}: expected auto, on or off")
    if choice in ("off", "false"):
        return False
    if choice == "auto":
        if resolve_precision(cfg.precision, device) != "bf16" or cfg.lora or cfg.gradient_checkpointing:
            return False
        if torch.device(device).type == "cpu" and not (shutil.which("g++") or shutil.which("c++")):
            say("compile=auto: no C++ compiler found, training runs eagerly")
            return False
    blocks = transformer_blocks(model)
    if blocks is None:
        if choice == "auto":
            return False
        raise UserError("compile=on: could not find the model's transformer blocks")
    from rlhfkit.models.loading import cache_dir

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "torchinductor"))
    from torch import _dynamo  # not `import torch._dynamo`: that would make `torch` local to this function

    _dynamo.config.suppress_errors = True  # a block that fails to compile runs eagerly
    _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 16)
    if torch.device(device).type == "cpu" and resolve_precision(cfg.precision, device) == "bf16":
        from rlhfkit.recipes.swiglu import use_swiglu_function

        use_swiglu_function(model)
        # AOTAutograd's on-disk cache skips graphs with custom autograd functions unless told: dynamo
        # traces SwiGLU's forward and backward into the graph, so their ops are part of its key
        # (checked: editing the backward misses the cache). Without it, +5 s per process.
        from torch._functorch import config as functorch_config

        functorch_config.autograd_cache_allow_custom_autograd_functions = True
    for b in blocks:
        b.compile(dynamic=True)
    return True


def fresh_compile_cache() -> None:
    """Forget the variants ``torch.compile`` made for the models of an earlier stage.

    Dynamo keeps compiled variants per code object, and every transformer block of every model in
    the process runs the same ``forward`` code, which holds at most ``cache_size_limit`` (16)
    variants: training and no-grad, fp32 and bf16 weights, with and without a mask, ... A variant
    beyond the limit runs eagerly. ``rlhfkit pipeline`` runs SFT, the reward model and PPO in one
    process: in the demo the variants of SFT and the RM had filled the cache when PPO hit a new one
    mid-run; its forwards then ran ~2.5x slower, and an eager forward beside compiled ones differs
    by bf16 rounding (a spurious KL). Each training stage calls this before it compiles its models
    (the models of the stage before are gone by then); PPO alone needs 4 variants.
    """
    from torch import _dynamo

    _dynamo.reset()
