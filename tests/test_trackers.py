"""report_to: every training stage feeds accelerate's trackers the numbers of metrics.jsonl.

Each tracker's files are read back with its own reader (TensorBoard's EventAccumulator, the
W&B offline run's transaction log, MLflow's client on the run's SQLite store) and must hold
exactly metrics.jsonl's numeric keys, at the same steps, with the same values.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from helpers import Crash, crash_after

from rlhfkit.config import PPOConfig, PretrainConfig, RewardConfig, SFTConfig
from rlhfkit.errors import UserError
from rlhfkit.recipes.common import MetricsLog, hyperparameters, read_metrics, report_to_trackers

Series = dict[str, list[tuple[int, float]]]  # metric name -> [(step, value), ...] in logging order


@pytest.fixture(autouse=True)
def wandb_offline(tmp_path, monkeypatch):
    """W&B without an account or network: offline runs, its own files kept in tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def demos(fixtures) -> str:
    return str(fixtures / "demos.jsonl")


def logged(out: Path) -> Series:
    """What metrics.jsonl says the trackers must hold: its numeric values, by name."""
    series: Series = {}
    for row in read_metrics(out):
        for k, v in row.items():
            if k not in ("step", "time") and isinstance(v, (int, float)):
                series.setdefault(k, []).append((row["step"], float(v)))
    return series


def tensorboard_series(out: Path) -> Series:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard" / "rlhfkit"))  # purge_orphaned_data: on, as in TensorBoard
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_records(run_file: Path):
    """The protobuf records of a W&B run file (LevelDB's log format: 32 KiB blocks of records with
    a 7-byte header: crc32, length, type FULL=1 FIRST=2 MIDDLE=3 LAST=4; the file starts with
    ':W&B', magic, version). wandb >= 0.2x reads these only in its Go core, so we read them here."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, part = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's zero trailer
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        part += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(part)
            part = b""
            yield record


def wandb_run(out: Path) -> tuple[Series, dict]:
    """History by name (W&B merges the metrics of one step into one row) and the run's config."""
    (run_file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    series: Series = {}
    config: dict = {}
    for r in wandb_records(run_file):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for k, v in row.items():
                if not k.startswith("_"):
                    series.setdefault(k, []).append((row["_step"], float(v)))
        elif kind == "config":
            config |= {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in r.config.update}
    return series, config


def mlflow_run(out: Path) -> tuple[Series, dict]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve() / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("rlhfkit").experiment_id])
    series = {k: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)] for k in run.data.metrics}
    return series, run.data.params


def assert_same(got: Series, want: Series, merged_steps: bool = False) -> None:
    """Same names, steps and values (TensorBoard stores float32: relative 1e-6)."""
    if merged_steps:  # W&B keeps one value per name and step: the last one
        want = {k: list(dict(v).items()) for k, v in want.items()}
    assert sorted(got) == sorted(want)
    for k in want:
        assert [s for s, _ in got[k]] == [s for s, _ in want[k]], k
        assert [v for _, v in got[k]] == pytest.approx([v for _, v in want[k]], rel=1e-6, abs=1e-7), k


def sft_cfg(tiny_path, demos, out, **kw) -> SFTConfig:
    base = dict(
        model=tiny_path,
        data=demos,
        out=str(out),
        batch_size=4,
        max_steps=4,
        lr=1e-3,
        warmup_steps=1,
        precision="fp32",
        max_length=96,
        eval_fraction=0.2,
        eval_every=2,
    )
    return SFTConfig(**(base | kw))


def test_sft_tensorboard_holds_the_metrics_and_resume_continues_its_steps(tiny_path, demos, tmp_path, monkeypatch):
    """TensorBoard's scalars are metrics.jsonl's; a run killed after step 3 and resumed from its
    step-2 checkpoint shows steps 0..4 once each (the killed run's step 3 hidden by purge_step)."""
    from rlhfkit.recipes import sft
    from rlhfkit.recipes.sft import train_sft

    train_sft(sft_cfg(tiny_path, demos, tmp_path / "sft", report_to="tensorboard"), say=lambda *a: None)
    want = logged(tmp_path / "sft")
    assert {"loss", "lr", "tokens", "grad_norm", "eval_loss"} <= set(want) and want["eval_loss"][0][0] == 0
    assert_same(tensorboard_series(tmp_path / "sft"), want)

    out = tmp_path / "resumed"
    with monkeypatch.context() as patch, pytest.raises(Crash):
        crash_after(patch, sft, 3)
        train_sft(sft_cfg(tiny_path, demos, out, report_to="tensorboard", save_every=2), say=lambda *a: None)
    train_sft(sft_cfg(tiny_path, demos, out, report_to="tensorboard", save_every=2, resume=True), say=lambda *a: None)
    assert [s for s, _ in logged(out)["loss"]] == [1, 2, 3, 4]
    assert_same(tensorboard_series(out), logged(out))


