"""The rollout engine on tiny random models: exactness against transformers, stops, batching."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from rlhfkit.rollout import Engine, SamplingParams


@pytest.fixture(scope="module")
def tiny_mod(tiny_path):
    from rlhfkit.models.loading import load_causal_lm

    return load_causal_lm(tiny_path)


def prompts_of(tok, n=20):
    """The first ``n`` requests of the built-in task's eval split, chat-formatted."""
    from rlhfkit.data.tokenize import encode_prompt
    from rlhfkit.tasks import load_task

    return [encode_prompt(tok, p.messages) for p in load_task("eval")[:n]]


def hf_greedy(model, prompt, new):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, pad_token_id=2)
    return out[0, len(prompt) :].tolist()


def hf_greedy_batch(model, tok, prompts, new):
    """transformers.generate on the left-padded batch (it derives positions from the mask)."""
    tok.padding_side = "left"
    batch = tok.pad({"input_ids": prompts}, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[:, batch["input_ids"].shape[1] :].tolist()


def teacher_forced_logprobs(model, prompt, tokens, T):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0].float()  # (L, V)
    logp = torch.log_softmax(logits / T, -1)[len(prompt) - 1 : -1]  # (n, V)
    return logp.gather(-1, torch.tensor(tokens)[:, None])[:, 0]


@pytest.mark.parametrize("which", ["tiny_mod", "sharp", "lively"])
def test_greedy_matches_transformers_generate(which, request):
    """20 real prompts of different lengths, batched together (rows of different positions)."""
    loaded = request.getfixturevalue(which)
    model, tok = loaded.model, loaded.tokenizer
    prompts = prompts_of(tok, 20 if which == "tiny_mod" else 10)
    assert len({len(p) for p in prompts}) > 5
    outs = Engine(model, tok, precision="fp32").generate(prompts, SamplingParams(max_new_tokens=10, temperature=0))
    assert [o.token_ids for o in outs] == hf_greedy_batch(model, tok, prompts, 10)
    if which == "lively":  # answers that depend on the prompt and on every token before them
        assert len({tuple(o.token_ids) for o in outs}) == len(outs) and all(len(set(o.token_ids)) >= 5 for o in outs)
    assert all(o.finish_reason == "length" for o in outs)
    # and one prompt alone (no padding at all on the reference side)
    assert outs[7].token_ids == hf_greedy(model, prompts[7], 10)


def test_logprobs_equal_teacher_forced_forward(sharp):
    model, tok = sharp.model, sharp.tokenizer
    prompts = [tok("Once upon a time")["input_ids"], tok("The capital of France is a city that")["input_ids"]]
    for T in (1.0, 0.7):
        outs = Engine(model, tok, precision="fp32", max_batch=4).generate(
            prompts, SamplingParams(max_new_tokens=12, temperature=T, seed=3, ignore_eos=True), n=3
        )
        assert len(outs) == 6 and [(o.prompt_index, o.sample_index) for o in outs][:3] == [(0, 0), (0, 1), (0, 2)]
        assert len({tuple(o.token_ids) for o in outs}) > 2  # real sampling happened
        for o in outs:
            ref = teacher_forced_logprobs(model, o.prompt_token_ids, o.token_ids, T)
            assert torch.tensor(o.logprobs) == pytest.approx(ref, abs=1e-4)


