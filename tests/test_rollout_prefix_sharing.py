"""Prompt-prefix sharing in the C++ decode kernel (rollout/attention_cpu.py, ``PrefixGroups``): the
K samples of a prompt read its keys/values once per group. The outputs must be bitwise those of
unshared decoding (kernel level and engine level), and close to SDPA over each row's full cache."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from rlhfkit.rollout import Engine, SamplingParams, attention_cpu
from rlhfkit.rollout.attention_cpu import PrefixGroups


def _kernel_or_skip():
    probe = torch.zeros(1, 1, 1, 64, dtype=torch.bfloat16)
    if not attention_cpu.ready(probe, 1):
        pytest.skip("decode-attention kernel not available here (the engine uses SDPA)")


def test_prefix_groups_build_example():
    g = PrefixGroups.build(["a", "b", "a"], [40, 7, 40])
    assert g.order.tolist() == [0, 2, 1] and g.starts.tolist() == [0, 2, 3] and g.plen.tolist() == [40, 7]
    none = PrefixGroups.none(3)
    assert none.order.tolist() == [0, 1, 2] and none.starts.tolist() == [0, 1, 2, 3] and none.plen.tolist() == [0] * 3


# rows -> group, and each group's shared prompt length: a group of 4 (prefix not a multiple of 16),
# a group of 3 (exactly 32), one of 2 whose prefix is shorter than a 16-key block, singletons (one
# with nothing shared, one sharing with itself), rows listed out of group order
GROUPS = [0, 1, 0, 2, 1, 0, 3, 4, 1, 0, 2]
PLENS = {0: 37, 1: 32, 2: 9, 3: 0, 4: 50}
N_VALID = [41, 33, 60, 12, 90, 38, 1, 51, 32, 77, 9]  # >= the prefix (prompt + generated so far)


def _shared_caches(S, Hkv, L, D, g):
    """Random caches in which the rows of each group hold identical prefixes (as after one prefill)."""
    kc = (3 * torch.randn(S, Hkv, L, D, generator=g)).bfloat16()  # peaked softmaxes too
    vc = torch.randn(S, Hkv, L, D, generator=g).bfloat16()
    first: dict[int, int] = {}
    for b, grp in enumerate(GROUPS):
        a = first.setdefault(grp, b)
        kc[b, :, : PLENS[grp]] = kc[a, :, : PLENS[grp]]
        vc[b, :, : PLENS[grp]] = vc[a, :, : PLENS[grp]]
    return kc, vc


@pytest.mark.parametrize("H,Hkv,D", [(9, 3, 64), (4, 2, 16), (8, 1, 128), (4, 4, 32)])
def test_shared_prefix_kernel_equals_unshared_and_sdpa(H, Hkv, D):
    _kernel_or_skip()
    g = torch.Generator().manual_seed(0)
    B, L = len(GROUPS), 96
    kc, vc = _shared_caches(B + 2, Hkv, L, D, g)
    n = torch.tensor(N_VALID)
    q = torch.randn(B, 1, H + Hkv, D, generator=g).bfloat16()[:, :, :H].transpose(1, 2)  # strided, as in the runner
    groups = PrefixGroups.build(GROUPS, [PLENS[x] for x in GROUPS])
    scale = D**-0.5
    shared = attention_cpu.decode_attention(q, kc, vc, n, scale, groups)
    alone = attention_cpu.decode_attention(q, kc, vc, n, scale)
    assert torch.equal(shared, alone)  # the same scores, sums and roundings: bitwise
    # SDPA over each row's own full cache, in fp32 and in bf16
    keep = torch.arange(L)[None, :] < n[:, None]
    mask = torch.zeros(B, 1, 1, L).masked_fill_(~keep[:, None, None], float("-inf"))
    ref = F.scaled_dot_product_attention(
        q.float(), kc[:B].float(), vc[:B].float(), attn_mask=mask, scale=scale, enable_gqa=True
    )
    sdpa = F.scaled_dot_product_attention(q, kc[:B], vc[:B], attn_mask=mask.bfloat16(), scale=scale, enable_gqa=True)
    assert (shared.float() - ref).abs().max() < 1e-2  # bf16 output rounding (values ~1)
    assert (shared.float() - ref).abs().mean() <= 1.5 * (sdpa.float() - ref).abs().mean() + 1e-4


def test_fused_step_with_shared_prefix_writes_and_attends_as_unshared():
    """rope_cache_attention with groups: the same cache writes and bitwise the same output."""
    _kernel_or_skip()
    g = torch.Generator().manual_seed(2)
    H, Hkv, D, L = 9, 3, 64, 96
    B = len(GROUPS)
    kc, vc = _shared_caches(B, Hkv, L, D, g)
    pos = torch.tensor(N_VALID)  # each row's new token goes at pos, after its prefix
    qkv = torch.randn(B, (H + 2 * Hkv) * D, generator=g).bfloat16()
    ang = torch.arange(L)[:, None] * 0.01 * torch.arange(1, D + 1)[None]
    cos, sin_signed = ang.cos().bfloat16(), ang.sin().bfloat16()
    groups = PrefixGroups.build(GROUPS, [PLENS[x] for x in GROUPS])
    k1, v1, k2, v2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    out_shared = attention_cpu.rope_cache_attention(qkv, cos, sin_signed, pos, k1, v1, H, D**-0.5, groups)
    out_alone = attention_cpu.rope_cache_attention(qkv, cos, sin_signed, pos, k2, v2, H, D**-0.5)
    assert torch.equal(out_shared, out_alone)
    assert torch.equal(k1, k2) and torch.equal(v1, v2) and not torch.equal(k1, kc)


def test_groups_must_cover_every_row_once():
    _kernel_or_skip()
    q = torch.zeros(3, 4, 1, 16, dtype=torch.bfloat16)
    kc = torch.zeros(3, 2, 8, 16, dtype=torch.bfloat16)
    n = torch.ones(3, dtype=torch.long)
    bad = PrefixGroups(torch.tensor([0, 0, 2]), torch.tensor([0, 2, 3]), torch.tensor([1, 1]))
    with pytest.raises(RuntimeError, match="permutation"):
        attention_cpu.decode_attention(q, kc, kc, n, 0.25, bad)


def _prompts(tok):
    """Prompts of different lengths, all longer than one 16-key block (so there is a prefix to share)."""
    words = "the quick brown fox jumps over the lazy dog while a small cat sleeps on a warm mat".split()
    return [tok(" ".join(words[: 6 + 3 * i] * 3))["input_ids"] for i in range(4)]


@pytest.mark.parametrize(
    "model_dtype, fused",
    [(torch.bfloat16, True), (torch.float32, True), (torch.float32, False)],
    ids=["bf16-model-fused-step", "fp32-model-autocast-fused-step", "fp32-model-autocast-kernel-only"],
)
def test_engine_outputs_identical_with_and_without_sharing(sharp, model_dtype, fused):
    """Sampled and greedy generation in bf16: the same tokens and log-probs with the prompt prefix
    shared as without, in the fused C++ step (bf16 model; fp32 model under bf16 autocast) and with
    the attention kernel alone (fp32 model, ``fuse_autocast`` off). Rows of one group stop at
    different steps (stop ids), their slots are refilled with other prompts while the rest of the
    group decodes on (continuous batching), and max_batch < n·prompts splits a prompt's samples over
    several admissions (separate prefills)."""
    _kernel_or_skip()
    model = copy.deepcopy(sharp.model).to(model_dtype)
    tok = sharp.tokenizer
    prompts = _prompts(tok)
    assert len({len(p) for p in prompts}) == 4 and min(map(len, prompts)) > 16
    engine = Engine(model, tok, precision="bf16", max_batch=6)
    run = engine.runner
    run.fuse_autocast = fused
    # T = 2: the samples of a prompt differ (this model's logits are peaked); stop ids that some
    # samples (not all) hit early: each prompt's first sample's second token
    pilot = engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=2.0, seed=3, ignore_eos=True), n=4)
    stops = sorted({c.token_ids[1] for c in pilot if c.sample_index == 0})
    sp = SamplingParams(max_new_tokens=12, temperature=2.0, seed=3, stop_token_ids=stops)

    shared_rows = []
    decode = run.decode

    def recording(*args, **kw):
        out = decode(*args, **kw)
        shared_rows.append(run.last_decode_shared)
        return out

    run.decode = recording
    results = {}
    for share in (True, False):
        run.share_prefix = share
        shared_rows.clear()
        sampled = engine.generate(prompts, sp, n=4)
        greedy = engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0.0), n=3)
        results[share] = [(c.token_ids, c.logprobs, c.finish_reason) for c in sampled + greedy]
        assert run.last_decode_kernel and run.last_decode_fused == fused
        assert (max(shared_rows) > 0) == share
    assert results[True] == results[False]
    lengths = {}
    for c in sampled:
        lengths.setdefault(c.prompt_index, set()).add(len(c.token_ids))
    assert any(len(v) > 1 for v in lengths.values())  # a group's rows finished at different steps
    # greedy: K samples of one prompt are identical, and equal to one sample decoded alone
    alone = Engine(model, tok, precision="bf16", max_batch=1).generate(
        prompts, SamplingParams(max_new_tokens=8, temperature=0.0)
    )
    for c in greedy:
        assert c.token_ids == alone[c.prompt_index].token_ids


def test_sdpa_fallback_ignores_groups(sharp):
    """With the kernel off (RLHFKIT_DECODE_KERNEL=0 / SDPA) the groups are not used: each slot holds
    its full copy of the prompt, and generation is unchanged."""
    model = copy.deepcopy(sharp.model).to(torch.bfloat16)
    engine = Engine(model, sharp.tokenizer, max_batch=5)
    engine.runner.decode_kernel = False
    out = engine.generate(_prompts(sharp.tokenizer), SamplingParams(max_new_tokens=6, temperature=0.0), n=3)
    assert not engine.runner.last_decode_kernel and engine.runner.last_decode_shared == 0
    assert all(len(c.token_ids) == 6 or c.finish_reason == "stop" for c in out)
    for i in range(4):  # greedy: the samples of a prompt agree
        assert len({tuple(c.token_ids) for c in out if c.prompt_index == i}) == 1
