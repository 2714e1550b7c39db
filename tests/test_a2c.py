"""A2C: the policy and value losses by hand; A2C's step is PPO's with one epoch, one minibatch and
the ratio at 1 (the peer check); its config errors; a tiny-model run in which the synthetic reward
(newlines in the response, /4, as tests/test_ppo.py) rises; the CLI."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import MACHINE_METRICS, Crash, newline_reward

from rlhfkit.algos.a2c import a2c_policy_loss
from rlhfkit.algos.ppo import ppo_policy_loss, ppo_value_loss
from rlhfkit.config import A2CConfig, PipelineConfig, PPOConfig
from rlhfkit.errors import UserError
from rlhfkit.recipes.common import read_metrics

# ------------------------------------------------------------------ math, by hand


def test_a2c_policy_loss_and_gradient_by_hand():
    # 3 response tokens: a response of 2 (log π = −1, −2; Â = 2, −1) and one of 1 (log π = −0.5, Â = 0.5)
    # L = −(2·(−1) + (−1)·(−2) + 0.5·(−0.5)) / 3 = 0.25 / 3;  ∂L/∂log π_t = −Â_t / 3
    lp = torch.tensor([[-1.0, -2.0], [-0.5, 7.0]], requires_grad=True)  # the padded position is masked
    adv = torch.tensor([[2.0, -1.0], [0.5, 99.0]], requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0]])
    out = a2c_policy_loss(lp, adv, mask)
    assert out.loss.item() == pytest.approx(0.25 / 3, rel=1e-6)
    assert out.pg_loss.item() == pytest.approx(0.25 / 3, rel=1e-6) and math.isnan(out.entropy.item())
    out.loss.backward()
    assert lp.grad.flatten().tolist() == pytest.approx([-2 / 3, 1 / 3, -0.5 / 3, 0.0])
    assert adv.grad is None  # the advantages are constants: no gradient into the critic through them
    # with an entropy bonus c = 0.1 and H = 1, 2, 3: L − 0.1 · 2, ∂L/∂H_t = −0.1 / 3
    ent = torch.tensor([[1.0, 2.0], [3.0, 50.0]], requires_grad=True)
    out = a2c_policy_loss(lp.detach(), adv.detach(), mask, ent, entropy_coef=0.1)
    assert out.loss.item() == pytest.approx(0.25 / 3 - 0.2, rel=1e-6) and out.entropy.item() == pytest.approx(2.0)
    out.loss.backward()
    assert ent.grad.flatten().tolist() == pytest.approx([-0.1 / 3, -0.1 / 3, -0.1 / 3, 0.0])


def test_value_loss_without_clipping_by_hand():
    # V = [1, 3], R = [2, 0], V_old = [0, 0]: ½ mean((1−2)², (3−0)²) = ½ · 5 = 2.5, ∂L/∂V = (V − R) / 2
    # (clipped at ε = 0.2 it would be ½ mean(max(1, 3.24), max(9, 0.04)) = 3.06: clipping matters here)
    values = torch.tensor([[1.0, 3.0]], requires_grad=True)
    old, ret, mask = torch.zeros(1, 2), torch.tensor([[2.0, 0.0]]), torch.ones(1, 2)
    out = ppo_value_loss(values, old, ret, mask, clip_eps=None)
    assert out.loss.item() == pytest.approx(2.5) and out.clipfrac.item() == 0.0
    out.loss.backward()
    assert values.grad.flatten().tolist() == pytest.approx([-0.5, 1.5])
    assert ppo_value_loss(values, old, ret, mask, clip_eps=0.2).loss.item() == pytest.approx(3.06)


def test_a2c_gradient_is_ppos_at_ratio_one():
    # the peer check on the math: PPO's clipped surrogate at π = π_old has A2C's gradient
    g = torch.Generator().manual_seed(0)
    lp = (-torch.rand(3, 5, generator=g) * 3).requires_grad_()
    adv = torch.randn(3, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    a2c_policy_loss(lp, adv, mask).loss.backward()
    want, lp.grad = lp.grad.clone(), None
    ppo_policy_loss(lp, lp.detach().clone(), adv, mask, clip_eps=0.2).loss.backward()
    assert torch.allclose(lp.grad, want, atol=1e-7)


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"ppo_epochs": 2}, "ppo_epochs=2: A2C takes one gradient step per rollout batch"),
        ({"num_minibatches": 4}, "num_minibatches=4: A2C takes its one step on the whole rollout batch"),
        ({"cliprange": 0.2}, "cliprange=0.2: A2C has no ratio to clip"),
        ({"cliprange_value": 0.5}, "cliprange_value=0.5: A2C has no ratio to clip"),
        ({"entropy_coef": -0.01}, "entropy_coef=-0.01: expected >= 0"),
        ({"critic": "none"}, "critic"),
    ],
)
def test_config_refuses_what_a2c_has_not(setting, message):
    with pytest.raises(UserError, match=message):
        A2CConfig(**setting)


def test_config_defaults_and_the_pipeline():
    cfg = A2CConfig()
    assert (cfg.ppo_epochs, cfg.num_minibatches, cfg.cliprange, cfg.cliprange_value) == (1, 1, None, None)
    assert cfg.critic == "rm" and cfg.entropy_coef == 0.0
    assert PipelineConfig(optimizer="a2c", a2c={"lr": 1e-5}).a2c.lr == 1e-5
    with pytest.raises(UserError, match="ppo_epochs=2"):
        PipelineConfig(optimizer="a2c", a2c={"ppo_epochs": 2})


def test_cli_setting_error_is_one_line():
    from typer.testing import CliRunner

    from rlhfkit.cli import app

    result = CliRunner().invoke(app, ["a2c", "--model", "tiny-random", "cliprange=0.2"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: cliprange=0.2: A2C has no ratio to clip (its one step per rollout batch is at ratio 1); clipping "
        "is PPO's (`rlhfkit ppo`)"
    ]


# ------------------------------------------------------------------ tiny-model runs


def small(model: str, critic_model: str, out, **kw) -> dict:
    return dict(
        model=model, critic_model=critic_model, out=str(out), batch_size=4, samples_per_prompt=2, max_new_tokens=8,
        temperature=1.0, lr=3e-4, kl_coef=0.1, precision="fp32", missing_eos_penalty=None, limit=32, grad_accum=2,
    ) | kw  # fmt: skip


@pytest.mark.usefixtures("one_thread")
def test_a2c_steps_are_ppos_with_one_epoch_one_minibatch_no_clip(sharp_path, tiny_path, tmp_path, monkeypatch):
    """The peer check on the recipes: every gradient A2C steps with (critic included) is the one PPO
    (ppo_epochs=1, num_minibatches=1, clip ranges too large to bite) steps with, iteration by
    iteration — A2C is PPO's update with its loss, at ratio 1."""
    import rlhfkit.recipes.ppo as ppo
    from rlhfkit.recipes.a2c import train_a2c

    grads: list[torch.Tensor] = []
    real = ppo.take_step

    def spy(share, optimizer, params, max_norm):
        grads.append(torch.cat([p.grad.flatten() for p in params if p.grad is not None]).clone())
        return real(share, optimizer, params, max_norm)

    monkeypatch.setattr(ppo, "take_step", spy)
    kw = dict(max_steps=2, vf_coef=0.5)
    train_a2c(A2CConfig(**small(sharp_path, tiny_path, tmp_path / "a2c", **kw)), newline_reward, say=lambda *a: None)
    a2c_grads, grads[:] = list(grads), []
    big = dict(ppo_epochs=1, num_minibatches=1, cliprange=1e9, cliprange_value=1e9)
    ppo_cfg = PPOConfig(**small(sharp_path, tiny_path, tmp_path / "ppo", **kw, **big))
    ppo.train_ppo(ppo_cfg, newline_reward, say=lambda *a: None)
    assert len(a2c_grads) == len(grads) == 2
    for a, p in zip(a2c_grads, grads):
        assert a.norm() > 0 and (a - p).abs().max() <= 1e-5 * a.abs().max(), (a - p).abs().max()
    rows = [read_metrics(tmp_path / name) for name in ("a2c", "ppo")]
    for key in ("score", "kl", "value_loss", "grad_norm", "explained_variance"):
        assert [r[key] for r in rows[0]] == pytest.approx([r[key] for r in rows[1]], rel=1e-5, abs=1e-7), key
    assert "clipfrac" not in rows[0][-1] and "value_clipfrac" not in rows[0][-1]