def test_top_logprobs_are_the_likeliest_tokens_of_the_same_distribution(sharp):
    """SamplingParams(logprobs=k): per token, the k likeliest (id, log-prob) of log_softmax(logits / T),
    as a teacher-forced forward gives them; the sampled token's log-prob is its entry there; a prompt
    that did not ask gets None; stream events carry the same numbers as the completion."""
    model, tok = sharp.model, sharp.tokenizer
    engine = Engine(model, tok, precision="fp32", max_batch=4)
    prompts = [tok("Once upon a time")["input_ids"], tok("The capital of France is")["input_ids"]]
    T = 0.7
    params = [
        SamplingParams(max_new_tokens=8, temperature=T, seed=3, ignore_eos=True, logprobs=5),
        SamplingParams(max_new_tokens=8, temperature=T, seed=3, ignore_eos=True),
    ]
    outs = engine.generate(prompts, params, n=2)
    for o in outs[2:]:
        assert o.top_logprobs is None
    for o in outs[:2]:
        with torch.no_grad():
            logits = model(torch.tensor([o.prompt_token_ids + o.token_ids])).logits[0].float()
        logp = torch.log_softmax(logits / T, -1)[len(o.prompt_token_ids) - 1 : -1]  # (n, V)
        ref_lp, ref_ids = torch.topk(logp, 5, dim=-1)
        assert len(o.top_logprobs) == len(o.token_ids) == 8
        assert [[t for t, _ in step] for step in o.top_logprobs] == ref_ids.tolist()
        assert torch.tensor([[lp for _, lp in step] for step in o.top_logprobs]) == pytest.approx(ref_lp, abs=1e-4)
        for t, lp, step in zip(o.token_ids, o.logprobs, o.top_logprobs):
            assert dict(step).get(t, lp) == pytest.approx(lp, abs=1e-5)
        assert sum(t in dict(step) for t, step in zip(o.token_ids, o.top_logprobs)) >= 4  # peaked: mostly in the top 5
    streamed: dict = {}
    for ev in engine.stream(prompts, params, n=2):  # the same call, streamed
        assert len(ev.logprobs) == len(ev.token_ids) and (ev.top_logprobs is None) == (ev.prompt_index == 1)
        key = (ev.prompt_index, ev.sample_index)
        streamed.setdefault(key, []).extend(ev.top_logprobs or ev.logprobs)
    assert [streamed[0, 0], streamed[0, 1]] == [outs[0].top_logprobs, outs[1].top_logprobs]
    assert [streamed[1, 0], streamed[1, 1]] == [outs[2].logprobs, outs[3].logprobs]
    greedy = engine.generate(prompts[:1], SamplingParams(max_new_tokens=4, temperature=0, logprobs=1))[0]
    assert [step[0][0] for step in greedy.top_logprobs] == greedy.token_ids  # greedy picks the top token


def test_seed_range_is_torchs(tiny):
    """Seeds torch.Generator takes work at both ends; one past them is a clear UserError (the web
    API's seed 2**70 gave a 500 from manual_seed's overflow)."""
    from rlhfkit.errors import UserError
    from rlhfkit.rollout.sampling import SEED_MAX, SEED_MIN

    engine = Engine(tiny.model, tiny.tokenizer, precision="fp32")
    for seed in (SEED_MIN, SEED_MAX):
        out = engine.generate([[1, 2]], SamplingParams(max_new_tokens=2, seed=seed))
        assert len(out[0].token_ids) == 2
    for seed in (SEED_MIN - 1, SEED_MAX + 1, 2**70):
        with pytest.raises(UserError, match="seed"):
            SamplingParams(seed=seed)


def test_first_token_distribution_chi_square(sharp):
    """n samples of one prompt share a prefill; their first tokens follow softmax(logits / T)."""
    model, tok = sharp.model, sharp.tokenizer
    prompt = tok("The weather today is")["input_ids"]
    T, n = 0.75, 700
    outs = Engine(model, tok, precision="fp32", max_batch=700).generate(
        [prompt], SamplingParams(max_new_tokens=1, temperature=T, seed=0), n=n
    )
    with torch.no_grad():
        p = torch.softmax(model(torch.tensor([prompt])).logits[0, -1].double() / T, -1)
    counts = torch.bincount(torch.tensor([o.token_ids[0] for o in outs]), minlength=p.numel()).double()
    expected = p * n
    big = expected >= 5
    assert big.sum() >= 8 and expected[big].sum() > 0.8 * n, "the test model must put mass on several tokens"
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    assert stats.chisquare(obs.numpy(), exp.numpy()).pvalue > 1e-3


def test_k_samples_share_one_prefill(sharp, monkeypatch):
    model, tok = sharp.model, sharp.tokenizer
    engine = Engine(model, tok, precision="fp32")
    seen = []
    orig = engine.runner.prefill

    def counting(cache, ids, lens, slots, src, rope):
        seen.append((ids.shape[0], slots.shape[0]))
        return orig(cache, ids, lens, slots, src, rope)

    monkeypatch.setattr(engine.runner, "prefill", counting)
    prompts = [tok("a b c")["input_ids"], tok("d e f g")["input_ids"], tok("h i")["input_ids"]]
    engine.generate(prompts, SamplingParams(max_new_tokens=3, seed=0), n=4)
    assert sum(p for p, _ in seen) == 3  # one prefill row per prompt
    assert sum(s for _, s in seen) == 12  # copied into 4 rows each


