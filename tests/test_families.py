"""Every stage on tiny random models of several Hugging Face families (tests/families.py): LLaMA,
Qwen2, Qwen3, Gemma 3, Mistral, Phi-3, GPT-2 and Gemma 2.

Two kinds of test. The layout tests check numbers: PPO's log-probs (policy and reference), the
reward model's scores however a row is padded or shared, and the evals' log-likelihoods equal what
the model's own ``forward`` gives — on models whose logits are made large, so that a missed
soft-cap (Gemma) would show. The end-to-end tests run SFT, the reward model, two PPO iterations,
a small pipeline (about ten seconds), TruthfulQA MC and a chat turn of the OpenAI API on each
family, the others in seconds. Families the rollout engine does not run generate with
transformers' ``generate`` (rollout_backend=auto).
"""

from __future__ import annotations

import dataclasses
import json
import math
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from families import FAMILIES, tiny_family

from rlhfkit.recipes.common import read_metrics

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CAP = 30.0  # the tiny Gemmas' final_logit_softcapping


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="session")
def family_path(tmp_path_factory):
    """``family_path(name)``: the tiny ``name`` model's directory, built once per session."""
    root = tmp_path_factory.mktemp("families")
    return lambda name: tiny_family(name, root)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def load(path: str, scale: float = 1.0):
    """The model (fp32, dropout off) and tokenizer; ``scale`` multiplies the output embeddings, which
    makes the logits that much larger (tied input embeddings scale too: the same kind of model)."""
    from rlhfkit.models.loading import load_causal_lm

    loaded = load_causal_lm(path)
    with torch.no_grad():
        loaded.model.get_output_embeddings().weight.mul_(scale)
    return loaded.model.eval(), loaded.tokenizer


def own_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of ``model(ids).logits``, one unpadded row: (T, V)."""
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


# ---------------------------------------------------------------------------------------------
# layout: the numbers are the model's own
# ---------------------------------------------------------------------------------------------


def test_ppo_logprobs_are_the_models_own(family, family_path):
    """PPO's no-grad forwards (policy, reference, policy-head values) on right-padded rows of two
    lengths: the log-probs equal log_softmax(model(query + response).logits) at the response tokens."""
    from torch import nn

    from rlhfkit.models.layout import head_logits, hidden_size, trunk
    from rlhfkit.recipes.ppo_models import Critic, make_batch, rollout_forwards

    model, tok = load(family_path(family), scale=40.0)
    ref, _ = load(family_path(family), scale=40.0)
    queries = [[11, 12, 13, 14, 15], [21, 22, 23, 24, 25, 26, 27, 28, 29]]
    response = torch.tensor([[31, 32, 33, 34], [41, 42, 43, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    batch = make_batch(queries, response, mask, tok.pad_token_id)
    head = nn.Linear(hidden_size(model), 1, bias=False)
    out = rollout_forwards(model, ref, Critic("policy_head", head=head), batch, 1.0, 2, nullcontext, False)
    for i, q in enumerate(queries):
        n = int(mask[i].sum())
        lp = own_logprobs(model, q + response[i, :n].tolist())
        want = lp[len(q) - 1 + torch.arange(n), response[i, :n]]
        assert torch.allclose(out["logprobs"][i, :n], want, atol=1e-4), (family, out["logprobs"][i, :n], want)
    assert torch.equal(out["ref_logprobs"], out["logprobs"])  # same weights: a KL of exactly 0
    assert out["values"].shape == (2, 4) and torch.isfinite(out["values"]).all()
    if family.startswith("gemma"):  # the test bites: without the soft-cap these logits are far off
        with torch.no_grad():
            h = trunk(model)(input_ids=torch.tensor([queries[0]])).last_hidden_state
            raw = model.get_output_embeddings()(h)
        assert raw.abs().max() > CAP and (head_logits(model, h) - raw).abs().max() > 1.0


def test_a_forward_that_does_more_than_the_head_falls_back_to_the_whole_model(family_path):
    """A model whose logits are not what ``head_logits`` makes of its trunk (here: LLaMA with a
    soft-cap in its config that its forward ignores) is run whole, and PPO's numbers stay its own."""
    from rlhfkit.models.layout import split_is_exact
    from rlhfkit.recipes.ppo_models import make_batch, policy_forward

    model, tok = load(family_path("llama"), scale=40.0)
    assert split_is_exact(model)
    model, tok = load(family_path("llama"), scale=40.0)
    model.config.final_logit_softcapping = 5.0
    assert not split_is_exact(model)
    q, r = [5, 6, 7, 8], [9, 10, 11]
    batch = make_batch([q], torch.tensor([r]), torch.ones(1, 3, dtype=torch.bool), tok.pad_token_id)
    with torch.no_grad():
        h, logits = policy_forward(model, batch)
    lp = torch.log_softmax(logits[0].float(), -1)[torch.arange(3), torch.tensor(r)]
    want = own_logprobs(model, q + r)[len(q) - 1 + torch.arange(3), torch.tensor(r)]
    assert torch.allclose(lp, want, atol=1e-5) and h.shape == (1, 3, 64)


