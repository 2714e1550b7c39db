"""Inter-annotator agreement on tasks ranked by several labelers. Pure functions, no storage.

A ranking is ``ranks[i]`` for answer i (0 = best, equal ranks = a tie), as in
:class:`~rlhfkit.data.records.Ranking`.
"""

from __future__ import annotations

from itertools import combinations


def _sign(x: int) -> int:
    return (x > 0) - (x < 0)


def pair_agreement(a: list[int], b: list[int]) -> tuple[int, int]:
    """(agreeing pairs, pairs) between two rankings of the same K answers.

    For each of the K·(K−1)/2 answer pairs (i, j) the two labelers agree when they order it the
    same way: sign(a_i − a_j) = sign(b_i − b_j) (both prefer i, both prefer j, or both tie).

        a = [0, 1, 2], b = [0, 2, 1]  ->  pairs (0,1) agree, (0,2) agree, (1,2) disagree  ->  (2, 3)
    """
    if len(a) != len(b):
        raise ValueError(f"rankings of {len(a)} and {len(b)} answers")
    pairs = list(combinations(range(len(a)), 2))
    agree = sum(_sign(a[i] - a[j]) == _sign(b[i] - b[j]) for i, j in pairs)
    return agree, len(pairs)


def share_agreeing_pairs(tasks: list[list[list[int]]]) -> float:
    """Share of agreeing answer pairs over every pair of labelers of every task labeled twice or more.

        share = Σ_tasks Σ_{labeler pairs} agree / Σ_tasks Σ_{labeler pairs} K(K−1)/2

    Tasks with fewer than two rankings are ignored; nan when none is left.
    """
    agree = total = 0
    for rankings in tasks:
        for a, b in combinations(rankings, 2):
            x, n = pair_agreement(a, b)
            agree, total = agree + x, total + n
    return agree / total if total else float("nan")


def average_ranks(ranks: list[int]) -> list[float]:
    """Ranks 1..K with tied answers sharing the mean of the places they occupy.

    [0, 1, 1, 2]  ->  [1, 2.5, 2.5, 4]
    """
    order = sorted(range(len(ranks)), key=lambda i: ranks[i])
    out = [0.0] * len(ranks)
    pos = 0
    while pos < len(order):
        end = pos
        while end + 1 < len(order) and ranks[order[end + 1]] == ranks[order[pos]]:
            end += 1
        mean = (pos + end) / 2 + 1  # places pos+1 .. end+1
        for p in range(pos, end + 1):
            out[order[p]] = mean
        pos = end + 1
    return out


def kendalls_w(rankings: list[list[int]]) -> float:
    """Kendall's coefficient of concordance W of m labelers ranking the same n answers, tie-corrected.

        R_i = Σ_j r_ij  (r_ij: average rank 1..n of answer i by labeler j),   R̄ = m(n+1)/2
        S = Σ_i (R_i − R̄)²,   T_j = Σ_groups (t³ − t) over labeler j's tie groups of size t
        W = 12 S / (m² (n³ − n) − m Σ_j T_j)

    W = 1: identical rankings; W = 0: no agreement beyond chance. nan when undefined (m < 2, n < 2,
    or every labeler ties everything).
    """
    m = len(rankings)
    if m < 2:
        return float("nan")
    n = len(rankings[0])
    if n < 2 or any(len(r) != n for r in rankings):
        if any(len(r) != n for r in rankings):
            raise ValueError("kendalls_w: every labeler must rank the same answers")
        return float("nan")
    avg = [average_ranks(r) for r in rankings]
    totals = [sum(a[i] for a in avg) for i in range(n)]
    mean = m * (n + 1) / 2
    s = sum((t - mean) ** 2 for t in totals)
    ties = 0
    for r in rankings:
        for value in set(r):
            t = r.count(value)
            ties += t**3 - t
    denom = m**2 * (n**3 - n) - m * ties
    return 12 * s / denom if denom > 0 else float("nan")


def agreement_summary(tasks: dict[int, list[list[int]]]) -> dict:
    """Dashboard numbers over the tasks labeled at least twice: their count, the share of agreeing
    pairs (pooled) and Kendall's W (mean over tasks)."""
    multi = [r for r in tasks.values() if len(r) >= 2]
    ws = [w for w in (kendalls_w(r) for r in multi) if w == w]
    return {
        "tasks": len(multi),
        "pair_agreement": share_agreeing_pairs(multi),
        "kendalls_w": sum(ws) / len(ws) if ws else float("nan"),
    }
