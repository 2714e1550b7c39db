"""Log-probabilities and entropies of sampled tokens under softmax(logits / τ): what every policy-
gradient stage (PPO, A2C, RLOO, GRPO) and the no-grad forwards compute from the LM head's logits.
Pure functions on tensors; float32 row by row, and a hand-written backward (``_TokenLogProbs``).

- [N-details] Huang et al. 2024, "The N Implementation Details of RLHF with PPO": the logits are
  scaled by the sampling temperature.
"""

from __future__ import annotations

import torch

__all__ = ["logprobs_from_logits", "logprobs_and_entropy", "entropy_from_logits"]


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each token under softmax(logits / temperature).

    log π(y_t) = z_{y_t}/τ − logsumexp(z/τ). The logits must be divided by the temperature the
    responses were sampled with, otherwise the PPO ratio compares two different policies
    [N-details, "the logits are scaled by the sampling temperature"].

    Alignment is the caller's job: ``logits[:, t]`` must be the prediction *for* ``tokens[:, t]``
    (for a causal LM over ``query + response`` that is ``logits[:, len(query) - 1 : -1]``).

    Computed in float32 one row at a time (``_TokenLogProbs``), so bf16 logits do not lose
    precision and the extra memory is one ``(T, V)`` slice rather than a ``(B, T, V)`` copy.

    Args:
        logits: ``(B, T, V)``.
        tokens: ``(B, T)`` token ids.
        temperature: sampling temperature τ > 0.

    Returns:
        logprobs ``(B, T)`` in float32, differentiable with respect to ``logits``.
    """
    _check_temperature(temperature)
    return _TokenLogProbs.apply(logits, tokens, temperature, False)[0]


def logprobs_and_entropy(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``logprobs_from_logits`` (bitwise the same values, differentiable) and the entropy of each
    position (``entropy_from_logits``'s, not differentiable), in one pass over the vocabulary:
    H = lse − Σ_v softmax(z)_v z_v reuses the log-probs' logsumexp. (B, T, V), (B, T) -> 2 × (B, T)."""
    _check_temperature(temperature)
    return _TokenLogProbs.apply(logits, tokens, temperature, True)


class _TokenLogProbs(torch.autograd.Function):
    """log softmax(z)[y] with z = logits / τ, row by row in float32, and its gradient by hand.

    Autograd through ``z.gather(...) − logsumexp(z)`` keeps a float32 copy of the logits and walks
    the vocabulary about ten times in the backward (the cast, the division, the gather's scatter,
    logsumexp's softmax, the sum of both branches, the cast back); the gradient in closed form,
    ∂ log p_y / ∂z_v = (1[v = y] − softmax(z)_v) / τ, takes one float32 slice per row and three
    passes, and keeps only the logits and the logsumexp (B, T). The forward's ops are unchanged
    (bitwise the same log-probs); the backward matches autograd's (tests/test_algos_ppo.py).
    """

    @staticmethod
    def forward(ctx, logits, tokens, temperature, with_entropy):
        lps, lses, ents = [], [], []
        for row_logits, row_tokens in zip(logits, tokens):  # (T, V), (T,)
            z = row_logits.float() / temperature  # (T, V)
            lse = torch.logsumexp(z, dim=-1)  # (T,)
            lps.append(z.gather(-1, row_tokens.unsqueeze(-1)).squeeze(-1) - lse)
            lses.append(lse)
            if with_entropy:
                p = torch.exp(z - lse.unsqueeze(-1))  # softmax(z)
                ents.append(lse - (p * z).sum(-1))
        empty = logits.new_zeros(logits.shape[:2], dtype=torch.float32)  # (B, T)
        logprobs = torch.stack(lps) if lps else empty
        entropy = torch.stack(ents) if ents else empty
        ctx.save_for_backward(logits, tokens, torch.stack(lses) if lses else empty)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad, _grad_entropy):
        logits, tokens, lse = ctx.saved_tensors
        out = torch.empty_like(logits)
        for i in range(len(logits)):  # grad_z = g · (onehot(y) − softmax(z)), grad_logits = grad_z / τ
            z = logits[i].float() / ctx.temperature  # (T, V)
            p = torch.exp(z.sub_(lse[i].unsqueeze(-1)))
            p.mul_(-grad[i].unsqueeze(-1)).scatter_add_(-1, tokens[i].unsqueeze(-1), grad[i].unsqueeze(-1))
            out[i] = p / ctx.temperature if ctx.temperature != 1.0 else p
        return out, None, None, None


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) at every position.

    H = −Σ_v p_v log p_v = logsumexp(z) − Σ_v p_v z_v, with z = logits / τ.

    Args:
        logits: ``(B, T, V)``.
        temperature: τ > 0, the sampling temperature (so the entropy is that of the sampler).

    Returns:
        entropy ``(B, T)`` in float32 (computed row by row, like ``logprobs_from_logits``).
    """
    _check_temperature(temperature)
    rows = []
    for row_logits in logits:  # (T, V)
        z = row_logits.float() / temperature
        p = torch.softmax(z, dim=-1)
        rows.append(torch.logsumexp(z, dim=-1) - (p * z).sum(-1))
    return torch.stack(rows)  # (B, T)