def test_ptx_loss_is_the_models_own_nll(family, family_path):
    from rlhfkit.recipes.ppo import ptx_loss

    model, tok = load(family_path(family), scale=40.0)
    chunks = [[3, 4, 5, 6, 7, 8], [9, 10, 11]]
    with torch.no_grad():
        got = ptx_loss(model, chunks, tok.pad_token_id)
    nll = [-own_logprobs(model, c)[torch.arange(len(c) - 1), torch.tensor(c[1:])] for c in chunks]
    assert got.item() == pytest.approx(torch.cat(nll).mean().item(), rel=1e-4)


def test_reward_model_scores_do_not_depend_on_padding_or_sharing(family, family_path):
    """One score per sequence, read at its last token: the same alone, right-padded, left-padded,
    and with the prompt shared by its responses in one row (``collate_shared_prompt``'s 4-D mask)."""
    from rlhfkit.data.tokenize import Encoded
    from rlhfkit.models.heads import load_reward_model
    from rlhfkit.recipes.reward import score_groups

    rm, tok = load_reward_model(family_path(family))
    rm.eval()
    pad = rm.config.pad_token_id
    assert pad is not None and pad != tok.eos_token_id  # GPT-2's config has none: one is set
    prompt = [101, 102, 103, 104, 105, 106]
    rows = [prompt + [201, 202, tok.eos_token_id], prompt + [301, 302, 303, 304, tok.eos_token_id]]
    T = max(len(r) for r in rows)

    def batch(left: bool):
        ids = torch.full((2, T), pad)
        mask = torch.zeros(2, T, dtype=torch.long)
        for i, r in enumerate(rows):
            cols = slice(T - len(r), T) if left else slice(0, len(r))
            ids[i, cols], mask[i, cols] = torch.tensor(r), 1
        return ids, mask

    with torch.no_grad():
        alone = torch.cat([rm(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long)) for r in rows])
        right = rm(*batch(left=False))
        left = rm(*batch(left=True))
        group = ([Encoded(r, len(prompt)) for r in rows], [0, 1])
        shared = score_groups(rm, [group], pad, "cpu", share_prompt=True)[0]
        separate = score_groups(rm, [group], pad, "cpu", share_prompt=False)[0]
    assert torch.isfinite(alone).all() and alone[0] != alone[1]
    for other in (right, left, shared, separate):
        assert torch.allclose(other, alone, atol=1e-5), (family, other, alone)


