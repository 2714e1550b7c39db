"""rollout_backend=vllm: VLLMGenerator against our engine, transformers and the policy's own forward.

These tests need vLLM, which CI does not install (3.4 GB, ~95 s for the CPU build), so in
`make test` they skip. Run them with a venv that has it (docs/performance.md), e.g.

    /work/vllm-venv/bin/python -m pytest -q -n 0 -p no:cacheprovider tests/test_vllm.py

One vLLM engine on SmolLM2-135M in fp32 is shared by the module (start-up costs seconds): in fp32
the greedy tokens of vLLM, our engine and ``transformers.generate`` agree exactly on the prompts
used, and vLLM's log-probs match a teacher-forced forward to 1e-3.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("vllm")

from rlhfkit.errors import UserError  # noqa: E402
from rlhfkit.models.loading import load_causal_lm  # noqa: E402
from rlhfkit.rollout import Engine, SamplingParams  # noqa: E402
from rlhfkit.rollout.vllm import VLLMGenerator, hf_named_tensors  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "How do vaccines work?"]
NEW = 20


@pytest.fixture(scope="module")
def smol(smollm2_path):
    loaded = load_causal_lm(smollm2_path)
    model, tok = loaded.model.eval(), loaded.tokenizer
    prompts = [
        list(
            tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)[
                "input_ids"
            ]
        )
        for q in QUESTIONS
    ]
    gen = VLLMGenerator(model, tok, precision="fp32", say=lambda *a: None)
    yield gen, model, tok, prompts
    gen.close()


def greedy(gen, prompts, new=NEW):
    return [c.token_ids for c in gen.generate(prompts, SamplingParams(max_new_tokens=new, temperature=0))]


@torch.no_grad()
def hf_greedy(model, prompts, new=NEW):
    out = []
    for p in prompts:
        x = torch.tensor([p])
        y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new)
        out.append(y[0, len(p) :].tolist())
    return out


@torch.no_grad()
def teacher_forced(model, prompt, tokens, temperature):
    """log_softmax(logits / T)[token] of each generated token, from one forward of the policy."""
    x = torch.tensor([prompt + tokens])
    logits = model(x).logits[0, len(prompt) - 1 : -1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def test_greedy_equals_engine_and_transformers(smol):
    from rlhfkit.rollout.backends import Generator

    gen, model, tok, prompts = smol
    assert isinstance(gen, Generator) and gen.device.type in ("cpu", "cuda")
    ours = greedy(gen, prompts)
    assert ours == greedy(Engine(model, tok, precision="fp32"), prompts)
    # generate stops at EOS; ours run on through it only if EOS never came
    hf = hf_greedy(model, prompts)
    assert [o[: len(h)] for o, h in zip(ours, hf)] == hf
    assert len(set(map(tuple, ours))) == len(prompts)  # real answers, not one repeated token


def test_completion_fields_stops_and_text(smol):
    gen, model, tok, prompts = smol
    params = SamplingParams(max_new_tokens=NEW, temperature=0)
    short, free = gen.generate([prompts[0], prompts[2]], params)
    # the short answer ends with the end-of-turn token: kept as the last token, the reason is its id
    assert tok.eos_token_id in gen.eos_ids
    assert (short.finish_reason, short.stop_reason) == ("stop", short.token_ids[-1])
    assert short.stop_reason in gen.eos_ids and short.stop_reason not in short.token_ids[:-1]
    assert short.text == tok.decode(short.token_ids[:-1]) and "<|im_end|>" not in short.text
    assert free.finish_reason == "length" and free.stop_reason is None and len(free.token_ids) == NEW
    assert free.text == tok.decode(free.token_ids, skip_special_tokens=True)
    assert free.prompt_token_ids == prompts[2] and (free.prompt_index, free.sample_index) == (1, 0)
    # ignore_eos: generation runs on through the end-of-turn token
    on = gen.generate(prompts[:1], SamplingParams(max_new_tokens=NEW, temperature=0, ignore_eos=True))[0]
    assert on.finish_reason == "length" and len(on.token_ids) == NEW
    assert on.token_ids[: len(short.token_ids)] == short.token_ids
    # a stop token of our own (EOS then no longer stops): kept as the last token, the reason is its id
    stop_at = free.token_ids[5]
    first = free.token_ids.index(stop_at)
    c = gen.generate([prompts[2]], SamplingParams(max_new_tokens=NEW, temperature=0, stop_token_ids=[stop_at]))[0]
    assert c.token_ids == free.token_ids[: first + 1]
    assert (c.finish_reason, c.stop_reason) == ("stop", stop_at)
    # a stop string: the text ends before it, the token that completed it is the last one
    word = free.text.split()[3]
    s = gen.generate([prompts[2]], SamplingParams(max_new_tokens=NEW, temperature=0, stop=[word]))[0]
    assert (s.finish_reason, s.stop_reason) == ("stop", word)
    assert s.text == free.text[: free.text.index(word)]
    assert word in tok.decode(s.token_ids) and word not in tok.decode(s.token_ids[:-1])
    # stream: one finished event per sample, after generation
    events = list(gen.stream([prompts[2], prompts[0]], SamplingParams(max_new_tokens=4, temperature=0)))
    assert [(e.prompt_index, e.finished) for e in events] == [(0, True), (1, True)]
    assert events[0].completion.token_ids == free.token_ids[:4] and events[0].text == events[0].completion.text


def test_logprobs_match_the_policy_forward_and_top_logprobs(smol):
    gen, model, tok, prompts = smol
    T = 0.7
    outs = gen.generate(prompts, SamplingParams(max_new_tokens=NEW, temperature=T, seed=1, logprobs=3), n=2)
    assert [(c.prompt_index, c.sample_index) for c in outs] == [(i, s) for i in range(3) for s in range(2)]
    assert outs[0].token_ids != outs[1].token_ids  # n samples differ
    for c in outs:
        ref = teacher_forced(model, c.prompt_token_ids, c.token_ids, T)
        assert torch.allclose(torch.tensor(c.logprobs), ref, atol=1e-3), (c.logprobs, ref)
        assert len(c.top_logprobs) == len(c.token_ids)
        for tok_id, lp, top in zip(c.token_ids, c.logprobs, c.top_logprobs):
            assert len(top) == 3 and [v for _, v in top] == sorted((v for _, v in top), reverse=True)
            if tok_id in dict(top):
                assert dict(top)[tok_id] == pytest.approx(lp, abs=1e-6)
            else:
                assert lp <= top[-1][1] + 1e-6


def test_seed_repeats_samples_and_leaves_the_callers_rng_alone(smol):
    gen, model, tok, prompts = smol
    sp = SamplingParams(max_new_tokens=8, temperature=1.0, seed=7)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = [c.token_ids for c in gen.generate(prompts, sp, n=2)]
    assert torch.equal(torch.get_rng_state(), state)
    assert a == [c.token_ids for c in gen.generate(prompts, sp, n=2)]
    b = [c.token_ids for c in gen.generate(prompts, SamplingParams(max_new_tokens=8, temperature=1.0, seed=8), n=2)]
    assert a != b


def test_seeded_samples_do_not_depend_on_the_batch(smol):
    """Per-sample seeds (vLLM's per-request seed = stream_key(seed, s, prompt) >> 1): a prompt's samples are
    the same alone, with other prompts and in reverse order; its samples differ from each other."""
    gen, model, tok, prompts = smol

    def sample(ps, seeds):
        params = [SamplingParams(max_new_tokens=8, temperature=1.0, seed=s) for s in seeds]
        return {(c.prompt_index, c.sample_index): c.token_ids for c in gen.generate(ps, params, n=3)}

    alone = sample(prompts[:1], [5])
    together = sample(prompts, [5, 6, 7])
    reverse = sample(prompts[::-1], [7, 6, 5])
    assert [alone[0, j] for j in range(3)] == [together[0, j] for j in range(3)] == [reverse[2, j] for j in range(3)]
    assert len({tuple(alone[0, j]) for j in range(3)}) == 3
    other = sample(prompts[:1], [50])  # another seed: other samples
    assert all(other[0, j] != alone[0, j] for j in range(3))


def test_push_weights_changes_the_next_answer_tied_lm_head_included(smol):
    gen, model, tok, prompts = smol
    before = greedy(gen, prompts)
    changed = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    try:
        # only the tied embedding: without re-packing vLLM's lm_head, its output layer would stay old
        with torch.no_grad():
            w = changed.model.embed_tokens.weight
            w.add_(0.5 * w.std() * torch.randn(w.shape, generator=g))
        assert changed.lm_head.weight is w
        seconds = gen.push_weights(changed)
        assert seconds > 0
        after = greedy(gen, prompts)
        assert after != before
        assert after == greedy(Engine(changed, tok, precision="fp32"), prompts)
        # one layer zeroed
        with torch.no_grad():
            changed.model.layers[3].mlp.down_proj.weight.zero_()
        gen.push_weights(changed)
        zeroed = greedy(gen, prompts)
        assert zeroed != after
        assert zeroed == greedy(Engine(changed, tok, precision="fp32"), prompts)
    finally:
        gen.push_weights(model)
    assert greedy(gen, prompts) == before


def test_lora_policy_is_pushed_merged_and_left_unmerged(smol):
    from peft import LoraConfig, get_peft_model

    gen, model, tok, prompts = smol
    torch.manual_seed(0)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(model), cfg)
    with torch.no_grad():  # make the adapters matter: B (zero-initialised by LoRA) random and large
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    named = dict(hf_named_tensors(peft_model))
    expected = {n: p for n, p in merged.named_parameters()}
    assert named.keys() == expected.keys()  # HF names, no lora_A/B or base_layer, tied weight once
    for n, p in expected.items():
        assert torch.allclose(named[n], p, atol=1e-6), n
    assert any("lora_B" in n for n, _ in peft_model.named_parameters())  # the live model keeps its adapters
    try:
        gen.push_weights(peft_model)
        assert greedy(gen, prompts) == greedy(Engine(merged, tok, precision="fp32"), prompts)
    finally:
        gen.push_weights(model)


def test_unsupported_head_size_is_one_clear_error(tiny):
    # tiny-random's head size is 16; vLLM's CPU attention has no kernel for it
    with pytest.raises(UserError, match="head sizes"):
        VLLMGenerator(tiny.model, tiny.tokenizer, say=lambda *a: None)


@pytest.fixture(scope="module")
def tiny32(tiny_path, tmp_path_factory) -> str:
    """tiny-random with head size 32 (vLLM's CPU attention has no kernel for its 16) and its final
    norm ×12 (peaked samples, see tests/test_ppo.py)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_path)
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 2, 1, 32
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.fill_(12.0)
    path = tmp_path_factory.mktemp("models") / "tiny32"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_path).save_pretrained(path)
    return str(path)


