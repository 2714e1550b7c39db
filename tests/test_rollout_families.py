"""The rollout engine on tiny models of each family it supports, against transformers' own forward.

Every model's matrices and norm weights are redrawn (seeded), so each family's quirks change the
answers: Gemma's (1 + weight) norms and sandwich norms, Qwen3/Gemma 3's per-head q/k norms, Qwen2's
q/k/v biases, Gemma 2's soft-capped attention and logits, Gemma 3's two RoPE bases, LLaMA 3's RoPE
scaling, Phi-3's fused projections and partial rotary. Sliding windows are set shorter than the
sequences (5 tokens) so that the windowed layers hide keys both in the prefill and while decoding.
"""

from __future__ import annotations

import pytest
import torch
from families import tiny_family

from rlhfkit.errors import UserError
from rlhfkit.rollout import Engine, SamplingParams
from rlhfkit.rollout.runner import Runner, engine_support, layer_windows

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")
WINDOW = 5

# config changes that make each family's own features bite in a tiny model
TWEAKS = {
    "llama": dict(
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=32,
        )
    ),
    "mistral": dict(sliding_window=WINDOW),
    "qwen2": dict(),
    "qwen3": dict(sliding_window=WINDOW, use_sliding_window=True, layer_types=["full_attention", "sliding_attention"]),
    "gemma2": dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]),
    "gemma3": dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]),
    "phi3": dict(
        sliding_window=WINDOW, rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5)
    ),
}

TEXTS = [
    "Once upon a time there was",
    "The capital of France is a city that many people",
    "Hi",
    "Write a short poem about the sea, the wind and the long night before the storm",
]


def lively(name: str, tmp_dir, tweaks: dict | None = None):
    """(model, tokenizer) of family ``name`` with ``tweaks`` (default TWEAKS), every weight redrawn:
    matrices at std 0.2, vectors (norm weights, biases) at 1 ± 0.3 (Gemma norms: w ± 0.3 around 0,
    so 1 + w is not 1)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = tiny_family(name, tmp_dir)
    config = AutoConfig.from_pretrained(path)
    for key, value in (TWEAKS[name] if tweaks is None else tweaks).items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            gemma_norm = name.startswith("gemma") and "norm" in pname
            p.copy_(noise * 0.2 if p.dim() == 2 else noise * 0.3 + (0.0 if gemma_norm else 1.0))
    return model, AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    model, tok = lively(request.param, tmp_path_factory.getbasetemp())
    return request.param, model, tok


def stops(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    return eos if isinstance(eos, list) else [eos]


def hf_greedy(model, prompt: list[int], new: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=stops(model), pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def teacher_forced(model, prompt: list[int], tokens: list[int], T: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / T) of a plain HF forward over prompt + tokens, at each generated token."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0].float()
    logp = torch.log_softmax(logits / T, -1)[len(prompt) - 1 : -1]
    return logp.gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def test_greedy_and_logprobs_equal_transformers(family):
    """Prompts of different lengths batched together: each answer token for token what HF's
    ``generate`` gives for that prompt alone, each log-prob what a teacher-forced forward gives."""
    name, model, tok = family
    assert engine_support(model.config) is None
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    assert max(len(p) for p in prompts) > WINDOW
    params = SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=stops(model))
    outs = Engine(model, tok, precision="fp32").generate(prompts, params)
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(model, p, 12), name
        assert torch.tensor(o.logprobs) == pytest.approx(teacher_forced(model, p, o.token_ids), abs=1e-4)
    # answers that depend on the prompt and on the tokens before them (a dropped norm shows)
    assert len({tuple(o.token_ids) for o in outs}) == len(outs)
    assert sum(len(o.token_ids) for o in outs) > 20


def test_sampling_n_samples_with_exact_logprobs(family):
    name, model, tok = family
    prompts = [tok(t)["input_ids"] for t in TEXTS[:2]]
    T = 0.8
    outs = Engine(model, tok, precision="fp32", max_batch=4).generate(
        prompts, SamplingParams(max_new_tokens=8, temperature=T, seed=1, ignore_eos=True), n=3
    )
    assert [(o.prompt_index, o.sample_index) for o in outs] == [(p, s) for p in range(2) for s in range(3)]
    assert len({tuple(o.token_ids) for o in outs}) > 3  # real sampling
    for o in outs:
        assert len(o.token_ids) == 8
        ref = teacher_forced(model, o.prompt_token_ids, o.token_ids, T)
        assert torch.tensor(o.logprobs) == pytest.approx(ref, abs=1e-4), name


def test_bf16_runs_each_family_near_fp32(family):
    """precision='bf16': LLaMA-shaped families (Qwen3 with its q/k norms) take the fast path,
    Gemma and a partial rotary (Phi-3 here) the module path under autocast; log-probs near the
    fp32 forward's."""
    name, model, tok = family
    engine = Engine(model, tok, precision="bf16")
    assert engine.runner.uses_fast_path == (not name.startswith("gemma") and name != "phi3")
    prompt = tok(TEXTS[1])["input_ids"]
    out = engine.generate([prompt], SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True))[0]
    ref = teacher_forced(model, prompt, out.token_ids)
    assert torch.tensor(out.logprobs) == pytest.approx(ref, abs=0.25), name
    if any(layer_windows(model.config)):  # a window shorter than the cache: masks, not the C++ kernel
        assert not engine.runner.last_decode_kernel


