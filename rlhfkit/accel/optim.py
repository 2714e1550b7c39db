"""Optimizer-side CPU techniques: gradient clipping fused into AdamW's step (``clip_and_step``),
trained parameters copied out of the checkpoint's file mapping (``own_memory``) and AdamW's moments
allocated before the first step (``allocate_adamw_state``). ``make_optimizer`` applies the last two
on CPU; every training stage steps through ``clip_and_step`` where each process holds whole
gradients (one process, DDP; ``recipes/engines.optimizer_step``; under FSDP and DeepSpeed, accelerate's
``clip_grad_norm_``).
"""

from __future__ import annotations

import torch


def clip_and_step(optimizer, params, max_norm: float) -> torch.Tensor | None:
    """Clip the gradients of ``params`` to a total L2 norm of ``max_norm``, as
    ``torch.nn.utils.clip_grad_norm_`` does (``max_norm <= 0``: no clipping), then take the
    optimizer step. Returns the total norm before clipping (None without clipping).

    Why not ``clip_grad_norm_``: it reads every gradient twice besides the step, once for the norm
    (``_foreach_norm``, far below a CPU's memory bandwidth) and once to scale it in place.
    Here the norm is a sum of BLAS dot products, and the clip factor goes to fused AdamW as its
    ``grad_scale`` (the hook PyTorch's GradScaler uses: the kernel divides each gradient by it as it
    reads it), so clipping costs no pass of its own. The same update up to float rounding (tested).
    A non-fused optimizer gets the gradients scaled in place.
    """
    if max_norm <= 0:
        optimizer.step()
        return None
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        optimizer.step()
        return torch.zeros(())
    flat = [g.reshape(-1).float() for g in grads]
    norm = torch.stack([torch.dot(g, g) for g in flat]).sum().sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
    if isinstance(inner, torch.optim.Adam | torch.optim.AdamW) and inner.defaults.get("fused"):
        inner.grad_scale = (1.0 / coef).to(torch.float32)
        try:
            optimizer.step()
        finally:
            del inner.grad_scale
    else:
        torch._foreach_mul_(grads, coef.to(grads[0].device))
        optimizer.step()
    return norm


def own_memory(params: list[torch.nn.Parameter]) -> None:
    """Copy each trained parameter into memory of its own, out of the file it was loaded from.

    Why: transformers loads safetensors zero-copy, so a parameter's data is a private mapping of
    the checkpoint file. The first optimizer step then writes every page of it and the kernel
    copies each 4 KiB page on write, many times slower than one ``clone``. Frozen models (the PPO
    reference, a judge) keep the mapping: it costs nothing until written.
    """
    with torch.no_grad():
        for p in params:
            p.data = p.data.clone()


def allocate_adamw_state(opt: torch.optim.AdamW) -> None:
    """Allocate AdamW's moments now, exactly as its first ``step`` would (``torch/optim/adam.py:
    _init_group``, fused: a float32 ``step`` tensor on the parameter's device, zero moments).

    Why: allocated lazily, the moments (8 bytes per parameter) take the memory that the first
    step's activations just freed, so the second step's activations fault in fresh pages.
    Allocated first, the activations' memory is reused from the second step on. Same numbers
    either way (test).
    """
    for group in opt.param_groups:
        assert group["fused"] and not group["amsgrad"], "allocate_adamw_state mirrors fused AdamW without amsgrad"
        for p in group["params"]:
            if not opt.state[p]:
                opt.state[p] = {
                    "step": torch.zeros((), dtype=torch.float32, device=p.device),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }
