"""LLaMA's SwiGLU MLP with a hand-written backward, for compiled bf16 training on a CPU
(``prepare_for_training`` routes the models' MLPs through it when it compiles their blocks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class SwiGLU(torch.autograd.Function):
    """LLaMA's MLP, ``y = down(silu(x Wgᵀ) · x Wuᵀ)``, with its backward written out so that every
    weight gradient is a plain (non-transposed) matmul.

    Math (Shazeer 2020, "GLU Variants Improve Transformer"; SiLU' (g) = σ(g)(1 + g(1 − σ(g)))), with
    g = x Wgᵀ, u = x Wuᵀ, a = silu(g)·u and dy the output's gradient (x, dy: (T, d) rows):
        da = dy Wd,  dg = da·u·silu'(g),  du = da·silu(g),  dx = dg Wg + du Wu,
        dWd = dyᵀ a,  dWg = (xᵀ dg)ᵀ,  dWu = (xᵀ du)ᵀ.
    Why: autograd computes a weight gradient as ``dyᵀ x``, a matmul whose first operand is read
    transposed; oneDNN's bf16 CPU kernels run that at about half the rate of the same product from a
    transposed *copy*, and the copy is cheap. Here xᵀ is copied once for both gate and up, dyᵀ once
    for down. The SiLU backward runs in fp32. Same gradients as autograd's (tested).
    """

    @staticmethod
    def forward(ctx, x, wg, wu, wd):
        g, u = x @ wg.t(), x @ wu.t()
        a = F.silu(g) * u
        ctx.save_for_backward(x, g, u, a, wg, wu, wd)
        return a @ wd.t()

    @staticmethod
    def backward(ctx, dy):
        x, g, u, a, wg, wu, wd = ctx.saved_tensors
        da = (dy @ wd).float()
        gf = g.float()
        sig = torch.sigmoid(gf)
        dg = (da * u.float() * sig * (1 + gf * (1 - sig))).to(g.dtype)
        du = (da * gf * sig).to(u.dtype)
        dx = dg @ wg + du @ wu
        xt = x.t().contiguous()  # (d, T): one copy serves both weight gradients below
        dwg = (xt @ dg).t().contiguous()
        dwu = (xt @ du).t().contiguous()
        dwd = dy.t().contiguous() @ a
        return dx, dwg, dwu, dwd


def use_swiglu_function(model: torch.nn.Module) -> int:
    """Route every LLaMA-style MLP of ``model`` (SiLU-gated, plain bias-free ``nn.Linear``
    projections: LLaMA, Mistral, Qwen2, SmolLM) through ``SwiGLU`` — for compiled bf16 training on
    a CPU (``prepare_for_training``). Weights, names and checkpoints are unchanged; LoRA-wrapped projections
    keep the module's own forward. Returns how many MLPs it routed."""
    n = 0
    for mlp in model.modules():
        projs = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
        act = type(getattr(mlp, "act_fn", None)).__name__  # torch's SiLU or transformers' SiLUActivation
        if not all(type(m) is torch.nn.Linear and m.bias is None for m in projs) or act not in (
            "SiLU",
            "SiLUActivation",
        ):
            continue
        mlp.forward = _swiglu_forward.__get__(mlp)
        n += 1
    return n


def _swiglu_forward(self, x: torch.Tensor) -> torch.Tensor:
    dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    shape = x.shape
    w = [m.weight.to(dt) for m in (self.gate_proj, self.up_proj, self.down_proj)]
    return SwiGLU.apply(x.reshape(-1, shape[-1]).to(dt), *w).reshape(*shape[:-1], -1)
