"""Attention for training on a CPU: ``short_row_attention`` (plain attention for short rows,
registered with transformers by ``use_training_attention``) and the additive masks it is fast with
(``additive_attention_mask``, used by ``rlhfkit.models.heads`` for ready 4-D masks).
"""

from __future__ import annotations

import torch

SHORT_ROWS = 384  # tokens: up to here training on CPU uses short_row_attention's plain attention
ATTENTION_NAME = "rlhfkit_cpu"


def short_row_attention(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention for training on CPU: plain ``softmax(q kᵀ · scale + mask) v`` for rows of up to
    ``SHORT_ROWS`` tokens, PyTorch's SDPA (flash kernel) beyond; GPUs always take SDPA. Gemma 2's
    soft-capped scores (``softcap``: ``tanh(s / c) · c`` before the mask, as its eager attention
    does) always take the plain path: SDPA cannot soft-cap.

    Why: inside a compiled block (``rlhfkit.accel.compile``) plain attention becomes two batched
    matmuls and one fused softmax kernel, while SDPA's CPU kernels are slow for short rows (flash's
    backward) or compile to a slow masked ``_safe_softmax`` (math). Longer rows gain little and keep
    every layer's (T, T) scores for the backward, hence the limit (docs/performance.md).

    Masks are additive: transformers builds them with its eager-attention builder (``eager_mask``:
    0 where a query attends, the dtype's lowest value elsewhere, not -inf, so a fully masked padding
    row gives finite, ignored values instead of NaN); Inductor's softmax adds a float mask far faster
    than it applies a boolean one. A boolean (B, 1, T, S) mask (True = attend) or None (plain causal)
    still works. The model's saved config is unchanged.
    """
    if softcap is None and (query.device.type != "cpu" or key.shape[2] > SHORT_ROWS):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = query.shape[1] // key.shape[1]  # grouped-query attention: each k/v head serves `groups` q heads
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)).float() * scale  # (B, H, T, S)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
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
    """A ready 4-D boolean mask (True = attend; transformers passes such masks on unchanged) as an
    additive float mask (0 = attend, the lowest float elsewhere), unless ``model`` attends with SDPA,
    which takes the boolean one as it is.

    Why: ``short_row_attention`` is fast with the additive form, and the eager attention of
    transformers' models (Gemma 2's default: SDPA cannot soft-cap) *adds* the mask to the scores,
    so a boolean one would silently attend everywhere. A model wrapped beyond recognition (no
    ``config`` in reach) gets the additive mask, which every attention takes."""
    if mask.dim() != 4 or mask.dtype != torch.bool:
        return mask
    config = getattr(model, "config", None) or getattr(getattr(model, "module", None), "config", None)
    if getattr(config, "_attn_implementation", None) == "sdpa":
        return mask
    return torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, torch.finfo(torch.float32).min)


def training_attention_mismatch(model: torch.nn.Module) -> str | None:
    """None when ``short_row_attention`` gives ``model``'s own logits, else why not (a few words).

    Checked, not assumed: a family whose attention does more than scaled, masked softmax attention
    (attention sinks, an unusual mask) would train on other numbers. The model's logits for one
    short row with its own attention and with ours must agree to float rounding (eval mode, no
    grad, fp32 as loaded); on a mismatch the model keeps its own attention. Call before
    ``use_training_attention`` (which installs it for good) on a CPU model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kind = getattr(base.config, "model_type", type(base).__name__)
    if not hasattr(base, "set_attn_implementation") or not getattr(base, "_supports_attention_backend", False):
        return f"{kind}: no pluggable attention"
    own = base.config._attn_implementation
    ids = (torch.arange(12) * 89 % base.get_input_embeddings().num_embeddings).unsqueeze(0)
    modes = {m: m.training for m in base.modules()}
    base.eval()
    try:
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            before = base(input_ids=ids, use_cache=False).logits.float()
            use_training_attention(base, "cpu")
            after = base(input_ids=ids, use_cache=False).logits.float()
    finally:
        for m, training in modes.items():
            m.training = training
    if torch.allclose(after, before, rtol=1e-4, atol=1e-4 * float(before.abs().max())):
        return None
    base.set_attn_implementation(own)
    return f"{kind}: its attention is not plain softmax attention"


def use_training_attention(model: torch.nn.Module, device) -> bool:
    """Route ``model``'s attention through ``short_row_attention`` when training on CPU (GPUs keep
    their default); a peft-wrapped model passes the call on to its base model. Returns whether it did."""
    if torch.device(device).type != "cpu" or not hasattr(model, "set_attn_implementation"):
        return False
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    AttentionInterface.register(ATTENTION_NAME, short_row_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)  # additive masks (see short_row_attention)
    model.set_attn_implementation(ATTENTION_NAME)
    return model.config._attn_implementation == ATTENTION_NAME
