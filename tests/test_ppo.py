"""PPO recipe on tiny models: the reward rises with KL bounded, exact resume, the LoRA reference,
EOS cutting and the missing-EOS penalty, and temperature-scaled log-prob recomputation.

The synthetic reward is the number of newlines in the response (/4). A tiny random model samples
almost uniformly over 49k tokens, so no single token would ever be seen; ``sharp_path`` is the
same model with its final norm scaled ×12, which makes its samples peaked (entropy ≈ 2 nats) with
the newline token among the frequent ones — a signal PPO can climb in a few iterations.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import MACHINE_METRICS, Crash, newline_reward

from rlhfkit.config import PPOConfig
from rlhfkit.recipes.common import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def ppo_cfg(model: str, critic_model: str, out: Path, **kw) -> PPOConfig:
    base = dict(
        model=model,
        critic_model=critic_model,
        out=str(out),
        batch_size=16,
        max_new_tokens=16,
        temperature=1.0,
        lr=3e-4,
        kl_coef=0.1,
        precision="fp32",
        missing_eos_penalty=None,
        limit=64,
    )
    return PPOConfig(**(base | kw))


def test_ppo_smoke_reward_rises_kl_bounded(sharp_path, tiny_path, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhfkit.feedback.rubric import gold_metrics
    from rlhfkit.recipes.ppo import train_ppo

    out = tmp_path / "ppo"
    result = train_ppo(
        ppo_cfg(sharp_path, tiny_path, out, max_steps=6),
        reward_fn=newline_reward,
        say=lambda *a: None,
        rollout_metrics=gold_metrics,
    )
    rows = read_metrics(out)
    scores = [r["score"] for r in rows]
    kls = [r["kl"] for r in rows]
    print("scores", [round(s, 3) for s in scores], "kl", [round(k, 3) for k in kls])
    assert len(rows) == result["step"] == 6
    assert scores[0] < 1.5 and scores[-1] > scores[0] + 1.0, scores  # a clear rise (max 4 = 16 newlines)
    assert kls[0] == pytest.approx(0.0, abs=1e-5)  # the policy starts as the reference
    assert all(abs(k) < 10 for k in kls), kls
    for key in (
        "score",
        "kl",
        "kl_k3",
        "entropy",
        "clipfrac",
        "approx_kl",
        "value_loss",
        "explained_variance",
        "response_length",
        "beta",
        "time_generate",
        "time_score",
        "time_forward",
        "time_train",
        "gold_score",
        "rss_mb",
        "peak_rss_mb",
    ):
        assert key in rows[-1] and rows[-1][key] is not None and math.isfinite(rows[-1][key]), key
    assert 0 < rows[-1]["rss_mb"] <= rows[-1]["peak_rss_mb"]
    # the policy is a plain HF directory; the critic a sequence-classification one
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.vocab_size > 0
    assert (out / "critic" / "config.json").exists()


def test_group_baseline_climbs_despite_per_prompt_offsets(sharp_path, tiny_path, tmp_path):
    """A reward with large per-prompt offsets (what a pairwise-trained RM has, arbitrarily): with
    4 samples per prompt and score_baseline=group the offsets cancel and the newline count rises."""
    from rlhfkit.recipes.ppo import train_ppo

    seen: list[float] = []

    def offset_reward(prompts, responses, finished):
        lines = [r.count("\n") / 4 for r in responses]
        seen.append(sum(lines) / len(lines))
        return [n + 5.0 * ((sum(map(ord, p.messages[-1]["content"])) % 5) - 2) for n, p in zip(lines, prompts)]

    out = tmp_path / "group"
    cfg = ppo_cfg(sharp_path, tiny_path, out, max_steps=6, batch_size=4, samples_per_prompt=4, score_baseline="group")
    train_ppo(cfg, reward_fn=offset_reward, say=lambda *a: None)
    print("newlines", [round(s, 3) for s in seen])
    assert len(seen) == 6
    assert seen[-1] > seen[0] + 0.5, seen
    rows = read_metrics(out)
    assert all(math.isfinite(r["score"]) for r in rows)


def test_group_baseline_needs_several_samples(tiny_path, tmp_path):
    from rlhfkit.errors import UserError
    from rlhfkit.recipes.ppo import train_ppo

    for kw, msg in (
        (dict(score_baseline="group"), "samples_per_prompt >= 2"),
        (dict(score_baseline="mean"), "expected"),
    ):
        with pytest.raises(UserError, match=msg):
            train_ppo(
                ppo_cfg(tiny_path, tiny_path, tmp_path / "x", **kw), reward_fn=newline_reward, say=lambda *a: None
            )


def test_ppo_exact_resume(sharp_path, tiny_path, tmp_path, monkeypatch):
    """2 iterations + crash + resume for 2 more == 4 straight (fp32, adaptive β, all metrics)."""
    from safetensors.torch import load_file

    from rlhfkit.recipes import ppo_saving
    from rlhfkit.recipes.ppo import train_ppo

    real = ppo_saving.save_checkpoint

    def checkpoint_then_crash(out, step, *args, **kwargs):
        real(out, step, *args, **kwargs)
        if step == 2:
            raise Crash(step)

    kw = dict(
        max_steps=4,
        batch_size=4,
        max_new_tokens=8,
        save_every=1,
        adaptive_kl=True,
        target_kl=0.5,
        kl_horizon=20,
        num_minibatches=2,
        ppo_epochs=2,
        lr=1e-3,
    )
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    train_ppo(ppo_cfg(sharp_path, tiny_path, straight, **kw), reward_fn=newline_reward, say=lambda *a: None)
    with monkeypatch.context() as patch, pytest.raises(Crash):
        patch.setattr(ppo_saving, "save_checkpoint", checkpoint_then_crash)  # dies right after step 2's checkpoint
        train_ppo(ppo_cfg(sharp_path, tiny_path, crashed, **kw), reward_fn=newline_reward, say=lambda *a: None)
    train_ppo(ppo_cfg(sharp_path, tiny_path, crashed, resume=True, **kw), reward_fn=newline_reward, say=lambda *a: None)
    a, b = read_metrics(straight), read_metrics(crashed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    assert len({r["beta"] for r in a}) > 1  # the adaptive controller moved (so its state was restored)
    skip = MACHINE_METRICS
    for ra, rb in zip(a, b):
        for k in ra:
            if k not in skip and ra[k] is not None:
                assert rb[k] == pytest.approx(ra[k], abs=1e-6), (ra["step"], k)
    wa, wb = load_file(straight / "model" / "model.safetensors"), load_file(crashed / "model" / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    ca, cb = load_file(straight / "critic" / "model.safetensors"), load_file(crashed / "critic" / "model.safetensors")
    assert all(torch.allclose(ca[k], cb[k], atol=1e-6) for k in ca)


@pytest.mark.parametrize("critic", ["rm", "policy_head"])
def test_chunk_layout_leaves_ppo_unchanged(sharp_path, tiny_path, tmp_path, critic):
    """Sorted no-grad chunks and length-sorted micro-batches are a speed layout only: one forward
    of all 8 rows and whole minibatches give the same iteration (fp32: metrics and updated
    weights) as chunks of 3 rows and 3 micro-batches per minibatch. (One iteration: a later one
    samples from weights that differ in the last bits, which can flip a sampled token.)"""
    from safetensors.torch import load_file

    from rlhfkit.recipes.ppo import train_ppo

    kw = dict(
        max_steps=1,
        batch_size=8,
        max_new_tokens=12,
        num_minibatches=2,
        ppo_epochs=2,
        critic=critic,
        missing_eos_penalty=-1.0,
    )
    one, split = tmp_path / "one", tmp_path / "split"
    train_ppo(
        ppo_cfg(sharp_path, tiny_path, one, grad_accum=1, forward_batch_size=8, **kw),
        reward_fn=newline_reward,
        say=lambda *a: None,
    )
    train_ppo(
        ppo_cfg(sharp_path, tiny_path, split, grad_accum=3, forward_batch_size=3, **kw),
        reward_fn=newline_reward,
        say=lambda *a: None,
    )
    (a,), (b,) = read_metrics(one), read_metrics(split)
    assert a["policy_loss"] != 0 and a["grad_norm"] > 0
    for k in (
        "score",
        "kl",
        "kl_k3",
        "entropy",
        "reward",
        "explained_variance",
        "value_mean",
        "return_mean",
        "response_length",
        "policy_loss",
        "clipfrac",
        "approx_kl",
        "value_loss",
        "ratio_mean",
        "grad_norm",
    ):
        assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
    wa, wb = load_file(one / "model" / "model.safetensors"), load_file(split / "model" / "model.safetensors")
    before = load_file(Path(sharp_path) / "model.safetensors")
    assert any(not torch.equal(wa[k], before[k]) for k in wa)  # the update happened
    # Adam divides by sqrt(v): where a gradient is ~0, summation-order noise (which differs between
    # CPUs' matmul kernels) can move an element by up to the step size. All but a few agree exactly.
    diff = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa])
    step = torch.cat([(wa[k] - before[k]).abs().flatten() for k in wa]).max()
    assert (diff > 1e-6).float().mean() < 1e-3 and diff.max() <= step


def _rollout(loaded, n_prompts: int = 4, new: int = 8, temperature: float = 1.0, seed: int = 0):
    from rlhfkit.data.tokenize import encode_prompt
    from rlhfkit.recipes.ppo_models import cut_responses, make_batch
    from rlhfkit.rollout import Engine, SamplingParams
    from rlhfkit.tasks import load_task

    tok = loaded.tokenizer
    queries = [encode_prompt(tok, p.messages) for p in load_task("train")[:n_prompts]]
    engine = Engine(loaded.model, tok, precision="fp32")
    comps = engine.generate(queries, SamplingParams(max_new_tokens=new, temperature=temperature, seed=seed))
    response, mask, _ = cut_responses(comps, engine.eos_ids, tok.pad_token_id)
    return comps, make_batch(queries, response, mask, tok.pad_token_id)


def test_logprob_recomputation_matches_engine_with_temperature(sharp_path):
    """log_softmax(logits / T) recomputed by the training forward == the engine's log-probs (fp32)."""
    from contextlib import nullcontext

    from rlhfkit.models.loading import load_causal_lm
    from rlhfkit.recipes.ppo_models import Critic, rollout_forwards

    loaded = load_causal_lm(sharp_path)
    critic = Critic("policy_head", head=torch.nn.Linear(loaded.model.config.hidden_size, 1, bias=False))
    comps, batch = _rollout(loaded, temperature=0.7)
    engine_lp = torch.zeros_like(batch.response, dtype=torch.float32)
    for i, c in enumerate(comps):
        engine_lp[i, : len(c.logprobs)] = torch.tensor(c.logprobs)
    engine_lp = engine_lp * batch.response_mask
    fw = rollout_forwards(loaded.model, loaded.model, critic, batch, 0.7, 3, nullcontext, lora_ref=False)
    assert (fw["logprobs"] - engine_lp).abs().max() < 1e-4
    assert torch.equal(fw["logprobs"], fw["ref_logprobs"])  # same weights: KL exactly 0
    unscaled = rollout_forwards(loaded.model, loaded.model, critic, batch, 1.0, 3, nullcontext, lora_ref=False)
    assert (unscaled["logprobs"] - engine_lp).abs().max() > 0.1  # forgetting T is visibly wrong


