"""Ratings on hand-computed values and on simulated comparisons with known strengths."""

import math
import re

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


# ---------------------------------------------------------------- found by mutation testing
# Each test below kills mutants of `make mutate` that the tests above let survive (docs/testing.md).


def exactly(message: str) -> str:
    """A `pytest.raises(match=...)` pattern for the whole message, not a substring of it."""
    return "^" + re.escape(message) + "$"


def test_bradley_terry_penalised_optimum_by_hand():
    # A beats B 3 times. With θ_A = −θ_B = t, ∂ℓ/∂θ_A = 3·σ(−2t) − l2·t = 0. Choosing
    # l2 = 3 / (2 ln 3) makes t = ln(3)/2 the optimum: σ(−ln 3) = 1/4 and 3/4 = l2 · ln(3)/2.
    # So the prior pulls the 3–0 record back to a 3:1 gap: 400·log10 3 = 190.85 Elo, around 1000.
    ratings = bradley_terry([("A", "B", 1)] * 3, l2=3 / (2 * math.log(3)))
    assert ratings["A"] == pytest.approx(1000 + ELO_3_TO_1 / 2, abs=1e-6)
    assert ratings["B"] == pytest.approx(1000 - ELO_3_TO_1 / 2, abs=1e-6)
    # A beats B once and C once: θ_A = 2u, θ_B = θ_C = −u (they sum to 0), ∂ℓ/∂θ_A = 2·σ(−3u) − l2·2u.
    # l2 = 3 / (4 ln 3) puts the optimum at 3u = ln 3: A is 190.85 Elo above B and C, 2/3 of it above 1000
    ratings = bradley_terry([("A", "B", 1), ("A", "C", 1)], l2=3 / (4 * math.log(3)))
    assert ratings["A"] == pytest.approx(1000 + 2 * ELO_3_TO_1 / 3, abs=1e-6)
    assert ratings["B"] == pytest.approx(1000 - ELO_3_TO_1 / 3, abs=1e-6)
    assert ratings["C"] == pytest.approx(1000 - ELO_3_TO_1 / 3, abs=1e-6)
    # the same record with l2 = 0.1: u solves σ(−3u) = 0.1·u (one root, the left side falls, the
    # right rises), found by bisection; A = 1000 + 2u, B = C = 1000 − u in Elo units (400 / ln 10)
    lo, hi = 0.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 1 / (1 + math.exp(3 * mid)) > 0.1 * mid else (lo, mid)
    elo_u = 400 / math.log(10) * lo  # ≈ 140.66
    ratings = bradley_terry([("A", "B", 1), ("A", "C", 1)], l2=0.1)
    assert ratings["A"] == pytest.approx(1000 + 2 * elo_u, abs=1e-6)
    assert ratings["B"] == pytest.approx(1000 - elo_u, abs=1e-6)


def test_rating_errors_name_the_comparison():
    with pytest.raises(ValueError, match=exactly("comparison 0: a model cannot be compared with itself ('A')")):
        elo_ratings([("A", "A", 1)])
    with pytest.raises(ValueError, match=exactly("comparison 1: a model cannot be compared with itself ('B')")):
        bradley_terry([("A", "B", 1), ("B", "B", 0)])
    with pytest.raises(
        ValueError, match=exactly("comparison 1: outcome must be 1 (a wins), 0 (b wins) or 0.5 (tie), got 2.0")
    ):
        bradley_terry([("A", "B", 1), ("A", "B", 2)])
    with pytest.raises(ValueError, match=exactly("l2 must be > 0 to keep the ratings finite, got 0")):
        bradley_terry([("A", "B", 1)], l2=0)
    with pytest.raises(ValueError, match=exactly("bradley_terry: no comparisons")):
        bradley_terry([])


COMPARISONS = [("A", "B", 1), ("A", "B", 1), ("A", "B", 0), ("B", "A", 0.5), ("A", "B", 1), ("B", "A", 0)]


