"""rlhfkit.accel: the CPU speed techniques and the one call that applies them — its rules and its
log line, compiled blocks (and the visible fallback when compiling fails), the CPU training
attention, SwiGLU's backward, bf16 matmul weights."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from helpers import MACHINE_METRICS

from rlhfkit.config import PPOConfig, RewardConfig
from rlhfkit.recipes.common import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_prepare_applies_what_fits_and_says_so_in_one_line(tiny_path):
    from rlhfkit.accel import prepare_for_inference, prepare_for_training
    from rlhfkit.accel.attention import ATTENTION_NAME
    from rlhfkit.models.loading import load_causal_lm

    lines: list[str] = []
    model = load_causal_lm(tiny_path).model
    applied = prepare_for_training(model, RewardConfig(precision="fp32"), "cuda", lines.append, name="policy")
    assert lines == ["accel (policy): none (cuda)"] and not applied.attention and not applied.blocks
    assert model.config._attn_implementation != ATTENTION_NAME  # nothing touched on a GPU
    lines.clear()
    gpu = prepare_for_training(load_causal_lm(tiny_path).model, RewardConfig(compile="on"), "cuda", lines.append)
    assert (gpu.attention, gpu.blocks, gpu.swiglu) == (False, model.config.num_hidden_layers, 0)  # only what was asked
    assert lines == [f"accel (model): compiled {gpu.blocks} blocks (torch.compile at first use; cached on disk)"]

    lines.clear()
    fp32 = prepare_for_training(model, RewardConfig(precision="fp32"), "cpu", lines.append, name="policy")
    assert lines == ["accel (policy): CPU attention, not compiled (fp32)"]
    assert fp32.attention and model.config._attn_implementation == ATTENTION_NAME

    lines.clear()
    n = model.config.num_hidden_layers
    bf16 = prepare_for_training(model, RewardConfig(precision="bf16", compile="on"), "cpu", lines.append, name="p")
    assert (bf16.blocks, bf16.swiglu) == (n, n)
    assert lines == [f"accel (p): CPU attention, compiled {n} blocks (torch.compile at first use; cached on disk), "
                     f"SwiGLU backward in {n} MLPs"]  # fmt: skip

    lines.clear()
    ref = load_causal_lm(tiny_path).model.requires_grad_(False)
    linears = [
        m for m in ref.modules() if type(m) is torch.nn.Linear and m.weight is not ref.get_input_embeddings().weight
    ]
    got = prepare_for_inference(ref, RewardConfig(precision="bf16", compile="on"), "cpu", like=bf16, say=lines.append)
    assert (got.attention, got.blocks, got.swiglu, got.bf16_weights) == (True, n, n, len(linears))
    assert all(m.weight.dtype == torch.bfloat16 for m in linears) and len(lines) == 1
    assert ref.get_input_embeddings().weight.dtype == torch.float32  # the residual stream stays fp32


def test_bf16_matmul_weights_leaves_a_bf16_model_alone(tiny_path):
    from rlhfkit.accel.weights import bf16_matmul_weights
    from rlhfkit.models.loading import load_causal_lm

    model = load_causal_lm(tiny_path, dtype=torch.bfloat16).model
    before = {name: p.data_ptr() for name, p in model.named_parameters()}
    assert bf16_matmul_weights(model) == 0
    assert before == {name: p.data_ptr() for name, p in model.named_parameters()}  # no copies either


def test_a_failed_compile_is_reported_once_and_runs_eagerly(tiny_path, tmp_path, monkeypatch):
    """compile=on where Inductor fails (no suppress_errors): one line names the error, the blocks of
    all of PPO's models (policy, reference, critic) run their eager forwards, and the run's numbers
    are exactly those of compile=off."""
    import torch._inductor.compile_fx as inductor

    from rlhfkit.recipes.ppo import train_ppo

    def run(out, compile: str, say) -> list[dict]:
        cfg = PPOConfig(
            model=tiny_path,
            critic_model=tiny_path,
            out=str(tmp_path / out),
            batch_size=4,
            max_steps=2,
            max_new_tokens=6,
            precision="fp32",
            missing_eos_penalty=None,
            limit=16,
            compile=compile,
        )
        train_ppo(cfg, reward_fn=lambda p, r, f: [len(x) / 10 for x in r], say=say)
        return read_metrics(tmp_path / out)

    eager = run("eager", "off", lambda *a: None)

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ toolchain today")

    lines: list[str] = []
    monkeypatch.setattr(inductor, "compile_fx", broken)
    failed = run("failed", "on", lines.append)
    assert any("compiled" in line and "blocks" in line for line in lines)  # it did try
    failures = [line for line in lines if "torch.compile failed" in line]
    assert len(failures) == 1 and "RuntimeError: no C++ toolchain today" in failures[0], lines
    skip = MACHINE_METRICS
    assert len(eager) == len(failed) == 2
    for a, b in zip(eager, failed):
        assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}


def test_compile_blocks_rules(tiny_path):
    from rlhfkit.accel.compile import compile_blocks, transformer_blocks
    from rlhfkit.errors import UserError
    from rlhfkit.models.loading import load_causal_lm

    model = load_causal_lm(tiny_path).model
    blocks = transformer_blocks(model)
    assert blocks is model.model.layers and len(blocks) == model.config.num_hidden_layers
    assert not compile_blocks(model, RewardConfig(precision="fp32"), "cpu")  # auto: only bf16 training
    assert not compile_blocks(model, RewardConfig(precision="bf16", lora=True), "cpu")  # nor LoRA
    assert not compile_blocks(model, RewardConfig(precision="bf16", compile="off"), "cpu")
    with pytest.raises(UserError, match="compile="):
        compile_blocks(model, RewardConfig(compile="maybe"), "cpu")


def test_short_row_attention_matches_sdpa():
    """The CPU training attention gives SDPA's outputs and gradients for every mask form it gets:
    None (causal), boolean 4-D (the shared-prompt layout, a fully masked padding row included),
    additive float; grouped-query heads; and hands long rows to SDPA."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from rlhfkit.accel.attention import SHORT_ROWS, short_row_attention

    g = torch.Generator().manual_seed(0)
    B, H, KV, T, D = 2, 4, 2, 7, 8
    module = SimpleNamespace(training=True, is_causal=True, num_key_value_groups=H // KV)  # as a LlamaAttention

    def qkv():
        return [torch.randn(B, n, T, D, generator=g, requires_grad=True) for n in (H, KV, KV)]

    def reference(q, k, v, mask):
        k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None).transpose(1, 2)

    causal = torch.ones(T, T, dtype=torch.bool).tril()
    shared = causal.clone().expand(B, 1, T, T).clone()
    shared[1, 0, 4:, 2] = False  # a later answer does not see an earlier one
    additive = torch.zeros(B, 1, T, T).masked_fill(~causal, torch.finfo(torch.float32).min)
    for mask in (None, shared, additive):
        q, k, v = qkv()
        out, weights = short_row_attention(module, q, k, v, mask, scaling=D**-0.5)
        assert weights is None and out.shape == (B, T, H, D)
        ref_inputs = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        ref = reference(*ref_inputs, mask)
        assert torch.allclose(out, ref, atol=1e-5)
        out.square().sum().backward()
        ref.square().sum().backward()
        for a, b in zip((q, k, v), ref_inputs):
            assert torch.allclose(a.grad, b.grad, atol=1e-4)
    # right padding: the last row of batch 1 attends to nothing, and stays finite
    padded = shared.clone()
    padded[1, 0, -1, :] = False
    q, k, v = qkv()
    out, _ = short_row_attention(module, q, k, v, padded, scaling=D**-0.5)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[1, :-1], reference(q, k, v, shared)[1, :-1], atol=1e-5)
    # a ready boolean 4-D mask (the reward model's shared-prompt rows) turned additive for it
    from rlhfkit.accel.attention import ATTENTION_NAME, additive_attention_mask

    ours, other = (SimpleNamespace(config=SimpleNamespace(_attn_implementation=n)) for n in (ATTENTION_NAME, "sdpa"))
    assert additive_attention_mask(other, padded) is padded
    add = additive_attention_mask(ours, padded)
    assert add.dtype == torch.float32 and torch.equal(add == 0, padded)
    out_add, _ = short_row_attention(module, q, k, v, add, scaling=D**-0.5)
    assert torch.isfinite(out_add).all() and torch.allclose(out_add[1, :-1], out[1, :-1], atol=1e-6)
    # rows longer than SHORT_ROWS go to SDPA (same result either way)
    L = SHORT_ROWS + 1
    q, k, v = (torch.randn(1, n, L, D, generator=g) for n in (H, KV, KV))
    out, _ = short_row_attention(module, q, k, v, None, scaling=D**-0.5, is_causal=True)
    assert torch.allclose(out, reference(q, k, v, None), atol=1e-5)