def test_bf16_reference_keeps_kl_zero_at_step_0(sharp_path):
    """The bf16 reference (Linear weights stored in bf16, embedding and norms fp32) gives bitwise
    the policy's log-probs under bf16 autocast: KL exactly 0 at step 0, entropy as before."""
    from rlhfkit.accel.weights import bf16_matmul_weights
    from rlhfkit.algos.logprobs import entropy_from_logits, logprobs_and_entropy, logprobs_from_logits
    from rlhfkit.models.loading import load_causal_lm
    from rlhfkit.recipes.ppo_models import Critic, rollout_forwards

    policy = load_causal_lm(sharp_path)
    ref = load_causal_lm(sharp_path).model.requires_grad_(False)
    bf16_matmul_weights(ref)
    assert ref.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert ref.get_input_embeddings().weight.dtype == torch.float32  # the residual stream stays fp32
    _, batch = _rollout(policy, temperature=0.7)
    critic = Critic("policy_head", head=torch.nn.Linear(policy.model.config.hidden_size, 1, bias=False))

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    fw = rollout_forwards(policy.model, ref, critic, batch, 0.7, 3, autocast, lora_ref=False)
    assert torch.equal(fw["logprobs"], fw["ref_logprobs"])
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 50, generator=gen) * 3
    tokens = torch.randint(0, 50, (2, 5), generator=gen)
    lp, ent = logprobs_and_entropy(logits, tokens, 0.7)
    assert torch.equal(lp, logprobs_from_logits(logits, tokens, 0.7))
    # softmax as exp(z - lse) instead of torch.softmax: fp32 rounding, ~1e-5 on peaked rows
    assert torch.allclose(ent, entropy_from_logits(logits, 0.7), atol=1e-4, rtol=1e-4)