def test_packed_sft_rows_compute_what_the_examples_compute_alone(family, family_path):
    """SFT's packed rows (a block-diagonal 4-D mask, positions restarting per example) give each
    example its own log-probs: the mask reaches every family's attention in a form it applies
    (Gemma 2's eager attention adds it to the scores)."""
    from rlhfkit.accel.attention import additive_attention_mask
    from rlhfkit.data.tokenize import Encoded, collate_packed

    model, tok = load(family_path(family), scale=40.0)
    examples = [[7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18]]
    batch = collate_packed([Encoded(e, 1) for e in examples], tok.pad_token_id, 64)
    assert batch["input_ids"].shape == (1, 12)
    with torch.no_grad():
        mask = additive_attention_mask(model, batch["attention_mask"])
        logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"]).logits
    packed = torch.log_softmax(logits[0].float(), -1)
    at = 0
    for e in examples:
        alone = own_logprobs(model, e)
        assert torch.allclose(packed[at : at + len(e)], alone, atol=1e-4), family
        at += len(e)


def test_loglik_scorer_gives_the_models_own_loglikelihoods(family, family_path):
    """The evals' scorer (trunk + head on continuation positions, or the whole model; the context
    run once and its cache repeated, or not) sums the log-probs of ``model(context + continuation)``."""
    from rlhfkit.evals.loglik import LoglikScorer

    model, tok = load(family_path(family), scale=40.0)
    requests = [
        ("Q: What is the capital of France?\nA:", " Paris"),
        ("Q: What is the capital of France?\nA:", " It is Lyon, in the south."),
        ("Q: Is water wet?\nA:", " yes"),
    ]
    for share in (True, False):
        scorer = LoglikScorer(model, tok, batch_size=2, share_context=share, show_progress=False)
        got = scorer.loglikelihood(requests)
        for (c, x), value in zip(requests, got):
            ctx, cont = scorer.encode_pair(c, x)
            lp = own_logprobs(model, ctx + cont)
            want = lp[len(ctx) - 1 + torch.arange(len(cont)), torch.tensor(cont)].sum().item()
            assert value == pytest.approx(want, abs=1e-3), (family, share, x)


