"""Critic-free policy gradients: RLOO and GRPO. Pure math, no models.

References:
  [RLOO] Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for
         Learning from Human Feedback in LLMs", eq. 5 (REINFORCE leave-one-out).
  [GRPO] Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open
         Language Models", eq. 3 (the GRPO objective) and §4.1.2 (outcome supervision).

Batches are prompt-major: the k samples of a prompt are adjacent rows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from rlhfkit.algos.ppo import group_baseline, kl_k3


def _groups(scores: torch.Tensor, k: int) -> torch.Tensor:
    if k < 2 or scores.dim() != 1 or scores.shape[0] % k:
        raise ValueError(f"need k >= 2 samples per prompt dividing the batch, got k={k} for {tuple(scores.shape)}")
    return scores.view(-1, k)  # (P, k)


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """[RLOO] eq. 5: each sample's reward minus the mean reward of the other k−1 samples of its prompt,

        A_i = R_i − 1/(k−1) · Σ_{j≠i} R_j

    with R_i = score_i − β Σ_t (log π − log π_ref)(y_t) (the KL is in the reward, one number per
    sequence; the caller broadcasts A_i to the response tokens).
    Shapes: ``(B,)`` prompt-major, B divisible by k → ``(B,)``.
    """
    _groups(rewards, k)
    return group_baseline(rewards, k)


def grpo_advantages(scores: torch.Tensor, k: int, eps: float = 1e-4) -> torch.Tensor:
    """[GRPO] §4.1.2 outcome supervision: Â_i = (r_i − mean(r)) / (std(r) + eps) over the k samples
    of a prompt. std is the unbiased one (Bessel, divide by k−1): ``torch.std``'s default, as TRL's
    GRPOTrainer computes it (``rewards.view(-1, G).std(dim=1)``). A group of equal scores gets 0.
    Shapes: ``(B,)`` prompt-major → ``(B,)``.
    """
    g = _groups(scores, k)
    mean = g.mean(dim=1, keepdim=True)
    std = g.std(dim=1, keepdim=True)  # unbiased
    return ((g - mean) / (std + eps)).reshape(scores.shape)


class RLOOLossOutput(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable
    clipfrac: torch.Tensor  # share of sequences whose clipped term is the larger one
    approx_kl: torch.Tensor  # ½ (log ρ)² per sequence, mean


def rloo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> RLOOLossOutput:
    """[RLOO] treats the whole response as one action (REINFORCE on sequences), so the importance
    ratio is the sequence's, clipped as PPO's — as TRL's RLOOTrainer computes it:

        ρ_i = exp(Σ_t log π(y_t) − Σ_t log π_old(y_t))
        L   = 1/B Σ_i −min(ρ_i A_i, clip(ρ_i, 1−ε, 1+ε) A_i)

    On the first step of an iteration ρ = 1 and the gradient is REINFORCE's −A_i ∇ log π(y_i).
    Shapes: ``logprobs``, ``old_logprobs``, ``response_mask`` ``(B, T)``; ``advantages`` ``(B,)``.
    """
    mask = response_mask.to(logprobs.dtype)
    log_ratio = ((logprobs - old_logprobs) * mask).sum(1)  # (B,)
    ratio = torch.exp(log_ratio)
    pg = -advantages * ratio
    pg_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = torch.maximum(pg, pg_clipped).mean()
    with torch.no_grad():
        clipfrac = (pg_clipped > pg).to(mask.dtype).mean()
        approx_kl = (0.5 * log_ratio**2).mean()
    return RLOOLossOutput(loss, clipfrac, approx_kl)


class GRPOLossOutput(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable
    policy_loss: torch.Tensor  # the clipped-ratio part (detached)
    kl: torch.Tensor  # the k3 KL part, before β (detached)
    clipfrac: torch.Tensor  # share of tokens where the clipped term is used
    approx_kl: torch.Tensor  # ½ (log ρ)², policy vs rollout policy


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_eps: float = 0.2,
    beta: float = 0.04,
) -> GRPOLossOutput:
    """[GRPO] eq. 3, negated to a loss; the KL to the reference is in the LOSS, not the reward:

        ρ_t = exp(log π(o_t) − log π_old(o_t))
        ℓ_t = −min(ρ_t Â, clip(ρ_t, 1−ε, 1+ε) Â) + β · k3_t,   k3_t = π_ref/π − log(π_ref/π) − 1
        L   = 1/G Σ_i 1/|o_i| Σ_t ℓ_{i,t}

    Normalisation: the paper's — a mean over each sequence's tokens, then over the sequences
    ("sequence mean"), also for the logged clipfrac and approx_kl. TRL's GRPOTrainer defaults to
    another (a token mean over the batch, its 'dapo'/'bnpo' loss types); we follow the paper.

    Args:
        logprobs: ``(B, T)`` of the policy being trained (with grad).
        old_logprobs, ref_logprobs: ``(B, T)`` at rollout time, of the policy and the reference.
        advantages: ``(B,)`` one per sequence (``grpo_advantages``), the same for all its tokens.
        response_mask: ``(B, T)``; every row has at least one token.
    """
    mask = response_mask.to(logprobs.dtype)
    log_ratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(log_ratio)
    adv = advantages.unsqueeze(1)  # (B, 1)
    pg = -adv * ratio
    pg_clipped = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    pg_tok = torch.maximum(pg, pg_clipped)  # = −min(ρÂ, clip(ρ)Â)
    kl_tok = kl_k3(logprobs, ref_logprobs)  # (B, T)
    per_seq = ((pg_tok + beta * kl_tok) * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B,)
    loss = per_seq.mean()
    with torch.no_grad():
        seq_mean = lambda x: ((x * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()  # noqa: E731
        out = GRPOLossOutput(
            loss,
            seq_mean(pg_tok),
            seq_mean(kl_tok),
            seq_mean((pg_clipped > pg).to(mask.dtype)),  # sequence means, as the loss: a statistic
            seq_mean(0.5 * log_ratio**2),  # that micro-batching and processes leave unchanged
        )
    return out
