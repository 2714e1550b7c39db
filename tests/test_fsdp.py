"""FSDP2 through accelerate, on CPUs (gloo): 2 sharded processes == 1 process, whole models saved
from the shards, exact resume; DeepSpeed only on GPUs (``gpu`` marker).

Every 2-process run is started the way a user starts one, ``accelerate launch --config_file
examples/accelerate/fsdp2.yaml``, and the worker asserts from inside each process, at every
optimizer step, that there are 2 processes, that accelerate's engine is FSDP2 and that the
parameters are DTensors of which this process holds a part.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import accelerate_launch, free_port

from rlhfkit.recipes.common import read_metrics

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import os, sys
from pathlib import Path

import torch

torch.set_num_threads(1)
import rlhfkit.recipes.engines as engines
import rlhfkit.recipes.dpo as dpo
import rlhfkit.recipes.reward as reward
import rlhfkit.recipes.sft as sft

marks, expect, crash_after = sys.argv[1], sys.argv[2], int(sys.argv[3])
step = engines.optimizer_step


def checked(acc, model, optimizer, max_norm):  # inside each process, at every optimizer step
    from torch.distributed.tensor import DTensor

    assert acc.num_processes == int(os.environ["WORLD_SIZE"]) == 2, (acc.num_processes, os.environ.get("WORLD_SIZE"))
    assert engines.engine(acc) == expect, (engines.engine(acc), acc.distributed_type)
    if expect == "fsdp":
        assert acc.is_fsdp2
        params = list(model.parameters())
        assert params and all(isinstance(p, DTensor) for p in params)
        assert sum(p.to_local().numel() for p in params) < sum(p.numel() for p in params)  # a shard, not all
    if expect == "deepspeed":
        stage = int(os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
        assert type(model).__name__ == "DeepSpeedEngine" and model.zero_optimization_stage() == stage
        if stage == 3:  # each process holds a partition of each parameter
            params = list(model.parameters())
            assert sum(p.ds_tensor.numel() for p in params) < sum(p.ds_numel for p in params)
    Path(marks, f"rank{acc.process_index}").write_text(f"{engines.engine(acc)} {acc.num_processes}")
    return step(acc, model, optimizer, max_norm)


sft.optimizer_step = reward.optimizer_step = dpo.optimizer_step = checked
if expect == "deepspeed" and not torch.cuda.is_available():
    from helpers import FORCE_DEEPSPEED_ON_CPU

    exec(FORCE_DEEPSPEED_ON_CPU)
if crash_after:
    for recipe in (sft, reward, dpo):
        real = recipe.periodic_checkpoint

        def checkpoint_then_crash(acc, cfg, out, done, *args, real=real):
            real(acc, cfg, out, done, *args)
            if done >= crash_after:
                raise SystemExit(3)

        recipe.periodic_checkpoint = checkpoint_then_crash
sys.argv = ["rlhfkit", *sys.argv[4:]]
from rlhfkit.cli import main

main()
"""


def _env() -> dict:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
    }


def launch(tmp: Path, config: str, args: list[str], expect: str = "fsdp", crash_after: int = 0):
    """``accelerate launch --config_file examples/accelerate/<config>.yaml`` of the worker (2 processes)."""
    worker = tmp / "worker.py"
    worker.write_text(WORKER)
    marks = tmp / f"marks-{free_port()}"
    marks.mkdir()
    command = [*accelerate_launch(config), str(worker), str(marks), expect, str(crash_after), *args]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    return done, sorted(p.read_text() for p in marks.iterdir())


def one_process(args: list[str]) -> None:
    """The same command line run in this process (1 process; no launcher to start)."""
    from rlhfkit.config import DPOConfig, RewardConfig, SFTConfig, build_config
    from rlhfkit.recipes.dpo import train_dpo
    from rlhfkit.recipes.reward import train_reward_model
    from rlhfkit.recipes.sft import train_sft

    stage, _, model, _, data, *overrides, _, out = args
    stages = {"sft": (train_sft, SFTConfig), "rm": (train_reward_model, RewardConfig), "dpo": (train_dpo, DPOConfig)}
    train, cls = stages[stage]
    train(build_config(cls, None, overrides, model=model, data=data, out=out), say=lambda *a, **k: None)


def run_args(stage: str, tiny_path: str, data: str, out: Path, *extra: str) -> list[str]:
    common = ["lr=1e-3", "warmup_steps=0", "precision=fp32", "max_length=64", "grad_accum=2", "max_grad_norm=0.05"]
    return [stage, "--model", tiny_path, "--data", data, *common, *extra, "--out", str(out)]


