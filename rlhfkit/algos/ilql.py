"""Implicit Language Q-Learning: the losses, the target-network update and the perturbed policy.

ILQL (Snell et al. 2022, "Offline RL for Natural Language Generation with Implicit Language Q
Learning", https://arxiv.org/abs/2206.11871) is IQL (Kostrikov et al. 2021, "Offline Reinforcement
Learning with Implicit Q-Learning", https://arxiv.org/abs/2110.06169) at the token level: the state
s_t is the text so far (the trunk's hidden state at position t), the action a_t the next token, the
reward r_t zero except on the last response token, where it is the sequence's reward. From logged
data only, heads on the LM trunk learn

  - two Q heads Q_1, Q_2 (s, ·) over the vocabulary, toward the one-step target (paper eq. 1)
        y_t = r_t + γ V(s_{t+1})   (V(s_{T+1}) = 0 after the last token; V carries no gradient here)
  - a V head by expectile regression on the *target* heads' Q̂ = min(Q̄_1, Q̄_2)(s_t, a_t) (eq. 2),
    so V(s) approaches an upper expectile of Q over the data's actions: a max over the actions the
    data supports, never a max over all tokens (the "implicit" part: no out-of-data action is queried)
  - a CQL term (Kumar et al. 2020, "Conservative Q-Learning for Offline RL", eq. 4; Snell et al.
    eq. 3): the cross-entropy of softmax(Q) against the logged token, which pushes Q down on the
    tokens the data never took
  - the LM itself with an AWAC-style term (Nair et al. 2020, "AWAC", eq. 13): the NLL of the logged
    tokens, weighted by exp(β_awac A) with A = Q̂ − V; β_awac = 0 (TRLX's default) makes it plain NLL,
    which keeps π_β, the "behaviour" policy the perturbation below starts from, a model of the data.

At generation (eq. 4) the policy is π(a|s) ∝ π_β(a|s) exp(β (Q̂(s,a) − V(s))): the logits
``log π_β + β (Q̂ − V)`` (``perturbed_logits``), then temperature, top-k/top-p or greedy as usual.

All functions here take flat per-token tensors (N,) or (N, V) — the response tokens of a batch,
padding already removed — and return per-token losses (N,); the recipe sums and divides by the
token count of the global batch. The Q̂ of the V loss and of the policy is the *target* heads'
(Polyak averages of the online heads, ``polyak_update``), as in TRLX's ILQL (CarperAI/trlx,
``modeling_ilql.py``), whose defaults are ours: τ = 0.7, γ = 0.99, cql_scale = 0.1, awac_scale = 1.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


def td_targets(rewards: torch.Tensor, next_values: torch.Tensor, dones: torch.Tensor, gamma: float) -> torch.Tensor:
    """The Q heads' regression target y_t = r_t + γ (1 − done_t) V(s_{t+1}) (Snell et al. eq. 1), detached.

    rewards, next_values: (N,) float; dones: (N,) bool, True on each response's last token (the
    episode ends there: V after it is 0). -> (N,)
    """
    return (rewards + gamma * (~dones).to(next_values.dtype) * next_values).detach()


def q_loss(q1: torch.Tensor, q2: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Both heads' squared TD error (Q_i(s_t, a_t) − y_t)², summed over the two heads (as TRLX).

    q1, q2: (N,) the online heads' Q of the taken tokens; targets: (N,) from ``td_targets``. -> (N,)
    """
    return (q1 - targets) ** 2 + (q2 - targets) ** 2


def expectile_loss(target_q1: torch.Tensor, target_q2: torch.Tensor, v: torch.Tensor, tau: float) -> torch.Tensor:
    """IQL's expectile regression of V (Kostrikov et al. eq. 5, Snell et al. eq. 2):

        L_V = |τ − 1(u < 0)| · u²,   u = Q̂(s_t, a_t) − V(s_t),   Q̂ = min(Q̄_1, Q̄_2) detached

    With τ > 0.5 an under-estimate (u > 0) costs τ and an over-estimate 1 − τ, so V settles above
    the mean of Q over the logged actions (τ = 0.5 is the mean, τ → 1 the max).

    target_q1, target_q2: (N,) the target heads' Q of the taken tokens; v: (N,) V(s_t). -> (N,)
    """
    u = torch.minimum(target_q1, target_q2).detach() - v
    weight = torch.where(u < 0, 1.0 - tau, tau)
    return weight * u**2


