"""Direct Preference Optimization: the losses and the pairs they are computed on.

DPO (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
Reward Model", https://arxiv.org/abs/2305.18290) trains the policy π_θ on preference pairs
(y_w ≻ y_l | x) directly, with the frozen SFT model π_ref in the role that the KL penalty gives it
in PPO: the implicit reward of a response is r(x, y) = β log π_θ(y|x)/π_ref(y|x) (eq. 5), and the
Bradley–Terry likelihood of the labels under that reward is maximised (eq. 7).

Definitions follow TRL 1.16 (``trl/trainer/dpo_trainer.py``, ``DPOTrainer._compute_loss``) so that
the numbers compare: sequence log-probs are *sums* over the response tokens, rewards/margins/
accuracies are computed from the summed log-ratios, and only IPO normalises by length (see
``dpo_loss``). ``benchmarks/dpo_trl_check.py`` checks the equality on one batch.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum of the log-probabilities of the tokens where ``loss_mask`` is 1, per sequence: log π(y|x).

    The same alignment as ``losses.masked_nll_sum`` (which sums over the whole batch): token t is
    predicted by the logits at position t-1, so the first token is never scored. ``collate`` sets
    ``loss_mask`` to 1 on the response tokens (the EOS included), 0 on the prompt and padding.
    Only the scored rows go through the log-softmax (not a (B, T, V) copy), in float32.

    logits: (B, T, V), input_ids: (B, T), loss_mask: (B, T) -> (B,) float32
    """
    mask = loss_mask[:, 1:].bool()  # (B, T-1)
    rows = mask.nonzero()[:, 0]  # (N,): the sequence of each scored token
    token_logps = -F.cross_entropy(logits[:, :-1][mask].float(), input_ids[:, 1:][mask], reduction="none")  # (N,)
    return torch.zeros(len(logits), device=logits.device).index_add(0, rows, token_logps)


class DPOLoss(NamedTuple):
    """Per-pair values (B,) of ``dpo_loss``; the caller reduces them (a weighted mean, see ``pair_weights``)."""

    loss: torch.Tensor  # differentiable
    chosen_rewards: torch.Tensor  # β (log π_θ(y_w|x) − log π_ref(y_w|x)), detached
    rejected_rewards: torch.Tensor  # β (log π_θ(y_l|x) − log π_ref(y_l|x)), detached
    accuracy: torch.Tensor  # 1.0 where chosen_rewards > rejected_rewards (ties count as wrong)
    margin: torch.Tensor  # chosen_rewards − rejected_rewards


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> DPOLoss:
    """The DPO loss of each pair, from sequence log-probs (B,) of policy and reference.

    With the log-ratio difference

        h = (log π_θ(y_w|x) − log π_ref(y_w|x)) − (log π_θ(y_l|x) − log π_ref(y_l|x))

    - ``sigmoid``, ε = 0 — DPO (Rafailov et al. 2023, eq. 7):  L = −log σ(β h)
    - ``sigmoid``, ε > 0 — conservative DPO (cDPO; Mitchell 2023, "A note on DPO with noisy
      preferences", https://ericmitchell.ai/cdpo.pdf): each label is taken as flipped with
      probability ε, L = −(1 − ε) log σ(β h) − ε log σ(−β h). (TRL ≤ 0.x's ``label_smoothing`` of
      ``sigmoid``; TRL 1.16 dropped it there and uses ε only in its ``robust`` and ``exo_pair`` losses.)
    - ``ipo`` — IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from
      Human Preferences", https://arxiv.org/abs/2310.12036, eq. 17, β in the role of τ):
      L = (h̄ − 1/(2β))², a squared loss that keeps a finite target margin instead of pushing
      h → ∞ on deterministic preferences. Length-normalised as TRL 1.16 does (agreed there with
      the IPO authors): h̄ uses each response's log-ratio divided by its token count, so
      ``chosen_lengths`` and ``rejected_lengths`` (B,) are required. ε is not used.

    Rewards, accuracy and margin always use the summed log-ratios (as TRL logs them).

    policy_*, ref_*: (B,) summed response log-probs; ref_* carry no gradient.
    """
    chosen_logratios = policy_chosen - ref_chosen  # (B,)
    rejected_logratios = policy_rejected - ref_rejected  # (B,)
    if loss_type == "sigmoid":
        h = chosen_logratios - rejected_logratios
        loss = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type='ipo' needs chosen_lengths and rejected_lengths (it is length-normalised)")
        h = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type={loss_type!r}: expected 'sigmoid' or 'ipo'")
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return DPOLoss(
        loss=loss,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        accuracy=(chosen_rewards > rejected_rewards).float(),
        margin=chosen_rewards - rejected_rewards,
    )


class Pair(NamedTuple):
    """One (chosen, rejected) pair of a ranking: indices into the ranking's responses, and its weight."""

    ranking: int
    chosen: int
    rejected: int
    weight: float


def ranking_pairs(ranks: list[list[int]], weighting: Literal["per_ranking", "per_pair"] = "per_ranking") -> list[Pair]:
    """Every (better, worse) pair of every ranking (``ranks[g][i]``: rank of response i of ranking g,
    0 = best); tied responses form no pair, so K = 4 with ranks [0, 1, 1, 2] gives 5 pairs, not 6.

    Weights: ``per_ranking`` gives each pair of a ranking 1/P, P its pair count (K(K−1)/2 without
    ties), so every ranking weighs 1 in total whatever its K — InstructGPT's RM loss (Ouyang et al.
    2022, eq. 1, the 1/C(K,2) factor; ``losses.ranking_loss``), because the C(K,2) pairs of one
    prompt are strongly correlated (each response sits in K−1 of them) and a K = 9 prompt should not
    count 36× a K = 2 one. ``per_pair`` gives every pair weight 1 (each comparison is a datum).
    For plain pairs (K = 2) both are 1. The loss of a batch is Σ w·ℓ / Σ w.
    """
    pairs = []
    for g, rk in enumerate(ranks):
        mine = [(i, j) for i in range(len(rk)) for j in range(len(rk)) if rk[i] < rk[j]]
        for i, j in mine:
            pairs.append(Pair(g, i, j, 1.0 / len(mine) if weighting == "per_ranking" else 1.0))
    return pairs
