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