def cql_loss(q1_all: torch.Tensor, q2_all: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """The CQL term of both heads: cross-entropy of softmax(Q_i(s_t, ·)) against the taken token,

        log Σ_a exp Q_i(s_t, a) − Q_i(s_t, a_t)

    (Kumar et al. 2020 eq. 4 with the uniform-action regulariser, Snell et al. eq. 3): Q goes down
    where the data did not go. q1_all, q2_all: (N, V); actions: (N,) -> (N,)
    """
    return F.cross_entropy(q1_all.float(), actions, reduction="none") + F.cross_entropy(
        q2_all.float(), actions, reduction="none"
    )


def awac_loss(logits: torch.Tensor, actions: torch.Tensor, advantages: torch.Tensor, beta: float = 0.0) -> torch.Tensor:
    """The LM's term: NLL of the logged token, weighted by exp(β A) (AWAC, Nair et al. 2020 eq. 13).

    β = 0 (the default, TRLX's): plain NLL, so the LM stays the behaviour policy π_β of the data.
    logits: (N, V) the LM's; actions: (N,); advantages: (N,) Q̂ − V (the weight carries no gradient). -> (N,)
    """
    nll = F.cross_entropy(logits.float(), actions, reduction="none")
    if beta == 0:
        return nll
    return torch.exp(beta * advantages.detach()) * nll


class ILQLLoss(NamedTuple):
    """Per-token values (N,) of ``ilql_loss``; the caller sums them and divides by the token count."""

    loss: torch.Tensor  # q + v + cql_scale · cql + awac_scale · awac, differentiable
    q: torch.Tensor
    v: torch.Tensor
    cql: torch.Tensor
    awac: torch.Tensor
    advantage: torch.Tensor  # Q̂ − V of the taken tokens, detached


def ilql_loss(
    logits: torch.Tensor,
    q1_all: torch.Tensor,
    q2_all: torch.Tensor,
    target_q1: torch.Tensor,
    target_q2: torch.Tensor,
    v: torch.Tensor,
    next_v: torch.Tensor,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    dones: torch.Tensor,
    gamma: float = 0.99,
    tau: float = 0.7,
    cql_scale: float = 0.1,
    awac_scale: float = 1.0,
    awac_beta: float = 0.0,
) -> ILQLLoss:
    """The ILQL objective per response token (Snell et al. 2022, §4; the module docstring):

        L = L_Q + L_V + cql_scale · L_CQL + awac_scale · L_AWAC

    logits, q1_all, q2_all: (N, V) the LM's logits and the online Q heads at the states s_t;
    target_q1, target_q2: (N,) the target heads' Q of the taken tokens; v, next_v: (N,) V(s_t) and
    V(s_{t+1}); actions (N,) long; rewards (N,); dones (N,) bool.
    """
    q1 = q1_all.gather(-1, actions[:, None])[:, 0].float()
    q2 = q2_all.gather(-1, actions[:, None])[:, 0].float()
    v, next_v = v.float(), next_v.float()
    l_q = q_loss(q1, q2, td_targets(rewards, next_v, dones, gamma))
    l_v = expectile_loss(target_q1.float(), target_q2.float(), v, tau)
    l_cql = cql_loss(q1_all, q2_all, actions)
    advantage = (torch.minimum(target_q1, target_q2).float() - v).detach()
    l_awac = awac_loss(logits, actions, advantage, awac_beta)
    total = l_q + l_v + cql_scale * l_cql + awac_scale * l_awac
    return ILQLLoss(total, l_q.detach(), l_v.detach(), l_cql.detach(), l_awac.detach(), advantage)


@torch.no_grad()
def polyak_update(target: nn.Module, online: nn.Module, alpha: float) -> None:
    """θ̄ ← α θ + (1 − α) θ̄ for every parameter pair (Polyak averaging of the target network;
    Lillicrap et al. 2016 "DDPG" §3, the τ of SAC and IQL)."""
    for t, p in zip(target.parameters(), online.parameters(), strict=True):
        t.lerp_(p.to(t.dtype), alpha)


def perturbed_logits(logits: torch.Tensor, q: torch.Tensor, v: torch.Tensor, beta: float) -> torch.Tensor:
    """The ILQL policy's logits log π_β(·|s) + β (Q̂(s, ·) − V(s)) (Snell et al. eq. 4), in float32.

    logits, q: (..., V); v: (..., 1) or (...,). Sampling applies temperature / top-k / top-p to
    these; β = 0 gives log π_β, the LM's own distribution.
    """
    v = v.float()
    if v.dim() == logits.dim() - 1:
        v = v[..., None]
    return torch.log_softmax(logits.float(), dim=-1) + beta * (q.float() - v)


def sequence_reward_of_ranks(ranks: list[int]) -> list[float]:
    """A ranking's ranks (0 = best, ties equal) -> rewards linear from +1 (best) to −1 (worst rank):
    r = 1 − 2 · rank / max(ranks); all tied -> all 0. A pair gives +1 / −1, ranks [0, 1, 1, 2] give
    1, 0, 0, −1."""
    worst = max(ranks)
    return [0.0 if worst == 0 else 1.0 - 2.0 * r / worst for r in ranks]
