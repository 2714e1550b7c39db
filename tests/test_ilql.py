"""ILQL: each loss on a 3-token example by hand and against a re-derivation with loops, the Polyak update
and the perturbed logits; the heads' save/load; generation with them (β = 0 is the LM, planted heads
change the answer); tiny-model runs of `rlhfkit ilql` (smoke, CLI, exact resume, demonstrations)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import Crash, crash_after

from rlhfkit.algos.ilql import (
    awac_loss,
    cql_loss,
    expectile_loss,
    ilql_loss,
    perturbed_logits,
    polyak_update,
    q_loss,
    sequence_reward_of_ranks,
    td_targets,
)
from rlhfkit.config import ILQLConfig
from rlhfkit.errors import UserError
from rlhfkit.recipes.common import read_metrics

# ---------------------------------------------------------------- the math, by hand

# One response of 3 tokens over a vocabulary of 2, taken tokens a = [0, 1, 1], the sequence reward 1
# on the last token (done there). γ = 0.5, τ = 0.7.
ACTIONS = torch.tensor([0, 1, 1])
REWARDS = torch.tensor([0.0, 0.0, 1.0])
DONES = torch.tensor([False, False, True])
V = torch.tensor([0.5, 1.0, 2.0])  # V(s_0), V(s_1), V(s_2)
NEXT_V = torch.tensor([1.0, 2.0, 5.0])  # V(s_1), V(s_2), V(s_3): the last is after the end, ignored
Q1_ALL = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])  # taken: 1, 2, 1
Q2_ALL = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 3.0]])  # taken: 0, 1, 3
TARGET_Q1 = torch.tensor([1.0, 0.5, 2.5])  # the target heads' Q of the taken tokens
TARGET_Q2 = torch.tensor([2.0, 0.0, 3.0])  # min: 1.0, 0.0, 2.5
LOGITS = torch.zeros(3, 2)  # the LM: uniform


def test_td_targets_by_hand():
    # y = r + γ (1 − done) V(s'): 0 + 0.5·1 = 0.5, 0 + 0.5·2 = 1, 1 + 0 (terminal: V(s_3) = 5 ignored)
    assert td_targets(REWARDS, NEXT_V, DONES, 0.5).tolist() == [0.5, 1.0, 1.0]


def test_q_loss_by_hand():
    # (1 − .5)² + (0 − .5)² = 0.5; (2 − 1)² + (1 − 1)² = 1; (1 − 1)² + (3 − 1)² = 4
    y = td_targets(REWARDS, NEXT_V, DONES, 0.5)
    assert q_loss(torch.tensor([1.0, 2.0, 1.0]), torch.tensor([0.0, 1.0, 3.0]), y).tolist() == [0.5, 1.0, 4.0]


def test_expectile_loss_by_hand_and_its_gradient_reaches_only_v():
    # u = min(Q̄1, Q̄2) − V = [1 − .5, 0 − 1, 2.5 − 2] = [.5, −1, .5]; weights τ, 1 − τ, τ = .7, .3, .7
    # L = [.7 · .25, .3 · 1, .7 · .25]; dL/dV = −2 w u = [−.7, .6, −.7]
    t1, t2, v = TARGET_Q1.clone().requires_grad_(), TARGET_Q2.clone().requires_grad_(), V.clone().requires_grad_()
    loss = expectile_loss(t1, t2, v, tau=0.7)
    assert loss.tolist() == pytest.approx([0.175, 0.3, 0.175])
    loss.sum().backward()
    assert v.grad.tolist() == pytest.approx([-0.7, 0.6, -0.7])
    assert t1.grad is None and t2.grad is None  # Q̂ is a target: detached


def test_expectile_at_one_half_is_half_the_squared_error():
    u = torch.tensor([2.0, -3.0])
    assert expectile_loss(u, u, torch.zeros(2), tau=0.5).tolist() == pytest.approx([2.0, 4.5])


def test_cql_loss_by_hand():
    # log Σ exp Q − Q(a): Q1 rows: log(1 + e⁻¹), log(1 + e⁻²), log 2; Q2 rows: log 2, log 2, log(1 + e⁻³)
    want = [
        math.log(1 + math.exp(-1)) + math.log(2),
        math.log(1 + math.exp(-2)) + math.log(2),
        math.log(2) + math.log(1 + math.exp(-3)),
    ]
    assert cql_loss(Q1_ALL, Q2_ALL, ACTIONS).tolist() == pytest.approx(want, abs=1e-6)


def test_awac_loss_is_nll_and_advantage_weighted_with_beta():
    adv = torch.tensor([0.5, -1.0, 0.5])
    assert awac_loss(LOGITS, ACTIONS, adv).tolist() == pytest.approx([math.log(2)] * 3)  # β = 0: plain NLL
    weighted = awac_loss(LOGITS, ACTIONS, adv, beta=2.0)
    assert weighted.tolist() == pytest.approx([math.e * math.log(2), math.exp(-2) * math.log(2), math.e * math.log(2)])


def reference_ilql(logits, q1_all, q2_all, tq1, tq2, v, next_v, actions, rewards, dones, gamma, tau, cql, awac):
    """The ILQL loss per token, re-derived with plain Python loops over the tokens and the vocabulary."""
    out = []
    for t in range(len(actions)):
        a = int(actions[t])
        y = float(rewards[t]) + (0.0 if bool(dones[t]) else gamma * float(next_v[t]))
        l_q = sum((float(q[t, a]) - y) ** 2 for q in (q1_all, q2_all))
        q_hat = min(float(tq1[t]), float(tq2[t]))
        diff = q_hat - float(v[t])
        l_v = (tau if diff >= 0 else 1 - tau) * diff * diff
        l_cql = 0.0
        for q in (q1_all, q2_all):
            l_cql += math.log(sum(math.exp(float(x)) for x in q[t])) - float(q[t, a])
        nll = math.log(sum(math.exp(float(x)) for x in logits[t])) - float(logits[t, a])
        out.append(l_q + l_v + cql * l_cql + awac * nll)
    return out


def test_ilql_loss_by_hand_on_the_3_token_example():
    got = ilql_loss(
        LOGITS, Q1_ALL, Q2_ALL, TARGET_Q1, TARGET_Q2, V, NEXT_V, ACTIONS, REWARDS, DONES, 0.5, 0.7, 0.1, 1.0
    )
    assert got.q.tolist() == pytest.approx([0.5, 1.0, 4.0])
    assert got.v.tolist() == pytest.approx([0.175, 0.3, 0.175])
    assert got.awac.tolist() == pytest.approx([math.log(2)] * 3)
    assert got.advantage.tolist() == pytest.approx([0.5, -1.0, 0.5])
    # token 0: 0.5 + 0.175 + 0.1 · (0.313262 + 0.693147) + 0.693147 = 1.468788
    assert got.loss[0].item() == pytest.approx(0.5 + 0.175 + 0.1 * (0.313262 + 0.693147) + 0.693147, abs=1e-5)
    ref = reference_ilql(
        LOGITS, Q1_ALL, Q2_ALL, TARGET_Q1, TARGET_Q2, V, NEXT_V, ACTIONS, REWARDS, DONES, 0.5, 0.7, 0.1, 1
    )
    assert got.loss.tolist() == pytest.approx(ref, abs=1e-6)


def test_ilql_loss_equals_the_loop_rederivation_on_random_values():
    g = torch.Generator().manual_seed(3)
    n, vocab = 7, 5
    args = [torch.randn(n, vocab, generator=g) for _ in range(3)] + [torch.randn(n, generator=g) for _ in range(4)]
    actions = torch.randint(vocab, (n,), generator=g)
    rewards, dones = torch.zeros(n), torch.tensor([False, False, True, False, False, False, True])
    rewards[2], rewards[6] = 1.0, -0.5
    got = ilql_loss(*args, actions, rewards, dones, gamma=0.9, tau=0.8, cql_scale=0.3, awac_scale=0.5)
    ref = reference_ilql(*args, actions, rewards, dones, 0.9, 0.8, 0.3, 0.5)
    assert got.loss.tolist() == pytest.approx(ref, abs=1e-5)


def test_gradients_the_losses_send_where():
    """The Q loss moves the online Q only (its target uses V(s') without gradient); the V loss moves V
    only (Q̂ is the target heads', detached); the LM term moves the logits only."""
    q1, q2 = Q1_ALL.clone().requires_grad_(), Q2_ALL.clone().requires_grad_()
    logits, v, next_v = LOGITS.clone().requires_grad_(), V.clone().requires_grad_(), NEXT_V.clone().requires_grad_()
    t1, t2 = TARGET_Q1.clone().requires_grad_(), TARGET_Q2.clone().requires_grad_()
    got = ilql_loss(logits, q1, q2, t1, t2, v, next_v, ACTIONS, REWARDS, DONES, 0.5, 0.7, 0.0, 1.0)
    got.loss.sum().backward()
    assert next_v.grad is None and t1.grad is None and t2.grad is None
    # dL_Q/dQ1(s_0, a_0) = 2 (1 − 0.5) = 1; other tokens' entries get no Q gradient (CQL off)
    assert q1.grad[0].tolist() == pytest.approx([1.0, 0.0]) and q1.grad[2].tolist() == pytest.approx([0.0, 0.0])
    assert v.grad.tolist() == pytest.approx([-0.7, 0.6, -0.7])


def test_polyak_update_by_hand():
    target, online = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    with torch.no_grad():
        target.weight.fill_(0.0), target.bias.fill_(0.0), online.weight.fill_(1.0), online.bias.fill_(-2.0)
    polyak_update(target, online, 0.25)
    assert target.weight.item() == pytest.approx(0.25) and target.bias.item() == pytest.approx(-0.5)
    polyak_update(target, online, 0.25)  # 0.25 + 0.25 · 0.75
    assert target.weight.item() == pytest.approx(0.4375)
    assert online.weight.item() == 1.0  # the online head is not touched


def test_perturbed_logits_by_hand():
    # log π = [log 1/4, log 3/4]; Q = [1, 0], V = 0.5, β = 2: + 2·[0.5, −0.5]
    logits = torch.tensor([[0.0, math.log(3)]])
    got = perturbed_logits(logits, torch.tensor([[1.0, 0.0]]), torch.tensor([0.5]), beta=2.0)
    assert got.tolist()[0] == pytest.approx([math.log(0.25) + 1.0, math.log(0.75) - 1.0])
    assert perturbed_logits(logits, torch.tensor([[1.0, 0.0]]), torch.tensor([0.5]), 0.0).tolist()[0] == pytest.approx(
        [math.log(0.25), math.log(0.75)]
    )


def test_rewards_of_ranks():
    assert sequence_reward_of_ranks([0, 1]) == [1.0, -1.0]
    assert sequence_reward_of_ranks([0, 1, 1, 2]) == [1.0, 0.0, 0.0, -1.0]
    assert sequence_reward_of_ranks([2, 0, 1]) == [-1.0, 1.0, 0.0]
    assert sequence_reward_of_ranks([0, 0]) == [0.0, 0.0]


def test_config_checks():
    assert ILQLConfig().tau == 0.7 and ILQLConfig().records == "rankings"
    for bad, match in [
        (dict(tau=1.0), "tau"),
        (dict(gamma=0.0), "gamma"),
        (dict(polyak_alpha=0.0), "polyak_alpha"),
        (dict(beta=-1.0), "beta"),
        (dict(records="pairs"), "records"),
        (dict(records="demonstrations", reward_model="rm"), "reward_model"),
    ]:
        with pytest.raises(UserError, match=match):
            ILQLConfig(**bad)


def test_episode_tensors_align_states_actions_rewards():
    """Prompt [5, 6] + response [7, 8, 9] (reward 2) and prompt [5] + response [4] (reward −1): the states
    are the positions before each response token (1, 2, 3 | 0), the actions the response tokens, the
    reward and the episode's end on its last token; V(s_{t+1}) reads the next position."""
    from rlhfkit.data.tokenize import Encoded
    from rlhfkit.recipes.ilql import Episode, episode_tensors

    t = episode_tensors([Episode(Encoded([5, 6, 7, 8, 9], 2), 2.0), Episode(Encoded([5, 4], 1), -1.0)], 0, "cpu")
    assert t["positions"].tolist() == [[1, 2, 3, 4], [0, 1, 1, 1]]  # s_0..s_3; the short row clamped
    assert t["valid"].tolist() == [[True, True, True], [True, False, False]]
    assert t["actions"].tolist() == [7, 8, 9, 4] and t["row"].tolist() == [0, 0, 0, 1]
    assert t["rewards"].tolist() == [0.0, 0.0, 2.0, -1.0] and t["dones"].tolist() == [False, False, True, True]


# ---------------------------------------------------------------- heads, saving, generation


def planted_heads(model, token: int, q: float = 50.0):
    """Heads whose target Q is `q` on `token` and 0 elsewhere, V = 0 (the policy's Q̂ is the targets')."""
    from rlhfkit.models.ilql import ILQLHeads
    from rlhfkit.models.layout import hidden_size

    heads = ILQLHeads(hidden_size(model), model.get_output_embeddings().weight.shape[0])
    with torch.no_grad():
        heads.target_q1.bias[token] = q
        heads.target_q2.bias[token] = q + 1.0  # the min of the two is what counts
    return heads


def greedy(gen, prompts, n_tokens=6):
    from rlhfkit.rollout import SamplingParams

    return gen.generate(prompts, SamplingParams(max_new_tokens=n_tokens, temperature=0.0))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generation_beta_0_is_the_lm_and_planted_heads_change_the_answer(family, tmp_path):
    """β = 0: the ILQL generator's greedy answers are the LM's own (token for token, log-probs too);
    β = 1 with Q̂ = 50 on one token and V = 0: that token wins every step, log-prob ≈ 0."""
    from families import tiny_family

    from rlhfkit.models.loading import load_causal_lm
    from rlhfkit.rollout.hf import HFGenerator
    from rlhfkit.rollout.ilql import ILQLGenerator

    loaded = load_causal_lm(tiny_family(family, tmp_path))
    model, tok = loaded.model.eval(), loaded.tokenizer
    prompts = [tok("Hello there, how are")["input_ids"], tok("One two")["input_ids"]]
    plain = greedy(HFGenerator(model, tok, precision="fp32"), prompts)
    token = next(t for t in range(100, 200) if t not in plain[0].token_ids + plain[1].token_ids)
    same = greedy(ILQLGenerator(model, tok, planted_heads(model, token), beta=0.0, precision="fp32"), prompts)
    assert [c.token_ids for c in same] == [c.token_ids for c in plain]
    for a, b in zip(same, plain):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)  # log_softmax(log π) = log π
    steered = greedy(ILQLGenerator(model, tok, planted_heads(model, token), beta=1.0, precision="fp32"), prompts)
    assert [c.token_ids for c in steered] == [[token] * 6, [token] * 6]
    assert max(abs(lp) for c in steered for lp in c.logprobs) < 1e-6
    sampled = ILQLGenerator(model, tok, planted_heads(model, token), beta=1.0, precision="fp32")
    from rlhfkit.rollout import SamplingParams

    outs = sampled.generate(prompts[:1], SamplingParams(max_new_tokens=3, temperature=1.0, seed=1), n=3)
    assert [c.token_ids for c in outs] == [[token] * 3] * 3  # sampling sees the same logits
    events = list(sampled.stream(prompts[:1], SamplingParams(max_new_tokens=3, temperature=0.0)))
    assert events[-1].completion.token_ids == [token] * 3  # streaming too


def test_heads_save_load_round_trip_and_make_generator_picks_them(tiny_path, tmp_path):
    """An LM directory with ilql_heads.safetensors + ilql.json: load -> same tensors and β; make_generator
    (any backend) returns the ILQL generator, says so in one line, and it generates with the heads."""
    import shutil

    from rlhfkit.models.ilql import has_ilql_heads, load_ilql_heads, save_ilql_heads
    from rlhfkit.models.loading import load_causal_lm
    from rlhfkit.rollout import make_generator
    from rlhfkit.rollout.ilql import ILQLGenerator

    model_dir = tmp_path / "ilql-model"
    shutil.copytree(tiny_path, model_dir)
    loaded = load_causal_lm(str(model_dir))
    assert load_ilql_heads(model_dir) is None and not isinstance(
        make_generator(loaded.model, loaded.tokenizer, "hf", "fp32", say=lambda *a: None), ILQLGenerator
    )
    heads = planted_heads(loaded.model, 123)
    with torch.no_grad():
        heads.v[2].bias.fill_(0.25)
    save_ilql_heads(heads, model_dir, beta=2.5)
    assert has_ilql_heads(model_dir) and json.loads((model_dir / "ilql.json").read_text())["beta"] == 2.5
    back, beta = load_ilql_heads(model_dir)
    assert beta == 2.5 and back.state_dict().keys() == heads.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in heads.state_dict().items())
    loaded = load_causal_lm(str(model_dir))
    for backend in ("auto", "engine", "hf"):
        said = []
        gen = make_generator(loaded.model, loaded.tokenizer, backend, "fp32", say=said.append)
        assert isinstance(gen, ILQLGenerator) and gen.beta == 2.5
        assert len(said) == 1 and "ILQL heads" in said[0]
    ids = loaded.tokenizer("Hi")["input_ids"]
    assert greedy(gen, [ids], 2)[0].token_ids == [123, 123]
    with pytest.raises(UserError, match="has ILQL heads: on-policy training"):
        gen.push_weights(loaded.model)  # PPO from an ILQL directory: refused, not silently off-policy
    (model_dir / "ilql.json").write_text("{}")
    with pytest.raises(UserError, match="broken ILQL heads"):
        load_ilql_heads(model_dir)


# ---------------------------------------------------------------- tiny-model runs


@pytest.fixture(scope="module")
def good_bad(tmp_path_factory) -> str:
    """12 pairs: one prompt per pair, the answer 'good' preferred to 'bad' (the same length: only the
    reward tells them apart, so a margin the heads open is learned from the rewards)."""
    rows = [
        {"prompt": f"Question {i}: how was the film?", "responses": ["good", "bad"], "ranks": [0, 1]} for i in range(12)
    ]
    path = tmp_path_factory.mktemp("ilql") / "rankings.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def tiny_cfg(tiny_path, data, out, **kw) -> ILQLConfig:
    common = dict(
        model=tiny_path, data=data, eval_data=data, out=str(out), batch_size=8, max_steps=16, lr=1e-3, head_lr=3e-2,
        warmup_steps=0, precision="fp32", max_length=64, schedule="constant", polyak_alpha=0.5, beta=1.0,
    )  # fmt: skip
    return ILQLConfig(**(common | kw))


def params_of(model_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def test_ilql_smoke_losses_fall_margin_rises_weights_change(tiny_path, good_bad, tmp_path):
    """Held out = the training pairs. Before training Q = V = 0, so the ILQL policy is the LM; after 16
    steps the heads prefer 'good': the ILQL policy's log-prob margin rises well above the LM's (which
    the NLL term trains on both answers alike), the advantage margin is positive, the losses fell."""
    from rlhfkit.recipes.ilql import train_ilql

    result = train_ilql(tiny_cfg(tiny_path, good_bad, tmp_path / "ilql"))
    assert result["step"] == 16
    assert result["eval_margin/logp_before"] == pytest.approx(result["eval_margin/logp_lm_before"], abs=1e-5)
    assert result["eval_margin/advantage_before"] == 0.0 and result["eval_values/v_before"] == 0.0
    assert result["eval_margin/logp"] > result["eval_margin/logp_before"] + 1.0, result
    assert result["eval_margin/logp"] > result["eval_margin/logp_lm"] + 1.0, result
    assert result["eval_margin/advantage"] > 0.2 and result["eval_accuracy"] == 1.0, result
    assert result["eval_loss"] < result["eval_loss_before"] - 0.5
    rows = [m for m in read_metrics(tmp_path / "ilql") if "loss/q" in m]
    assert len(rows) == 16 and rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["loss/awac"] < rows[0]["loss/awac"]
    assert {"loss/v", "loss/cql", "values/q", "values/target_q", "values/v", "values/advantage", "grad_norm"} <= rows[
        0
    ].keys()
    saved, base = params_of(tmp_path / "ilql" / "model"), params_of(tiny_path)
    assert max((saved[k] - base[k]).abs().max().item() for k in base) > 1e-4
    meta = json.loads((tmp_path / "ilql" / "model" / "ilql.json").read_text())
    assert meta["beta"] == 1.0 and (tmp_path / "ilql" / "model" / "ilql_heads.safetensors").exists()


def test_ilql_cli_on_demonstrations(tiny_path, tmp_path):
    from typer.testing import CliRunner

    from rlhfkit.cli import app

    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps({"prompt": f"Count to {i}.", "response": "1 2 3"}) + "\n" for i in range(6)))
    args = ["ilql", "--model", tiny_path, "--data", str(demos), "--out", str(tmp_path / "d")]
    args += ["records=demonstrations", "demo_reward=0.5", "max_steps=2", "batch_size=3", "precision=fp32"]
    args += ["eval_fraction=0.34", "warmup_steps=0", "beta=3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = read_metrics(tmp_path / "d")
    assert [m["step"] for m in rows if "loss" in m] == [1, 2] and "eval_loss" in rows[-1]
    assert "eval_margin/logp" not in rows[-1]  # demonstrations have no pairs
    assert json.loads((tmp_path / "d" / "model" / "ilql.json").read_text())["beta"] == 3.0
    bad = CliRunner().invoke(app, ["ilql", "--data", str(demos), "--out", str(tmp_path / "x"), "tau=1.5"])
    assert bad.exit_code == 2 and "tau=1.5: expected 0 < tau < 1" in bad.output


def test_ilql_resume_is_exact(tiny_path, good_bad, tmp_path, monkeypatch):
    """4 steps, crash after 3 (checkpoint at 2), resume: the same losses, values and weights -- heads and
    their Polyak targets included -- as 4 steps straight."""
    from rlhfkit.models.ilql import load_ilql_heads
    from rlhfkit.recipes import ilql

    kw = dict(max_steps=4, save_every=2, schedule="linear", warmup_steps=1, batch_size=4, eval_data="")
    ilql.train_ilql(tiny_cfg(tiny_path, good_bad, tmp_path / "straight", **kw))
    with monkeypatch.context() as patch, pytest.raises(Crash):
        crash_after(patch, ilql, 3)
        ilql.train_ilql(tiny_cfg(tiny_path, good_bad, tmp_path / "resumed", **kw))
    ilql.train_ilql(tiny_cfg(tiny_path, good_bad, tmp_path / "resumed", resume=True, **kw))
    rows = [[m for m in read_metrics(tmp_path / r) if "loss" in m] for r in ("straight", "resumed")]
    assert [m["step"] for m in rows[1]] == [1, 2, 3, 4]
    for key in ("loss", "loss/q", "values/target_q", "values/v", "lr"):
        a, b = [m[key] for m in rows[0]], [m[key] for m in rows[1]]
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-6, (key, a, b)
    a, b = params_of(tmp_path / "straight" / "model"), params_of(tmp_path / "resumed" / "model")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    ha, hb = (load_ilql_heads(tmp_path / r / "model")[0].state_dict() for r in ("straight", "resumed"))
    assert max((ha[k] - hb[k]).abs().max().item() for k in ha) <= 1e-6


def test_pipeline_with_ilql_as_the_optimizer(tiny_path, tmp_path):
    """optimizer=ilql: after SFT and the round's reward model, ILQL from SFT on the same rankings; the
    version ilql1 is judged (generating with its heads), rated, reported and served like ppo1."""
    import yaml
    from test_pipeline import demo_config

    from rlhfkit.recipes.pipeline import run_pipeline
    from rlhfkit.web.models import discover_versions

    run, said = tmp_path / "run", []
    cfg = demo_config(
        model=tiny_path, out=str(run), train_prompts=6, eval_prompts=4, k=3, max_new_tokens=10, precision="fp32",
        min_demo_score=-9.0, round_prompts=3, fresh_process=False, optimizer="ilql",
        sft={"batch_size": 4}, ilql={"max_steps": 2, "batch_size": 4, "lr": 1e-4},
    )  # fmt: skip
    summary = run_pipeline(cfg, say=said.append)
    assert summary["final"] == "ilql1" and set(summary["versions"]) == {"base", "sft", "ilql1"}
    assert [m["step"] for m in summary["training"]["ilql1"] if "loss/q" in m] == [1, 2]
    assert {p.name for p in (run / "round1").iterdir()} & {"ppo", "dpo"} == set()
    data = yaml.safe_load((run / "round1" / "ilql" / "config.yaml").read_text())["data"]
    assert data == str(run / "round1" / "rm_data.jsonl")  # the rankings the round's RM learned from
    model = run / "round1" / "ilql" / "model"
    assert (model / "ilql_heads.safetensors").exists() and (model / "ilql.json").exists()
    assert any(str(model) in line and "ILQL heads" in line for line in said)  # the judge generated with them
    assert set(summary["ratings"]) == {"base", "sft", "ilql1"} and "ilql1" in (run / "report.html").read_text()
    assert discover_versions(run)["ilql1"] == str(model)


WORKER = """
import os, sys
from pathlib import Path

import rlhfkit.recipes.ilql as ilql

make, marks = ilql.make_accelerator, sys.argv[1]


def checked(cfg):  # inside each worker: there really are 2 processes, and this is one of them
    acc = make(cfg)
    assert acc.num_processes == int(os.environ["WORLD_SIZE"]) == 2, acc.num_processes
    Path(marks, f"rank{acc.process_index}").write_text(str(acc.num_processes))
    return acc


ilql.make_accelerator = checked
sys.argv = ["rlhfkit", *sys.argv[2:]]
from rlhfkit.cli import main

main()
"""


def test_ilql_two_processes_equal_one_process(tiny_path, good_bad, tmp_path):
    """torchrun --nproc_per_node 2 (DDP over gloo) x batch b == 1 process x batch b: the same losses,
    held-out metrics (split across the ranks), weights and heads."""
    import os
    import subprocess
    import sys

    from rlhfkit.models.ilql import load_ilql_heads

    args = ["ilql", "--model", tiny_path, "--data", good_bad, "batch_size=8", "max_steps=3", "lr=1e-3"]
    args += ["head_lr=3e-2", "polyak_alpha=0.5", "warmup_steps=0", "precision=fp32", "eval_fraction=0.25"]
    args += ["grad_accum=2"]
    root = str(Path(__file__).resolve().parents[1])  # the worker script lives in tmp_path: import this checkout
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
    }
    one = subprocess.run(
        [sys.executable, "-m", "rlhfkit.cli", *args, "--out", str(tmp_path / "one")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    (tmp_path / "worker.py").write_text(WORKER)
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2"]
    two = subprocess.run(
        [*torchrun, str(tmp_path / "worker.py"), str(tmp_path), *args, "--out", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("rank*")) == ["rank0", "rank1"]
    rows = [read_metrics(tmp_path / r) for r in ("one", "two")]
    for key in ("loss", "loss/q", "values/v", "eval_loss", "eval_margin/logp", "eval_margin/advantage"):
        a, b = [m[key] for m in rows[0] if key in m], [m[key] for m in rows[1] if key in m]
        assert len(a) == len(b) >= 2 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (key, a, b)
    a, b = params_of(tmp_path / "one" / "model"), params_of(tmp_path / "two" / "model")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4  # a tenth of one AdamW step
    ha, hb = (load_ilql_heads(tmp_path / r / "model")[0].state_dict() for r in ("one", "two"))
    assert max((ha[k] - hb[k]).abs().max().item() for k in ha) <= 3e-3  # head_lr = 3e-2


@pytest.mark.parametrize("family", ["gpt2", "gemma2"])
def test_ilql_trains_and_generates_on_other_families(family, good_bad, tmp_path):
    """GPT-2 (its trunk is `transformer`, width `n_embd`, no pad id) and Gemma 2 (soft-capped logits, an
    end of turn that is not EOS): two steps, then the saved model generates through make_generator."""
    from families import tiny_family

    from rlhfkit.models.loading import load_causal_lm
    from rlhfkit.recipes.ilql import train_ilql
    from rlhfkit.rollout import make_generator
    from rlhfkit.rollout.ilql import ILQLGenerator

    model_dir = tiny_family(family, tmp_path)
    result = train_ilql(tiny_cfg(model_dir, good_bad, tmp_path / "run", max_steps=2, batch_size=4))
    assert result["step"] == 2 and math.isfinite(result["eval_loss"]) and result["eval_values/target_q"] != 0.0
    loaded = load_causal_lm(str(tmp_path / "run" / "model"))
    gen = make_generator(loaded.model, loaded.tokenizer, "auto", "fp32", say=lambda *a: None)
    assert isinstance(gen, ILQLGenerator)
    assert len(greedy(gen, [loaded.tokenizer("Hi there")["input_ids"]], 4)[0].token_ids) >= 1


def test_ilql_lora_saves_a_merged_lm_beside_the_heads(tiny_path, good_bad, tmp_path):
    """LoRA: the heads train in full, the LM through adapters; checkpoints hold the adapters and the heads
    (model/ilql/), the final model is merged (no lora keys) and differs from the base where adapted."""
    from rlhfkit.recipes.ilql import train_ilql

    result = train_ilql(
        tiny_cfg(tiny_path, good_bad, tmp_path / "lora", lora=True, lora_r=4, max_steps=3, save_every=1)
    )
    assert result["step"] == 3 and result["eval_values/target_q"] != 0.0
    ckpt = next((tmp_path / "lora" / "checkpoints").glob("step-*"))
    assert (ckpt / "model" / "adapter_model.safetensors").exists() and (ckpt / "model" / "ilql" / "ilql.json").exists()
    saved, base = params_of(tmp_path / "lora" / "model"), params_of(tiny_path)
    assert not any("lora" in k for k in saved) and (tmp_path / "lora" / "model" / "ilql_heads.safetensors").exists()
    key = "model.layers.0.self_attn.q_proj.weight"
    assert (saved[key] - base[key]).abs().max() > 1e-5


def test_ilql_rewards_from_a_reward_model(tiny_path, good_bad, tmp_path):
    """reward_model=DIR: the answers' rewards are its scores (here a fresh head on tiny-random), not ±1."""
    from rlhfkit.data.records import Ranking
    from rlhfkit.data.tokenize import collate, encode_ranking
    from rlhfkit.models.heads import load_reward_model
    from rlhfkit.models.loading import load_tokenizer
    from rlhfkit.recipes.ilql import load_episodes

    cfg = tiny_cfg(tiny_path, good_bad, tmp_path / "rm", reward_model=tiny_path)
    said = []
    torch.manual_seed(0)
    train, held_out, pairs = load_episodes(cfg, load_tokenizer(tiny_path), said.append)
    torch.manual_seed(0)
    rm, rm_tok = load_reward_model(tiny_path)  # the same fresh head: the same seed
    first = Ranking([{"role": "user", "content": "Question 0: how was the film?"}], ["good", "bad"])
    batch = collate(encode_ranking(rm_tok, first, 64), rm_tok.pad_token_id)
    with torch.no_grad():
        want = rm.score(batch["input_ids"], batch["attention_mask"], batch["last_index"]).tolist()
    assert [e.reward for e in train[:2]] == pytest.approx(want, abs=1e-5) and want != [1.0, -1.0]
    assert len(train) == len(held_out) == 24 and len(pairs) == 12 and "scores of 48 answers" in said[-1]
