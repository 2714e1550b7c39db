"""Labelers: a prompt and K responses in, a :class:`~rlhfkit.data.records.Ranking` out.

One interface, :class:`Labeler` — ``rank(prompt, responses, finished=None) -> Ranking`` with
``ranks[i]`` the rank of ``responses[i]`` (0 = best, equal ranks = ties). Implementations:

- :class:`GoldLabeler`: the gold rubric (:mod:`rlhfkit.feedback.rubric`), no noise; responses
  with equal gold scores are tied.
- :class:`SimulatedLabeler`: the gold rubric plus human-like noise (below).
- A human labeler (the web app) implements the same method. A person answers slowly, so
  callers must not assume ``rank`` is fast; a web-backed labeler may block until the person
  has answered, or the app may collect rankings into the preference store and the loop read
  them from there. Either way the unit of work stays "one prompt, K responses -> one Ranking".

The simulated labeler's model of a person (Plackett–Luce, the K-way Bradley–Terry)::

    u_i = gold_i + length_bias * (log(1 + words_i) - mean_j log(1 + words_j))
    order ~ Plackett–Luce(exp(u / temperature)):  sort by  u_i / temperature + Gumbel_i

(the Gumbel-max trick samples the Plackett–Luce order exactly). ``temperature = 0`` is the
deterministic order of ``u`` with exact ties kept as ties — with ``length_bias = 0``, exactly
the gold order. With probability ``random_share`` the labeler ignores the answers and returns
a uniformly random order (a careless or mistaken click). Noisy rankings are strict orders
except that identical responses are always tied.

Reproducibility: each call draws from a generator seeded by ``(seed, prompt, responses)``, so
the same inputs give the same ranking regardless of call order, process or resume point;
different seeds play different labelers.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from rlhfkit.data.records import Prompt, Ranking
from rlhfkit.feedback import rubric


@runtime_checkable
class Labeler(Protocol):
    """Anything that ranks K responses to a prompt, best first (ties allowed)."""

    def rank(self, prompt: Prompt, responses: list[str], finished: list[bool] | None = None) -> Ranking:
        """``finished[i]`` is False when response i hit the length limit without EOS."""
        ...


def ranks_from_scores(scores: list[float]) -> list[int]:
    """Dense ranks, best (highest) first, equal scores tied: [0.5, 1.0, 0.5, 0.0] -> [1, 0, 1, 2]."""
    distinct = sorted(set(scores), reverse=True)
    pos = {s: r for r, s in enumerate(distinct)}
    return [pos[s] for s in scores]


def _check(responses: list[str], finished: list[bool] | None) -> list[bool]:
    if len(responses) < 2:
        raise ValueError(f"ranking needs K >= 2 responses, got {len(responses)}")
    if finished is None:
        return [True] * len(responses)
    if len(finished) != len(responses):
        raise ValueError(f"{len(finished)} finished flags for {len(responses)} responses")
    return list(finished)


def _meta(prompt: Prompt, labeler: str, gold: list[rubric.GoldScore], **extra) -> dict:
    meta = {"labeler": labeler, "gold": [g.total for g in gold], **extra}
    if "id" in prompt.meta:
        meta["prompt_id"] = prompt.meta["id"]
    return meta


class GoldLabeler:
    """Ranks by the gold rubric score, no noise; equal scores are ties."""

    name = "gold"

    def rank(self, prompt: Prompt, responses: list[str], finished: list[bool] | None = None) -> Ranking:
        fin = _check(responses, finished)
        gold = [rubric.score(prompt, r, f) for r, f in zip(responses, fin)]
        return Ranking(
            messages=list(prompt.messages),
            responses=list(responses),
            ranks=ranks_from_scores([g.total for g in gold]),
            meta=_meta(prompt, self.name, gold),
        )


@dataclass
class SimulatedLabelerConfig:
    """A simulated person: the gold rubric seen through noise."""

    temperature: float = 0.1
    """Plackett–Luce temperature on the gold scale (scores in [-1, 1]); 0 = the exact gold order."""
    length_bias: float = 0.0
    """Utility per unit of log(1 + words) above the mean of the K answers: > 0 prefers longer
    answers, < 0 shorter ones (0.1 is a noticeable taste, 0.5 a strong one)."""
    random_share: float = 0.05
    """Probability that a ranking is a uniformly random order."""
    seed: int = 0
    """Seeds the labeler; different seeds play different people."""
    name: str = "simulated"
    """Recorded in ``Ranking.meta["labeler"]``."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 <= self.random_share <= 1:
            raise ValueError(f"random_share must be in [0, 1], got {self.random_share}")


