"""The rollout engine on the real SmolLM2-135M-Instruct (slow tier)."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.rollout import Engine, SamplingParams

pytestmark = pytest.mark.slow

EOS = 2  # <|im_end|>


@pytest.fixture(scope="module")
def smol(smollm2_path):
    from rlhfkit.models.loading import load_causal_lm

    return load_causal_lm(smollm2_path)  # fp32


@pytest.fixture(scope="module")
def chat(smol):
    """The first 20 requests of the built-in task's eval split, chat-formatted."""
    from rlhfkit.data.tokenize import encode_prompt
    from rlhfkit.tasks import load_task

    return [encode_prompt(smol.tokenizer, p.messages) for p in load_task("eval")[:20]]


def until_eos(ids: list[int]) -> list[int]:
    return ids[: ids.index(EOS) + 1] if EOS in ids else ids


def test_greedy_matches_transformers_generate_fp32(smol, chat):
    model, tok = smol.model, smol.tokenizer
    new = 48
    outs = Engine(model, tok, precision="fp32").generate(chat, SamplingParams(max_new_tokens=new, temperature=0))
    tok.padding_side = "left"
    batch = tok.pad({"input_ids": chat}, return_tensors="pt")
    with torch.no_grad():
        ref = model.generate(**batch, max_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)
    ref = [until_eos(r) for r in ref[:, batch["input_ids"].shape[1] :].tolist()]
    assert [o.token_ids for o in outs] == ref
    for o in outs:  # EOS ends a sample exactly, and is kept
        assert o.finish_reason == ("stop" if o.token_ids[-1] == EOS else "length")
        assert EOS not in o.token_ids[:-1]
    with torch.no_grad():  # one prompt alone, no padding on the reference side
        alone = model.generate(torch.tensor([chat[5]]), max_new_tokens=new, do_sample=False, pad_token_id=EOS)
    assert outs[5].token_ids == until_eos(alone[0, len(chat[5]) :].tolist())


def test_logprobs_equal_teacher_forced_forward_fp32(smol, chat):
    model, tok = smol.model, smol.tokenizer
    outs = Engine(model, tok, precision="fp32").generate(
        chat[:3], SamplingParams(max_new_tokens=32, temperature=1.0, seed=0), n=2
    )
    for o in outs:
        with torch.no_grad():
            logits = model(torch.tensor([o.prompt_token_ids + o.token_ids])).logits[0]
        lp = torch.log_softmax(logits.float(), -1)[len(o.prompt_token_ids) - 1 : -1]
        ref = lp.gather(-1, torch.tensor(o.token_ids)[:, None])[:, 0]
        assert torch.tensor(o.logprobs) == pytest.approx(ref, abs=1e-4)


def test_bf16_autocast_close_to_fp32(smol, chat):
    """bf16 rollouts: log-probs near an fp32 teacher-forced pass (PPO recomputes them anyway)."""
    model, tok = smol.model, smol.tokenizer
    outs = Engine(model, tok, precision="bf16").generate(
        chat[:4], SamplingParams(max_new_tokens=32, temperature=1.0, seed=0), n=2
    )
    diffs = []
    for o in outs:
        with torch.no_grad():
            logits = model(torch.tensor([o.prompt_token_ids + o.token_ids])).logits[0]
        lp = torch.log_softmax(logits.float(), -1)[len(o.prompt_token_ids) - 1 : -1]
        diffs.append((lp.gather(-1, torch.tensor(o.token_ids)[:, None])[:, 0] - torch.tensor(o.logprobs)).abs())
    d = torch.cat(diffs)
    assert d.mean() < 0.1, d.mean()


def test_stop_string_on_real_text(smol, chat):
    model, tok = smol.model, smol.tokenizer
    engine = Engine(model, tok, precision="fp32")
    sp = dict(max_new_tokens=64, temperature=0)
    full = engine.generate(chat[:6], SamplingParams(**sp))
    cut = engine.generate(chat[:6], SamplingParams(**sp, stop=["\n"]))
    checked = 0
    for f, c in zip(full, cut):
        if "\n" not in f.text:
            assert c.token_ids == f.token_ids
            continue
        checked += 1
        assert c.text == f.text[: f.text.index("\n")]
        assert (c.finish_reason, c.stop_reason) == ("stop", "\n")
        assert c.token_ids == f.token_ids[: len(c.token_ids)]
        assert "\n" in tok.decode(c.token_ids) and "\n" not in tok.decode(c.token_ids[:-1])
    assert checked > 0
