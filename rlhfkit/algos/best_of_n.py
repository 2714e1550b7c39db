"""Best-of-N sampling: answer with the reward model's best of N samples (no training).

Nakano et al. 2021 (WebGPT, "rejection sampling against the reward model") and Stiennon et al.
2020 (Learning to summarize from human feedback, §4.3 / appendix G) use it as the simplest way to
optimise a policy against a reward model; the KL of the best-of-N policy to the base policy is
bounded analytically (``kl_bound``), which puts it on the same gold-score-vs-KL axis as PPO.

Pure math: no models here. ``best_of`` picks, ``kl_bound`` is the x axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def best_of(candidates: Sequence[Sequence[str]], scores: Sequence[Sequence[float]]) -> list[str]:
    """The highest-scored candidate of each group; the first one wins a tie.

    candidates: (B, N) texts; scores: (B, N) reward-model scores of the same texts -> (B,) picks.
    """
    if len(candidates) != len(scores):
        raise ValueError(f"best_of: {len(candidates)} candidate groups but {len(scores)} score groups")
    picks = []
    for i, (group, s) in enumerate(zip(candidates, scores)):
        if len(group) != len(s) or not group:
            raise ValueError(f"best_of: group {i} has {len(group)} candidates and {len(s)} scores")
        picks.append(group[best_index(s)])
    return picks


def best_index(scores: Sequence[float]) -> int:
    """Index of the highest score (the first one on a tie)."""
    return max(range(len(scores)), key=lambda j: (scores[j], -j))


def kl_bound(n: int) -> float:
    """KL(best-of-n || base) = log n - (n - 1) / n  (nats), the analytic value for continuous
    rewards (Stiennon et al. 2020, appendix G.3; Hilton, "KL divergence of max-of-n", 2023, shows it
    is an upper bound when rewards tie). n=1 -> 0; n=4 -> log 4 - 3/4 = 0.6363.
    """
    if n < 1:
        raise ValueError(f"kl_bound: n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n