def test_bootstrap_arguments_are_checked():
    for confidence in (0.0, 1.0):
        with pytest.raises(ValueError, match=exactly(f"confidence must be in (0, 1), got {confidence}")):
            bradley_terry_bootstrap(COMPARISONS, confidence=confidence)
    with pytest.raises(ValueError, match=exactly("n_boot must be >= 1, got 0")):
        bradley_terry_bootstrap(COMPARISONS, n_boot=0)
    # one replicate is allowed: its interval is a single point
    one = bradley_terry_bootstrap(COMPARISONS, n_boot=1)
    assert one["A"].lower == one["A"].upper


def test_bootstrap_point_uses_anchor_rating_and_l2():
    intervals = bradley_terry_bootstrap(COMPARISONS, anchor="B", anchor_rating=1500.0, l2=0.5, n_boot=20)
    point = bradley_terry(COMPARISONS, anchor="B", anchor_rating=1500.0, l2=0.5)
    assert intervals["B"] == (1500.0, 1500.0, 1500.0)
    assert intervals["A"].rating == point["A"]


def test_bootstrap_is_refitting_resampled_comparisons():
    """The interval, recomputed the plain way: draw n comparisons with replacement (the same
    multinomial draws), refit Bradley–Terry on the resampled list, take the 2.5 / 97.5 percentiles."""
    n_boot, seed = 40, 3
    intervals = bradley_terry_bootstrap(COMPARISONS, anchor="B", n_boot=n_boot, seed=seed)
    rng = np.random.default_rng(seed)
    n = len(COMPARISONS)
    replicates = []
    for _ in range(n_boot):
        counts = rng.multinomial(n, np.full(n, 1.0 / n))
        resampled = [c for c, k in zip(COMPARISONS, counts) for _ in range(k)]
        replicates.append(bradley_terry(resampled, anchor="B")["A"])
    lower, upper = np.quantile(replicates, [0.025, 0.975])
    assert intervals["A"].lower == pytest.approx(lower, abs=1e-6)
    assert intervals["A"].upper == pytest.approx(upper, abs=1e-6)
    assert intervals["A"].lower < intervals["A"].upper


def test_bootstrap_and_win_rate_defaults():
    # three models, enough comparisons that the percentiles move with the seed and n_boot
    comparisons = COMPARISONS + [
        ("A", "C", 1),
        ("C", "A", 0.5),
        ("B", "C", 1),
        ("C", "B", 1),
        ("A", "C", 0),
        ("B", "C", 0.5),
    ]
    assert bradley_terry_bootstrap(comparisons) == bradley_terry_bootstrap(
        comparisons, n_boot=1000, confidence=0.95, seed=0
    )
    outcomes = [1, 1, 0.5, 0, 1, 0, 1]
    assert win_rate(outcomes) == win_rate(outcomes, n_boot=1000, confidence=0.95, seed=0)


def test_win_rate_two_ties_and_its_errors():
    # (1 win + ½·2 ties) / 4 = 0.5
    result = win_rate([1, 0.5, 0.5, 0], n_boot=10)
    assert result.rate == 0.5 and (result.wins, result.ties, result.losses) == (1, 2, 1)
    with pytest.raises(ValueError, match=exactly("win_rate: no outcomes")):
        win_rate([])
    # the first bad value is named, whatever valid values come before it
    with pytest.raises(ValueError, match=exactly("win_rate: outcomes must be 1, 0.5 or 0, got 0.7")):
        win_rate([0, 0.5, 1, 0.7, 2])
    for confidence in (0.0, 1.0):
        with pytest.raises(ValueError, match=exactly(f"confidence must be in (0, 1), got {confidence}")):
            win_rate([1, 0], confidence=confidence)


def test_win_rate_interval_cuts_half_the_missing_confidence_off_each_side():
    # outcomes [win, loss]: a resample of 2 scores 0, ½ or 1 with probabilities ¼, ½, ¼.
    # A 40 % interval cuts 30 % off each side: both cuts fall inside the middle ½ → [0.5, 0.5]
    # (a 20 % cut would fall in the bottom ¼ and give 0).
    result = win_rate([1, 0], n_boot=10000, confidence=0.4, seed=0)
    assert (result.lower, result.upper) == (0.5, 0.5)
