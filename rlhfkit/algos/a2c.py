"""A2C's policy loss: the plain advantage actor-critic policy gradient. Pure math, no models.

References:
  [A3C] Mnih et al. 2016, "Asynchronous Methods for Deep Reinforcement Learning", §4 ("the
        gradient … ∇θ' log π(a_t|s_t; θ') (R_t − V(s_t; θ_v)) + β ∇θ' H(π(s_t; θ'))") and
        Algorithm S3; A2C is its synchronous variant (one learner, a batch of rollouts per step).
  [A2C=PPO] Huang et al. 2022, "A2C is a Special Case of PPO" (arXiv:2205.09123): PPO with one
        epoch, one minibatch and the ratio at 1 takes A2C's step.

Everything else A2C needs is PPO's (``rlhfkit/algos/ppo.py``): the per-token rewards with the KL
penalty, GAE (the advantage estimate in place of [A3C]'s n-step returns), whitening, and the value
loss ``ppo_value_loss(..., clip_eps=None)``, ½ (V − R)².
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from rlhfkit.algos.ppo import masked_mean


class A2CLossOutput(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable: pg_loss − entropy_coef · entropy
    pg_loss: torch.Tensor  # −mean_t Â_t log π(y_t) (detached)
    entropy: torch.Tensor  # mean_t H_t of the policy being trained (detached; NaN without entropy)


def a2c_policy_loss(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
) -> A2CLossOutput:
    """[A3C] §4's policy gradient as a loss, averaged over response tokens:

        L = −mean_t Â_t · log π(y_t | x, y_<t)  −  c · mean_t H(π(· | x, y_<t))

    Â_t are constants (no gradient flows into the critic through them); their gradient is
    ∂L/∂log π(y_t) = −Â_t / n (n = response tokens of the batch): PPO's clipped surrogate has the
    same gradient where its ratio is 1, as on A2C's one step per rollout batch [A2C=PPO].

    Args:
        logprobs: ``(B, T)`` of the policy being trained (with grad).
        advantages: ``(B, T)``, usually GAE's, whitened.
        response_mask: ``(B, T)``.
        entropy: ``(B, T)`` the policy's entropy at each position (with grad), for the bonus; None: no bonus.
        entropy_coef: c ([A3C]'s β, 0.01 on Atari).

    Returns:
        ``A2CLossOutput``; all fields but ``loss`` are detached.
    """
    mask = response_mask.to(logprobs.dtype)
    pg_loss = masked_mean(-advantages.detach() * logprobs, mask)
    loss = pg_loss
    mean_entropy = logprobs.new_tensor(float("nan"))
    if entropy is not None:
        mean_entropy = masked_mean(entropy, mask)
        loss = loss - entropy_coef * mean_entropy
    return A2CLossOutput(loss, pg_loss.detach(), mean_entropy.detach())
