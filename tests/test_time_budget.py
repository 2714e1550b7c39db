"""``max_seconds``: a stage stops after the step during which its wall-clock budget ran out, saves a
model that loads, says so in one line and records it in its result (rlhfkit/recipes/common.py:
TimeBudget; the optimisers compared on one budget in benchmarks/optimizers.py)."""

from __future__ import annotations

import json

import pytest
from helpers import newline_reward

from rlhfkit.config import A2CConfig, DPOConfig, ILQLConfig, PPOConfig, RLOOConfig
from rlhfkit.errors import UserError
from rlhfkit.recipes.common import read_metrics


def rollout_cfg(cls, model: str, out, **kw):
    base = dict(
        model=model, out=str(out), batch_size=2, samples_per_prompt=2, max_new_tokens=8, temperature=1.0,
        precision="fp32", missing_eos_penalty=None, limit=16, max_steps=4, seed=0,
    )  # fmt: skip
    return cls(**(base | kw))


def dpo_data(tmp_path) -> str:
    rows = [
        {"prompt": f"Say something about {i}.", "responses": [f"{i} is nice.", f"{i}.", "no"], "ranks": [0, 1, 2]}
        for i in range(8)
    ]
    path = tmp_path / "rankings.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run_stage(stage: str, tiny_path: str, tmp_path, max_seconds: float, say) -> tuple[dict, object]:
    out = tmp_path / stage
    if stage == "ppo":
        from rlhfkit.recipes.ppo import train_ppo

        cfg = rollout_cfg(PPOConfig, tiny_path, out, max_seconds=max_seconds)
        return train_ppo(cfg, reward_fn=newline_reward, say=say), out
    if stage == "rloo":
        from rlhfkit.recipes.critic_free import train_rloo

        cfg = rollout_cfg(RLOOConfig, tiny_path, out, max_seconds=max_seconds)
        return train_rloo(cfg, reward_fn=newline_reward, say=say), out
    if stage == "a2c":
        from rlhfkit.recipes.a2c import train_a2c

        cfg = rollout_cfg(A2CConfig, tiny_path, out, max_seconds=max_seconds)
        return train_a2c(cfg, reward_fn=newline_reward, say=say), out
    if stage == "ilql":
        from rlhfkit.recipes.ilql import train_ilql

        cfg = ILQLConfig(
            model=tiny_path, data=dpo_data(tmp_path), out=str(out), batch_size=2, max_steps=4, precision="fp32",
            max_length=64, eval_fraction=0.0, max_seconds=max_seconds,
        )  # fmt: skip
        return train_ilql(cfg, say=say), out
    from rlhfkit.recipes.dpo import train_dpo

    cfg = DPOConfig(
        model=tiny_path, data=dpo_data(tmp_path), out=str(out), batch_size=2, max_steps=4, precision="fp32",
        max_length=64, eval_fraction=0.0, max_seconds=max_seconds,
    )  # fmt: skip
    return train_dpo(cfg, say=say), out


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("stage", ["ppo", "a2c", "rloo", "dpo", "ilql"])
def test_a_tiny_budget_stops_after_the_first_step_and_saves_a_loadable_model(stage, tiny_path, tmp_path):
    from rlhfkit.models.loading import load_causal_lm

    said: list[str] = []
    result, out = run_stage(stage, tiny_path, tmp_path, 1e-6, said.append)
    assert result["step"] == 1 and result["planned_steps"] == 4 and result["stopped_at_time_budget"] is True
    assert said.count("stopped at the time budget after 1 of 4 steps (max_seconds=1e-06)") == 1, said
    steps = {m["step"] for m in read_metrics(out)}
    assert max(steps) == 1, steps  # nothing logged after the stop
    loaded = load_causal_lm(str(out / "model"))
    assert loaded.model.config.vocab_size > 0


@pytest.mark.usefixtures("one_thread")
def test_no_budget_runs_every_step(tiny_path, tmp_path):
    said: list[str] = []
    result, _ = run_stage("rloo", tiny_path, tmp_path, 0.0, said.append)
    assert result["step"] == 4 and "stopped_at_time_budget" not in result
    assert not [s for s in said if "time budget" in s]


def test_a_negative_budget_is_a_user_error():
    with pytest.raises(UserError, match=r"max_seconds=-1\.0: expected >= 0"):
        PPOConfig(max_seconds=-1.0)
