"""RLOO and GRPO: hand-computed advantages and losses, then a tiny-model run of each in which the
synthetic reward (newlines in the response, /4, as tests/test_ppo.py) rises."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import newline_reward

from rlhfkit.algos.critic_free import grpo_advantages, grpo_loss, rloo_advantages, rloo_loss
from rlhfkit.config import GRPOConfig, PPOConfig, RLOOConfig
from rlhfkit.errors import UserError
from rlhfkit.recipes.common import read_metrics

# ------------------------------------------------------------------ math, by hand


def test_rloo_advantages_leave_one_out_by_hand():
    # k=3, rewards [1, 2, 4]: each minus the mean of the other two
    #   1 − (2+4)/2 = −2,  2 − (1+4)/2 = −0.5,  4 − (1+2)/2 = 2.5; a second prompt [0, 0, 3]
    got = rloo_advantages(torch.tensor([1.0, 2.0, 4.0, 0.0, 0.0, 3.0]), k=3)
    assert got.tolist() == pytest.approx([-2.0, -0.5, 2.5, -1.5, -1.5, 3.0])


def test_grpo_advantages_unbiased_std_by_hand():
    # k=3, scores [1, 2, 4]: mean 7/3, deviations −4/3, −1/3, 5/3;
    # unbiased variance (16 + 1 + 25)/9 / (3−1) = 7/3, std = √(7/3) ≈ 1.5275
    std = math.sqrt(7 / 3)
    want = [d / (std + 1e-4) for d in (-4 / 3, -1 / 3, 5 / 3)]
    got = grpo_advantages(torch.tensor([1.0, 2.0, 4.0, 5.0, 5.0, 5.0]), k=3)
    assert got[:3].tolist() == pytest.approx(want, rel=1e-6)
    assert got[3:].tolist() == [0.0, 0.0, 0.0]  # equal scores: no signal


@pytest.mark.parametrize("fn", [rloo_advantages, grpo_advantages])
def test_group_size_checked(fn):
    with pytest.raises(ValueError):
        fn(torch.zeros(4), k=3)
    with pytest.raises(ValueError):
        fn(torch.zeros(4), k=1)


def test_rloo_loss_sequence_ratio_by_hand():
    # two responses (2 and 1 tokens), A = [+1, −2], ε = 0.2
    # seq 1: log ρ = 0.05 + 0.05 = 0.1, ρ = e^0.1 ≈ 1.105 (inside the clip): −A ρ = −e^0.1
    # seq 2: log ρ = −0.5, ρ = e^−0.5 ≈ 0.607 < 0.8 with A < 0: max(2 ρ, 2 · 0.8) = 1.6 (clipped)
    # L = (−e^0.1 + 1.6) / 2, clipfrac 1/2
    old = torch.zeros(2, 2)
    new = torch.tensor([[0.05, 0.05], [-0.5, 123.0]])  # the padded position is masked
    mask = torch.tensor([[1, 1], [1, 0]])
    out = rloo_loss(new, old, torch.tensor([1.0, -2.0]), mask, clip_eps=0.2)
    assert out.loss.item() == pytest.approx((-math.exp(0.1) + 1.6) / 2, rel=1e-6)
    assert out.clipfrac.item() == 0.5
    assert out.approx_kl.item() == pytest.approx((0.5 * 0.1**2 + 0.5 * 0.25) / 2, rel=1e-6)
    # at ρ = 1 the gradient is REINFORCE's: ∂L/∂log π(y_t) = −A_i / B on each token
    lp = torch.zeros(2, 2, requires_grad=True)
    rloo_loss(lp, old, torch.tensor([1.0, -2.0]), mask).loss.backward()
    assert lp.grad.flatten().tolist() == pytest.approx([-0.5, -0.5, 1.0, 0.0])


def test_grpo_loss_kl_in_the_loss_by_hand():
    # one sequence of 2 tokens, ratio 1 (π = π_old), Â = 2, β = 0.5
    # token 1: log(π_ref/π) = ln 2 → k3 = 2 − 1 − ln 2;  token 2: π_ref = π → k3 = 0
    # ℓ = mean(−2 + 0.5 (1 − ln 2), −2) = −2 + 0.25 (1 − ln 2)
    lp = torch.tensor([[-1.0, -2.0]])
    ref = lp + torch.tensor([[math.log(2.0), 0.0]])
    out = grpo_loss(lp, lp.clone(), ref, torch.tensor([2.0]), torch.ones(1, 2), clip_eps=0.2, beta=0.5)
    assert out.loss.item() == pytest.approx(-2 + 0.25 * (1 - math.log(2)), rel=1e-6)
    assert out.kl.item() == pytest.approx((1 - math.log(2)) / 2, rel=1e-6)
    assert out.clipfrac.item() == 0.0


def test_grpo_loss_sequence_mean_and_clip_by_hand():
    # sequences of 1 and 3 tokens, Â = +1 and −1, ratio 1, β = 0: per-token losses −1 and +1
    # sequence mean: (−1 + 1)/2 = 0   (a token mean would give (−1 + 3)/4 = 0.5)
    lp = torch.zeros(2, 3)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    out = grpo_loss(lp, lp.clone(), lp.clone(), torch.tensor([1.0, -1.0]), mask, beta=0.0)
    assert out.loss.item() == pytest.approx(0.0, abs=1e-7)
    # ratio e^0.5 ≈ 1.65 > 1 + ε with Â = +1: clipped to 1.2 → ℓ = −1.2, clipfrac 1
    new = torch.full((1, 1), 0.5)
    out = grpo_loss(new, torch.zeros(1, 1), new.clone(), torch.tensor([1.0]), torch.ones(1, 1), 0.2, 0.04)
    assert out.loss.item() == pytest.approx(-1.2, rel=1e-6)
    assert out.clipfrac.item() == 1.0
    # clipfrac is a sequence mean as the loss: the 1-token sequence clipped, the 3-token one not → (1 + 0)/2
    # (a token mean, 1/4, would change with how the rows are cut into micro-batches or shared by processes)
    new = torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
    out = grpo_loss(new, torch.zeros(2, 3), new.clone(), torch.tensor([1.0, 1.0]), mask, 0.2, 0.0)
    assert out.clipfrac.item() == 0.5 and out.approx_kl.item() == pytest.approx(0.5 * 0.25 / 2)


def test_configs_reject_one_sample_and_a_critic():
    with pytest.raises(UserError, match="samples_per_prompt=1"):
        RLOOConfig(samples_per_prompt=1)
    with pytest.raises(UserError, match="samples_per_prompt=1"):
        GRPOConfig(samples_per_prompt=1)
    with pytest.raises(UserError, match="critic"):
        GRPOConfig(critic="rm")
    assert RLOOConfig().samples_per_prompt == 4 and GRPOConfig().kl_coef == 0.04


def test_ppo_keeps_its_critics():
    with pytest.raises(UserError, match="critic"):
        PPOConfig(critic="none")


# ------------------------------------------------------------------ tiny-model runs


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("algo", ["rloo", "grpo"])
def test_smoke_reward_rises(algo, sharp_path, tmp_path):
    from safetensors.torch import load_file

    from rlhfkit.recipes.critic_free import train_grpo, train_rloo

    cls, train = (RLOOConfig, train_rloo) if algo == "rloo" else (GRPOConfig, train_grpo)
    out = tmp_path / algo
    cfg = cls(
        model=sharp_path, out=str(out), batch_size=4, samples_per_prompt=4, max_new_tokens=16, temperature=1.0,
        lr=3e-4, kl_coef=0.05, precision="fp32", missing_eos_penalty=None, limit=64, max_steps=8, seed=0,
    )  # fmt: skip
    result = train(cfg, reward_fn=newline_reward, say=lambda *a: None)
    rows = read_metrics(out)
    scores = [r["score"] for r in rows]
    print(algo, "scores", [round(s, 3) for s in scores])
    assert len(rows) == result["step"] == 8
    assert sum(scores[-2:]) / 2 > sum(scores[:2]) / 2 + 0.5, scores
    for key in ("score", "kl", "entropy", "response_length", "no_eos_fraction", "policy_loss", "clipfrac",
                "approx_kl", "lr", "time_generate", "time_train"):  # fmt: skip
        assert key in rows[-1] and math.isfinite(rows[-1][key]), key
    assert "explained_variance" not in rows[-1]
    before, after = load_file(f"{sharp_path}/model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert any(not torch.equal(before[n], after[n]) for n in before if n in after)
    assert not (out / "critic").exists()


@pytest.mark.usefixtures("one_thread")
def test_on_policy_grpo_takes_old_logprobs_from_its_training_pass(sharp_path, tmp_path, monkeypatch):
    """One epoch over one minibatch: GRPO skips the policy's no-grad forward (its old log-probs are
    the training pass's, detached, as TRL's) and trains exactly as with it: the same metrics — the
    KL and entropy now read from the training pass — and the same final weights (fp32; the no-grad
    forward in chunks of the micro-batches' rows, so both passes lay rows out alike and agree
    bitwise). With two minibatches the second is off-policy: the forward runs."""
    from safetensors.torch import load_file

    import rlhfkit.recipes.critic_free as cf

    real, asked = cf.forwards, []

    def counted(m, cfg, batch, with_policy=True):
        asked.append(with_policy)
        return real(m, cfg, batch, with_policy)

    def run(name: str, **kw) -> list[dict]:
        cfg = GRPOConfig(
            model=sharp_path, out=str(tmp_path / name), batch_size=4, samples_per_prompt=4, max_new_tokens=12,
            temperature=1.0, lr=3e-4, kl_coef=0.05, precision="fp32", missing_eos_penalty=None, limit=32,
            max_steps=3, seed=0, grad_accum=2, forward_batch_size=8, **kw,
        )  # fmt: skip
        cf.train_grpo(cfg, reward_fn=newline_reward, say=lambda *a: None)
        return read_metrics(tmp_path / name)

    monkeypatch.setattr(cf, "forwards", counted)
    skipped = run("skipped", num_minibatches=1)
    assert asked == [False] * 3
    monkeypatch.setattr(cf, "forwards", lambda m, cfg, batch, with_policy=True: real(m, cfg, batch, True))
    full = run("full", num_minibatches=1)
    keys = ["score", "kl", "kl_k3", "entropy", "reward", "policy_loss", "kl_loss", "loss", "approx_kl", "grad_norm"]
    for a, b in zip(skipped, full, strict=True):
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key, a[key], b[key])
    assert min(r["kl"] for r in full[1:]) > 0.1  # the policy moved: the KL read from the training pass is checked
    one, two = (load_file(tmp_path / n / "model" / "model.safetensors") for n in ("skipped", "full"))
    assert all(torch.equal(one[n], two[n]) for n in one)

    asked.clear()
    monkeypatch.setattr(cf, "forwards", counted)
    run("two_minibatches", num_minibatches=2)
    assert asked == [True] * 3


@pytest.mark.parametrize("stage", ["rloo", "grpo"])
def test_cli_one_sample_is_one_line_error(stage):
    from typer.testing import CliRunner

    from rlhfkit.cli import app

    result = CliRunner().invoke(app, [stage, "--model", "tiny-random", "samples_per_prompt=1"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: samples_per_prompt=1: critic-free training compares the samples of a prompt, expected >= 2"
    ]


def test_advantages_equal_trl_rloo_and_grpo_trainers():
    """benchmarks/critic_free_trl_check.py under TRL 1.16 (the venv TRL_VENV names; TRL is never our
    dependency): the recipe's RLOO advantages (β·KL in the reward, with and without whitening), the KL
    per sequence and GRPO's group-normalised advantages equal the expressions of TRL's RLOOTrainer and
    GRPOTrainer (lifted from their ``_generate_and_score_completions`` and checked to be in its
    source) on the same scores and log-probs, fp32, within 1e-6."""
    import os
    import subprocess
    from pathlib import Path

    venv = os.environ.get("TRL_VENV")
    python = Path(venv or "/nonexistent") / "bin" / "python"
    if not python.exists():
        pytest.skip("set TRL_VENV to a venv with trl==1.16.0 (see benchmarks/dpo_trl_check.py)")
    root = Path(__file__).resolve().parents[1]
    script = root / "benchmarks" / "critic_free_trl_check.py"
    run = subprocess.run([str(python), str(script)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith(("RLOO", "GRPO"))]
    assert "all within 1e-06" in run.stdout and len(rows) == 11, run.stdout  # every case compared
