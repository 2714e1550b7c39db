"""Ratings of model versions from pairwise comparisons: online Elo, Bradley–Terry with bootstrap
confidence intervals, and win-rates. numpy only.

A comparison is ``(a, b, outcome)``: two model names and the result *for a* — 1 (a wins),
0 (b wins) or 0.5 (tie). Ratings are on the Elo scale: a 400-point gap means 10:1 odds.

Sources:
- Elo 1978, "The Rating of Chessplayers, Past and Present" (logistic form, K-factor).
- Bradley & Terry 1952, "Rank Analysis of Incomplete Block Designs"; Hunter 2004, "MM algorithms
  for generalized Bradley–Terry models" (the likelihood); ties as half a win each, as in
  Chatbot Arena (Chiang et al. 2024, "Chatbot Arena", §5 and its notebook: BT by logistic
  regression on the Elo scale, bootstrap over battles for the intervals).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence
from typing import NamedTuple

import numpy as np

__all__ = [
    "Comparison",
    "elo_ratings",
    "bradley_terry",
    "Rating",
    "bradley_terry_bootstrap",
    "WinRate",
    "win_rate",
]

Comparison = tuple[Hashable, Hashable, float]

ELO_SCALE = 400.0 / math.log(10.0)  # natural-log strength → Elo points (≈ 173.72)


def _check_outcome(outcome: float, index: int) -> float:
    outcome = float(outcome)
    if not 0.0 <= outcome <= 1.0:
        raise ValueError(f"comparison {index}: outcome must be 1 (a wins), 0 (b wins) or 0.5 (tie), got {outcome}")
    return outcome


def _expected(rating_a: float, rating_b: float) -> float:
    """Elo's expected score of a against b: 1 / (1 + 10^((R_b − R_a)/400))."""
    return 1.0 / (1.0 + 10.0 ** ((rating_b - rating_a) / 400.0))


def elo_ratings(comparisons: Iterable[Comparison], k: float = 32.0, initial: float = 1000.0) -> dict[Hashable, float]:
    """Online Elo over comparisons in the order given.

        E_a = 1 / (1 + 10^((R_b − R_a)/400)),   R_a ← R_a + K (S_a − E_a),   R_b ← R_b − K (S_a − E_a)

    with S_a = 1, 0.5 or 0. Elo depends on the order of the games and forgets early ones; prefer
    ``bradley_terry`` (order-free, with intervals) for a report, and use Elo as the familiar
    running number.

    Returns:
        ``{name: rating}`` in order of first appearance; every player starts at ``initial``.
    """
    ratings: dict[Hashable, float] = {}
    for index, (a, b, outcome) in enumerate(comparisons):
        s_a = _check_outcome(outcome, index)
        if a == b:
            raise ValueError(f"comparison {index}: a model cannot be compared with itself ({a!r})")
        r_a = ratings.setdefault(a, float(initial))
        r_b = ratings.setdefault(b, float(initial))
        delta = k * (s_a - _expected(r_a, r_b))
        ratings[a] = r_a + delta
        ratings[b] = r_b - delta
    return ratings


def _index(comparisons: Sequence[Comparison]) -> tuple[list[Hashable], np.ndarray, np.ndarray, np.ndarray]:
    """Names in order of first appearance, and arrays (i, j, outcome for i) of length N."""
    names: dict[Hashable, int] = {}
    ii, jj, ss = [], [], []
    for index, (a, b, outcome) in enumerate(comparisons):
        s = _check_outcome(outcome, index)
        if a == b:
            raise ValueError(f"comparison {index}: a model cannot be compared with itself ({a!r})")
        ii.append(names.setdefault(a, len(names)))
        jj.append(names.setdefault(b, len(names)))
        ss.append(s)
    return list(names), np.asarray(ii, dtype=np.int64), np.asarray(jj, dtype=np.int64), np.asarray(ss, dtype=float)


def _wins_matrix(n: int, i: np.ndarray, j: np.ndarray, s: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """W[x, y] = (weighted) number of wins of x over y, a tie counting half a win for each."""
    w = np.ones_like(s) if weights is None else weights
    wins = np.bincount(i * n + j, weights=w * s, minlength=n * n)
    wins += np.bincount(j * n + i, weights=w * (1.0 - s), minlength=n * n)
    return wins.reshape(n, n)


def _fit_bt(wins: np.ndarray, l2: float, max_iter: int = 100, tol: float = 1e-10) -> np.ndarray:
    """Maximise the penalised BT log-likelihood over strengths θ (natural-log units).

        ℓ(θ) = Σ_{x,y} W[x,y] · log σ(θ_x − θ_y) − (l2 / 2) · Σ_x θ_x²

    ℓ is strictly concave for l2 > 0, so Newton's method with step halving converges to the
    unique maximum. At the optimum Σ_x θ_x = 0 (the likelihood's gradient sums to zero), so the
    penalty only fixes the otherwise free offset and keeps θ finite when a model wins every game.
    """
    n = wins.shape[0]
    games = wins + wins.T  # N[x, y]
    theta = np.zeros(n)

    def objective(t: np.ndarray) -> float:
        diff = t[:, None] - t[None, :]
        return float(-(wins * np.logaddexp(0.0, -diff)).sum() - 0.5 * l2 * (t**2).sum())

    current = objective(theta)
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-(theta[:, None] - theta[None, :])))  # P(x beats y)
        grad = wins.sum(axis=1) - (games * p).sum(axis=1) - l2 * theta
        w = games * p * p.T  # N[x, y] · p(1 − p)
        hessian = w - np.diag(w.sum(axis=1)) - l2 * np.eye(n)  # negative definite
        step = np.linalg.solve(hessian, -grad)
        scale = 1.0
        while True:
            candidate = theta + scale * step
            value = objective(candidate)
            if value >= current - 1e-12 or scale < 1e-8:
                break
            scale *= 0.5
        theta, previous, current = candidate, current, value
        if np.abs(scale * step).max() < tol or abs(current - previous) < tol * max(1.0, abs(current)):
            break
    return theta