def test_continuous_batching_equals_one_at_a_time(sharp):
    """Rows finish at different times (per-request lengths, stop ids) and are refilled."""
    model, tok = sharp.model, sharp.tokenizer
    prompts = prompts_of(tok, 5)
    params = [SamplingParams(max_new_tokens=3 + 2 * i, temperature=0) for i in range(len(prompts))]
    alone = [Engine(model, tok, precision="fp32", max_batch=1).generate([p], sp)[0] for p, sp in zip(prompts, params)]
    engine = Engine(model, tok, precision="fp32", max_batch=3)
    together = engine.generate(prompts, params)
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert [len(o.token_ids) for o in together] == [sp.max_new_tokens for sp in params]
    # n > max_batch: samples of one prompt split over several admissions, still identical (greedy)
    sp6 = SamplingParams(max_new_tokens=6, temperature=0)
    many = engine.generate(prompts[:2], sp6, n=4)
    ref = [Engine(model, tok, precision="fp32", max_batch=1).generate([p], sp6)[0].token_ids for p in prompts[:2]]
    assert [o.token_ids for o in many] == [ref[0]] * 4 + [ref[1]] * 4


def test_stop_token_ends_exactly(sharp):
    model, tok = sharp.model, sharp.tokenizer
    engine = Engine(model, tok, precision="fp32")
    prompt = tok("Tell me a story")["input_ids"]
    sp = dict(max_new_tokens=24, temperature=1.0, seed=11)
    full = engine.generate([prompt], SamplingParams(**sp, ignore_eos=True))[0]
    stop_tok = full.token_ids[6]
    first = full.token_ids.index(stop_tok)
    out = engine.generate([prompt], SamplingParams(**sp, stop_token_ids=[stop_tok]))[0]
    assert out.token_ids == full.token_ids[: first + 1]  # the stop token is kept
    assert out.logprobs == full.logprobs[: first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_tok)
    assert full.finish_reason == "length" and full.stop_reason is None
    assert 2 in engine.eos_ids  # <|im_end|> stops by default


def test_stop_string_ends_exactly(sharp):
    model, tok = sharp.model, sharp.tokenizer
    engine = Engine(model, tok, precision="fp32")
    prompt = tok("Write a list")["input_ids"]
    sp = dict(max_new_tokens=30, temperature=1.0, seed=5, ignore_eos=True)
    full = engine.generate([prompt], SamplingParams(**sp))[0]
    # a stop string that starts inside token 8's text and ends inside a later token
    pieces = [tok.decode(full.token_ids[: i + 1], skip_special_tokens=True) for i in range(len(full.token_ids))]
    start = len(pieces[7]) - 1 if len(pieces[7]) > len(pieces[6]) else len(pieces[7])
    stop = full.text[start : start + 4]
    assert len(stop) == 4
    cut = full.text.index(stop)
    ends = next(i for i, t in enumerate(pieces) if stop in t)
    out = engine.generate([prompt], SamplingParams(**sp, stop=[stop, "\x00never"]))[0]
    assert out.text == full.text[:cut]
    assert out.token_ids == full.token_ids[: ends + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)


def test_stream_matches_generate_and_hides_stop_strings(sharp):
    model, tok = sharp.model, sharp.tokenizer
    engine = Engine(model, tok, precision="fp32")
    prompts = [tok("Write a list")["input_ids"], tok("Hi")["input_ids"]]
    sp = SamplingParams(max_new_tokens=20, temperature=1.0, seed=5, ignore_eos=True)
    ref = engine.generate(prompts, sp, n=2)
    stop = ref[0].text[10:13]
    sp_stop = SamplingParams(max_new_tokens=20, temperature=1.0, seed=5, ignore_eos=True, stop=[stop])
    final = engine.generate(prompts, sp_stop, n=2)
    texts, toks, done = {}, {}, {}
    for ev in engine.stream(prompts, sp_stop, n=2):
        key = (ev.prompt_index, ev.sample_index)
        texts[key] = texts.get(key, "") + ev.text
        toks[key] = toks.get(key, []) + ev.token_ids
        assert stop not in texts[key]
        if ev.finished:
            done[key] = ev.completion
    for c in final:
        key = (c.prompt_index, c.sample_index)
        assert texts[key] == c.text and toks[key] == c.token_ids and done[key].token_ids == c.token_ids
    assert final[0].finish_reason == "stop"


