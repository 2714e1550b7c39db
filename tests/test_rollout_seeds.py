"""Per-sample seeds: sample ``s`` of a request seeded ``seed`` draws from its own stream
(``sampling.stream_key(seed, s, prompt)``), so a prompt's samples do not depend on the batch around it.

What is checked: the stream function against SplitMix64's published first output; a prompt's samples
are the same alone, in a batch, in another order, with another batch size, and between the engine
and ``transformers.generate`` (fp32, where their logits agree); other seeds and other sample
indices give other samples; the sampled first tokens over many seeds follow softmax(logits / T),
with and without top-k (chi-square).
"""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from rlhfkit.rollout import Engine, SamplingParams
from rlhfkit.rollout.hf import HFGenerator
from rlhfkit.rollout.sampling import stream_key, uniform

pytestmark = pytest.mark.usefixtures("one_thread")


def test_uniform_is_splitmix64():
    """uniform(key, t) is the top 24 bits of SplitMix64(seed=key)'s output t: for seed 0 the first
    output is 0xE220A8397B1DCDAF (the reference implementation's, Vigna's splitmix64.c)."""
    assert uniform(0, 0) == 0xE220A8 / 2**24
    assert all(0 <= uniform(stream_key(s, j), t) < 1 for s in (-(2**63), 0, 2**64 - 1) for j in (0, 9) for t in (0, 5))
    # nearby seeds and sample indices give unrelated streams: (seed s, sample 1) is not (s + 1, sample 0)
    keys = {stream_key(s, j) for s in range(50) for j in range(50)}
    assert len(keys) == 2500
    us = torch.tensor([uniform(k, t) for k in list(keys)[:200] for t in range(20)])
    assert stats.kstest(us.numpy(), "uniform").pvalue > 1e-3


def test_one_seed_shared_by_many_prompts_gives_each_prompt_its_own_streams(lively):
    """A call's one SamplingParams(seed=3) for every prompt: the prompt's ids are part of the key, so
    two prompts do not draw the same numbers; the same prompt twice with the same seed samples the same."""
    a, b = [1, 2, 3], [1, 2, 4]
    assert stream_key(3, 0, a) != stream_key(3, 0, b) and stream_key(3, 0, a) == stream_key(3, 0, tuple(a))
    assert len({stream_key(3, j, p) for j in range(4) for p in (a, b, [])}) == 12
    model, tok = lively.model, lively.tokenizer
    prompts = _prompts(tok)
    sp = SamplingParams(max_new_tokens=6, temperature=1.0, seed=3, ignore_eos=True)
    outs = _tokens(Engine(model, tok, precision="fp32").generate([prompts[0], prompts[1], prompts[0]], sp, n=2))
    assert outs[0, 0] == outs[2, 0] and outs[0, 1] == outs[2, 1] and outs[0, 0] != outs[0, 1]


def _tokens(outs) -> dict:
    return {(o.prompt_index, o.sample_index): o.token_ids for o in outs}


def _prompts(tok) -> list[list[int]]:
    texts = ["Once upon a time", "The capital of France is a city that", "Hi", "Write a list of fruits"]
    return [tok(t)["input_ids"] for t in texts]


@pytest.mark.parametrize("backend", ["engine", "hf"])
def test_a_prompts_samples_do_not_depend_on_the_batch(lively, backend):
    """Prompt 0 (seed 11) sampled alone, with three others, last in reverse order, and in batches
    of 3 rows (its samples then wait in the queue and fill freed rows): the same tokens each time."""
    model, tok = lively.model, lively.tokenizer
    prompts = _prompts(tok)
    seeds = [11, 12, 13, 14]

    def make(max_batch):
        cls = Engine if backend == "engine" else HFGenerator
        return cls(model, tok, precision="fp32", max_batch=max_batch)

    def sp(seed):
        return SamplingParams(max_new_tokens=10, temperature=1.0, seed=seed, ignore_eos=True)

    gen = make(64)
    alone = _tokens(gen.generate(prompts[:1], sp(11), n=3))
    assert len({tuple(t) for t in alone.values()}) == 3  # the samples of one prompt differ
    together = _tokens(gen.generate(prompts, [sp(s) for s in seeds], n=3))
    reverse = _tokens(gen.generate(prompts[::-1], [sp(s) for s in seeds[::-1]], n=3))
    small = _tokens(make(3).generate(prompts, [sp(s) for s in seeds], n=3))
    for j in range(3):
        assert together[0, j] == alone[0, j] == reverse[3, j] == small[0, j], j
    for i in range(4):
        assert (
            [together[i, j] for j in range(3)]
            == [small[i, j] for j in range(3)]
            == [reverse[3 - i, j] for j in range(3)]
        )
    other = _tokens(gen.generate(prompts[:1], sp(99), n=3))
    assert all(other[0, j] != alone[0, j] for j in range(3))  # another seed, other samples


def test_engine_and_hf_sample_the_same_tokens(lively):
    """One stream definition for both backends: with the same seeds, fp32, they sample alike."""
    model, tok = lively.model, lively.tokenizer
    prompts = _prompts(tok)
    params = [SamplingParams(max_new_tokens=8, temperature=0.8, seed=s, ignore_eos=True) for s in (1, 2, 3, 4)]
    engine = _tokens(Engine(model, tok, precision="fp32").generate(prompts, params, n=2))
    hf = _tokens(HFGenerator(model, tok, precision="fp32").generate(prompts, params, n=2))
    assert engine == hf
    assert len({tuple(t) for t in engine.values()}) == 8


def _chi_square_pvalue(tokens: list[int], p: torch.Tensor) -> float:
    """Chi-square of sampled tokens against probabilities p (V,), tokens with < 5 expected pooled;
    a token of probability 0 (filtered out) must never be sampled."""
    n = len(tokens)
    counts = torch.bincount(torch.tensor(tokens), minlength=p.numel()).double()
    assert counts[p == 0].sum() == 0
    counts, p = counts[p > 0], p[p > 0]
    expected = p * n
    big = expected >= 5
    if bool(big.all()):
        return float(stats.chisquare(counts.numpy(), expected.numpy()).pvalue)
    assert big.sum() >= 5 and expected[big].sum() > 0.8 * n, "the test model must put mass on several tokens"
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    return float(stats.chisquare(obs.numpy(), exp.numpy()).pvalue)


@pytest.mark.parametrize("top_k", [0, 6])
def test_first_tokens_over_many_seeds_follow_the_softmax(sharp, top_k):
    """600 requests of one prompt, seeds 0..599, one sample each: the first tokens follow
    softmax(logits / T) (top-k: renormalised over the k likeliest), on the engine and on hf."""
    model, tok = sharp.model, sharp.tokenizer
    prompt = tok("The weather today is")["input_ids"]
    T, n = 0.75, 600
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].double() / T
    if top_k:
        logits = logits.masked_fill(logits < logits.topk(top_k).values[-1], float("-inf"))
    p = torch.softmax(logits, -1)
    params = [SamplingParams(max_new_tokens=1, temperature=T, top_k=top_k, seed=s) for s in range(n)]
    engine = Engine(model, tok, precision="fp32", max_batch=n).generate([prompt] * n, params)
    assert _chi_square_pvalue([o.token_ids[0] for o in engine], p) > 1e-3
    hf = HFGenerator(model, tok, precision="fp32", max_batch=n).generate([prompt] * n, params)
    assert [o.token_ids for o in hf] == [o.token_ids for o in engine]