def test_training_attention_is_installed_and_not_saved(tiny_path, tmp_path):
    from rlhfkit.accel.attention import ATTENTION_NAME, use_training_attention
    from rlhfkit.models.loading import load_causal_lm

    loaded = load_causal_lm(tiny_path)
    model = loaded.model
    ids = torch.tensor([[1, 5, 9, 13, 2], [1, 7, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    from rlhfkit.accel import attention

    seen = []
    real = attention.short_row_attention

    def spy(module, q, k, v, attention_mask, **kw):
        seen.append(attention_mask)
        return real(module, q, k, v, attention_mask, **kw)

    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        with mock.patch.object(attention, "short_row_attention", spy):
            assert use_training_attention(model, "cpu") and model.config._attn_implementation == ATTENTION_NAME
        after = model(input_ids=ids, attention_mask=mask).logits
    # transformers builds additive float masks for it (0 = attend), the fast form in compiled blocks
    assert seen and all(m.dtype == torch.float32 and m.shape == (2, 1, 5, 5) for m in seen)
    assert (seen[0][1, 0, 4, :3] == 0).all() and (seen[0][1, 0, :, 3:] < -1e38).all()
    use_training_attention(model, "cpu")  # the real function registered again, for later tests
    assert torch.allclose(before[0], after[0], atol=1e-4) and torch.allclose(before[1, :3], after[1, :3], atol=1e-4)
    model.save_pretrained(tmp_path / "m")
    assert ATTENTION_NAME not in (tmp_path / "m" / "config.json").read_text()
    assert not use_training_attention(model, "meta")  # GPUs (any non-CPU device) keep their default


def test_swiglu_function_gives_autograds_gradients(tiny_path):
    """use_swiglu_function routes LLaMA's MLPs through SwiGLU (hand-written backward, weight
    gradients from transposed copies): the same output and gradients as the module's own forward,
    to fp32 rounding; in bf16 autocast within bf16 rounding. LoRA-wrapped projections are left alone."""
    import copy

    from rlhfkit.accel.swiglu import use_swiglu_function
    from rlhfkit.config import PPOConfig
    from rlhfkit.models.loading import load_causal_lm
    from rlhfkit.recipes.common import apply_lora

    model = load_causal_lm(tiny_path).model
    mlp = model.model.layers[0].mlp
    ours = copy.deepcopy(mlp)
    assert use_swiglu_function(ours) == 1 and "forward" not in vars(mlp)
    assert use_swiglu_function(copy.deepcopy(model)) == model.config.num_hidden_layers
    x = torch.randn(3, 5, mlp.gate_proj.in_features, generator=torch.Generator().manual_seed(0))
    dy = torch.randn(3, 5, mlp.down_proj.out_features, generator=torch.Generator().manual_seed(1))

    def grads(module, autocast: bool):
        xi = x.clone().requires_grad_(True)
        module.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = module(xi)
        y.float().backward(dy)
        return [y.float(), xi.grad] + [m.weight.grad for m in (module.gate_proj, module.up_proj, module.down_proj)]

    for autocast, tol in ((False, 1e-5), (True, 2e-2)):
        for a, b in zip(grads(ours, autocast), grads(mlp, autocast)):
            assert a.shape == b.shape and a.is_contiguous()
            assert (a - b).abs().max() <= tol * b.abs().max(), (autocast, (a - b).abs().max(), b.abs().max())
    lora = apply_lora(load_causal_lm(tiny_path).model, PPOConfig(lora=True, lora_r=4))
    assert use_swiglu_function(lora) == 0