class SimulatedLabeler:
    """The gold rubric plus human-like noise; see the module docstring for the model."""

    def __init__(self, config: SimulatedLabelerConfig | None = None) -> None:
        self.config = config or SimulatedLabelerConfig()
        self.name = self.config.name

    def _rng(self, prompt: Prompt, responses: list[str]) -> random.Random:
        h = hashlib.sha256(str(self.config.seed).encode())
        for part in [prompt.text, *responses]:
            h.update(b"\x1f" + part.encode("utf-8", "surrogatepass"))
        return random.Random(int.from_bytes(h.digest()[:8], "big"))

    def utilities(self, responses: list[str], gold: list[float]) -> list[float]:
        """Gold score plus the length taste (see the module docstring)."""
        c = self.config
        if not c.length_bias:
            return list(gold)
        loglen = [math.log1p(len(rubric.words(r))) for r in responses]
        mean = sum(loglen) / len(loglen)
        return [g + c.length_bias * (x - mean) for g, x in zip(gold, loglen)]

    def rank(self, prompt: Prompt, responses: list[str], finished: list[bool] | None = None) -> Ranking:
        c = self.config
        fin = _check(responses, finished)
        gold = [rubric.score(prompt, r, f) for r, f in zip(responses, fin)]
        u = self.utilities(responses, [g.total for g in gold])
        rng = self._rng(prompt, responses)
        k = len(responses)

        is_random = rng.random() < c.random_share
        if is_random:
            order = list(range(k))
            rng.shuffle(order)
            ranks = _strict_ranks(order)
        elif c.temperature == 0:
            ranks = ranks_from_scores(u)
        else:
            # Gumbel-max: argsort(u/T + G) is a Plackett–Luce sample with weights exp(u/T)
            keys = [ui / c.temperature - math.log(-math.log(rng.random() or 1e-300)) for ui in u]
            ranks = _strict_ranks(sorted(range(k), key=lambda i: -keys[i]))
        if c.temperature > 0 or is_random:
            ranks = _tie_identical(responses, ranks)
        return Ranking(
            messages=list(prompt.messages),
            responses=list(responses),
            ranks=ranks,
            meta=_meta(prompt, self.name, gold, random=is_random, temperature=c.temperature, seed=c.seed),
        )


def _strict_ranks(order: list[int]) -> list[int]:
    """``order`` lists response indices best first; returns ranks per response."""
    ranks = [0] * len(order)
    for r, i in enumerate(order):
        ranks[i] = r
    return ranks


def _tie_identical(responses: list[str], ranks: list[int]) -> list[int]:
    """Identical responses (after stripping) share the best of their ranks; ranks stay dense."""
    best: dict[str, int] = {}
    for r, rk in zip(responses, ranks):
        key = r.strip()
        best[key] = min(best.get(key, rk), rk)
    return ranks_from_scores([-best[r.strip()] for r in responses])


def agreement(a: Ranking, b: Ranking) -> float:
    """Share of the pairs ordered by ``b`` that ``a`` orders the same way (nan if ``b`` has none)."""
    pairs = b.pairs()
    if not pairs:
        return float("nan")
    return sum(a.ranks[i] < a.ranks[j] for i, j in pairs) / len(pairs)