def series(out: Path, key: str) -> list[float]:
    return [m[key] for m in read_metrics(out) if key in m]


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def assert_same_run(a: Path, b: Path, n_steps: int, atol: float = 1e-5, weights_atol: float = 1e-4) -> None:
    """The same losses (within ``atol``), gradient norms (before clipping; clipped at 0.05, so the
    global norm matters) and final weights (``weights_atol``: a tenth of one AdamW step of lr 1e-3;
    AdamW divides by the root of the second moment, which magnifies the float rounding of near-zero
    gradients), and the same key set in model.safetensors (no shard, no duplicate tied head)."""
    la, lb = series(a, "loss"), series(b, "loss")
    assert len(la) == len(lb) == n_steps and max(abs(x - y) for x, y in zip(la, lb)) < atol, (la, lb)
    ga, gb = series(a, "grad_norm"), series(b, "grad_norm")
    assert len(ga) == len(gb) == n_steps and all(x > 0.05 for x in ga), ga  # every step was clipped
    assert all(abs(x - y) <= 1e-4 * x for x, y in zip(ga, gb)), (ga, gb)
    wa, wb = weights(a / "model"), weights(b / "model")
    assert wa.keys() == wb.keys()
    assert all(wa[k].shape == wb[k].shape for k in wa)
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst < weights_atol, worst