def test_compiled_policy_and_reference_start_at_kl_zero(sharp_path, tiny_path, tmp_path):
    """bf16 with compiled blocks (the CPU default): the reference runs the policy's compiled
    kernels, so the first iteration's KL is exactly 0 (an eager reference beside a compiled policy
    differs by bf16 rounding on every token)."""
    from rlhfkit.recipes.ppo import train_ppo

    out = tmp_path / "ppo"
    train_ppo(
        ppo_cfg(sharp_path, tiny_path, out, max_steps=1, precision="bf16", compile="on", critic="policy_head"),
        reward_fn=newline_reward,
        say=lambda *a: None,
    )
    first = read_metrics(out)[0]
    assert first["kl"] == 0.0 and first["kl_k3"] == 0.0, first


def test_lora_reference_is_the_base_model(tiny_path):
    """With LoRA the reference is the policy with adapters disabled: the base model's log-probs."""
    from contextlib import nullcontext

    from rlhfkit.models.loading import load_causal_lm
    from rlhfkit.recipes.common import apply_lora
    from rlhfkit.recipes.ppo_models import Critic, rollout_forwards

    base = load_causal_lm(tiny_path)
    comps, batch = _rollout(base)
    critic = Critic("policy_head", head=torch.nn.Linear(base.model.config.hidden_size, 1, bias=False))
    base_fw = rollout_forwards(base.model, base.model, critic, batch, 1.0, 4, nullcontext, lora_ref=False)

    policy = apply_lora(load_causal_lm(tiny_path).model, PPOConfig(lora=True, lora_r=4))
    with torch.no_grad():  # trained adapters: lora_B is zero at init, so give it weights
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    fw = rollout_forwards(policy, None, critic, batch, 1.0, 4, nullcontext, lora_ref=True)
    assert torch.allclose(fw["ref_logprobs"], base_fw["logprobs"], atol=1e-5)
    assert (fw["logprobs"] - base_fw["logprobs"]).abs().max() > 1e-2  # the adapters do change the policy
    n_params = sum(p.numel() for p in policy.parameters())
    assert n_params < 1.2 * sum(p.numel() for p in base.model.parameters())  # no second copy of the weights