def test_seed_reproducible_and_live_weights(tiny):
    """Same seed -> same samples; after a weight update the engine samples from the new weights."""
    model, tok = tiny.model, tiny.tokenizer
    engine = Engine(model, tok, precision="fp32")
    prompt = tok("Hello there")["input_ids"]
    sp = SamplingParams(max_new_tokens=8, seed=1, temperature=0)
    a = engine.generate([prompt], sp)[0]
    assert engine.generate([prompt], sp)[0].token_ids == a.token_ids
    with torch.no_grad():  # an "optimizer step" on the live model
        model.model.norm.weight.mul_(30.0)
        model.model.layers[0].mlp.down_proj.weight.add_(torch.randn_like(model.model.layers[0].mlp.down_proj.weight))
    b = engine.generate([prompt], sp)[0]
    assert b.token_ids == hf_greedy(model, prompt, 8)
    assert b.token_ids != a.token_ids


def test_bf16_autocast_on_fp32_model(sharp):
    """precision='bf16' on an fp32 model: autocast, weights untouched, log-probs close to fp32."""
    model, tok = sharp.model, sharp.tokenizer
    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    engine = Engine(model, tok, precision="bf16")
    assert engine.precision == "bf16" and engine.runner.compute_dtype == torch.bfloat16
    prompt = tok("The weather today is")["input_ids"]
    out = engine.generate([prompt], SamplingParams(max_new_tokens=8, temperature=1.0, seed=0), n=2)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)
    for o in out:
        ref = teacher_forced_logprobs(model, prompt, o.token_ids, 1.0)
        assert (torch.tensor(o.logprobs) - ref).abs().mean() < 0.15


def test_bad_input_errors(tiny):
    from rlhfkit.errors import UserError

    engine = Engine(tiny.model, tiny.tokenizer, precision="fp32")
    with pytest.raises(UserError, match="empty"):
        engine.generate([[]])
    with pytest.raises(UserError, match="SamplingParams"):
        engine.generate([[1], [2]], [SamplingParams()])
    with pytest.raises(UserError, match="positions"):
        engine.generate([[1]], SamplingParams(max_new_tokens=100_000))
    assert engine.generate([]) == []
    out = engine.generate(["Hello"], SamplingParams(max_new_tokens=2, temperature=0))
    assert out[0].prompt_token_ids == tiny.tokenizer("Hello", add_special_tokens=False)["input_ids"]


def test_stream_bf16_on_fp32_model_and_one_call_at_a_time(sharp):
    from rlhfkit.errors import UserError

    model, tok = sharp.model, sharp.tokenizer
    engine = Engine(model, tok, precision="bf16")
    sp = SamplingParams(max_new_tokens=5, temperature=0)
    it = engine.stream([tok("Hi")["input_ids"]], sp)
    first = next(it)
    assert not torch.is_autocast_enabled("cpu")  # autocast does not leak out between events
    with pytest.raises(UserError, match="already generating"):
        engine.generate([[1, 2]], sp)
    events = [first, *it]
    assert sum(len(e.token_ids) for e in events) == 5 and events[-1].finished
    assert engine.generate([[1, 2]], sp)[0].finish_reason == "length"  # free again


# ---------------------------------------------------------------- the bf16 fast path


def test_bf16_fast_path_logits_match_the_modules(sharp):
    """Packed, fused weights (runner fast path) compute what the model's own modules compute."""
    import copy

    from rlhfkit.rollout.runner import FusedLinear, Runner

    model = copy.deepcopy(sharp.model).to(torch.bfloat16)
    run = Runner(model, "bf16")
    prompts = [sharp.tokenizer("Once upon a time there")["input_ids"], sharp.tokenizer("Hi")["input_ids"]]
    T = max(map(len, prompts))
    ids = torch.tensor([p + [0] * (T - len(p)) for p in prompts])  # (2, T) right-padded
    lens = torch.tensor([len(p) for p in prompts])
    slots, src = torch.arange(4), torch.tensor([0, 0, 1, 1])  # 2 samples per prompt
    rope = run.rope_tables(T + 4)
    nxt = torch.tensor([5, 6, 7, 8])

    def step(bound: bool):
        cache = run.new_cache(4, T + 4)
        run.bind(4) if bound else run.unbind()
        first = run.prefill(cache, ids, lens, slots, src, rope).float()  # (4, V)
        second = run.decode(cache, nxt, rope).float()  # (4, V)
        return first, second

    fast = step(True)
    assert isinstance(run._bound[0][0].qkv, FusedLinear)  # q, k, v: one matmul
    mod = step(False)
    with torch.no_grad():  # HF's own forward of the first prompt, bf16
        hf = model(torch.tensor([prompts[0]])).logits[0, -1].float()
    run.unbind()
    scale = mod[0].abs().max()
    for f, m in zip(fast, mod):
        assert (f - m).abs().max() < 0.03 * scale
    assert (fast[0][0] - hf).abs().max() < 0.03 * scale
    assert torch.equal(fast[0][0], fast[0][1])  # the two samples of a prompt share its prefill
    assert not torch.equal(fast[1][0], fast[1][1])  # different next tokens, different logits