@pytest.mark.parametrize("name", ["qwen3", "phi3"])
def test_bf16_fast_path_takes_the_decode_kernel(name, tmp_path_factory):
    """At windows longer than any sequence, the fast path's C++ decode attention runs: Qwen3 with
    the plain decode step (its q/k norms are not in the fused one), Phi-3 (fused qkv and gate/up
    projections) with the fused step; the numbers agree with the SDPA path's."""
    from rlhfkit.rollout import attention_cpu

    if not attention_cpu.ready(torch.zeros(1, 1, 1, 16, dtype=torch.bfloat16), 1):
        pytest.skip("decode-attention kernel not available here (the engine uses SDPA)")
    model, tok = lively(name, tmp_path_factory.getbasetemp(), tweaks={})
    engine = Engine(model, tok, precision="bf16")
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    params = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    outs = engine.generate(prompts, params)
    assert engine.runner.last_decode_kernel and engine.runner.last_decode_fused == (name == "phi3")
    for p, o in zip(prompts, outs):  # near the fp32 forward (bf16 roundings)
        assert o.logprobs == pytest.approx(teacher_forced(model, p, o.token_ids).tolist(), abs=0.25)
    engine.runner.decode_kernel = False
    for o, ref in zip(outs, engine.generate(prompts, params)):
        assert not engine.runner.last_decode_kernel
        k = next((j for j, (a, b) in enumerate(zip(o.token_ids, ref.token_ids)) if a != b), len(o.token_ids))
        assert k >= 1 and o.logprobs[:k] == pytest.approx(ref.logprobs[:k], abs=0.15)


def test_multimodal_gemma3_runs_its_text_model(tmp_path_factory):
    """What ``AutoModelForCausalLM`` gives for Gemma 3 4B and up, Gemma3ForConditionalGeneration:
    on text prompts the engine equals its ``generate``."""
    import transformers as tf

    path = tiny_family("gemma3", tmp_path_factory.getbasetemp())
    tok = tf.AutoTokenizer.from_pretrained(path)
    text = tf.AutoConfig.from_pretrained(path).to_dict()
    text.update(TWEAKS["gemma3"], final_logit_softcapping=None)  # the multimodal class does not cap logits
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28)
    config = tf.Gemma3Config(
        text_config=text, vision_config=dict(vision, patch_size=14), mm_tokens_per_image=4, image_token_index=3
    )
    assert engine_support(config) is None
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise * 0.2 if p.dim() == 2 else noise * 0.3)
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    outs = Engine(model, tok, precision="fp32").generate(prompts, SamplingParams(max_new_tokens=10, temperature=0))
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(model, p, 10)
        assert torch.tensor(o.logprobs) == pytest.approx(teacher_forced(model, p, o.token_ids), abs=1e-4)
    capped = tf.Gemma3Config(text_config=dict(text, final_logit_softcapping=30.0), vision_config=vision)
    assert "soft-capping" in engine_support(capped)