@pytest.mark.usefixtures("one_thread")
def test_smoke_reward_rises(sharp_path, tmp_path):
    from safetensors.torch import load_file

    from rlhfkit.recipes.a2c import train_a2c

    out = tmp_path / "a2c"
    cfg = A2CConfig(**small(sharp_path, "", out, critic="policy_head", batch_size=8, max_new_tokens=16, max_steps=8,
                            entropy_coef=0.01, limit=64))  # fmt: skip
    result = train_a2c(cfg, reward_fn=newline_reward, say=lambda *a: None)
    rows = read_metrics(out)
    scores = [r["score"] for r in rows]
    print("a2c scores", [round(s, 3) for s in scores])
    assert len(rows) == result["step"] == 8
    assert sum(scores[-2:]) / 2 > sum(scores[:2]) / 2 + 0.5, scores
    for key in ("score", "kl", "entropy", "policy_loss", "pg_loss", "value_loss", "explained_variance", "grad_norm"):
        assert key in rows[-1] and math.isfinite(rows[-1][key]), key
    before, after = load_file(f"{sharp_path}/model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert any(not torch.equal(before[n], after[n]) for n in before if n in after)
    assert (out / "critic").exists()


@pytest.mark.usefixtures("one_thread")
def test_resume_is_exact(sharp_path, tiny_path, tmp_path, monkeypatch):
    """2 iterations + crash + resume for 2 more == 4 straight (fp32, adaptive β, all metrics, policy and critic)."""
    from safetensors.torch import load_file

    import rlhfkit.recipes.ppo_saving as ppo_saving
    from rlhfkit.recipes.a2c import train_a2c

    real = ppo_saving.save_checkpoint

    def checkpoint_then_crash(out, step, *args, **kwargs):
        real(out, step, *args, **kwargs)
        if step == 2:
            raise Crash(step)

    kw = dict(max_steps=4, save_every=1, adaptive_kl=True, target_kl=0.5, kl_horizon=20, lr=1e-3, entropy_coef=0.01)
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    train_a2c(A2CConfig(**small(sharp_path, tiny_path, straight, **kw)), newline_reward, say=lambda *a: None)
    with monkeypatch.context() as patch, pytest.raises(Crash):
        patch.setattr(ppo_saving, "save_checkpoint", checkpoint_then_crash)  # dies right after step 2's checkpoint
        train_a2c(A2CConfig(**small(sharp_path, tiny_path, crashed, **kw)), newline_reward, say=lambda *a: None)
    cfg = A2CConfig(**small(sharp_path, tiny_path, crashed, resume=True, **kw))
    train_a2c(cfg, newline_reward, say=lambda *a: None)
    a, b = read_metrics(straight), read_metrics(crashed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    assert len({r["beta"] for r in a}) > 1  # the adaptive controller moved (so its state was restored)
    for ra, rb in zip(a, b):
        for k in ra:
            if k not in MACHINE_METRICS and ra[k] is not None:
                assert rb[k] == pytest.approx(ra[k], abs=1e-6), (ra["step"], k)
    for name in ("model", "critic"):
        wa, wb = (load_file(d / name / "model.safetensors") for d in (straight, crashed))
        assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa), name


def test_cli_run(tiny_path, tmp_path):
    """`rlhfkit a2c` against a reward-model directory: 2 iterations, the policy and the critic saved."""
    from typer.testing import CliRunner

    from rlhfkit.cli import app

    out = tmp_path / "a2c"
    args = ["a2c", "--model", tiny_path, "--reward-model", tiny_path, "--out", str(out)]
    args += ["max_steps=2", "batch_size=2", "max_new_tokens=6", "precision=fp32", "lr=1e-3", "entropy_coef=0.01"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    rows = read_metrics(out)
    assert len(rows) == 2 and all(math.isfinite(r["value_loss"]) and math.isfinite(r["pg_loss"]) for r in rows)
    assert (out / "model" / "config.json").exists() and (out / "critic" / "config.json").exists()
