"""Ratings on hand-computed values and on simulated comparisons with known strengths."""

import math

import numpy as np
import pytest

from rlhfkit.algos.ratings import bradley_terry, bradley_terry_bootstrap, elo_ratings, win_rate

ELO_3_TO_1 = 400 * math.log10(3.0)  # 190.8485: the gap at which the stronger side scores 3 of 4


def test_elo_by_hand():
    # game 1: both 1000, E = 0.5, A wins → A += 32·0.5 = 16, B −= 16
    # game 2: B (984) ties C (1000): E_B = 1/(1 + 10^(16/400)) = 1/(1 + 1.0964782) = 0.4769904,
    #         B += 32·(0.5 − 0.4769904) = +0.7363068 → 984.7363068, C → 999.2636932
    ratings = elo_ratings([("A", "B", 1), ("B", "C", 0.5)], k=32, initial=1000)
    assert list(ratings) == ["A", "B", "C"]
    assert ratings["A"] == pytest.approx(1016.0)
    assert ratings["B"] == pytest.approx(984.7363068, abs=1e-6)
    assert ratings["C"] == pytest.approx(999.2636932, abs=1e-6)
    assert sum(ratings.values()) == pytest.approx(3000.0)  # Elo is zero-sum
    # b winning is outcome 0 from a's side
    assert elo_ratings([("A", "B", 0)])["B"] == pytest.approx(1016.0)
    with pytest.raises(ValueError, match="comparison 1"):
        elo_ratings([("A", "B", 1), ("A", "B", 2)])


def test_bradley_terry_by_hand_ties_count_half():
    # A scores 3 of 4 against B (2 wins, 2 ties): MLE σ(θ_A − θ_B) = 3/4 → θ gap ln 3
    # → Elo gap 400·log10 3 = 190.85, split around a mean of 1000
    comparisons = [("A", "B", 1), ("A", "B", 1), ("B", "A", 0.5), ("A", "B", 0.5)]
    ratings = bradley_terry(comparisons, l2=1e-9)
    assert ratings["A"] == pytest.approx(1000 + ELO_3_TO_1 / 2, abs=1e-3)
    assert ratings["B"] == pytest.approx(1000 - ELO_3_TO_1 / 2, abs=1e-3)
    # anchored on B: B = 1000, A = 1190.85
    anchored = bradley_terry(comparisons, anchor="B", l2=1e-9)
    assert anchored["B"] == pytest.approx(1000.0)
    assert anchored["A"] == pytest.approx(1000 + ELO_3_TO_1, abs=1e-3)
    # the default prior shrinks only slightly
    assert bradley_terry(comparisons, anchor="B")["A"] == pytest.approx(1000 + ELO_3_TO_1, abs=5)
    with pytest.raises(ValueError, match="anchor"):
        bradley_terry(comparisons, anchor="nobody")


def test_bradley_terry_stays_finite_when_one_model_wins_everything():
    ratings = bradley_terry([("v2", "v1", 1)] * 20 + [("v1", "v0", 1)] * 20, anchor="v0")
    assert all(math.isfinite(r) for r in ratings.values())
    assert ratings["v2"] > ratings["v1"] > ratings["v0"] == 1000.0


TRUE = {"sft": 1000.0, "v1": 1100.0, "v2": 1250.0, "base": 900.0}


def simulate(n_per_pair: int, seed: int, tie_share: float = 0.1):
    """Comparisons drawn from the BT model with the TRUE ratings, a share of them ties.

    Each pair's expected score for a stays p = 1/(1 + 10^((R_b − R_a)/400)) — a tie is worth ½,
    so P(win) = p − t/2, P(tie) = t, P(loss) = 1 − p − t/2 — which is what BT with ties counted
    half estimates.
    """
    rng = np.random.default_rng(seed)
    names = list(TRUE)
    comparisons = []
    for x in range(len(names)):
        for y in range(x + 1, len(names)):
            a, b = names[x], names[y]
            p = 1.0 / (1.0 + 10 ** ((TRUE[b] - TRUE[a]) / 400))
            t = min(tie_share, 2 * p, 2 * (1 - p))
            draws = rng.choice([1.0, 0.5, 0.0], size=n_per_pair, p=[p - t / 2, t, 1 - p - t / 2])
            comparisons += [(a, b, float(o)) for o in draws]
    order = rng.permutation(len(comparisons))
    return [comparisons[k] for k in order]


def test_bradley_terry_recovers_known_strengths_and_ci_covers_truth():
    comparisons = simulate(n_per_pair=400, seed=1)
    ratings = bradley_terry(comparisons, anchor="sft")
    for name, truth in TRUE.items():
        assert ratings[name] == pytest.approx(truth, abs=30), name
    intervals = bradley_terry_bootstrap(comparisons, anchor="sft", n_boot=200, seed=0)
    for name, truth in TRUE.items():
        rating, lower, upper = intervals[name]
        assert rating == pytest.approx(ratings[name])
        assert lower <= truth <= upper, (name, lower, truth, upper)
        assert lower <= rating <= upper
    assert intervals["sft"].lower == intervals["sft"].upper == 1000.0  # the anchor is pinned
    width = intervals["v2"].upper - intervals["v2"].lower
    assert 10 < width < 120  # ±2 standard errors of ~15 Elo points with 400 games per pair
    # the same seed gives the same intervals; mean anchoring keeps the mean at 1000
    assert bradley_terry_bootstrap(comparisons, anchor="sft", n_boot=200, seed=0) == intervals
    assert np.mean(list(bradley_terry(comparisons).values())) == pytest.approx(1000.0)


def test_bradley_terry_agrees_with_elo_ordering():
    comparisons = simulate(n_per_pair=200, seed=2, tie_share=0.0)
    bt = bradley_terry(comparisons)
    elo = elo_ratings(comparisons, k=8)
    assert sorted(bt, key=bt.get) == sorted(elo, key=elo.get) == ["base", "sft", "v1", "v2"]


def test_win_rate_by_hand():
    result = win_rate([1, 1, 1, 0.5, 0], n_boot=500, seed=0)
    # (3 wins + ½·1 tie) / 5 = 0.7
    assert result.rate == pytest.approx(0.7)
    assert (result.wins, result.ties, result.losses) == (3, 1, 1)
    assert result.lower < 0.7 < result.upper
    assert 0.0 <= result.lower and result.upper <= 1.0
    assert win_rate([1, 1, 1, 0.5, 0], n_boot=500, seed=0) == result
    with pytest.raises(ValueError, match="0.7"):
        win_rate([1, 0.7])
    with pytest.raises(ValueError, match="no outcomes"):
        win_rate([])


def test_win_rate_interval_covers_truth_about_95_percent():
    # true win 0.6, tie 0.1 → win-rate 0.65; 200 experiments of 100 comparisons
    rng = np.random.default_rng(0)
    covered = 0
    for experiment in range(200):
        outcomes = rng.choice([1.0, 0.5, 0.0], size=100, p=[0.6, 0.1, 0.3])
        result = win_rate(outcomes, n_boot=400, seed=experiment)
        covered += result.lower <= 0.65 <= result.upper
    assert 0.88 <= covered / 200 <= 0.99