def test_cut_responses_eos_and_padding():
    """Cut after the first EOS; a 'length' sample shorter than the batch is not 'ended' even when pad == EOS."""
    from rlhfkit.recipes.ppo_models import cut_responses
    from rlhfkit.rollout.engine import Completion

    EOS = PAD = 2
    comps = [
        Completion(0, 0, [5], [7, 8, EOS], [0.0] * 3, "", "stop", EOS),
        Completion(1, 0, [5], [7, 8], [0.0] * 2, "", "length"),  # shorter, no EOS
        Completion(2, 0, [5], [7, EOS, 9, 9], [0.0] * 4, "", "length"),  # ignore_eos: tokens after EOS
        Completion(3, 0, [5], [9, 9, 9, 9], [0.0] * 4, "", "length"),
    ]
    response, mask, ended = cut_responses(comps, {EOS}, PAD)
    assert ended.tolist() == [True, False, True, False]
    assert mask.int().tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert response.tolist() == [[7, 8, EOS, PAD], [7, 8, PAD, PAD], [7, EOS, PAD, PAD], [9, 9, 9, 9]]


def test_missing_eos_penalty_applied(tiny_path, tmp_path):
    """The tiny random model never samples EOS: every score becomes the penalty."""
    from rlhfkit.recipes.ppo import train_ppo

    out = tmp_path / "pen"
    cfg = ppo_cfg(
        tiny_path,
        tiny_path,
        out,
        max_steps=1,
        batch_size=4,
        max_new_tokens=4,
        missing_eos_penalty=-3.0,
        critic="policy_head",
        lora=True,
        lora_r=4,
    )
    train_ppo(cfg, reward_fn=lambda p, r, f: [1.0] * len(r), say=lambda *a: None)
    row = read_metrics(out)[0]
    assert row["no_eos_fraction"] == 1.0
    assert row["score_raw"] == 1.0 and row["score"] == -3.0
    assert (out / "critic" / "value_head.safetensors").exists()
    assert (out / "model" / "model.safetensors").exists()  # LoRA merged into a plain directory