def test_bf16_fast_path_reads_live_weights(sharp):
    """Weights are taken from the live modules at every call: an in-place update is seen."""
    import copy

    model = copy.deepcopy(sharp.model)  # fp32: bf16 under autocast, packed once per call
    old = copy.deepcopy(model)
    tok = sharp.tokenizer
    engine = Engine(model, tok, precision="bf16")
    prompt = tok("The weather today is")["input_ids"]
    sp = SamplingParams(max_new_tokens=8, temperature=1.0, seed=0)

    def gap(m, out):
        ref = teacher_forced_logprobs(m, prompt, out.token_ids, 1.0)
        return (torch.tensor(out.logprobs) - ref).abs().mean()

    assert gap(model, engine.generate([prompt], sp)[0]) < 0.15
    with torch.no_grad():  # an "optimizer step" on the live model
        for layer in model.model.layers:
            w = layer.mlp.down_proj.weight
            w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * 0.2)
    out = engine.generate([prompt], sp)[0]
    assert engine.runner._bound is None  # nothing kept between calls
    assert gap(model, out) < 0.15
    assert gap(old, out) > 3 * gap(model, out)


def test_bf16_fast_path_with_lora_adapters(tiny_path):
    """PEFT LoRA projections are called as modules inside the fast path (adapters on and off)."""
    from rlhfkit.config import PPOConfig
    from rlhfkit.models.loading import load_causal_lm
    from rlhfkit.recipes.common import apply_lora

    loaded = load_causal_lm(tiny_path)
    with torch.no_grad():
        loaded.model.model.norm.weight.mul_(25.0)  # peaked distributions (like `sharp`)
    policy = apply_lora(loaded.model, PPOConfig(lora=True, lora_r=4))
    with torch.no_grad():  # trained adapters: lora_B is zero at init
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    tok = loaded.tokenizer
    engine = Engine(policy, tok, precision="bf16")
    prompt = tok("The weather today is")["input_ids"]
    sp = SamplingParams(max_new_tokens=8, temperature=1.0, seed=0)

    def ref(adapters: bool, out):
        with policy.disable_adapter() if not adapters else torch.no_grad():
            return teacher_forced_logprobs(policy, prompt, out.token_ids, 1.0)

    for adapters in (True, False):
        with policy.disable_adapter() if not adapters else torch.no_grad():
            out = engine.generate([prompt], sp)[0]
        # median: large random adapters make single tokens bf16-sensitive (on both paths), and the
        # fused decode step keeps the residual stream in bf16 (0.07-0.19 here vs 0.02 in fp32)
        right = (torch.tensor(out.logprobs) - ref(adapters, out)).abs().median()
        wrong = (torch.tensor(out.logprobs) - ref(not adapters, out)).abs().median()
        assert right < 0.3 and wrong > 10 * right


def test_lm_head_in_chunks_is_bitwise_the_plain_head():
    """The fp32 decode step's LM head runs over vocabulary chunks: the same values for a vocabulary
    that is not a multiple of the chunk, with and without a bias — bit for bit where MKL takes the
    same kernel for a chunk as for the whole head; for one row on an AMX Xeon it takes a GEMV whose
    sums differ in the last bit (seen: 1 ulp), so the check allows 2 ulp."""
    from rlhfkit.rollout.runner import HEAD_CHUNK, head_in_chunks

    g = torch.Generator().manual_seed(0)
    V, d = 2 * HEAD_CHUNK + 37, 64
    w, b = torch.randn(V, d, generator=g), torch.randn(V, generator=g)
    for rows in (1, 5, 16):
        h = torch.randn(rows, d, generator=g)
        for bias in (None, b):
            chunked, plain = head_in_chunks(h, w, bias), torch.nn.functional.linear(h, w, bias)
            assert (chunked - plain).abs().max() <= 2 * torch.finfo(torch.float32).eps * plain.abs().max()
