"""Labelers: gold order at temperature 0, noisy but mostly-right orders with noise, seeded
reproducibility, the random share, the length taste, ties."""

from __future__ import annotations

import pytest

from rlhfkit.data.records import Prompt, Ranking, as_messages
from rlhfkit.feedback.labelers import (
    GoldLabeler,
    Labeler,
    SimulatedLabeler,
    SimulatedLabelerConfig,
    agreement,
    ranks_from_scores,
)

PROMPT = Prompt(
    messages=as_messages("How do I cook rice? Use lowercase only. Do not use commas. Use at most 12 words."),
    meta={
        "id": "t-1",
        "instructions": [
            {"kind": "lowercase"},
            {"kind": "no_commas"},
            {"kind": "word_count", "relation": "at_most", "n": 12},
        ],
    },
)


def answers(i: int = 0) -> list[str]:
    """Four answers with gold scores 1, 2/3, 1/3, 0 (best first); ``i`` makes each set unique."""
    return [
        f"rinse the rice and simmer it {i} minutes.",  # 3/3
        f"Rinse the rice and simmer it {i} minutes.",  # 2/3 (capital)
        f"Rinse the rice, then simmer it {i} minutes.",  # 1/3 (capital, comma)
        f"Rinse the rice, then simmer it gently for about {i} minutes until all the water is gone.",  # 0/3
    ]


def test_ranks_from_scores_dense_with_ties():
    assert ranks_from_scores([0.5, 1.0, 0.5, 0.0]) == [1, 0, 1, 2]


def test_gold_labeler_orders_by_gold_and_ties_equal_scores():
    resp = answers()
    r = GoldLabeler().rank(PROMPT, resp[::-1])
    assert r.ranks == [3, 2, 1, 0]
    assert r.responses == resp[::-1] and r.messages == PROMPT.messages
    assert r.meta["labeler"] == "gold" and r.meta["prompt_id"] == "t-1"
    assert r.meta["gold"] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])
    tied = GoldLabeler().rank(PROMPT, ["good one.", "fine one.", "Bad one."])
    assert tied.ranks == [0, 0, 1]
    assert sorted(tied.pairs()) == [(0, 2), (1, 2)]


def test_temperature_zero_is_exactly_gold():
    lab = SimulatedLabeler(SimulatedLabelerConfig(temperature=0.0, random_share=0.0, seed=3))
    gold = GoldLabeler()
    for i in range(20):
        resp = answers(i)[::-1] if i % 2 else answers(i)
        assert lab.rank(PROMPT, resp).ranks == gold.rank(PROMPT, resp).ranks
    assert lab.rank(PROMPT, ["good one.", "fine one.", "Bad one."]).ranks == [0, 0, 1]


def test_finished_flags_reach_the_rubric():
    resp = ["rinse the rice and simmer it for ten minutes.", "rinse and simmer the rice for ten minutes."]
    r = GoldLabeler().rank(PROMPT, resp, finished=[False, True])
    assert r.ranks == [1, 0]
    assert r.meta["gold"] == pytest.approx([0.7, 1.0])
    with pytest.raises(ValueError):
        GoldLabeler().rank(PROMPT, resp, finished=[True])
    with pytest.raises(ValueError):
        GoldLabeler().rank(PROMPT, ["only one"])


def test_noise_agrees_with_gold_mostly_but_not_always():
    lab = SimulatedLabeler(SimulatedLabelerConfig(temperature=0.15, random_share=0.0, seed=0))
    gold = GoldLabeler()
    agree = []
    for i in range(200):
        resp = answers(i)
        agree.append(agreement(lab.rank(PROMPT, resp), gold.rank(PROMPT, resp)))
    mean = sum(agree) / len(agree)
    # adjacent answers differ by 1/3 in gold: P(flip) = 1 / (1 + exp(1/3 / 0.15)) ≈ 0.10
    assert 0.85 < mean < 0.99
    assert min(agree) < 1.0


