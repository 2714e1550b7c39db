"""Smoke runs of pretrain / sft / rm on tiny-random, exact resume, and the batch invariances
(grad accumulation, 2 processes x b == 1 process x 2b)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TORCHRUN, Crash, crash_after

from rlhfkit.config import PretrainConfig, RewardConfig, SFTConfig, build_config
from rlhfkit.data.jsonl import read_jsonl, write_jsonl
from rlhfkit.recipes.common import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def losses(out) -> list[float]:
    return [m["loss"] for m in read_metrics(out) if "loss" in m]


@pytest.fixture(scope="module")
def demos(fixtures) -> str:
    """24 short demonstrations (tests/fixtures/demos.jsonl)."""
    return str(fixtures / "demos.jsonl")


@pytest.fixture(scope="module")
def rankings(tmp_path_factory, fixtures) -> str:
    """16 pairs in HH-RLHF's format (tests/fixtures/hh_pairs.jsonl) plus 4 hand-made K = 4 rankings with a tie."""
    rows = read_jsonl(fixtures / "hh_pairs.jsonl")
    for i in range(4):
        rows.append(
            {
                "prompt": f"Say something kind about number {i}.",
                "responses": [f"{i} is a lovely number.", f"{i} is fine.", f"{i}.", "no"],
                "ranks": [0, 1, 1, 2],
            }
        )
    path = tmp_path_factory.mktemp("data") / "rankings.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def params_of(model_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def test_sft_smoke_loss_falls_and_weights_change(tiny_path, demos, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhfkit.recipes.sft import train_sft

    cfg = SFTConfig(
        model=tiny_path,
        data=demos,
        out=str(tmp_path / "sft"),
        batch_size=8,
        epochs=4,
        lr=3e-3,
        warmup_steps=0,
        precision="fp32",
        max_length=128,
        eval_fraction=0.2,
    )
    result = train_sft(cfg)
    ls = losses(tmp_path / "sft")
    assert len(ls) == result["step"] == 8  # 19 training demos // 8 per batch = 2 steps/epoch x 4
    assert ls[-1] < ls[0] - 0.5, ls
    assert result["eval_loss"] < result["eval_loss_before"]
    before, after = params_of(tiny_path), params_of(str(tmp_path / "sft" / "model"))
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before)
    # a plain transformers load of the saved directory gives the same held-out behaviour
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "sft" / "model")
    assert torch.equal(model.state_dict()["model.norm.weight"], after["model.norm.weight"])


def lora_sft_cfg(model: str, demos: str, out, max_steps: int) -> SFTConfig:
    return SFTConfig(
        model=model,
        data=demos,
        out=str(out),
        batch_size=8,
        max_steps=max_steps,
        lr=1e-2,
        warmup_steps=0,
        precision="fp32",
        max_length=128,
        lora=True,
        lora_r=4,
        eval_fraction=0.2,
    )


def test_sft_lora_trains_adapters_and_saves_merged(tiny_path, demos, tmp_path):
    from rlhfkit.recipes.sft import train_sft

    train_sft(lora_sft_cfg(tiny_path, demos, tmp_path / "lora", max_steps=4))
    ls = losses(tmp_path / "lora")
    assert ls[-1] < ls[0]
    before, after = params_of(tiny_path), params_of(str(tmp_path / "lora" / "model"))
    assert set(before) == set(after)  # merged: a plain model, no adapter tensors
    assert not torch.equal(
        before["model.layers.0.self_attn.q_proj.weight"], after["model.layers.0.self_attn.q_proj.weight"]
    )
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])  # not a LoRA target