def test_ppo_with_reward_model_and_ptx(tiny_path, tmp_path):
    """A reward-model path (scores from the RM at the EOS) and the PPO-ptx term run end to end."""
    from rlhfkit.recipes.ppo import train_ppo

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    out = tmp_path / "rm"
    cfg = ppo_cfg(
        tiny_path,
        "",
        out,
        reward_model=tiny_path,
        max_steps=2,
        batch_size=4,
        max_new_tokens=4,
        ptx_data=str(corpus),
        ptx_coef=0.5,
        ptx_batch_size=2,
        ptx_length=32,
    )
    result = train_ppo(cfg, say=lambda *a: None)
    rows = read_metrics(out)
    assert len(rows) == 2 and all(math.isfinite(r["ptx_loss"]) for r in rows)
    assert rows[0]["score_raw"] != 0.0 and math.isfinite(result["score"])


def test_critic_values_are_on_the_reward_scale(tiny_path, tmp_path):
    """critic='rm' subtracts the RM's stored offset (rewards use normalised scores), so at the last
    token the critic's value equals the normalised score; the policy-head critic starts at zero."""
    from contextlib import nullcontext

    from rlhfkit.models.heads import load_reward_model
    from rlhfkit.models.loading import load_causal_lm
    from rlhfkit.recipes.ppo_models import Critic, rm_scores

    rm, tok = load_reward_model(tiny_path)
    rm.seq_model.config.reward_offset = 1.25
    rm.seq_model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    rm, _ = load_reward_model(str(tmp_path / "rm"))
    critic = Critic("rm", seq_model=load_reward_model(str(tmp_path / "rm"))[0].seq_model)
    comps, batch = _rollout(load_causal_lm(tiny_path))
    with torch.no_grad():
        values = critic.values(batch)  # (N, R)
        scores = rm_scores(rm, batch, 4, nullcontext)  # (N,) normalised: raw - 1.25
    last = batch.response_mask.long().sum(1) - 1
    at_last = values[torch.arange(len(last)), last]
    # the value read at position t predicts token t; the RM reads the hidden state of the last
    # token itself, one position later: compare the RM's raw outputs at the same positions instead
    raw_at = rm.seq_model.score(
        rm.trunk(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state[
            torch.arange(len(last)), batch.positions[torch.arange(len(last)), last]
        ]
    ).squeeze(-1)
    assert torch.allclose(at_last, raw_at.detach() - 1.25, atol=1e-5)
    assert (
        scores.mean().item() < rm.forward(batch.input_ids, batch.attention_mask, batch.last_index).mean().item() - 1.2
    )

    # the policy-head critic starts at zero: the first iteration's values are exactly 0
    from rlhfkit.recipes.ppo import train_ppo

    train_ppo(
        ppo_cfg(tiny_path, "", tmp_path / "ppo", critic="policy_head", max_steps=1, batch_size=4),
        reward_fn=newline_reward,
    )
    first = json.loads((tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["value_mean"] == 0.0


def test_no_grad_forwards_in_sorted_chunks_keep_the_batch_order(tiny_path):
    """rollout_forwards and rm_scores sort rows by length into chunks and must hand every result
    back to its own row: chunks of 2 rows give the same tensors as one forward of all rows, for a
    batch built so that sorting reverses it (longest prompt + answer first)."""
    from contextlib import nullcontext

    from rlhfkit.models.heads import load_reward_model
    from rlhfkit.models.loading import load_causal_lm
    from rlhfkit.recipes.ppo_models import Critic, length_chunks, make_batch, rm_scores, rollout_forwards

    loaded = load_causal_lm(tiny_path)
    policy, ref = loaded.model.eval(), load_causal_lm(tiny_path).model.eval()
    g = torch.Generator().manual_seed(0)
    n = 6
    queries = [torch.randint(5, 1000, (14 - 2 * i,), generator=g).tolist() for i in range(n)]
    response = torch.randint(5, 1000, (n, 9), generator=g)
    mask = torch.arange(9)[None, :] < torch.tensor([9, 8, 6, 5, 3, 2])[:, None]
    batch = make_batch(queries, response.masked_fill(~mask, 0), mask, 0)
    assert [c.tolist() for c in length_chunks(batch, torch.arange(n), 2)] == [[5, 4], [3, 2], [1, 0]]
    head = torch.nn.Linear(policy.config.hidden_size, 1, bias=False)
    torch.nn.init.normal_(head.weight, std=0.5)
    critic = Critic("policy_head", head=head)
    whole = rollout_forwards(policy, ref, critic, batch, 0.7, n, nullcontext, False)
    chunked = rollout_forwards(policy, ref, critic, batch, 0.7, 2, nullcontext, False)
    for k in ("logprobs", "entropy", "values", "ref_logprobs"):
        assert (whole[k] != 0).any(), k
        assert torch.allclose(whole[k], chunked[k], atol=1e-5), k
    rm, _ = load_reward_model(tiny_path)
    with torch.no_grad():
        s_whole, s_chunked = rm_scores(rm, batch, n, nullcontext), rm_scores(rm, batch, 2, nullcontext)
        s_rows = torch.cat([rm_scores(rm, batch.rows(torch.tensor([i])), 1, nullcontext) for i in range(n)])
    assert torch.allclose(s_whole, s_chunked, atol=1e-5) and torch.allclose(s_rows, s_chunked, atol=1e-5)
    assert s_chunked.std() > 0


def test_one_iteration_is_wired_as_computed_by_hand(tiny_path, tmp_path, monkeypatch):
    """The recipe's use of the math: on 4 responses of 3 tokens, the advantages that reach the
    policy loss and the returns that reach the value loss are those computed here by hand from
    the rollout's scores, log-probs and values — rewards r_t = −β(log π − log π_ref) + score at the
    last token, GAE with γ = 0.9 and λ = 0.5 (not swapped), advantages whitened. Checked at the
    second iteration, where the policy has moved away from the reference."""
    import rlhfkit.recipes.ppo as ppo

    seen: dict = {"policy": [], "value": []}
    forwards, policy_loss, value_loss = ppo.rollout_forwards, ppo.ppo_policy_loss, ppo.ppo_value_loss

    def spy_forwards(*a, **kw):
        fw = forwards(*a, **kw)
        seen["fw"] = {k: v.detach().clone() for k, v in fw.items()}
        seen["policy"], seen["value"] = [], []
        return fw

    def spy_policy(new, old, adv, mask, clip):
        seen["policy"].append((old.clone(), adv.clone(), mask.clone()))
        return policy_loss(new, old, adv, mask, clip)

    def spy_value(values, old, ret, mask, clip):
        seen["value"].append((old.clone(), ret.clone()))
        return value_loss(values, old, ret, mask, clip)

    monkeypatch.setattr(ppo, "rollout_forwards", spy_forwards)
    monkeypatch.setattr(ppo, "ppo_policy_loss", spy_policy)
    monkeypatch.setattr(ppo, "ppo_value_loss", spy_value)
    scores = [1.0, -0.5, 0.25, 2.0]
    gamma, lam, beta = 0.9, 0.5, 0.1
    cfg = ppo_cfg(
        tiny_path,
        tiny_path,
        tmp_path / "run",
        max_steps=2,
        batch_size=2,
        samples_per_prompt=2,
        max_new_tokens=3,
        ignore_eos=True,
        gamma=gamma,
        lam=lam,
        kl_coef=beta,
        num_minibatches=1,
        grad_accum=1,
        lr=1e-2,
    )
    ppo.train_ppo(cfg, reward_fn=lambda prompts, responses, finished: scores, say=lambda *a: None)

    fw = seen["fw"]
    lp, ref, V = fw["logprobs"].tolist(), fw["ref_logprobs"].tolist(), fw["values"].tolist()
    assert max(abs(a - b) for ra, rb in zip(lp, ref) for a, b in zip(ra, rb)) > 1e-4  # the policy moved
    advantages, returns = [], []
    for i in range(4):
        r = [-beta * (lp[i][t] - ref[i][t]) for t in range(3)]
        r[2] += scores[i]
        A, running = [0.0] * 3, 0.0
        for t in (2, 1, 0):
            delta = r[t] + gamma * (V[i][t + 1] if t < 2 else 0.0) - V[i][t]
            running = delta + gamma * lam * running
            A[t] = running
        advantages.append(A)
        returns.append([A[t] + V[i][t] for t in range(3)])
    flat = [a for row in advantages for a in row]
    mean = sum(flat) / 12
    std = (sum((a - mean) ** 2 for a in flat) / 11 + 1e-8) ** 0.5
    whitened = [[(a - mean) / std for a in row] for row in advantages]

    ((old, adv, mask),) = seen["policy"]  # one minibatch, one micro-batch: all 4 rows, in some order
    ((old_v, ret),) = seen["value"]
    assert mask.all() and adv.shape == (4, 3)
    for j in range(4):
        i = next(i for i in range(4) if torch.equal(old[j], fw["logprobs"][i]))
        assert torch.equal(old_v[j], fw["values"][i])
        assert adv[j].tolist() == pytest.approx(whitened[i], abs=1e-5)
        assert ret[j].tolist() == pytest.approx(returns[i], abs=1e-5)


def test_ptx_term_pulls_the_policy_towards_the_corpus(tiny_path, tmp_path):
    """PPO-ptx (InstructGPT eq. 2): the same run with ptx_coef > 0 ends with a lower next-token
    loss on the pretraining corpus than without it, and its weights differ."""
    from transformers import AutoModelForCausalLM

    from rlhfkit.recipes.ppo import train_ppo

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    runs = {}
    for coef in (0.0, 1.0):
        out = tmp_path / f"ptx{coef}"
        train_ppo(
            ppo_cfg(
                tiny_path,
                "",
                out,
                critic="policy_head",
                max_steps=3,
                batch_size=4,
                max_new_tokens=4,
                lr=1e-3,
                ptx_data=str(corpus),
                ptx_coef=coef,
                ptx_batch_size=2,
                ptx_length=32,
            ),
            reward_fn=newline_reward,
            say=lambda *a: None,
        )
        runs[coef] = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_path)(corpus.read_text()[:400], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        nll = {c: m(ids, labels=ids).loss.item() for c, m in runs.items()}
    assert nll[1.0] < nll[0.0] - 0.1, nll
    assert rows_ptx(tmp_path / "ptx1.0") and not rows_ptx(tmp_path / "ptx0.0")


def rows_ptx(out) -> bool:
    return any("ptx_loss" in r for r in read_metrics(out))


def test_rollout_metrics_join_every_metrics_line(tiny_path, tmp_path):
    """Task-specific numbers enter through ``rollout_metrics``: called once per iteration with the
    iteration's prompts, decoded responses and EOS flags, its dict merged into the metrics line.
    ``gold_metrics`` is such a callback, picklable with train_ppo (the pipeline runs stages in a
    spawned process) and silent for prompts without gold instructions."""
    import functools
    import pickle

    from rlhfkit.data.records import Prompt
    from rlhfkit.feedback.rubric import gold_metrics
    from rlhfkit.recipes.ppo import train_ppo

    calls = []

    def chars(prompts, responses, finished):
        calls.append((len(prompts), len(responses), len(finished)))
        return {"mean_chars": sum(map(len, responses)) / len(responses)}

    out = tmp_path / "ppo"
    cfg = ppo_cfg(tiny_path, tiny_path, out, max_steps=2, batch_size=2, samples_per_prompt=2, max_new_tokens=4)
    train_ppo(cfg, reward_fn=newline_reward, say=lambda *a: None, rollout_metrics=chars)
    rows = read_metrics(out)
    assert calls == [(4, 4, 4)] * 2
    assert [r["step"] for r in rows] == [1, 2] and all(r["mean_chars"] >= 0 for r in rows)
    assert "gold_score" not in rows[0]  # nothing task-specific without a callback

    run = pickle.loads(pickle.dumps(functools.partial(train_ppo, rollout_metrics=gold_metrics)))
    assert run.keywords["rollout_metrics"] is gold_metrics
    plain = Prompt(messages=[{"role": "user", "content": "Hi."}])
    assert gold_metrics([plain], ["Hello."], [True]) == {}
