"""The C++ decode-attention kernel (rollout/attention_cpu.py) against fp32 reference attention,
and its fallback to SDPA. The first test in a session builds the kernel if this machine's cache
lacks it (about a minute, once); the others reuse it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rlhfkit.rollout import attention_cpu


def _kernel_or_skip():
    probe = torch.zeros(1, 1, 1, 64, dtype=torch.bfloat16)
    if not attention_cpu.ready(probe, 1):
        pytest.skip("decode-attention kernel not available here (the engine uses SDPA)")


def _reference(q, kc, vc, n, scale):
    """fp32 attention of (B, H, 1, D) queries over each row's first n[b] keys, GQA by repeat."""
    B, H, _, D = q.shape
    G = H // kc.shape[1]
    span = int(n.max())
    k = kc[:B, :, :span].float().repeat_interleave(G, 1)
    v = vc[:B, :, :span].float().repeat_interleave(G, 1)
    s = (q.float() @ k.transpose(-1, -2)) * scale  # (B, H, 1, span)
    s = s.masked_fill(~(torch.arange(span)[None, :] < n[:, None])[:, None, None], float("-inf"))
    return s.softmax(-1) @ v


@pytest.mark.parametrize("H,Hkv,D", [(9, 3, 64), (4, 2, 16), (8, 1, 128), (4, 4, 32)])
def test_kernel_matches_reference_attention(H, Hkv, D):
    _kernel_or_skip()
    g = torch.Generator().manual_seed(0)
    B, S, L = 13, 16, 90
    n = torch.tensor([1, 2, 15, 16, 17, 31, 32, 33, 47, 64, 65, 89, 90])  # ragged, around 16-key blocks
    qk = torch.randn(B, 1, H + Hkv, D, generator=g).bfloat16()
    q = qk[:, :, :H].transpose(1, 2)  # (B, H, 1, D), strided as in the runner
    kc = (3 * torch.randn(S, Hkv, L, D, generator=g)).bfloat16()  # peaked softmaxes too
    vc = torch.randn(S, Hkv, L, D, generator=g).bfloat16()
    scale = D**-0.5
    out = attention_cpu.decode_attention(q, kc, vc, n, scale)
    assert out.shape == (B, H, 1, D) and out.dtype == torch.bfloat16
    ref = _reference(q, kc, vc, n, scale)
    assert (out.float() - ref).abs().max() < 1e-2  # bf16 output rounding (values ~1)
    # as close to the fp32 reference as bf16 SDPA is
    keep = torch.arange(L)[None, :] < n[:, None]
    mask = torch.zeros(B, 1, 1, L, dtype=torch.bfloat16).masked_fill_(~keep[:, None, None], float("-inf"))
    sdpa = F.scaled_dot_product_attention(q, kc[:B], vc[:B], attn_mask=mask, scale=scale, enable_gqa=True)
    assert (out.float() - ref).abs().mean() <= 1.5 * (sdpa.float() - ref).abs().mean() + 1e-4
    # the runner reshapes o.transpose(1, 2) to (B, 1, H·D): a free view of the kernel's buffer
    assert out.transpose(1, 2).is_contiguous()


def test_runner_decode_kernel_vs_sdpa(sharp):
    """A bf16 fast-path decode step gives the same logits with the kernel as with SDPA."""
    import copy

    from rlhfkit.rollout.runner import Runner

    _kernel_or_skip()
    model = copy.deepcopy(sharp.model).to(torch.bfloat16)
    run = Runner(model, "bf16")
    prompts = [sharp.tokenizer(t)["input_ids"] for t in ("Once upon a time there", "Hi", "The cat sat on the")]
    T = max(map(len, prompts))
    ids = torch.tensor([p + [0] * (T - len(p)) for p in prompts])
    lens = torch.tensor([len(p) for p in prompts])
    slots, src = torch.arange(6), torch.tensor([0, 0, 1, 1, 2, 2])
    rope = run.rope_tables(T + 8)
    run.bind(6)

    def steps(kernel: bool):
        run.decode_kernel = kernel
        cache = run.new_cache(6, T + 8)
        run.prefill(cache, ids, lens, slots, src, rope)
        out = [run.decode(cache, torch.tensor([5, 6, 7, 8, 9, 10]) + i, rope).float() for i in range(3)]
        return out, run.last_decode_kernel

    with_kernel, used = steps(True)
    with_sdpa, used_sdpa = steps(False)
    run.unbind()
    assert used and not used_sdpa
    scale = with_sdpa[0].abs().max()
    for a, b in zip(with_kernel, with_sdpa):
        assert (a - b).abs().max() < 0.03 * scale


