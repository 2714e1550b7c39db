"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

MACHINE_METRICS = frozenset(
    {"time", "time_generate", "time_score", "time_forward", "time_train", "time_iteration", "rss_mb", "peak_rss_mb"}
)
"""PPO metrics of the machine (seconds, memory): they differ between two runs of the same trajectory."""


def newline_reward(prompts, responses, finished) -> list[float]:
    """A synthetic reward for RL smoke tests: a quarter point per newline of the response."""
    return [r.count("\n") / 4 for r in responses]


class Crash(Exception):
    """A simulated crash, raised right after a checkpoint was (or would have been) written."""


def crash_after(monkeypatch, recipe, step: int) -> None:
    """Make ``recipe``'s run (the module ``rlhfkit.recipes.sft``, ``reward``, ``dpo``) die with
    ``Crash`` right after its periodic checkpoint of optimizer step ``step``: resume tests."""
    real = recipe.periodic_checkpoint

    def checkpoint_then_crash(acc, cfg, out, done, *args):
        real(acc, cfg, out, done, *args)
        if done >= step:
            raise Crash(done)

    monkeypatch.setattr(recipe, "periodic_checkpoint", checkpoint_then_crash)