def test_pretrain_smoke(tiny_path, tmp_path):
    from rlhfkit.recipes.pretrain import train_pretrain
    from rlhfkit.tasks import load_task

    corpus = tmp_path / "corpus.txt"  # the built-in task's requests as plain text
    corpus.write_text("\n\n".join(p.text for p in load_task("train"))[:6000])
    cfg = PretrainConfig(
        model=tiny_path,
        data=str(corpus),
        out=str(tmp_path / "pt"),
        batch_size=4,
        max_steps=8,
        lr=3e-3,
        precision="fp32",
        max_length=64,
        eval_fraction=0.1,
    )
    result = train_pretrain(cfg)
    ls = losses(tmp_path / "pt")
    assert ls[-1] < ls[0] - 0.5, ls
    assert result["eval_loss"] < result["eval_loss_before"]


def test_rm_smoke_loss_falls_head_saved_and_offset(tiny_path, rankings, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from rlhfkit.models.heads import load_reward_model
    from rlhfkit.recipes.reward import train_reward_model

    cfg = RewardConfig(
        model=tiny_path,
        data=rankings,
        out=str(tmp_path / "rm"),
        batch_size=4,
        epochs=6,
        lr=2e-3,
        warmup_steps=0,
        precision="fp32",
        max_length=96,
        eval_fraction=0.0,
    )
    result = train_reward_model(cfg)
    ls = losses(tmp_path / "rm")
    first, last = sum(ls[:3]) / 3, sum(ls[-3:]) / 3
    assert last < first - 0.1, ls
    saved = tmp_path / "rm" / "model"
    config = json.loads((saved / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["reward_offset"] == pytest.approx(result["reward_offset"])
    assert config["pad_token_id"] != 2  # never the EOS, so plain transformers reads the EOS too
    # plain transformers gives our raw score; ours subtracts the offset
    rm, tok = load_reward_model(str(saved))
    plain = AutoModelForSequenceClassification.from_pretrained(saved).eval()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Say something kind about number 1."}], add_generation_prompt=True
    )["input_ids"]
    ids = ids + tok("1 is a lovely number.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    x = torch.tensor([ids + [config["pad_token_id"]] * 3])
    mask = torch.tensor([[1] * len(ids) + [0] * 3])
    with torch.no_grad():
        ours = rm.eval().score(x, mask).item()
        theirs = plain(input_ids=x, attention_mask=mask).logits[0, 0].item()
    assert ours == pytest.approx(theirs - config["reward_offset"], abs=1e-4)


def test_reward_head_init_variance(tiny_path):
    from rlhfkit.models.heads import load_reward_model

    torch.manual_seed(0)
    rm, _ = load_reward_model(tiny_path)
    d = rm.config.hidden_size  # 64: std should be 1/sqrt(65) = 0.124
    std = rm.head.weight.std().item()
    assert abs(std - 1 / (d + 1) ** 0.5) < 0.03


@pytest.fixture(scope="module")
def varied(tmp_path_factory) -> dict[str, str]:
    """Demonstrations and K = 2..4 rankings of very different lengths (1 to 60 words): a batch
    splits into several forwards of similar lengths (length_groups), a different number on each
    process of a 2-process run."""
    import random

    rng = random.Random(0)
    where = tmp_path_factory.mktemp("varied")
    words = lambda n, tag: " ".join(["word"] * n) + f" {tag}"  # noqa: E731
    demos = [
        {
            "prompt": f"Say word {i}." + " Please." * rng.choice([0, 12]),
            "response": words(rng.choice([1, 2, 30, 60]), i),
        }
        for i in range(48)
    ]
    rankings = []
    for i in range(40):
        k = rng.choice([2, 3, 4])
        rankings.append(
            {
                "prompt": "Say things " * rng.choice([1, 10]) + str(i),
                "responses": [words(rng.choice([1, 3, 25, 50]), j) for j in range(k)],
                "ranks": list(range(k)),
            }
        )
    write_jsonl(where / "demos.jsonl", demos)
    write_jsonl(where / "rankings.jsonl", rankings)
    return {"sft": str(where / "demos.jsonl"), "rm": str(where / "rankings.jsonl")}


def lrs(out) -> list[float]:
    return [m["lr"] for m in read_metrics(out) if "lr" in m]


def grad_norms(out) -> list[float]:
    return [m["grad_norm"] for m in read_metrics(out) if "grad_norm" in m]


def assert_same_weights(a_dir, b_dir, atol: float) -> None:
    a, b = params_of(str(a_dir)), params_of(str(b_dir))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, worst


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_resume_is_exact(stage, tiny_path, varied, tmp_path, monkeypatch):
    """2 steps, crash, resume 2 more == 4 steps straight: the same losses, learning rates,
    optimizer state and final weights (fp32)."""
    from rlhfkit.recipes import reward, sft

    recipe = sft if stage == "sft" else reward
    run, cls = (sft.train_sft, SFTConfig) if stage == "sft" else (reward.train_reward_model, RewardConfig)
    common = dict(
        model=tiny_path,
        data=varied[stage],
        batch_size=4,
        max_steps=4,
        lr=1e-3,
        warmup_steps=1,
        precision="fp32",
        max_length=96,
        eval_fraction=0.0,
        save_every=2,
        schedule="linear",
    )
    run(cls(out=str(tmp_path / "straight"), **common))
    with monkeypatch.context() as patch, pytest.raises(Crash):
        crash_after(patch, recipe, 3)  # dies after step 3; checkpoint at 2
        run(cls(out=str(tmp_path / "resumed"), **common))
    run(cls(out=str(tmp_path / "resumed"), resume=True, **common))
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert len(a) == len(b) == 4
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-6, (a, b)
    assert (
        lrs(tmp_path / "straight")
        == lrs(tmp_path / "resumed")
        == pytest.approx([1e-3, 2 / 3 * 1e-3, 1 / 3 * 1e-3, 0.0])
    )
    assert_same_weights(tmp_path / "straight" / "model", tmp_path / "resumed" / "model", atol=1e-6)
    states = [
        torch.load(tmp_path / r / "checkpoints" / "step-000004" / "state.pt", weights_only=False)
        for r in ("straight", "resumed")
    ]
    assert states[0]["scheduler"] == states[1]["scheduler"]
    (sa, sb) = (s["optimizer"]["state"] for s in states)
    assert sa.keys() == sb.keys() and all(
        torch.allclose(sa[i][k], sb[i][k], atol=1e-6, rtol=1e-5) for i in sa for k in ("step", "exp_avg", "exp_avg_sq")
    )


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_grad_accumulation_gives_the_same_losses_and_gradients(stage, tiny_path, varied, tmp_path):
    """grad_accum=4 splits each batch into 4 micro-batches: the same losses, gradient norms
    (a constant factor on the loss would show here, AdamW hides it in the weights) and weights."""
    from rlhfkit.recipes.reward import train_reward_model
    from rlhfkit.recipes.sft import train_sft

    run, cls = (train_sft, SFTConfig) if stage == "sft" else (train_reward_model, RewardConfig)
    common = dict(
        model=tiny_path,
        data=varied[stage],
        batch_size=8,
        max_steps=3,
        lr=1e-3,
        warmup_steps=0,
        precision="fp32",
        max_length=96,
        eval_fraction=0.0,
        max_grad_norm=1e6,
    )
    run(cls(out=str(tmp_path / "a1"), grad_accum=1, **common))
    run(cls(out=str(tmp_path / "a4"), grad_accum=4, **common))
    a, b = losses(tmp_path / "a1"), losses(tmp_path / "a4")
    assert len(a) == 3 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    # max_grad_norm=1e6: never clipped, so the logged norm is that of the summed micro-batch gradients
    ga, gb = grad_norms(tmp_path / "a1"), grad_norms(tmp_path / "a4")
    assert len(ga) == len(gb) == 3 and all(abs(x - y) <= 1e-5 * x for x, y in zip(ga, gb)), (ga, gb)
    assert_same_weights(tmp_path / "a1" / "model", tmp_path / "a4" / "model", atol=1e-4)  # a tenth of one AdamW step


WORKER = """
import os, sys
from pathlib import Path

import rlhfkit.recipes.common as common
import rlhfkit.recipes.reward as reward
import rlhfkit.recipes.sft as sft

make, marks = common.make_accelerator, sys.argv[1]


def checked(cfg):  # inside each worker: there really are 2 processes, and this is one of them
    acc = make(cfg)
    assert acc.num_processes == int(os.environ["WORLD_SIZE"]) == 2, (acc.num_processes, os.environ.get("WORLD_SIZE"))
    assert acc.distributed_type.value == "MULTI_CPU", acc.distributed_type
    Path(marks, f"rank{acc.process_index}").write_text(str(acc.num_processes))
    return acc


sft.make_accelerator = reward.make_accelerator = checked
sys.argv = ["rlhfkit", *sys.argv[2:]]
from rlhfkit.cli import main

main()
"""


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_two_processes_equal_one_process(stage, tiny_path, varied, tmp_path):
    """torchrun --nproc_per_node 2 (DDP over gloo) x batch b == 1 process x batch b: the same losses
    and weights, with length-grouped micro-batches that give each rank its own number of forwards
    (the case that once deadlocked). Each worker asserts there are 2 of them."""
    args = [
        stage,
        "--model",
        tiny_path,
        "--data",
        varied[stage],
        "batch_size=8",
        "max_steps=6",
        "lr=1e-3",
        "warmup_steps=0",
        "precision=fp32",
        "max_length=96",
        "eval_fraction=0.0",
        "grad_accum=2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "rlhfkit.cli", *args, "--out", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    two = subprocess.run(
        [*TORCHRUN, str(worker), str(tmp_path), *args, "--out", str(tmp_path / "two")],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("rank*")) == ["rank0", "rank1"]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    assert_same_weights(tmp_path / "one" / "model", tmp_path / "two" / "model", atol=1e-4)  # a tenth of one AdamW step


def test_config_presets_and_overrides(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("lr: 3.0e-5\nepochs: 2\nlora: true\n")
    cfg = build_config(SFTConfig, str(preset), ["lr=1e-4", "fields={prompt: q, response: a}"], batch_size=4)
    assert cfg.lr == 1e-4 and cfg.epochs == 2.0 and cfg.lora is True and cfg.batch_size == 4
    assert cfg.fields == {"prompt": "q", "response": "a"}


def test_rm_with_lora(tiny_path, rankings, tmp_path):
    from rlhfkit.recipes.reward import train_reward_model

    cfg = RewardConfig(
        model=tiny_path,
        data=rankings,
        out=str(tmp_path / "rm_lora"),
        batch_size=4,
        max_steps=4,
        lr=1e-3,
        warmup_steps=0,
        precision="fp32",
        max_length=96,
        eval_fraction=0.0,
        lora=True,
        lora_r=4,
    )
    result = train_reward_model(cfg)
    assert result["step"] == 4
    saved = params_of(str(tmp_path / "rm_lora" / "model"))
    assert "score.weight" in saved and not any("lora" in k for k in saved)  # merged, head kept
    base = params_of(tiny_path)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        assert (saved[name] - base[name]).abs().max() > 1e-4, name  # the adapters trained and were merged in
    assert torch.equal(saved["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # not a LoRA target
    ls = losses(tmp_path / "rm_lora")
    assert len(ls) == 4 and ls[-1] < ls[0], ls


def test_rm_compiled_blocks_train_like_eager(tiny_path, rankings, tmp_path):
    """compile=on (torch.compile per block) gives the eager losses (fp32) and a plain HF checkpoint."""
    from transformers import AutoModelForSequenceClassification

    from rlhfkit.recipes.reward import train_reward_model

    common = dict(
        model=tiny_path,
        data=rankings,
        batch_size=4,
        max_steps=3,
        lr=1e-3,
        warmup_steps=0,
        precision="fp32",
        max_length=96,
        eval_fraction=0.0,
    )
    train_reward_model(RewardConfig(out=str(tmp_path / "eager"), compile="off", **common))
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    train_reward_model(RewardConfig(out=str(tmp_path / "compiled"), compile="on", **common))
    assert counters["stats"]["unique_graphs"] > graphs  # it did compile (errors would fall back to eager)
    a, b = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert len(a) == len(b) == 3
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    pa, pb = params_of(str(tmp_path / "eager" / "model")), params_of(str(tmp_path / "compiled" / "model"))
    assert pa.keys() == pb.keys()
    assert max((pa[k] - pb[k]).abs().max().item() for k in pa) < 1e-4
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "compiled" / "model")


def test_each_stage_starts_with_a_fresh_compile_cache(tiny_path, demos, rankings, tmp_path):
    """The stages of `rlhfkit pipeline` share a process, and dynamo keeps at most 16 compiled
    variants for the one `forward` code that every transformer block runs: SFT's and the RM's
    variants must not stay there for PPO (a variant beyond the limit runs eagerly). Here: SFT,
    then the RM, then SFT again holds only SFT's variants, as it did the first time."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from rlhfkit.accel.compile import transformer_blocks
    from rlhfkit.models.loading import load_causal_lm
    from rlhfkit.recipes.reward import train_reward_model
    from rlhfkit.recipes.sft import train_sft

    code = type(transformer_blocks(load_causal_lm(tiny_path).model)[0]).forward.__code__

    def variants() -> int:
        return len(_debug_get_cache_entry_list(code))

    common = dict(
        model=tiny_path,
        batch_size=4,
        max_steps=1,
        lr=1e-3,
        warmup_steps=0,
        precision="fp32",
        max_length=96,
        eval_fraction=0.0,
        compile="on",
    )
    train_sft(SFTConfig(out=str(tmp_path / "sft1"), data=demos, **common), say=lambda *a: None)
    sft_variants = variants()
    train_reward_model(RewardConfig(out=str(tmp_path / "rm"), data=rankings, **common), say=lambda *a: None)
    rm_variants = variants()
    train_sft(SFTConfig(out=str(tmp_path / "sft2"), data=demos, **common), say=lambda *a: None)
    assert sft_variants >= 1 and rm_variants >= 1  # each stage compiled its blocks
    assert variants() == sft_variants  # without the reset: SFT's + the RM's


def test_rm_shared_prompt_rows_train_like_separate_rows(tiny_path, rankings, tmp_path):
    """share_prompt (the K responses after one copy of the prompt) changes the cost, not the losses."""
    from rlhfkit.recipes.reward import train_reward_model

    common = dict(
        model=tiny_path,
        data=rankings,
        batch_size=4,
        max_steps=3,
        lr=1e-3,
        warmup_steps=0,
        precision="fp32",
        max_length=96,
        eval_fraction=0.0,
    )
    train_reward_model(RewardConfig(out=str(tmp_path / "shared"), share_prompt=True, **common))
    train_reward_model(RewardConfig(out=str(tmp_path / "separate"), share_prompt=False, **common))
    a, b = losses(tmp_path / "shared"), losses(tmp_path / "separate")
    assert len(a) == len(b) == 3
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)


def test_rm_gold_accuracy_against_the_rubric_behind_the_labeler(tiny_path, tmp_path):
    """Our rankings carry the gold scores (meta.gold) through the loader; evaluate_rm reports the
    RM's agreement with them: gold equal to the labeler's order gives the same number as the
    labeler accuracy, gold reversing it gives 1 - accuracy, tied gold pairs do not count."""
    from rlhfkit.data.loaders import load_records
    from rlhfkit.data.tokenize import encode_ranking
    from rlhfkit.models.heads import load_reward_model
    from rlhfkit.recipes.reward import evaluate_rm, gold_of

    # written as the pipeline writes them: responses in sampled order, ranks and gold per response;
    # the loader puts the responses best first, and the gold scores must follow them
    rows = [
        {
            "prompt": f"Name a colour, please ({i}).",
            "responses": ["green", "Red.", "I do not know.", "Blue, I think."],
            "ranks": [2, 0, 3, 1],
            "meta": {"labeler": "simulated", "gold": [0.1, 0.9, -0.2, 0.5]},
        }
        for i in range(6)
    ]
    path = tmp_path / "rankings.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = load_records(str(path), "ranking").records
    assert records[0].responses == ["Red.", "Blue, I think.", "green", "I do not know."] and records[0].ranks == [
        0,
        1,
        2,
        3,
    ]
    assert records[0].meta["labeler"] == "simulated" and records[0].meta["gold"] == [0.9, 0.5, 0.1, -0.2]
    assert gold_of(records[0], 4) == [0.9, 0.5, 0.1, -0.2] and gold_of(records[0], 3) is None

    rm, tok = load_reward_model(tiny_path)
    groups = [(encode_ranking(tok, r, 64), list(r.ranks)) for r in records]
    same = evaluate_rm(rm, groups, tok.pad_token_id, "cpu", gold=[gold_of(r, 4) for r in records])
    reverse = evaluate_rm(rm, groups, tok.pad_token_id, "cpu", gold=[[-0.2, 0.1, 0.5, 0.9]] * 6)
    tied = evaluate_rm(rm, groups, tok.pad_token_id, "cpu", gold=[[0.5, 0.5, 0.1, 0.1]] * 6)
    none = evaluate_rm(rm, groups, tok.pad_token_id, "cpu", gold=[None] * 6)
    assert same["pairs"] == 36 and same["gold_pairs"] == 36
    assert same["gold_accuracy"] == pytest.approx(same["accuracy"])
    assert reverse["gold_accuracy"] == pytest.approx(1 - same["accuracy"])
    assert tied["gold_pairs"] == 6 * 4  # only the 4 pairs across the two gold levels, per ranking
    assert "gold_accuracy" not in none


LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_modules(model) -> list[str]:
    return sorted(name for name, m in model.named_modules() if hasattr(m, "lora_A"))


def test_lora_all_linear_on_llama_is_the_seven_projections(tiny_path):
    """The default lora_targets=["all-linear"] adapts what the old LLaMA-named default did."""
    from transformers import AutoModelForCausalLM

    from rlhfkit.recipes.common import apply_lora

    assert SFTConfig().lora_targets == ["all-linear"]
    default = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_path), SFTConfig(lora=True))
    named = apply_lora(
        AutoModelForCausalLM.from_pretrained(tiny_path), SFTConfig(lora=True, lora_targets=LLAMA_PROJECTIONS)
    )
    assert lora_modules(default) == lora_modules(named)
    assert {n.split(".")[-1] for n in lora_modules(default)} == set(LLAMA_PROJECTIONS)


def test_sft_lora_runs_on_gpt2(demos, tmp_path):
    """GPT-2's projections are c_attn / c_proj / c_fc (Conv1D): the all-linear default finds them."""
    from families import tiny_family

    from rlhfkit.recipes.sft import train_sft

    model = tiny_family("gpt2", tmp_path)
    train_sft(lora_sft_cfg(model, demos, tmp_path / "lora", max_steps=2), say=lambda *a: None)
    assert len(losses(tmp_path / "lora")) == 2
    before, after = params_of(str(model)), params_of(str(tmp_path / "lora" / "model"))
    assert set(before) == set(after)  # merged: a plain model, no adapter tensors
    key = "transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(before[key], after[key])
    assert torch.equal(before["transformer.wte.weight"], after["transformer.wte.weight"])  # not a LoRA target