def test_rm_wandb_offline_run_holds_the_metrics_and_config(tiny_path, fixtures, tmp_path):
    from rlhfkit.recipes.reward import train_reward_model

    out = tmp_path / "rm"
    cfg = RewardConfig(
        model=tiny_path,
        data=str(fixtures / "hh_pairs.jsonl"),
        out=str(out),
        batch_size=4,
        max_steps=3,
        lr=1e-3,
        warmup_steps=0,
        precision="fp32",
        max_length=96,
        eval_fraction=0.25,
        report_to="wandb",
    )
    train_reward_model(cfg, say=lambda *a: None)
    series, config = wandb_run(out)
    want = logged(out)
    assert {"loss", "accuracy", "eval_accuracy", "reward_offset"} <= set(want)
    assert_same(series, want, merged_steps=True)
    assert config["lr"] == 1e-3 and config["report_to"] == "wandb" and config["lora_targets"] == '["all-linear"]'


def test_pretrain_mlflow_run_holds_the_metrics_and_params(tiny_path, tmp_path):
    from rlhfkit.recipes.pretrain import train_pretrain

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "pt"
    cfg = PretrainConfig(
        model=tiny_path,
        data=str(corpus),
        out=str(out),
        batch_size=2,
        max_steps=3,
        max_length=32,
        precision="fp32",
        report_to="mlflow",
    )
    train_pretrain(cfg, say=lambda *a: None)
    series, params = mlflow_run(out)
    assert_same(series, logged(out))
    assert params["max_length"] == "32" and params["report_to"] == "mlflow"
    assert not (Path.cwd() / "mlruns").exists() and not (Path.cwd() / "mlflow.db").exists()


def test_ppo_report_to_all_feeds_every_installed_tracker(tiny_path, tmp_path):
    from rlhfkit.recipes.ppo import train_ppo

    out = tmp_path / "ppo"
    cfg = PPOConfig(
        model=tiny_path,
        critic_model=tiny_path,
        out=str(out),
        batch_size=4,
        max_new_tokens=4,
        max_steps=2,
        precision="fp32",
        missing_eos_penalty=None,
        limit=8,
        report_to="all",
    )
    train_ppo(
        cfg, reward_fn=lambda prompts, responses, finished: [r.count(" ") / 4 for r in responses], say=lambda *a: None
    )
    want = logged(out)
    assert {"score", "kl", "entropy"} <= set(want) and len(want["score"]) == 2
    assert_same(tensorboard_series(out), want)
    assert_same(wandb_run(out)[0], want, merged_steps=True)
    assert_same(mlflow_run(out)[0], want)


def test_report_to_none_writes_only_metrics_jsonl(tiny_path, demos, tmp_path):
    from rlhfkit.recipes.sft import train_sft

    assert SFTConfig().report_to == "none"
    out = tmp_path / "plain"
    train_sft(sft_cfg(tiny_path, demos, out, max_steps=1), say=lambda *a: None)
    assert logged(out)["loss"] and not {"tensorboard", "wandb", "mlflow.db"} & {p.name for p in out.iterdir()}


def test_a_missing_tracker_stops_the_stage_before_the_model_loads(tiny_path, demos, tmp_path, monkeypatch):
    import importlib.util

    from rlhfkit.recipes import sft

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    monkeypatch.setattr(sft, "load_causal_lm", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(UserError, match=r"report_to=wandb needs the wandb package: pip install wandb"):
        sft.train_sft(sft_cfg(tiny_path, demos, tmp_path / "x", report_to="tensorboard,wandb"))
    assert not (tmp_path / "x").exists()
    with pytest.raises(UserError, match="expected none, all, or a comma list of tensorboard, wandb, mlflow"):
        report_to_trackers("comet")
    assert report_to_trackers("all") == ["tensorboard", "mlflow"]  # what is installed
    assert report_to_trackers(" TensorBoard, mlflow ,tensorboard") == ["tensorboard", "mlflow"]
    assert report_to_trackers("none") == report_to_trackers("") == []


def test_only_the_main_process_logs(tmp_path):
    class OtherRank:
        is_main_process = False
        log_with = ["tensorboard"]
        trackers: list = []

        def init_trackers(self, *a, **k):
            pytest.fail("a non-main process started a tracker")

        def log(self, *a, **k):
            pytest.fail("a non-main process logged")

    log = MetricsLog(tmp_path, OtherRank(), SFTConfig(report_to="tensorboard"))
    log.log(1, loss=1.0)
    log.close()
    assert not list(tmp_path.iterdir())


def test_hyperparameters_are_flat_scalars():
    hp = hyperparameters(SFTConfig(fields={"prompt": "q", "response": "a"}, lora_targets=["q_proj"]))
    assert hp["fields.prompt"] == "q" and hp["fields.response"] == "a" and hp["lora_targets"] == '["q_proj"]'
    assert hp["lr"] == SFTConfig().lr and hp["lora"] is False
    assert all(isinstance(v, (bool, int, float, str)) for v in hp.values())
    assert hyperparameters(SFTConfig())["fields"] == "{}"