def test_engine_support_names_what_it_cannot_run():
    import transformers as tf

    assert "gpt2" in engine_support(tf.GPT2Config())
    long = tf.Phi3Config(
        rope_parameters=dict(
            rope_type="longrope",
            rope_theta=1e4,
            short_factor=[1.0] * 48,
            long_factor=[2.0] * 48,
            original_max_position_embeddings=4096,
        ),
        max_position_embeddings=131072,
    )
    assert "longrope" in engine_support(long)  # its frequencies switch with the sequence length
    assert "bidirectional" in engine_support(tf.Gemma3TextConfig(use_bidirectional_attention=True))
    dynamic = tf.LlamaConfig(rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0))
    assert "dynamic" in engine_support(dynamic)
    for config in (
        tf.LlamaConfig(),
        tf.MistralConfig(),
        tf.Qwen2Config(),
        tf.Qwen3Config(),
        tf.Gemma2Config(),
        tf.Gemma3TextConfig(),
        tf.Phi3Config(),
    ):
        assert engine_support(config) is None, config.model_type
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(UserError, match="model_type gpt2 has no engine path"):
        Runner(gpt2)


def test_engine_support_runs_the_common_small_models():
    """The config.json of Gemma-3-270M, Qwen3-0.6B and Llama-3.2-1B as published (their shapes;
    no weights): the engine runs them, Gemma 3 with its 512-token local windows."""
    import transformers as tf

    local_global = (["sliding_attention"] * 5 + ["full_attention"]) * 3
    gemma = tf.Gemma3TextConfig.from_dict(
        dict(hidden_size=640, num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
             intermediate_size=2048, sliding_window=512, query_pre_attn_scalar=256, rope_local_base_freq=10000.0,
             rope_theta=1000000.0, rope_scaling=None, max_position_embeddings=32768, final_logit_softcapping=None,
             attn_logit_softcapping=None, vocab_size=262144, layer_types=local_global)
    )  # fmt: skip
    qwen = tf.Qwen3Config.from_dict(
        dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
             max_position_embeddings=40960, rope_theta=1000000.0, rope_scaling=None, use_sliding_window=False,
             sliding_window=None, max_window_layers=28, tie_word_embeddings=True, vocab_size=151936)
    )  # fmt: skip
    llama = tf.LlamaConfig.from_dict(
        dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
             rope_theta=500000.0, max_position_embeddings=131072, vocab_size=128256,
             rope_scaling=dict(factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0,
                               original_max_position_embeddings=8192, rope_type="llama3"))
    )  # fmt: skip
    for config in (gemma, qwen, llama):
        assert engine_support(config) is None, config.model_type
    assert layer_windows(gemma)[:6] == [512] * 5 + [None] and set(layer_windows(qwen)) == {None}


def test_layer_windows_follow_the_config():
    import transformers as tf

    assert layer_windows(tf.MistralConfig(num_hidden_layers=2, sliding_window=7)) == [7, 7]
    assert layer_windows(tf.MistralConfig(num_hidden_layers=2, sliding_window=None)) == [None, None]
    assert layer_windows(tf.Qwen3Config(num_hidden_layers=2)) == [None, None]  # use_sliding_window off
    g3 = tf.Gemma3TextConfig(num_hidden_layers=7, sliding_window=512)
    assert layer_windows(g3) == [512] * 5 + [None, 512]  # five local layers, then a global one
