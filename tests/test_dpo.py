"""DPO: the losses on hand-computed values, pairs from rankings, and tiny-model runs of `rlhfkit dpo`
(smoke, exact resume, grad accumulation, LoRA with the adapters-disabled reference)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import Crash, crash_after

from rlhfkit.algos.dpo import Pair, dpo_loss, ranking_pairs, sequence_logprobs
from rlhfkit.config import DPOConfig
from rlhfkit.errors import UserError
from rlhfkit.recipes.common import read_metrics

LOG2 = math.log(2)


def softplus(x: float) -> float:
    """-log σ(-x) = log(1 + e^x), by hand."""
    return math.log(1 + math.exp(x))


# ---------------------------------------------------------------- the math, by hand

# Two pairs, β = 0.5. Pair 0: log-ratios +1 (chosen) and −1 (rejected), h = 2, βh = 1.
# Pair 1: the policy prefers the rejected answer: log-ratios −1 and +1, h = −2, βh = −1.
POLICY_CHOSEN, POLICY_REJECTED = torch.tensor([-1.0, -3.0]), torch.tensor([-3.0, -1.0])
REF_CHOSEN, REF_REJECTED = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])


def test_sigmoid_loss_rewards_accuracy_margin_by_hand():
    d = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.5)
    # −log σ(1) = log(1 + e^−1) = 0.313262; −log σ(−1) = log(1 + e) = 1.313262
    assert d.loss.tolist() == pytest.approx([softplus(-1.0), softplus(1.0)], abs=1e-6)
    assert d.loss.tolist() == pytest.approx([0.313262, 1.313262], abs=1e-6)
    assert d.chosen_rewards.tolist() == pytest.approx([0.5, -0.5])  # β · log-ratio
    assert d.rejected_rewards.tolist() == pytest.approx([-0.5, 0.5])
    assert d.margin.tolist() == pytest.approx([1.0, -1.0])
    assert d.accuracy.tolist() == [1.0, 0.0]


def test_sigmoid_loss_is_log2_and_accuracy_0_when_policy_is_the_reference():
    d = dpo_loss(REF_CHOSEN, REF_REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.1)
    assert d.loss.tolist() == pytest.approx([LOG2, LOG2])
    assert d.accuracy.tolist() == [0.0, 0.0]  # equal rewards: not (yet) right


def test_sigmoid_gradient_by_hand():
    # dL/d log π(y_w) = −β σ(−βh): βh = 1 → −0.5 · σ(−1) = −0.5 · 0.268941 = −0.134471; rejected: +0.134471
    chosen = POLICY_CHOSEN[:1].clone().requires_grad_()
    rejected = POLICY_REJECTED[:1].clone().requires_grad_()
    dpo_loss(chosen, rejected, REF_CHOSEN[:1], REF_REJECTED[:1], beta=0.5).loss.sum().backward()
    assert chosen.grad.item() == pytest.approx(-0.5 / (1 + math.e), abs=1e-6)
    assert rejected.grad.item() == pytest.approx(0.5 / (1 + math.e), abs=1e-6)


def test_conservative_dpo_label_smoothing_by_hand():
    # −(1−ε) log σ(βh) − ε log σ(−βh) with ε = 0.1: 0.9 · 0.313262 + 0.1 · 1.313262 = 0.413262;
    # for βh = −1 the two terms swap: 0.9 · 1.313262 + 0.1 · 0.313262 = 1.213262
    d = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.5, label_smoothing=0.1)
    assert d.loss.tolist() == pytest.approx([0.413262, 1.213262], abs=1e-6)
    assert d.chosen_rewards.tolist() == pytest.approx([0.5, -0.5])  # rewards do not depend on ε


def test_ipo_loss_is_length_normalised_by_hand():
    # β = 0.5: target 1/(2β) = 1. Pair 0: chosen log-ratio +1 over 2 tokens = 0.5, rejected −1 over
    # 4 tokens = −0.25: h̄ = 0.75, loss (0.75 − 1)² = 0.0625. Pair 1: −1/2 − 1/4 = −0.75 → (−1.75)² = 3.0625
    lengths_c, lengths_r = torch.tensor([2, 2]), torch.tensor([4, 4])
    d = dpo_loss(
        POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, 0.5, loss_type="ipo",
        chosen_lengths=lengths_c, rejected_lengths=lengths_r,
    )  # fmt: skip
    assert d.loss.tolist() == pytest.approx([0.0625, 3.0625], abs=1e-6)
    assert d.margin.tolist() == pytest.approx([1.0, -1.0])  # from the summed log-ratios, as TRL logs them
    with pytest.raises(ValueError, match="lengths"):
        dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, 0.5, loss_type="ipo")


def test_ipo_loss_is_zero_at_its_target_margin():
    # h̄ = 1/(2β) = 5 for β = 0.1: one-token responses with log-ratios +2.5 and −2.5
    d = dpo_loss(
        torch.tensor([0.5]), torch.tensor([-5.0]), torch.tensor([-2.0]), torch.tensor([-2.5]), 0.1,
        loss_type="ipo", chosen_lengths=torch.tensor([1]), rejected_lengths=torch.tensor([1]),
    )  # fmt: skip
    assert d.loss.item() == pytest.approx(0.0, abs=1e-10)


def test_sequence_logprobs_sums_response_tokens_only():
    # V = 2. Row 0: logits [ln 3, 0] everywhere, so p(token 0) = 3/4, p(token 1) = 1/4.
    # Tokens [1, 0, 0, 1], response = the last two (mask [0, 0, 1, 1]): token 2 (= 0) is predicted at
    # position 1, token 3 (= 1) at position 2 -> log(3/4) + log(1/4).
    # Row 1: uniform logits, 3 response tokens, the last one padding (mask 0) -> 2 log(1/2).
    logits = torch.zeros(2, 4, 2)
    logits[0, :, 0] = math.log(3)
    ids = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0]])
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 0]])
    got = sequence_logprobs(logits, ids, mask)
    assert got.tolist() == pytest.approx([math.log(3 / 4) + math.log(1 / 4), 2 * math.log(1 / 2)], abs=1e-6)


def test_pairs_from_a_ranking_with_a_tie_and_their_weights():
    # ranking 0: K = 4 with a tie (ranks 0, 1, 1, 2): 6 − 1 = 5 pairs, the tied pair (1, 2) gives none
    # ranking 1: a plain pair; ranking 2: K = 3 strictly ordered: 3 pairs
    ranks = [[0, 1, 1, 2], [0, 1], [2, 0, 1]]
    pairs = ranking_pairs(ranks, "per_ranking")
    assert [(p.ranking, p.chosen, p.rejected) for p in pairs] == [
        (0, 0, 1), (0, 0, 2), (0, 0, 3), (0, 1, 3), (0, 2, 3),
        (1, 0, 1),
        (2, 1, 0), (2, 1, 2), (2, 2, 0),
    ]  # fmt: skip
    assert [p.weight for p in pairs] == pytest.approx([1 / 5] * 5 + [1.0] + [1 / 3] * 3)
    assert [p.weight for p in ranking_pairs(ranks, "per_pair")] == [1.0] * 9
    assert ranking_pairs([[0, 0]]) == []  # all tied: no pair
    assert isinstance(pairs[0], Pair)


def test_config_checks():
    assert DPOConfig().loss_type == "sigmoid" and DPOConfig().pair_weighting == "per_ranking"
    with pytest.raises(UserError, match="loss_type"):
        DPOConfig(loss_type="hinge")
    with pytest.raises(UserError, match="pair_weighting"):
        DPOConfig(pair_weighting="per_prompt")
    with pytest.raises(UserError, match="beta"):
        DPOConfig(beta=0.0)


# ---------------------------------------------------------------- tiny-model runs


@pytest.fixture(scope="module")
def rankings(tmp_path_factory, fixtures) -> str:
    """16 HH-RLHF pairs (tests/fixtures/hh_pairs.jsonl) plus 2 K = 4 rankings with a tie."""
    rows = [json.loads(line) for line in (fixtures / "hh_pairs.jsonl").read_text().splitlines()]
    for i in range(2):
        rows.append(
            {
                "prompt": f"Say something kind about number {i}.",
                "responses": [f"{i} is a lovely number.", f"{i} is fine.", f"{i}.", "no"],
                "ranks": [0, 1, 1, 2],
            }
        )
    path = tmp_path_factory.mktemp("dpo") / "rankings.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def tiny_cfg(tiny_path, data, out, **kw) -> DPOConfig:
    common = dict(
        model=tiny_path, data=data, out=str(out), batch_size=8, max_steps=6, lr=1e-3, warmup_steps=0,
        precision="fp32", max_length=96, eval_fraction=0.0, schedule="constant", beta=0.1,
    )  # fmt: skip
    return DPOConfig(**(common | kw))


def params_of(model_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def test_dpo_smoke_margin_and_accuracy_rise_and_weights_change(tiny_path, rankings, tmp_path):
    """Held out = the training pairs: before training the policy is the reference (loss log 2, margin
    0, accuracy 0: equal rewards count as wrong); after 6 steps the preferred answers lead."""
    from rlhfkit.recipes.dpo import train_dpo

    result = train_dpo(tiny_cfg(tiny_path, rankings, tmp_path / "dpo", eval_data=rankings))
    assert result["step"] == 6
    assert result["eval_loss_before"] == pytest.approx(LOG2, abs=1e-6)
    assert result["eval_rewards/margin_before"] == pytest.approx(0.0, abs=1e-6)
    assert result["eval_rewards/accuracy_before"] == 0.0
    assert result["eval_rewards/margin"] > 0.05 and result["eval_rewards/accuracy"] > 0.75, result
    assert result["eval_loss"] < LOG2 - 0.02
    train = [m for m in read_metrics(tmp_path / "dpo") if "rewards/margin" in m]
    assert len(train) == 6 and train[0]["loss"] == pytest.approx(LOG2, abs=1e-6)  # step 1: policy = reference
    assert train[-1]["rewards/margin"] > train[0]["rewards/margin"]
    assert {"rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "lr", "grad_norm"} <= train[
        0
    ].keys()
    saved, base = params_of(tmp_path / "dpo" / "model"), params_of(Path(tiny_path))
    assert max((saved[k] - base[k]).abs().max().item() for k in base) > 1e-4


def test_dpo_cli_ipo_per_pair(tiny_path, rankings, tmp_path):
    from typer.testing import CliRunner

    from rlhfkit.cli import app

    args = ["dpo", "--model", tiny_path, "--data", rankings, "--out", str(tmp_path / "ipo")]
    args += ["loss_type=ipo", "pair_weighting=per_pair", "max_steps=2", "batch_size=4", "lr=1e-3"]
    args += ["precision=fp32", "max_length=96", "eval_fraction=0.2", "warmup_steps=0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    # step 1: policy = reference, h̄ = 0, loss (0 − 1/(2β))² = 25 for β = 0.1
    first = next(m for m in read_metrics(tmp_path / "ipo") if "loss" in m and m["step"] == 1)
    assert first["loss"] == pytest.approx(25.0, abs=1e-4)
    assert (tmp_path / "ipo" / "model" / "config.json").exists()


def test_dpo_resume_is_exact(tiny_path, rankings, tmp_path, monkeypatch):
    """2 steps, crash after 3, resume: the same losses, learning rates and weights as 4 steps straight."""
    from rlhfkit.recipes import dpo

    kw = dict(max_steps=4, save_every=2, schedule="linear", warmup_steps=1, batch_size=4)
    dpo.train_dpo(tiny_cfg(tiny_path, rankings, tmp_path / "straight", **kw))
    with monkeypatch.context() as patch, pytest.raises(Crash):
        crash_after(patch, dpo, 3)
        dpo.train_dpo(tiny_cfg(tiny_path, rankings, tmp_path / "resumed", **kw))
    dpo.train_dpo(tiny_cfg(tiny_path, rankings, tmp_path / "resumed", resume=True, **kw))
    rows = [[m for m in read_metrics(tmp_path / r) if "loss" in m] for r in ("straight", "resumed")]
    assert [m["step"] for m in rows[1]] == [1, 2, 3, 4]
    for key in ("loss", "rewards/margin", "lr"):
        a, b = [m[key] for m in rows[0]], [m[key] for m in rows[1]]
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-6, (key, a, b)
    a, b = params_of(tmp_path / "straight" / "model"), params_of(tmp_path / "resumed" / "model")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_dpo_grad_accumulation_gives_the_same_losses(tiny_path, rankings, tmp_path):
    """grad_accum=4: the same weighted losses and gradient norms (the Σ w normaliser is global)."""
    from rlhfkit.recipes.dpo import train_dpo

    kw = dict(max_steps=3, max_grad_norm=1e6)
    train_dpo(tiny_cfg(tiny_path, rankings, tmp_path / "a1", grad_accum=1, **kw))
    train_dpo(tiny_cfg(tiny_path, rankings, tmp_path / "a4", grad_accum=4, **kw))
    rows = [[m for m in read_metrics(tmp_path / r) if "loss" in m] for r in ("a1", "a4")]
    for key in ("loss", "grad_norm", "rewards/accuracy"):
        a, b = [m[key] for m in rows[0]], [m[key] for m in rows[1]]
        assert len(a) == 3 and all(abs(x - y) <= 1e-5 * max(1.0, abs(x)) for x, y in zip(a, b)), (key, a, b)


def test_dpo_lora_reference_is_the_base_with_adapters_disabled(tiny_path, rankings, tmp_path, monkeypatch):
    """Under LoRA there is no second model: the reference is the policy with its adapters off (used
    once, for the reference pass). Its log-probs equal the fresh policy's (LoRA's B starts at 0), so
    step 1's loss is log 2; the saved model is merged and differs from the base in the adapted weights."""
    from peft import PeftModel

    from rlhfkit.recipes.dpo import train_dpo

    real, calls = PeftModel.disable_adapter, []
    monkeypatch.setattr(PeftModel, "disable_adapter", lambda self: calls.append(1) or real(self))
    result = train_dpo(tiny_cfg(tiny_path, rankings, tmp_path / "lora", lora=True, lora_r=4, max_steps=4))
    rows = [m for m in read_metrics(tmp_path / "lora") if "loss" in m]
    assert calls == [1]
    assert result["step"] == 4 and rows[0]["loss"] == pytest.approx(LOG2, abs=1e-6)
    assert rows[-1]["rewards/margin"] > 0
    saved, base = params_of(tmp_path / "lora" / "model"), params_of(Path(tiny_path))
    assert not any("lora" in k for k in saved)
    assert (
        saved["model.layers.0.self_attn.q_proj.weight"] - base["model.layers.0.self_attn.q_proj.weight"]
    ).abs().max() > 1e-5
    assert torch.equal(saved["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def test_dpo_loss_equals_trl_dpotrainer():
    """benchmarks/dpo_trl_check.py under TRL 1.16 (the venv TRL_VENV names; TRL is never our dependency):
    the same batch tensors, reference log-probs, loss and metrics, sigmoid and IPO, within 1e-5."""
    import os
    import subprocess

    venv = os.environ.get("TRL_VENV")
    python = Path(venv or "/nonexistent") / "bin" / "python"
    if not python.exists():
        pytest.skip("set TRL_VENV to a venv with trl==1.16.0 (see benchmarks/dpo_trl_check.py)")
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [str(python), str(root / "benchmarks" / "dpo_trl_check.py")], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "all within 1e-05" in run.stdout


WORKER = """
import os, sys
from pathlib import Path

import rlhfkit.recipes.dpo as dpo

make, marks = dpo.make_accelerator, sys.argv[1]


def checked(cfg):  # inside each worker: there really are 2 processes, and this is one of them
    acc = make(cfg)
    assert acc.num_processes == int(os.environ["WORLD_SIZE"]) == 2, acc.num_processes
    Path(marks, f"rank{acc.process_index}").write_text(str(acc.num_processes))
    return acc


dpo.make_accelerator = checked
sys.argv = ["rlhfkit", *sys.argv[2:]]
from rlhfkit.cli import main

main()
"""


def test_dpo_two_processes_equal_one_process(tiny_path, rankings, tmp_path):
    """torchrun --nproc_per_node 2 (DDP over gloo) x batch b == 1 process x batch b: the same losses,
    held-out metrics (reference and eval passes split across the ranks) and weights."""
    import os
    import subprocess
    import sys

    args = ["dpo", "--model", tiny_path, "--data", rankings, "batch_size=8", "max_steps=3", "lr=1e-3"]
    args += ["warmup_steps=0", "precision=fp32", "max_length=96", "eval_fraction=0.25", "grad_accum=2"]
    root = str(Path(__file__).resolve().parents[1])  # the worker script lives in tmp_path: import this checkout
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
    }
    one = subprocess.run(
        [sys.executable, "-m", "rlhfkit.cli", *args, "--out", str(tmp_path / "one")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    (tmp_path / "worker.py").write_text(WORKER)
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2"]
    two = subprocess.run(
        [*torchrun, str(tmp_path / "worker.py"), str(tmp_path), *args, "--out", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("rank*")) == ["rank0", "rank1"]
    rows = [read_metrics(tmp_path / r) for r in ("one", "two")]
    for key in ("loss", "rewards/margin", "eval_loss", "eval_rewards/margin"):
        a, b = [m[key] for m in rows[0] if key in m], [m[key] for m in rows[1] if key in m]
        assert len(a) == len(b) >= 2 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (key, a, b)
    a, b = params_of(tmp_path / "one" / "model"), params_of(tmp_path / "two" / "model")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4  # a tenth of one AdamW step
