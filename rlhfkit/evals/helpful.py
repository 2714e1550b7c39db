"""Helpfulness: win-rate of a model M against a baseline B on a prompt set, under a judge.

A judge is any callable ``judge(prompt, response_m, response_b) -> float`` giving M's share of
the win: 1 (M better), 0 (B better), 0.5 (tie); values in between are allowed (a probability).
  - ``RewardJudge(reward_fn)``: a reward model's scores, ``reward_fn(prompts, responses) -> list``;
    a tie when the scores are within ``tie_margin``;
  - ``GoldJudge``: the project's gold rubric (verifiable instructions + penalties) on the
    built-in task's prompts -- the default;
  - ``ReferenceJudge``: without a rubric -- the answer closer (ROUGE-L) to the human-written
    reference answer wins (self-instruct seed tasks ship one per instance);
  - humans, through the web arena, plug in the same way (a callable that asks and waits).
Win-rate = mean judge outcome (ties count half); 95% CI by bootstrap over prompts (percentile).
Length matters to judges (longer answers tend to win), so the report puts the mean length
difference (words, M - B) beside the win-rate, and a length-controlled win-rate: the
intercept of a logistic regression of the outcome on the length difference (AlpacaEval-LC's
idea), i.e. the win-rate M would have at equal length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rlhfkit.errors import UserError
from rlhfkit.evals.data import read_rows
from rlhfkit.evals.textsim import rouge_l

Judge = Callable[[str, str, str], float]


def win_rate(outcomes: Sequence[float]) -> float:
    """Mean of per-prompt outcomes (1 win, 0.5 tie, 0 loss)."""
    return float(np.mean(outcomes))


def bootstrap_ci(
    outcomes: Sequence[float], n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean, resampling prompts with replacement."""
    x = np.asarray(outcomes, dtype=float)
    if len(x) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    return float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))


def length_controlled_win_rate(outcomes: Sequence[float], len_diff: Sequence[float], iters: int = 50) -> float:
    """sigmoid(a) of the logistic fit  P(M wins) = sigmoid(a + b * tanh(len_diff / sd))  (Newton steps).

    Outcomes may be fractional (ties 0.5): the fit uses them as soft labels. Returns the plain
    win-rate when the length differences are all zero.
    """
    y = np.asarray(outcomes, dtype=float)
    d = np.asarray(len_diff, dtype=float)
    sd = d.std()
    if sd == 0:
        return float(y.mean())
    X = np.stack([np.ones_like(d), np.tanh(d / sd)], 1)  # (N, 2)
    w = np.zeros(2)
    for _ in range(iters):
        p = 1 / (1 + np.exp(-X @ w))
        g = X.T @ (y - p) - 1e-3 * w  # a little L2 keeps separable data finite
        H = (X * (p * (1 - p))[:, None]).T @ X + 1e-3 * np.eye(2)
        step = np.linalg.solve(H, g)
        w += step
        if np.abs(step).max() < 1e-10:
            break
    return float(1 / (1 + np.exp(-w[0])))


def n_words(text: str) -> int:
    return len(text.split())