def test_ppo_with_vllm_samples_from_the_pushed_policy(tiny32, tmp_path, monkeypatch):
    """2 PPO iterations with rollout_backend=vllm: KL 0 at iteration 0, and at each iteration
    vLLM's log-probs are those of the policy as it is then (after the optimizer step), not the
    initial one: the weights were pushed."""
    from rlhfkit.config import PPOConfig
    from rlhfkit.recipes.common import read_metrics
    from rlhfkit.recipes.ppo import train_ppo

    initial = load_causal_lm(tiny32).model.eval()
    seen: list[tuple[float, float]] = []  # per generate call: max |Δ| vs the current / the initial policy
    pushed: list = []
    push, generate = VLLMGenerator.push_weights, VLLMGenerator.generate

    def spy_push(self, model):
        pushed.append(model)
        return push(self, model)

    def spy_generate(self, prompts, params=None, n=1, progress=False):
        outs = generate(self, prompts, params, n, progress)
        T = (params[0] if isinstance(params, list) else params).temperature  # PPO: one SamplingParams per prompt

        def worst(model):
            return max(
                (torch.tensor(c.logprobs) - teacher_forced(model, c.prompt_token_ids, c.token_ids, T)).abs().max()
                for c in outs
            )

        seen.append((float(worst(pushed[-1])), float(worst(initial))))
        return outs

    monkeypatch.setattr(VLLMGenerator, "push_weights", spy_push)
    monkeypatch.setattr(VLLMGenerator, "generate", spy_generate)
    cfg = PPOConfig(
        model=tiny32,
        out=str(tmp_path / "ppo"),
        rollout_backend="vllm",
        batch_size=8,
        max_new_tokens=12,
        temperature=1.0,
        lr=3e-3,
        precision="fp32",
        missing_eos_penalty=None,
        limit=16,
        max_steps=2,
    )
    train_ppo(cfg, reward_fn=lambda p, r, f: [x.count("\n") / 4 for x in r], say=lambda *a: None)
    rows = read_metrics(tmp_path / "ppo")
    assert len(rows) == 2 and len(seen) == 2
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # fp32: the policy starts as the reference
    assert all(r["time_push"] > 0 for r in rows)
    assert seen[0][0] < 1e-3 and seen[0][1] < 1e-3  # iteration 0: the initial weights
    assert seen[1][0] < 1e-3 < seen[1][1]  # iteration 1: the updated policy's, which differ from the initial
