"""Sampling math of the rollout engine on hand-computed values (no model)."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from rlhfkit.errors import UserError
from rlhfkit.rollout.sampling import (
    SamplingParams,
    sample_from_probs,
    sample_next,
    scale_logits,
    top_k_filter,
    top_p_filter,
)
from rlhfkit.rollout.text import IncrementalText, find_stop, held_back

NEG = float("-inf")


def test_top_k_keeps_k_largest():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [1.0, 3.0, 2.0, 0.0], [5.0, 1.0, 1.0, 1.0]])
    out = top_k_filter(logits, torch.tensor([2, 0, 1]))
    assert out[0].tolist() == [NEG, 3.0, 2.0, NEG]
    assert out[1].tolist() == [1.0, 3.0, 2.0, 0.0]  # 0 = off
    assert out[2].tolist() == [5.0, NEG, NEG, NEG]


def test_top_k_keeps_ties_and_clamps_to_vocab():
    out = top_k_filter(torch.tensor([[2.0, 1.0, 1.0, 0.0]]), torch.tensor([2]))
    assert out[0].tolist() == [2.0, 1.0, 1.0, NEG]
    assert top_k_filter(torch.tensor([[2.0, 1.0]]), torch.tensor([10]))[0].tolist() == [2.0, 1.0]


def test_top_p_hand_computed():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log()[None].repeat(3, 1)
    out = top_p_filter(logits, torch.tensor([0.8, 0.81, 0.3]))
    # sorted: 0.5, 0.3, 0.15, 0.05 ; mass before each: 0, 0.5, 0.8, 0.95
    assert torch.isfinite(out[0]).tolist() == [False, True, False, True]  # 0.8 is not < 0.8
    assert torch.isfinite(out[1]).tolist() == [False, True, True, True]
    assert torch.isfinite(out[2]).tolist() == [False, True, False, False]  # the top token always stays
    kept = torch.softmax(out[0], -1)
    assert kept.tolist() == pytest.approx([0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8], abs=1e-6)


def test_scale_logits_temperature_and_greedy():
    logits = torch.tensor([[2.0, 4.0], [2.0, 4.0], [2.0, 4.0]])
    out = scale_logits(logits, torch.tensor([0.5, 0.0, 2.0]))
    assert out.tolist() == [[4.0, 8.0], [2.0, 4.0], [1.0, 2.0]]


def test_sample_from_probs_inverse_cdf():
    probs = torch.tensor([[0.2, 0.0, 0.8], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    for seed in range(20):
        t = sample_from_probs(probs, torch.Generator().manual_seed(seed))
        assert t[0].item() in (0, 2) and t[1].item() == 2 and t[2].item() == 0


def test_sample_next_greedy_and_logprobs():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]])
    tok, lp = sample_next(logits, torch.tensor([0.0, 0.0]), torch.tensor([0, 0]), torch.tensor([1.0, 1.0]))
    assert tok.tolist() == [1, 2]
    assert lp.tolist() == pytest.approx(torch.log_softmax(logits, -1)[[0, 1], [1, 2]].tolist(), abs=1e-6)


def test_sample_next_logprob_is_before_filtering():
    """With top-k=1 the token is the argmax, but its log-prob is the full softmax(logits/T) one."""
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    tok, lp = sample_next(logits, torch.tensor([0.5]), torch.tensor([1]), torch.tensor([1.0]))
    assert tok.item() == 1
    assert lp.item() == pytest.approx(torch.log_softmax(logits / 0.5, -1)[0, 1].item(), abs=1e-6)


def test_sample_next_distribution_chi_square():
    """Empirical counts of 20,000 draws from per-row logits match softmax(logits / T)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5, 3.0])
    T = 0.7
    B = 20000
    tok, lp = sample_next(
        logits.repeat(B, 1), torch.full((B,), T), torch.zeros(B, dtype=torch.long), torch.ones(B), g, filtering=True
    )
    p = torch.softmax(logits / T, -1)
    counts = torch.bincount(tok, minlength=6).double()
    assert stats.chisquare(counts.numpy(), (p.double() * B).numpy()).pvalue > 1e-3
    assert lp.tolist() == pytest.approx(p.log()[tok].tolist(), abs=1e-5)


def test_sample_next_top_k_top_p_distribution():
    g = torch.Generator().manual_seed(1)
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5, 3.0])
    B = 20000
    tok, _ = sample_next(logits.repeat(B, 1), torch.ones(B), torch.full((B,), 3), torch.ones(B), g)
    counts = torch.bincount(tok, minlength=6).double()
    assert counts[[0, 3, 4]].sum() == 0  # only the 3 best (indices 5, 2, 1)
    p = torch.softmax(logits[[1, 2, 5]], -1).double()
    assert stats.chisquare(counts[[1, 2, 5]].numpy(), (p * B).numpy()).pvalue > 1e-3


def test_sampling_params_validation():
    with pytest.raises(UserError):
        SamplingParams(temperature=-1)
    with pytest.raises(UserError):
        SamplingParams(top_p=0)
    with pytest.raises(UserError):
        SamplingParams(max_new_tokens=0)
    assert SamplingParams(stop="x").stop == ["x"]
    assert SamplingParams(temperature=0).greedy


def test_find_stop_and_held_back():
    assert find_stop("ab\nUser:", ["User:"], 3) == (3, "User:")
    assert find_stop("abc", ["x"], 0) is None
    assert find_stop("xaby", ["ab", "y"], 2) == (1, "ab")  # a stop straddling the old end is found
    assert held_back("Hello\nUs", ["\nUser:"]) == 3
    assert held_back("Hello", ["\nUser:"]) == 0


class _ByteTok:
    """A tokenizer whose tokens are single UTF-8 bytes (multi-byte characters span tokens)."""

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return bytes(ids).decode("utf-8", errors="replace")


def test_incremental_text_never_splits_a_character():
    tok = _ByteTok()
    text = "héllo → wörld"
    inc = IncrementalText(tok)
    deltas = [inc.add([b]) for b in text.encode()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert math.isclose(len(inc.text), len(text))


def test_sample_next_bf16_logits_and_reused_workspace():
    """bf16 logits (the fast path's lm_head) and a workspace reused across calls of fewer rows."""
    from rlhfkit.rollout.sampling import sampling_workspace

    g = torch.Generator().manual_seed(0)
    work = sampling_workspace(4, 300)  # V = 300 -> 512 columns, the tail stays zero probability
    assert work.shape == (4, 512)
    for B, T in ((4, 1.0), (3, 0.7)):
        logits = (torch.randn(B, 300, generator=g) * 3).to(torch.bfloat16)
        temp = torch.full((B,), T)
        temp[0] = 0.0  # a greedy row among sampled ones
        tok, lp = sample_next(logits, temp, torch.zeros(B, dtype=torch.long), torch.ones(B), g, False, work)
        assert (tok < 300).all() and tok[0] == logits[0].argmax()
        t = torch.where(temp > 0, temp, torch.ones(B))[:, None]
        ref = torch.log_softmax(logits.float() / t, -1).gather(-1, tok[:, None])[:, 0]
        assert lp.tolist() == pytest.approx(ref.tolist(), abs=1e-5)
        assert work[:, 300:].eq(0).all()