def test_higher_temperature_means_less_agreement():
    gold = GoldLabeler()

    def mean_agreement(t):
        lab = SimulatedLabeler(SimulatedLabelerConfig(temperature=t, random_share=0.0))
        return sum(agreement(lab.rank(PROMPT, answers(i)), gold.rank(PROMPT, answers(i))) for i in range(150)) / 150

    assert mean_agreement(0.05) > mean_agreement(0.3) > mean_agreement(5.0) > 0.3


def test_seeded_reproducibility():
    cfg = SimulatedLabelerConfig(temperature=0.5, random_share=0.1, seed=7)
    a = [SimulatedLabeler(cfg).rank(PROMPT, answers(i)).ranks for i in range(50)]
    b = [SimulatedLabeler(cfg).rank(PROMPT, answers(i)).ranks for i in reversed(range(50))][::-1]
    assert a == b  # same inputs -> same ranking, whatever the call order
    other = SimulatedLabelerConfig(temperature=0.5, random_share=0.1, seed=8)
    c = [SimulatedLabeler(other).rank(PROMPT, answers(i)).ranks for i in range(50)]
    assert a != c


def test_random_share():
    lab = SimulatedLabeler(SimulatedLabelerConfig(temperature=0.0, random_share=0.2, seed=1))
    rankings = [lab.rank(PROMPT, answers(i)) for i in range(400)]
    share = sum(r.meta["random"] for r in rankings) / len(rankings)
    assert 0.15 < share < 0.25
    gold = GoldLabeler()
    for i, r in enumerate(rankings):
        if not r.meta["random"]:
            assert r.ranks == gold.rank(PROMPT, answers(i)).ranks
        assert sorted(r.ranks) == [0, 1, 2, 3]
    all_random = SimulatedLabeler(SimulatedLabelerConfig(temperature=0.0, random_share=1.0))
    orders = {tuple(all_random.rank(PROMPT, answers(i)).ranks) for i in range(100)}
    assert len(orders) > 10  # many different permutations


def test_length_bias():
    p = Prompt(messages=as_messages("Say something about rice."), meta={"instructions": []})
    short, long = (
        "Rice is a grain that many people eat.",
        "Rice is a grain that feeds half of the people on this planet.",
    )
    assert GoldLabeler().rank(p, [short, long]).ranks == [0, 0]  # equal gold
    likes_long = SimulatedLabeler(SimulatedLabelerConfig(temperature=0.0, random_share=0.0, length_bias=0.2))
    likes_short = SimulatedLabeler(SimulatedLabelerConfig(temperature=0.0, random_share=0.0, length_bias=-0.2))
    assert likes_long.rank(p, [short, long]).ranks == [1, 0]
    assert likes_short.rank(p, [short, long]).ranks == [0, 1]
    # a small taste does not overturn a clear gold difference
    resp = answers(3)
    assert likes_long.rank(PROMPT, resp).ranks == [0, 1, 2, 3]


def test_identical_responses_are_tied_even_with_noise():
    lab = SimulatedLabeler(SimulatedLabelerConfig(temperature=1.0, random_share=0.5))
    for i in range(30):
        resp = [f"same answer {i}.", f"Other, answer {i}", f"same answer {i}. "]
        r = lab.rank(PROMPT, resp)
        assert r.ranks[0] == r.ranks[2]
        assert sorted(set(r.ranks)) == [0, 1]


def test_interface_and_ranking_several_prompts():
    assert isinstance(SimulatedLabeler(), Labeler)
    assert isinstance(GoldLabeler(), Labeler)
    out = [GoldLabeler().rank(PROMPT, rs) for rs in (answers(1), answers(2)[::-1])]
    assert [r.ranks for r in out] == [[0, 1, 2, 3], [3, 2, 1, 0]]
    assert all(isinstance(r, Ranking) for r in out)
    with pytest.raises(ValueError):
        SimulatedLabelerConfig(temperature=-1)
    with pytest.raises(ValueError):
        SimulatedLabelerConfig(random_share=1.5)
