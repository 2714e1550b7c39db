"""The command line: every field in --help, one-line errors with exit code 2, no tracebacks."""

from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner

from rlhfkit.cli import app
from rlhfkit.config import STAGES, build_config

runner = CliRunner()


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_help_lists_every_field_with_its_help(stage):
    result = runner.invoke(app, [stage, "--help"], terminal_width=200)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for f in dataclasses.fields(STAGES[stage]):
        assert "--" + f.name.replace("_", "-") in text, f.name
        first_words = " ".join(f.metadata["help"].split()[:4])
        assert first_words in text, (f.name, first_words)


def _error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert lines, result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_unknown_override_suggests_the_right_name(tmp_path):
    result = runner.invoke(app, ["sft", "--data", "x.jsonl", "--out", str(tmp_path / "o"), "learning_rat=1e-5"])
    assert result.exit_code == 2
    assert "unknown setting 'learning_rat'" in _error_line(result)


def test_wrong_type_override(tmp_path):
    result = runner.invoke(app, ["rm", "--out", str(tmp_path / "o"), "batch_size=eight"])
    assert result.exit_code == 2
    assert "batch_size expects int" in _error_line(result)


def test_bad_yaml_preset_names_file_and_line(tmp_path):
    preset = tmp_path / "bad.yaml"
    preset.write_text("lr: 1e-5\nepochs: [1\n")
    result = runner.invoke(app, ["sft", "--config", str(preset), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    line = _error_line(result)
    assert str(preset) in line and "not valid YAML" in line


def test_missing_data_file(tmp_path, tiny_path):
    result = runner.invoke(app, ["sft", "--model", tiny_path, "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "nope.jsonl" in _error_line(result)


def test_malformed_record_names_file_line_and_field(tmp_path, tiny_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b"}) + "\n"
                    + json.dumps({"prompt": "hi", "chosen": None, "rejected": "b"}) + "\n")
    result = runner.invoke(app, ["rm", "--model", tiny_path, "--data", str(data), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    line = _error_line(result)
    assert f"{data}:2" in line and "chosen" in line


def test_unknown_model_spec(tmp_path, fixtures):
    result = runner.invoke(app, ["sft", "--model", "no-such-model", "--data", str(fixtures / "demos.jsonl"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "--model no-such-model" in _error_line(result)


def test_existing_run_is_not_overwritten(tmp_path, tiny_path):
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "model" / "config.json").write_text("{}")
    result = runner.invoke(app, ["sft", "--model", tiny_path, "--data", "x.jsonl", "--out", str(out)])
    assert result.exit_code == 2
    assert "already holds a run" in _error_line(result)


def test_resume_without_checkpoint(tmp_path, tiny_path):
    result = runner.invoke(app, ["sft", "--model", tiny_path, "--data", "x.jsonl", "--out", str(tmp_path / "o"), "resume=true"])
    assert result.exit_code == 2
    assert "no checkpoint" in _error_line(result)


def test_bundled_presets_load():
    from rlhfkit.config import PipelineConfig, RewardConfig

    quick = build_config(PipelineConfig, "pipeline-quick")
    assert quick.train_prompts == 16 and quick.ppo_iterations == 3
    rm = build_config(RewardConfig, "rm-hh", ["lr=2e-5"])
    assert rm.epochs == 1.0 and rm.lr == 2e-5 and rm.max_length == 512