def test_accel_applies_only_what_is_exact_and_says_why_not(family, family_path):
    """The CPU training attention gives the model's own logits where it is installed (checked per
    family); SwiGLU's backward takes LLaMA-style MLPs only; the one accel line says what was skipped."""
    from rlhfkit.accel import prepare_for_training
    from rlhfkit.accel.attention import ATTENTION_NAME
    from rlhfkit.accel.swiglu import use_swiglu_function
    from rlhfkit.config import RewardConfig

    model, _ = load(family_path(family), scale=40.0)
    ids = torch.tensor([[5, 17, 29, 41, 53, 65, 77]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    lines: list[str] = []
    applied = prepare_for_training(model, RewardConfig(precision="fp32"), "cpu", lines.append, name=family)
    assert len(lines) == 1 and lines[0].startswith(f"accel ({family}): ")
    assert applied.attention == (model.config._attn_implementation == ATTENTION_NAME)
    if applied.attention:
        with torch.no_grad():
            after = model.eval()(input_ids=ids).logits
        assert torch.allclose(after, before, atol=1e-4 * float(before.abs().max()))
    else:
        assert "no CPU attention" in lines[0]
    llama_mlp = family in ("llama", "qwen2", "qwen3", "mistral")
    assert (use_swiglu_function(model) == model.config.num_hidden_layers) == llama_mlp


def test_gemma2_soft_capped_attention_is_exact():
    """Gemma 2 soft-caps its attention scores: the CPU training attention does the same, at every
    row length (SDPA cannot, so capped rows never go to it)."""
    from types import SimpleNamespace

    from rlhfkit.accel.attention import SHORT_ROWS, short_row_attention

    g = torch.Generator().manual_seed(0)
    module = SimpleNamespace(training=False, is_causal=True)
    for T in (7, SHORT_ROWS + 3):
        q, k, v = (torch.randn(1, 2, T, 8, generator=g) * 6 for _ in range(3))
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        out, _ = short_row_attention(module, q, k, v, causal[None, None], scaling=1.0, softcap=5.0)
        scores = torch.tanh(q @ k.transpose(2, 3) / 5.0) * 5.0
        want = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ v
        assert torch.allclose(out, want.transpose(1, 2), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# end to end: every stage on every family
# ---------------------------------------------------------------------------------------------


def params_of(model_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def test_sft_trains(family, family_path, tmp_path):
    from transformers import AutoConfig

    from rlhfkit.config import SFTConfig
    from rlhfkit.recipes.sft import train_sft

    path = family_path(family)
    cfg = SFTConfig(
        model=path,
        data=str(FIXTURES / "demos.jsonl"),
        out=str(tmp_path / "sft"),
        batch_size=8,
        max_steps=4,
        lr=3e-3,
        warmup_steps=0,
        precision="fp32",
        max_length=64,
        eval_fraction=0.2,
    )
    result = train_sft(cfg, say=lambda *a: None)
    losses = [m["loss"] for m in read_metrics(tmp_path / "sft") if "loss" in m]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    assert result["eval_loss"] < result["eval_loss_before"]
    before, after = params_of(path), params_of(tmp_path / "sft" / "model")
    assert set(before) == set(after) and all(not torch.equal(before[k], after[k]) for k in before)
    assert (
        AutoConfig.from_pretrained(tmp_path / "sft" / "model").model_type == AutoConfig.from_pretrained(path).model_type
    )


def test_reward_model_trains(family, family_path, tmp_path):
    from rlhfkit.config import RewardConfig
    from rlhfkit.models.heads import load_reward_model
    from rlhfkit.recipes.reward import train_reward_model

    path = family_path(family)
    cfg = RewardConfig(
        model=path,
        data=str(FIXTURES / "hh_pairs.jsonl"),
        out=str(tmp_path / "rm"),
        batch_size=4,
        max_steps=3,
        lr=1e-3,
        warmup_steps=0,
        precision="fp32",
        max_length=96,
        eval_fraction=0.25,
    )
    train_reward_model(cfg, say=lambda *a: None)
    rm, tok = load_reward_model(str(tmp_path / "rm" / "model"))
    before = params_of(path)
    after = {k: v for k, v in rm.seq_model.state_dict().items() if k in before}
    assert after and any(not torch.equal(before[k], after[k]) for k in after)
    enc = tok(["Hello there.", "A longer answer, with more words in it."], padding=True, return_tensors="pt")
    with torch.no_grad():
        scores = rm.score(enc["input_ids"], enc["attention_mask"])
    assert scores.shape == (2,) and torch.isfinite(scores).all() and scores[0] != scores[1]


def test_ppo_two_iterations(family, family_path, tmp_path):
    """Two PPO iterations with rollout_backend=auto: the engine where it runs the family, else
    transformers' generate (one notice line); a reward model scores, the critic is a second copy of
    it; then a policy-head critic with PPO-ptx."""
    from transformers import AutoConfig

    from rlhfkit.config import PPOConfig
    from rlhfkit.recipes.ppo import train_ppo
    from rlhfkit.rollout.runner import engine_support

    path = family_path(family)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    common = dict(model=path, batch_size=2, samples_per_prompt=2, max_new_tokens=6, limit=4, precision="fp32")
    common |= dict(max_steps=2, lr=3e-4, missing_eos_penalty=None)
    said: list[str] = []
    train_ppo(PPOConfig(out=str(tmp_path / "rm"), reward_model=path, **common), say=said.append)
    rows = read_metrics(tmp_path / "rm")
    assert len(rows) == 2 and rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    for key in ("score", "kl", "entropy", "value_loss", "policy_loss", "response_length"):
        assert all(math.isfinite(r[key]) for r in rows), key
    reason = engine_support(AutoConfig.from_pretrained(path))
    notices = [s for s in said if s.startswith("rollout:")]
    assert notices == ([] if reason is None else [notices[0]]) and (reason is None or reason in notices[0])

    def reward_fn(prompts, responses, finished):
        return [len(r) / 10 for r in responses]

    out = tmp_path / "head"
    cfg = PPOConfig(out=str(out), critic="policy_head", ptx_data=str(corpus), ptx_coef=0.5, ptx_length=16, **common)
    train_ppo(cfg, reward_fn=reward_fn, say=lambda *a: None)
    rows = read_metrics(out)
    assert len(rows) == 2 and all(math.isfinite(r["ptx_loss"]) and math.isfinite(r["value_loss"]) for r in rows)
    before, after = params_of(path), params_of(out / "model")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_pipeline_quick(family, family_path, tmp_path):
    """The main job's loop, made tiny (pipeline-quick without the rule-based revisions): sample and
    label, SFT, one round of RM and PPO, judge every version."""
    from rlhfkit.config import PipelineConfig, build_config
    from rlhfkit.recipes.pipeline import run_pipeline

    cfg = build_config(PipelineConfig, "pipeline-quick")
    cfg = dataclasses.replace(
        cfg,
        model=family_path(family),
        out=str(tmp_path / "run"),
        train_prompts=4,
        eval_prompts=2,
        k=2,
        max_new_tokens=8,
        round_prompts=2,
        precision="fp32",
        fresh_process=False,
        min_demo_score=-10.0,
        revise_demos=False,
        rank_revisions=False,
        rank_edit_sets=False,
        sft=dataclasses.replace(cfg.sft, batch_size=2, max_steps=2),
        rm=dataclasses.replace(cfg.rm, batch_size=2, max_steps=2),
        ppo=dataclasses.replace(cfg.ppo, max_steps=1, batch_size=2, max_new_tokens=8),
    )
    summary = run_pipeline(cfg, say=lambda *a: None)
    run = tmp_path / "run"
    samples = [json.loads(x) for x in (run / "round0" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(len(s["responses"]) == 2 for s in samples)
    for d in ("sft", "round1/rm", "round1/ppo"):
        assert (run / d / "model" / "config.json").exists(), d
    assert set(summary["versions"]) == {"base", "sft", "ppo1"} and summary["final"] == "ppo1"
    assert len(summary["training"]["ppo1"]) == 1 and math.isfinite(summary["training"]["ppo1"][0]["kl"])


def test_truthfulqa_mc(family, family_path, tmp_path):
    """``rlhfkit eval --suite truthful`` (MC only) on the fixture's 3 questions."""
    from rlhfkit.evals.runner import EvalConfig, run_eval

    res = run_eval(
        EvalConfig(
            models=[f"v={family_path(family)}"],
            suites=["truthful"],
            truthful_gen=False,
            data_dir=str(FIXTURES / "evals"),
            out=str(tmp_path / "eval.json"),
            show_progress=False,
        )
    )
    mc = res["models"]["v"]["truthful"]["mc"]
    assert mc["n"] == 3 and 0.0 <= mc["mc1"] <= 1.0 and 0.0 < mc["mc2"] < 1.0, mc


def test_chat_turn_through_the_openai_api(family, family_path, tmp_path):
    """A chat turn through /v1/chat/completions: the family's own chat template formats the prompt
    (the usage counts it), the answer stops at a stop token or the cap."""
    from fastapi.testclient import TestClient
    from transformers import AutoTokenizer
    from web_support import make_run

    from rlhfkit.config import ServeConfig
    from rlhfkit.web.app import create_app

    path = family_path(family)
    app = create_app(ServeConfig(run=str(make_run(tmp_path, path)), max_new_tokens=8, precision="fp32", rate_limit=0))
    app.state.store.create_user("ann", password="password123")
    key = app.state.store.new_api_key("ann")
    messages = [{"role": "user", "content": "Say hi."}]
    r = TestClient(app).post(
        "/v1/chat/completions",
        json={"model": "sft", "messages": messages, "max_tokens": 6, "temperature": 0},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert isinstance(choice["message"]["content"], str) and choice["finish_reason"] in ("stop", "length")
    prompt = AutoTokenizer.from_pretrained(path).apply_chat_template(messages, add_generation_prompt=True)
    prompt = prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt
    assert body["usage"]["prompt_tokens"] == len(prompt) and 1 <= body["usage"]["completion_tokens"] <= 6