@pytest.fixture(scope="module")
def rankings(tmp_path_factory, fixtures) -> str:
    """The 16 HH-RLHF pairs plus 4 rankings of K = 3: 20 prompts."""
    rows = [json.loads(line) for line in (fixtures / "hh_pairs.jsonl").read_text().splitlines() if line.strip()]
    for i in range(4):
        rows.append({"prompt": f"Count to {i}.", "responses": [f"{i}, done.", f"{i}", "no"], "ranks": [0, 1, 2]})
    path = tmp_path_factory.mktemp("data") / "rankings.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_fsdp2_sft_two_processes_equal_one_process(tiny_path, fixtures, tmp_path):
    """SFT: accelerate launch with fsdp2.yaml (2 sharded processes) == 1 process; the saved
    model/ loads in plain transformers and gives the 1-process model's logits."""
    from transformers import AutoModelForCausalLM

    data = str(fixtures / "demos.jsonl")
    extra = ["batch_size=8", "max_steps=4", "eval_fraction=0.1"]
    one_process(run_args("sft", tiny_path, data, tmp_path / "one", *extra))
    two, marks = launch(tmp_path, "fsdp2", run_args("sft", tiny_path, data, tmp_path / "two", *extra))
    assert two.returncode == 0, two.stderr[-3000:]
    assert marks == ["fsdp 2", "fsdp 2"]
    assert_same_run(tmp_path / "one", tmp_path / "two", 4)
    ea, eb = series(tmp_path / "one", "eval_loss"), series(tmp_path / "two", "eval_loss")
    assert len(ea) == len(eb) == 2 and max(abs(x - y) for x, y in zip(ea, eb)) < 1e-5, (ea, eb)

    models = [AutoModelForCausalLM.from_pretrained(str(tmp_path / r / "model")).eval() for r in ("one", "two")]
    ids = torch.randint(100, 2000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = [m(input_ids=ids).logits for m in models]
    assert (logits[0] - logits[1]).abs().max().item() < 1e-4
    assert logits[0].abs().max().item() > 0.1  # not an empty model


def test_fsdp2_reward_model_two_processes_equal_one_process(tiny_path, rankings, tmp_path):
    """The reward model (trunk + score head inside our RewardModel wrapper, K = 2 and 3): the same
    under FSDP2; its model/ is a sequence-classification directory with the same scores and offset."""
    from transformers import AutoModelForSequenceClassification

    extra = ["batch_size=4", "max_steps=3", "eval_fraction=0.2"]
    one_process(run_args("rm", tiny_path, rankings, tmp_path / "one", *extra))
    two, marks = launch(tmp_path, "fsdp2", run_args("rm", tiny_path, rankings, tmp_path / "two", *extra))
    assert two.returncode == 0, two.stderr[-3000:]
    assert marks == ["fsdp 2", "fsdp 2"]
    assert_same_run(tmp_path / "one", tmp_path / "two", 3)
    models = [AutoModelForSequenceClassification.from_pretrained(str(tmp_path / r / "model")) for r in ("one", "two")]
    assert abs(models[0].config.reward_offset - models[1].config.reward_offset) < 1e-5
    ids = torch.randint(100, 2000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        scores = [m.eval()(input_ids=ids).logits for m in models]
    assert (scores[0] - scores[1]).abs().max().item() < 1e-4


def test_fsdp2_dpo_two_processes_equal_one_process(tiny_path, rankings, tmp_path):
    """DPO under FSDP2: the reference log-probs and the held-out pass are computed whole by every
    process (in lockstep), the training pairs split across them: the same as 1 process."""
    extra = ["batch_size=8", "max_steps=3", "eval_fraction=0.25"]
    one_process(run_args("dpo", tiny_path, rankings, tmp_path / "one", *extra))
    two, marks = launch(tmp_path, "fsdp2", run_args("dpo", tiny_path, rankings, tmp_path / "two", *extra))
    assert two.returncode == 0, two.stderr[-3000:]
    assert marks == ["fsdp 2", "fsdp 2"]
    assert_same_run(tmp_path / "one", tmp_path / "two", 3)
    for key in ("rewards/margin", "eval_loss", "eval_rewards/margin"):
        a, b = series(tmp_path / "one", key), series(tmp_path / "two", key)
        assert len(a) == len(b) >= 2 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (key, a, b)


@pytest.mark.slow  # three 2-process launches: ~90 s on 2 busy cores
def test_fsdp2_resume_is_exact(tiny_path, fixtures, tmp_path):
    """2 FSDP2 processes killed after step 3 (checkpoint at 2) and resumed == the uninterrupted run:
    the checkpoint holds whole weights and the whole optimizer state, each process takes its shard."""
    data = str(fixtures / "demos.jsonl")
    extra = ["batch_size=4", "max_steps=4", "eval_fraction=0.0", "save_every=2", "schedule=linear"]
    straight, _ = launch(tmp_path, "fsdp2", run_args("sft", tiny_path, data, tmp_path / "straight", *extra))
    assert straight.returncode == 0, straight.stderr[-3000:]
    args = run_args("sft", tiny_path, data, tmp_path / "resumed", *extra)
    crashed, _ = launch(tmp_path, "fsdp2", args, crash_after=3)
    assert crashed.returncode != 0 and not (tmp_path / "resumed" / "model").exists(), crashed.stderr[-3000:]
    assert (tmp_path / "resumed" / "checkpoints" / "step-000002" / "model" / "model.safetensors").exists()
    state = torch.load(tmp_path / "resumed" / "checkpoints" / "step-000002" / "state.pt", weights_only=False)
    assert state["sharded"] and "model.embed_tokens.weight" in state["optimizer"]["state"]  # whole, by name
    resumed, marks = launch(
        tmp_path, "fsdp2", run_args("sft", tiny_path, data, tmp_path / "resumed", *extra, "resume=true")
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert marks == ["fsdp 2", "fsdp 2"]
    assert_same_run(tmp_path / "straight", tmp_path / "resumed", 4, atol=1e-6, weights_atol=1e-6)
    assert series(tmp_path / "straight", "lr") == series(tmp_path / "resumed", "lr")


def test_shipped_ddp_config_starts_two_processes(tiny_path, fixtures, tmp_path):
    """examples/accelerate/ddp.yaml really starts 2 processes (DDP over gloo here), which train
    as 1 process does."""
    data = str(fixtures / "demos.jsonl")
    extra = ["batch_size=8", "max_steps=2", "eval_fraction=0.0"]
    one_process(run_args("sft", tiny_path, data, tmp_path / "one", *extra))
    two, marks = launch(tmp_path, "ddp", run_args("sft", tiny_path, data, tmp_path / "two", *extra), expect="ddp")
    assert two.returncode == 0, two.stderr[-3000:]
    assert marks == ["ddp 2", "ddp 2"]
    assert_same_run(tmp_path / "one", tmp_path / "two", 2)


def test_ilql_under_fsdp2_is_a_one_line_error(tiny_path, tmp_path):
    """What does not run under FSDP2 yet (ILQL: its heads and their Polyak targets are saved from
    whole weights) stops at once under fsdp2.yaml, in one line that says what works (on each
    process, no traceback from rlhfkit), before anything is written."""
    data = tmp_path / "rankings.jsonl"
    data.write_text('{"prompt": "Hi", "responses": ["a", "b"], "ranks": [0, 1]}\n' * 8)
    done, _ = launch(
        tmp_path, "fsdp2", ["ilql", "--model", tiny_path, "--data", str(data), "--out", str(tmp_path / "q")]
    )
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and "ilql does not run under fsdp" in errors[0] and "ddp.yaml" in errors[0], done.stderr
    assert not (tmp_path / "q").exists()


class _State:
    fsdp_plugin = object()


class _Acc:
    """What ``_check_engine`` reads of an Accelerator: 2 processes under FSDP2 (or ``DEEPSPEED2`` /
    ``DEEPSPEED3``: DeepSpeed of that ZeRO stage)."""

    def __init__(self, kind: str = "FSDP"):
        from types import SimpleNamespace

        from accelerate.utils import DistributedType

        stage = int(kind[-1]) if kind.startswith("DEEPSPEED") else None
        self.distributed_type, self.num_processes = DistributedType[kind.rstrip("23")], 2
        self.device, self.state = torch.device("cpu"), _State()
        if stage:
            self.state.deepspeed_plugin = SimpleNamespace(zero3_init_flag=True, zero_stage=stage)


@pytest.mark.parametrize(
    "env, cfg, acc_kind, expected",
    [
        ({"FSDP_VERSION": "2"}, {"lora": True}, "FSDP", "lora=true with fsdp: not supported"),
        ({"FSDP_VERSION": "1"}, {}, "FSDP", "FSDP version 1 is not supported"),
        ({"FSDP_VERSION": "2"}, {"kind": "ilql"}, "FSDP", "ilql does not run under fsdp yet"),
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, {}, "MULTI_CPU", "DeepSpeed runs only on CUDA GPUs"),
    ],
)
def test_engine_refusals_say_what_works(env, cfg, acc_kind, expected, monkeypatch):
    from rlhfkit.config import ILQLConfig, RLOOConfig, SFTConfig
    from rlhfkit.errors import UserError
    from rlhfkit.recipes.engines import _check_engine

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true" if "FSDP_VERSION" in env else "false")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    kind = cfg.pop("kind", None)
    kinds = {"rloo": RLOOConfig, "ilql": ILQLConfig}
    config = kinds[kind](model="m") if kind else SFTConfig(model="m", **cfg)
    with pytest.raises(UserError, match=expected):
        _check_engine(_Acc(acc_kind), config)


def test_a_batch_that_does_not_split_evenly_is_refused_under_fsdp():
    from rlhfkit.config import SFTConfig
    from rlhfkit.errors import UserError
    from rlhfkit.recipes.engines import check_batch

    with pytest.raises(UserError, match="batch_size=5: under fsdp it must be a multiple of the 2 processes"):
        check_batch(_Acc(), SFTConfig(batch_size=5), 100)
    check_batch(_Acc(), SFTConfig(batch_size=6), 100)
    check_batch(_Acc("MULTI_CPU"), SFTConfig(batch_size=5), 100)  # DDP: uneven shares are fine


@pytest.mark.parametrize("config", ["deepspeed_zero2", "deepspeed_zero3"])
def test_deepspeed_two_processes_equal_one_process(config, tiny_path, fixtures, tmp_path):
    """DeepSpeed ZeRO-2/3 with 2 processes == 1 process (SFT, grad_accum 2, clipped): on GPUs as
    accelerate starts it; on CPUs with DeepSpeed's CPU accelerator, the worker making accelerate's
    state say DEEPSPEED (accelerate refuses it on CPUs; rlhfkit itself says so in one line)."""
    pytest.importorskip("deepspeed")
    data = str(fixtures / "demos.jsonl")
    extra = ["batch_size=8", "max_steps=3", "eval_fraction=0.1"]
    one_process(run_args("sft", tiny_path, data, tmp_path / "one", *extra))
    two, marks = launch(tmp_path, config, run_args("sft", tiny_path, data, tmp_path / "two", *extra), "deepspeed")
    assert two.returncode == 0, two.stderr[-3000:]
    assert marks == ["deepspeed 2", "deepspeed 2"]
    assert_same_run(tmp_path / "one", tmp_path / "two", 3)


@pytest.mark.gpu
def test_fsdp2_bf16_on_two_gpus(tiny_path, fixtures, tmp_path):
    """FSDP2 over NCCL with bf16 mixed precision (GPUs only; untested where this was written)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    data = str(fixtures / "demos.jsonl")
    extra = ["batch_size=8", "max_steps=3", "eval_fraction=0.1", "precision=bf16"]
    args = [a for a in run_args("sft", tiny_path, data, tmp_path / "two", *extra) if a != "precision=fp32"]
    two, marks = launch(tmp_path, "fsdp2", args)
    assert two.returncode == 0, two.stderr[-3000:]
    assert marks == ["fsdp 2", "fsdp 2"]
    losses = series(tmp_path / "two", "loss")
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert (tmp_path / "two" / "model" / "model.safetensors").exists()
