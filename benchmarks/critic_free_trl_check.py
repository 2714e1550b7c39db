"""Check rlhfkit's RLOO and GRPO advantages against TRL 1.16's ``RLOOTrainer`` and ``GRPOTrainer``
on the same scores and log-probs (fp32, CPU, within 1e-6).

TRL computes them inline, in the middle of ``_generate_and_score_completions`` (a method that also
generates, so it cannot be called on given scores). The expressions below (``TRL_RLOO``,
``TRL_GRPO``) are lifted from it at the pinned version, and checked to be there, line for line, in
that method's source (``inspect.getsource``): a TRL that changes them fails this check instead of
silently comparing against an old copy. ``nanstd`` is TRL's own function (``trl.trainer.utils``).

Our side is what the recipe runs: ``rlhfkit.recipes.critic_free.advantages`` on a rollout with those
scores and log-probs (``compute_rewards`` puts β·KL in RLOO's reward; ``rloo_advantages`` /
``grpo_advantages`` of ``rlhfkit/algos/critic_free.py``; RLOO's optional whitening). Cases: 16
prompts × 4 samples (TRL's benchmark shape), one prompt's 4 scores tied (GRPO: all 0), responses of
1 to 12 tokens; RLOO with β = 0.05 and 0 and with ``normalize_advantages``; GRPO's default
``scale_rewards="group"``. Also the per-sequence KL and RLOO's sequence reward.

Run it with the TRL venv's Python (TRL is never a dependency of rlhfkit)::

    /work/trl-venv/bin/python benchmarks/critic_free_trl_check.py     # exit 0: all equal

tests/test_critic_free.py runs it when ``TRL_VENV`` names that venv. It prints a table and writes nothing.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-6
K, PROMPTS, T = 4, 16, 12

# RLOOTrainer._generate_and_score_completions, TRL 1.16.0 (no NaN rows here: every completion is scored)
TRL_RLOO = """
per_token_kl = old_per_token_logps - ref_per_token_logps
kl = (per_token_kl * completion_mask).sum(-1)
rewards = rewards - self.beta * kl
grouped_rewards = rewards.view(-1, num_generations)
scorable_counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)  # (num_prompts, 1)
grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)  # (num_prompts, 1)
baselines = (grouped_sum - grouped_rewards) / (scorable_counts - 1)  # (num_prompts, num_generations)
baselines = baselines.view(-1)  # Flatten back to match rewards shape
advantages = rewards - baselines
if self.normalize_advantages:
advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)
advantages = torch.nan_to_num(advantages, nan=0.0)
"""

# GRPOTrainer._generate_and_score_completions, TRL 1.16.0, multi_objective_aggregation="sum_then_normalize"
# (the default), scale_rewards="group" (the default)
TRL_GRPO = """
mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
advantages = rewards - mean_grouped_rewards
if self.scale_rewards != "none":
advantages = advantages / (std_rewards + 1e-4)
advantages = torch.nan_to_num(advantages, nan=0.0)
"""


def check_lifted(code: str, method) -> None:
    """Every line of ``code`` appears in ``method``'s source (stripped of indentation)."""
    source = {line.strip() for line in inspect.getsource(method).splitlines()}
    missing = [line for line in code.strip().splitlines() if line.strip() not in source]
    if missing:
        raise SystemExit(f"{method.__qualname__} no longer has these lines (a TRL other than 1.16.0?): {missing}")


def run_lifted(code: str, env: dict) -> dict:
    """Execute the lifted lines in order (an ``if`` line guards the next line only, as in TRL)."""
    lines = code.strip().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].split("  #")[0].strip()
        if line.startswith("if ") and line.endswith(":"):
            if not eval(line[3:-1], env):
                i += 1  # skip the guarded line
        else:
            exec(line, env)
        i += 1
    return env


def main() -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    import torch
    import trl
    from trl.trainer.grpo_trainer import GRPOTrainer
    from trl.trainer.rloo_trainer import RLOOTrainer
    from trl.trainer.utils import nanstd

    sys.path.insert(0, str(ROOT))
    from rlhfkit.config import GRPOConfig, RLOOConfig
    from rlhfkit.recipes.critic_free import advantages

    check_lifted(TRL_RLOO, RLOOTrainer._generate_and_score_completions)
    check_lifted(TRL_GRPO, GRPOTrainer._generate_and_score_completions)

    g = torch.Generator().manual_seed(0)
    B = K * PROMPTS
    scores = torch.randn(B, generator=g)
    scores[4:8] = 0.5  # one prompt's samples tie
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()  # (B, T) prefix of ones
    logprobs = -torch.rand(B, T, generator=g) * 3 * mask
    ref_logprobs = (logprobs + 0.3 * torch.randn(B, T, generator=g)) * mask

    def ours(cfg, algo: str, beta: float):
        ro = SimpleNamespace(
            batch=SimpleNamespace(response_mask=mask),
            scores=scores.clone(),
            fw={"logprobs": logprobs, "ref_logprobs": ref_logprobs},
        )
        adv = advantages(cfg, algo, ro, beta)
        return adv.advantages[:, 0], adv.kl.sum(1), adv.rewards.sum(1)

    rows, worst = [], 0.0
    for beta, normalize in ((0.05, False), (0.0, False), (0.05, True)):
        trl_self = SimpleNamespace(beta=beta, normalize_advantages=normalize)
        env = run_lifted(
            TRL_RLOO,
            {
                "torch": torch,
                "nanstd": nanstd,
                "self": trl_self,
                "old_per_token_logps": logprobs,
                "ref_per_token_logps": ref_logprobs,
                "completion_mask": mask,
                "rewards": scores.clone(),
                "num_generations": K,
            },
        )
        cfg = RLOOConfig(samples_per_prompt=K, whiten_advantages=normalize, kl_coef=beta)
        adv, kl, reward = ours(cfg, "rloo", beta)
        for what, a, b in (
            ("advantages", adv, env["advantages"]),
            ("KL per sequence", kl, env["kl"]),
            ("reward (score - beta KL)", reward, env["rewards"]),
        ):
            diff = (a - b).abs().max().item()
            worst = max(worst, diff)
            rows.append((f"RLOO beta={beta} normalize={normalize}", what, diff))

    env = run_lifted(
        TRL_GRPO,
        {
            "torch": torch,
            "nanstd": nanstd,
            "self": SimpleNamespace(scale_rewards="group"),
            "rewards": scores.clone(),
            "num_generations": K,
        },
    )
    adv, _, _ = ours(GRPOConfig(samples_per_prompt=K), "grpo", 0.04)
    diff = (adv - env["advantages"]).abs().max().item()
    worst = max(worst, diff)
    rows.append(("GRPO scale_rewards=group", "advantages", diff))
    tied = adv[4:8].abs().max().item()
    rows.append(("GRPO, the tied prompt", "|advantage| (0 expected)", tied))
    worst = max(worst, tied)

    print(f"TRL {trl.__version__}, torch {torch.__version__}; {PROMPTS} prompts x {K} samples, fp32")
    print(f"{'case':<36} {'quantity':<28} max |ours - TRL|")
    for case, what, d in rows:
        print(f"{case:<36} {what:<28} {d:.2e}")
    if worst > TOL:
        print(f"DIFFERENT: max difference {worst:.2e} > {TOL}")
        return 1
    print(f"all within {TOL}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
