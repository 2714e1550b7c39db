"""bf16 matmul weights for frozen models: what bf16 autocast would cast them to at every forward,
stored once."""

from __future__ import annotations

import torch
from torch import nn


def bf16_matmul_weights(model: nn.Module) -> int:
    """Store a frozen model's fp32 Linear weights in bf16: exactly the values bf16 autocast casts
    them to at every forward, so its forwards under autocast give bitwise the same results, with
    half the memory for those weights and no per-forward cast. Returns how many Linear layers it
    converted (0 for a model without fp32 Linear weights, which it leaves as it is).

    For PPO's reference. The embedding and the norms stay fp32 (the residual stream stays fp32 as
    in the policy's forward), and so does a head tied to the embedding (converting it would convert
    the embedding too), so the reference's log-probs equal the policy's at step 0 — KL exactly 0.
    Casting the whole model to bf16 instead would put the residual stream in bf16: a KL of nearly a
    nat per sequence at step 0.
    """
    tied = model.get_input_embeddings().weight
    linears = [m for m in model.modules() if type(m) is nn.Linear and m.weight is not tied]
    linears = [m for m in linears if m.weight.dtype == torch.float32]
    converted = set()
    for m in linears:
        for p in (m.weight, m.bias):
            if p is not None:
                p.data = p.data.to(torch.bfloat16)
                converted.add(id(p))
    if not linears:
        return 0
    # The rest gets memory of its own: the checkpoint is memory-mapped, and while any tensor still
    # views the file, every page of it that was read (all of them, by the conversion) stays in RSS.
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in converted:
            t.data = t.data.clone()
    return len(linears)