class RewardJudge:
    """Judge by a reward function; ``reward_fn(prompts, responses) -> list[float]``."""

    def __init__(self, reward_fn: Callable[[list[str], list[str]], list[float]], tie_margin: float = 0.0) -> None:
        self.reward_fn, self.tie_margin = reward_fn, tie_margin
        self.name = getattr(reward_fn, "name", "reward model")

    def __call__(self, prompt: str, a: str, b: str) -> float:
        ra, rb = self.reward_fn([prompt, prompt], [a, b])
        return 0.5 if abs(ra - rb) <= self.tie_margin else float(ra > rb)

    def batch(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[float]:
        r = self.reward_fn(list(prompts) + list(prompts), list(a) + list(b))
        ra, rb = r[: len(prompts)], r[len(prompts) :]
        return [0.5 if abs(x - y) <= self.tie_margin else float(x > y) for x, y in zip(ra, rb)]


class ReferenceJudge:
    """The answer more similar (ROUGE-L) to the reference answer of its prompt wins."""

    name = "reference answer (ROUGE-L)"

    def __init__(self, references: dict[str, str], tie_margin: float = 1e-9) -> None:
        self.references, self.tie_margin = references, tie_margin

    def __call__(self, prompt: str, a: str, b: str) -> float:
        ref = self.references.get(prompt)
        if ref is None:
            raise UserError(f"reference judge: no reference answer for prompt {prompt[:60]!r}")
        sa, sb = rouge_l(a, ref), rouge_l(b, ref)
        return 0.5 if abs(sa - sb) <= self.tie_margin else float(sa > sb)


class GoldJudge:
    """The project's gold rubric (``rlhfkit.feedback.rubric``) on the built-in task's prompts:
    the answer with the higher rubric total wins, equal totals tie."""

    name = "gold rubric"

    def __init__(self, prompts) -> None:  # list[rlhfkit.data.records.Prompt]
        self.prompts = {p.text: p for p in prompts}

    def __call__(self, prompt: str, a: str, b: str) -> float:
        from rlhfkit.feedback.rubric import score

        p = self.prompts.get(prompt)
        if p is None:
            raise UserError(f"gold judge: prompt {prompt[:60]!r} is not one of the built-in task's")
        sa, sb = score(p, a).total, score(p, b).total
        return 0.5 if sa == sb else float(sa > sb)


def hf_reward_fn(model_path: str, batch_size: int = 8):
    """A reward function from a reward-model directory saved by ``rlhfkit rm``.

    Inputs are built as in training (``rlhfkit.data.tokenize``: chat-formatted prompt, response,
    one EOS), right-padded, scored at the last token, minus the stored ``reward_offset``.
    """
    import torch

    from rlhfkit.data.tokenize import encode_prompt, encode_response
    from rlhfkit.models.heads import load_reward_model

    model, tok = load_reward_model(model_path)
    model.eval()
    pad = model.config.pad_token_id or 0
    dev = next(model.parameters()).device

    @torch.no_grad()
    def reward(prompts: list[str] | list[list[dict]], responses: list[str]) -> list[float]:
        """Prompts as text (one user turn) or as chat messages."""
        seqs = [
            encode_prompt(tok, [{"role": "user", "content": p}] if isinstance(p, str) else p) + encode_response(tok, r)
            for p, r in zip(prompts, responses)
        ]
        out: list[float] = []
        for s in range(0, len(seqs), batch_size):
            part = seqs[s : s + batch_size]
            T = max(len(x) for x in part)
            ids = torch.full((len(part), T), pad, dtype=torch.long)
            mask = torch.zeros((len(part), T), dtype=torch.long)
            for i, x in enumerate(part):
                ids[i, : len(x)] = torch.tensor(x)
                mask[i, : len(x)] = 1
            out += model.score(ids.to(dev), mask.to(dev)).tolist()
        return out

    reward.name = f"reward model ({model_path})"
    return reward


@dataclass
class HelpPrompt:
    text: str
    reference: str | None = None
    meta: dict = field(default_factory=dict)


def load_help_prompts(source: str | Path) -> list[HelpPrompt]:
    """Self-instruct seed tasks (instruction + first instance input, its output as reference),
    or records with ``prompt`` / ``instruction`` / ``text`` (+ optional ``reference``/``output``)."""
    rows = read_rows(source, "train")
    out = []
    for i, r in enumerate(rows):
        if "instruction" in r:
            inst = r.get("instances") or [{}]
            inp = (inst[0].get("input") or "").strip()
            text = r["instruction"].strip() + ("\n\n" + inp if inp else "")
            ref = inst[0].get("output") if inst else r.get("output")
            out.append(HelpPrompt(text, ref))
        elif "prompt" in r or "text" in r:
            out.append(HelpPrompt(r.get("prompt") or r["text"], r.get("reference") or r.get("output")))
        else:
            raise UserError(f"{source}: record {i + 1} has no instruction / prompt / text field")
    return out


def helpful_eval(
    prompts: Sequence[str],
    responses_m: Sequence[str],
    responses_b: Sequence[str],
    judge: Judge,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict:
    """Win-rate of M over B with a bootstrap CI, the length difference and an LC win-rate."""
    if hasattr(judge, "batch"):
        outcomes = judge.batch(prompts, responses_m, responses_b)
    else:
        outcomes = [judge(p, a, b) for p, a, b in zip(prompts, responses_m, responses_b)]
    lm = np.array([n_words(a) for a in responses_m], dtype=float)
    lb = np.array([n_words(b) for b in responses_b], dtype=float)
    lo, hi = bootstrap_ci(outcomes, n_boot=n_boot, seed=seed)
    return {
        "n": len(outcomes),
        "judge": getattr(judge, "name", type(judge).__name__),
        "win_rate": win_rate(outcomes),
        "ci95": [lo, hi],
        "wins": int(sum(o == 1 for o in outcomes)),
        "ties": int(sum(o == 0.5 for o in outcomes)),
        "losses": int(sum(o == 0 for o in outcomes)),
        "mean_len_model": float(lm.mean()),
        "mean_len_baseline": float(lb.mean()),
        "length_diff_words": float((lm - lb).mean()),
        "lc_win_rate": length_controlled_win_rate(outcomes, lm - lb),
        "outcomes": list(map(float, outcomes)),
        "examples": [
            {"prompt": p, "model": a, "baseline": b, "outcome": o}
            for p, a, b, o in list(zip(prompts, responses_m, responses_b, outcomes))[:5]
        ],
    }