def test_fallback_when_the_kernel_is_unavailable(sharp, monkeypatch):
    """A failed build (or RLHFKIT_DECODE_KERNEL=0) means SDPA, silently: generation still works."""
    import copy

    from rlhfkit.rollout import Engine, SamplingParams

    monkeypatch.setattr(attention_cpu, "_module", False)  # as after a compile error
    probe = torch.zeros(1, 1, 1, 64, dtype=torch.bfloat16)
    assert not attention_cpu.ready(probe, 1)
    assert attention_cpu.decode_attention(probe, probe, probe, torch.ones(1, dtype=torch.long), 0.125) is None
    model = copy.deepcopy(sharp.model).to(torch.bfloat16)
    engine = Engine(model, sharp.tokenizer)
    out = engine.generate([sharp.tokenizer("Hi")["input_ids"]], SamplingParams(max_new_tokens=4, temperature=0.0))
    assert len(out[0].token_ids) == 4 and not engine.runner.last_decode_kernel
    monkeypatch.setenv("RLHFKIT_DECODE_KERNEL", "0")
    monkeypatch.setattr(attention_cpu, "_module", None)
    assert not attention_cpu.ready(probe, 1)


def test_fused_decode_ops_match_pytorch():
    """RoPE + cache write + attention, residual add + RMSNorm, SiLU·up: the C++ ops of the fused
    decode step against the PyTorch ops they replace (HF's LLaMA roundings)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from rlhfkit.rollout.runner import apply_rope

    _kernel_or_skip()
    g = torch.Generator().manual_seed(1)
    # residual add + RMSNorm
    h = torch.randn(7, 576, generator=g).bfloat16()
    r = torch.randn(7, 576, generator=g).bfloat16()
    norm = LlamaRMSNorm(576, eps=1e-5).bfloat16()
    norm.weight.data = (1 + 0.1 * torch.randn(576, generator=g)).bfloat16()
    expect_h = h + r
    with torch.no_grad():
        expect_x = norm(expect_h)
    x = attention_cpu.add_rms_norm(h, r, norm.weight.data, 1e-5)
    assert torch.equal(h, expect_h)  # updated in place, bf16 add
    assert (x.float() - expect_x.float()).abs().max() <= 0.01 * expect_x.float().abs().max()
    # SiLU·up
    gu = (3 * torch.randn(5, 2 * 40, generator=g)).bfloat16()
    y = attention_cpu.silu_mul(gu)
    expect_y = F.silu(gu[:, :40]) * gu[:, 40:]
    assert ((y.float() - expect_y.float()).abs() <= 0.01 * expect_y.float().abs() + 1e-3).all()
    # RoPE + cache write + attention
    B, H, Hkv, D, L = 5, 9, 3, 64, 40
    pos = torch.tensor([0, 3, 17, 32, 39])
    qkv = torch.randn(B, (H + 2 * Hkv) * D, generator=g).bfloat16()
    kc = torch.randn(B, Hkv, L, D, generator=g).bfloat16()
    vc = torch.randn(B, Hkv, L, D, generator=g).bfloat16()
    ang = torch.arange(L)[:, None] * (1e4 ** (-torch.arange(D // 2) / (D // 2)))[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1).bfloat16(), torch.cat([ang.sin()] * 2, -1).bfloat16()
    sin_signed = torch.cat((-sin[:, : D // 2], sin[:, D // 2 :]), -1)
    x4 = qkv.view(B, H + 2 * Hkv, 1, D).float()
    rot = apply_rope(x4[:, : H + Hkv], cos[pos][:, None, None].float(), sin[pos][:, None, None].float())
    kc2, vc2 = kc.clone(), vc.clone()
    kc2[torch.arange(B), :, pos] = rot[:, H:, 0].bfloat16()
    vc2[torch.arange(B), :, pos] = qkv.view(B, H + 2 * Hkv, D)[:, H + Hkv :]
    ref = _reference(rot[:, :H].bfloat16(), kc2, vc2, pos + 1, D**-0.5)  # (B, H, 1, D)
    out = attention_cpu.rope_cache_attention(qkv, cos, sin_signed, pos, kc, vc, H, D**-0.5)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)  # written at pos, nothing else touched
    assert (out.view(B, H, 1, D).float() - ref).abs().max() < 1e-2


def test_sampling_pass_matches_pytorch(monkeypatch):
    """bf16 logits: the C++ exp + block-sum pass samples what the PyTorch ops sample."""
    from rlhfkit.rollout import sampling

    _kernel_or_skip()
    g = torch.Generator().manual_seed(2)
    logits = (4 * torch.randn(64, 1000, generator=g)).bfloat16()
    temp = torch.tensor([1.0, 0.7, 0.0, 1.3] * 16)
    off = torch.zeros(64, dtype=torch.long), torch.ones(64)

    def run():
        gen = torch.Generator().manual_seed(3)
        return sampling.sample_next(logits, temp, *off, gen, filtering=False)

    assert sampling._fused_exp(logits, sampling.sampling_workspace(64, 1000))
    tok_c, lp_c = run()
    monkeypatch.setattr(sampling, "_fused_exp", lambda *a: False)
    tok_t, lp_t = run()
    assert torch.equal(tok_c, tok_t)
    assert (lp_c - lp_t).abs().max() < 1e-4


def _fp32_fma_sum_of_squares(row: list[float]) -> float:
    """ss = fma(x, x, ss) over the row in order, in fp32 with one rounding per step (exact rationals)."""
    from fractions import Fraction

    import numpy as np

    def round_f32(exact: Fraction) -> np.float32:
        x = np.float32(float(exact))  # within one fp32 step of the exact value: pick the nearest (ties to even)
        cands = [x, np.nextafter(x, np.float32(np.inf)), np.nextafter(x, np.float32(-np.inf))]
        best = min(cands, key=lambda c: (abs(Fraction(float(c)) - exact), int(c.view(np.uint32)) & 1))
        return best

    ss = np.float32(0)
    for x in row:
        ss = round_f32(Fraction(float(ss)) + Fraction(x) * Fraction(x))
    return float(ss)


def test_add_rms_norm_bitwise_as_the_scalar_loop():
    """The vectorised add + RMSNorm (16 rows in the lanes of one vector) rounds exactly as the
    scalar loop it replaced: bf16 add, then one fp32 fused multiply-add per element in column order
    for the sum of squares, then HF's two bf16 roundings. Rows in full and partial 16-row blocks,
    and columns in and past the 16-wide vector part (d = 40)."""
    _kernel_or_skip()
    g = torch.Generator().manual_seed(3)
    N, d, eps = 19, 40, 1e-5
    h = (torch.randn(N, d, generator=g) * torch.logspace(-2, 2, d)).bfloat16()
    r = torch.randn(N, d, generator=g).bfloat16()
    w = (1 + 0.3 * torch.randn(d, generator=g)).bfloat16()
    hh = h.clone()
    x = attention_cpu.add_rms_norm(hh, r, w, eps)
    expect_h = (h.float() + r.float()).bfloat16()
    assert torch.equal(hh, expect_h)
    f = expect_h.float()
    for i in range(N):
        ss = torch.tensor(_fp32_fma_sum_of_squares(f[i].tolist()), dtype=torch.float32)
        inv = 1.0 / torch.sqrt(ss / d + torch.tensor(eps, dtype=torch.float32))
        expect_x = (w.float() * (f[i] * inv).bfloat16().float()).bfloat16()
        assert torch.equal(x[i], expect_x), i
    # each row's result is independent of its place in the 16-row blocks
    alone = torch.cat([attention_cpu.add_rms_norm(h[i : i + 1].clone(), r[i : i + 1], w, eps) for i in range(N)])
    assert torch.equal(alone, x)