def _to_elo(theta: np.ndarray, names: list[Hashable], anchor: Hashable | None, anchor_rating: float) -> np.ndarray:
    ratings = ELO_SCALE * theta
    if anchor is None:
        return ratings - ratings.mean() + anchor_rating
    return ratings - ratings[names.index(anchor)] + anchor_rating


def _check_anchor(names: list[Hashable], anchor: Hashable | None) -> None:
    if anchor is not None and anchor not in names:
        raise ValueError(f"anchor model {anchor!r} appears in no comparison (models: {names})")


def bradley_terry(
    comparisons: Sequence[Comparison],
    anchor: Hashable | None = None,
    anchor_rating: float = 1000.0,
    l2: float = 1e-2,
) -> dict[Hashable, float]:
    """Bradley–Terry maximum-likelihood ratings on the Elo scale.

        P(a beats b) = 1 / (1 + 10^((R_b − R_a)/400)) = σ(θ_a − θ_b),   R = 400/ln 10 · θ + c

    Ties count as half a win for each side. A small L2 penalty ``l2`` on θ (a Gaussian prior with
    variance 1/l2 in natural-log units) keeps ratings finite when a model wins or loses every
    comparison; with tens of games per model its effect on the others is a fraction of a point.

    Args:
        comparisons: ``(a, b, outcome for a)``.
        anchor: the model whose rating is pinned to ``anchor_rating`` (e.g. the SFT model);
            ``None`` pins the mean of all ratings instead.
        anchor_rating: 1000 by default, Elo's usual starting value.
        l2: penalty strength (> 0).

    Returns:
        ``{name: rating}`` in order of first appearance.
    """
    if l2 <= 0:
        raise ValueError(f"l2 must be > 0 to keep the ratings finite, got {l2}")
    names, i, j, s = _index(comparisons)
    if not names:
        raise ValueError("bradley_terry: no comparisons")
    _check_anchor(names, anchor)
    theta = _fit_bt(_wins_matrix(len(names), i, j, s), l2)
    return dict(zip(names, _to_elo(theta, names, anchor, anchor_rating).tolist()))


class Rating(NamedTuple):
    rating: float  # the fit on all comparisons
    lower: float  # percentile bootstrap interval
    upper: float


def bradley_terry_bootstrap(
    comparisons: Sequence[Comparison],
    anchor: Hashable | None = None,
    anchor_rating: float = 1000.0,
    l2: float = 1e-2,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[Hashable, Rating]:
    """Bradley–Terry ratings with percentile bootstrap confidence intervals.

    Each of ``n_boot`` replicates resamples the comparisons with replacement (same count; drawn
    as multinomial weights, which is the same thing) and refits; the interval is the
    (1 − confidence)/2 and (1 + confidence)/2 percentiles of each model's rating. Each replicate
    is anchored like the point fit, so the anchor's own interval is a single point and the others
    are intervals *relative to the anchor*. Deterministic for a given ``seed``.

    Returns:
        ``{name: Rating(rating, lower, upper)}`` in order of first appearance.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    point = bradley_terry(comparisons, anchor=anchor, anchor_rating=anchor_rating, l2=l2)
    names, i, j, s = _index(comparisons)
    rng = np.random.default_rng(seed)
    n = len(s)
    replicates = np.empty((n_boot, len(names)))
    for b in range(n_boot):
        weights = rng.multinomial(n, np.full(n, 1.0 / n)).astype(float)  # resample the comparisons
        theta = _fit_bt(_wins_matrix(len(names), i, j, s, weights), l2)
        replicates[b] = _to_elo(theta, names, anchor, anchor_rating)
    alpha = (1.0 - confidence) / 2.0
    lower, upper = np.quantile(replicates, [alpha, 1.0 - alpha], axis=0)
    return {name: Rating(point[name], float(lower[x]), float(upper[x])) for x, name in enumerate(names)}


class WinRate(NamedTuple):
    rate: float  # (wins + ties / 2) / n
    lower: float  # percentile bootstrap interval
    upper: float
    wins: int
    ties: int
    losses: int


def win_rate(outcomes: Iterable[float], n_boot: int = 1000, confidence: float = 0.95, seed: int = 0) -> WinRate:
    """Win-rate of a model over another, ties counting half, with a bootstrap interval.

    ``outcomes`` are 1 (win), 0.5 (tie), 0 (loss) from the first model's side, one per
    comparison (e.g. per held-out prompt, judged by the gold rubric). Resampling n outcomes with
    replacement is a multinomial draw of (wins, ties, losses), which is what is sampled here.
    """
    values = np.asarray(list(outcomes), dtype=float)
    if values.size == 0:
        raise ValueError("win_rate: no outcomes")
    if not np.isin(values, (0.0, 0.5, 1.0)).all():
        bad = values[~np.isin(values, (0.0, 0.5, 1.0))][0]
        raise ValueError(f"win_rate: outcomes must be 1, 0.5 or 0, got {bad}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    n = values.size
    wins, ties = int((values == 1.0).sum()), int((values == 0.5).sum())
    losses = n - wins - ties
    rate = (wins + 0.5 * ties) / n
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, [wins / n, ties / n, losses / n], size=n_boot)  # (n_boot, 3)
    rates = (draws[:, 0] + 0.5 * draws[:, 1]) / n
    alpha = (1.0 - confidence) / 2.0
    lower, upper = np.quantile(rates, [alpha, 1.0 - alpha])
    return WinRate(float(rate), float(lower), float(upper), wins, ties, losses)
