"""Supervised losses: next-token NLL on selected tokens (pretrain, SFT, PPO-ptx) and the
InstructGPT ranking loss for reward models, with its metrics.

Losses return *sums* plus counts; the recipe divides by the count of the whole global batch
(all processes, all accumulation steps), so that 2 processes x batch b give exactly the same
loss and gradients as 1 process x batch 2b.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def masked_nll_sum(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of next-token negative log-likelihoods over the tokens where ``loss_mask`` is 1.

    Token t is predicted by the logits at position t-1, so the first token is never a target.
    SFT sets ``loss_mask`` to 1 on response tokens only (prompt tokens are context, not
    targets); pretraining sets it to 1 everywhere but padding.

    logits: (B, T, V), input_ids: (B, T), loss_mask: (B, T) -> (scalar sum, number of tokens)
    """
    mask = loss_mask[:, 1:].bool()  # (B, T-1)
    logits = logits[:, :-1][mask]  # (N, V): only the rows we score (saves a (B, T, V) log-softmax)
    targets = input_ids[:, 1:][mask]  # (N,)
    nll = F.cross_entropy(logits.float(), targets, reduction="sum")
    return nll, int(mask.sum())


def ranking_loss(scores: torch.Tensor, ranks: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """InstructGPT's reward-model loss (Ouyang et al. 2022, eq. 1), per prompt.

        loss(θ) = -1/C(K,2) · Σ_{(y_w, y_l)} log σ(r_θ(x, y_w) − r_θ(x, y_l))

    All K responses of a prompt are scored in one batch; each prompt's loss is the mean over
    its pairs, so every prompt weighs the same whatever its K (a prompt with K = 9 is not 36×
    a prompt with K = 2). Tied responses (equal rank) form no pair; a prompt whose responses are
    all tied has no pair and is rejected by the data loader.

    scores: (N,) one score per response; ranks: (N,) 0 = best, equal = tie; group: (N,) the
    prompt index of each response, 0..G-1.
    Returns (per-prompt losses (G,), per-prompt pair counts (G,)).
    """
    same = group[:, None] == group[None, :]  # (N, N)
    better = same & (ranks[:, None] < ranks[None, :])  # (N, N): row i beats column j
    margin = scores[:, None] - scores[None, :]  # (N, N)
    pair_loss = -F.logsigmoid(margin) * better  # (N, N)
    n_groups = int(group.max()) + 1
    loss_sum = torch.zeros(n_groups, dtype=scores.dtype, device=scores.device).index_add(0, group, pair_loss.sum(1))
    pairs = torch.zeros(n_groups, dtype=scores.dtype, device=scores.device).index_add(
        0, group, better.sum(1).to(scores.dtype)
    )
    return loss_sum / pairs.clamp(min=1), pairs


def pairwise_accuracy(
    scores: torch.Tensor, ranks: torch.Tensor, group: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise accuracy as counts: the untied pairs (two responses to one prompt with different
    ranks) and how many of them the scores order like the ranks; equal scores count as wrong.

    scores, ranks (0 = best), group (prompt index): (N,) each. Returns (correct, pairs), two scalar
    tensors; the accuracy is correct / pairs.
    """
    better = (group[:, None] == group[None, :]) & (ranks[:, None] < ranks[None, :])  # (N, N): i ranked above j
    correct = ((scores[:, None] > scores[None, :]) & better).sum()
    return correct, better.sum()


def ranking_metrics(scores: list[float], ranks: list[int]) -> dict[str, float]:
    """Agreement of one prompt's scores with its human ranking.

    - ``pair_correct`` / ``pairs``: untied pairs the scores order correctly (``pairwise_accuracy``).
    - ``top1``: the highest-scored response is among the best-ranked ones (K > 2 reporting).
    - ``kendall_tau``: Kendall's τ-b between scores and the ranking (higher score = better),
      which accounts for ties on either side; NaN when one side is constant.
    """
    k = len(scores)
    correct, pairs = pairwise_accuracy(
        torch.tensor(scores, dtype=torch.float64), torch.tensor(ranks), torch.zeros(k, dtype=torch.long)
    )
    conc = disc = ties_r = ties_s = 0
    for i in range(k):
        for j in range(i + 1, k):
            dr = ranks[j] - ranks[i]  # > 0: i ranked better
            ds = scores[i] - scores[j]  # > 0: i scored higher
            if dr == 0 and ds == 0:
                continue
            if dr == 0:
                ties_r += 1
            elif ds == 0:
                ties_s += 1
            elif (dr > 0) == (ds > 0):
                conc += 1
            else:
                disc += 1
    n0 = conc + disc
    denom = math.sqrt((n0 + ties_r) * (n0 + ties_s))
    tau = (conc - disc) / denom if denom > 0 else float("nan")
    best = min(ranks)
    top = max(range(k), key=lambda i: scores[i])
    return {
        "pair_correct": float(correct),
        "pairs": float(pairs),
        "top1": float(ranks[top] == best),
        "kendall_tau": tau,
    }
