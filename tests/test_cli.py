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
    result = runner.invoke(
        app, ["sft", "--model", tiny_path, "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2
    assert "nope.jsonl" in _error_line(result)


def test_malformed_record_names_file_line_and_field(tmp_path, tiny_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b"})
        + "\n"
        + json.dumps({"prompt": "hi", "chosen": None, "rejected": "b"})
        + "\n"
    )
    result = runner.invoke(app, ["rm", "--model", tiny_path, "--data", str(data), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    line = _error_line(result)
    assert f"{data}:2" in line and "chosen" in line


def test_unknown_model_spec(tmp_path, fixtures):
    result = runner.invoke(
        app, ["sft", "--model", "no-such-model", "--data", str(fixtures / "demos.jsonl"), "--out", str(tmp_path / "o")]
    )
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
    result = runner.invoke(
        app, ["sft", "--model", tiny_path, "--data", "x.jsonl", "--out", str(tmp_path / "o"), "resume=true"]
    )
    assert result.exit_code == 2
    assert "no checkpoint" in _error_line(result)


def test_bundled_presets_load():
    from rlhfkit.config import PipelineConfig, RewardConfig

    quick = build_config(PipelineConfig, "pipeline-quick")  # extends: demo
    assert quick.train_prompts == 16 and quick.ppo.max_steps == 3 and quick.sft.epochs == 1
    assert quick.sft.lr == 1e-4 and quick.ppo.critic == "policy_head"  # from the demo preset
    rm = build_config(RewardConfig, "rm-hh", ["lr=2e-5"])
    assert rm.epochs == 1.0 and rm.lr == 2e-5 and rm.max_length == 512


def test_the_demo_preset_is_the_recipe_of_the_main_job():
    """`rlhfkit demo` = the pipeline with presets/demo.yaml over each stage's own defaults."""
    from rlhfkit.config import PipelineConfig, PPOConfig, SFTConfig

    demo = build_config(PipelineConfig, "demo")
    assert (demo.sft.lr, demo.sft.epochs, demo.sft.grad_accum, demo.sft.max_length) == (1e-4, 3.0, 4, 384)
    assert (demo.rm.batch_size, demo.rm.eval_fraction, demo.rm.warmup_steps) == (8, 0.15, 2)
    assert (demo.ppo.max_steps, demo.ppo.batch_size, demo.ppo.samples_per_prompt, demo.ppo.lam) == (40, 4, 4, 1.0)
    assert (demo.ppo.critic, demo.ppo.score_baseline, demo.ppo.max_new_tokens) == ("policy_head", "group", 128)
    plain = PipelineConfig()  # without the preset: each stage's one set of defaults
    assert plain.sft == SFTConfig() and plain.ppo == PPOConfig()


def test_nested_stage_settings_on_the_command_line_and_in_yaml(tmp_path):
    from rlhfkit.config import PipelineConfig

    preset = tmp_path / "p.yaml"
    preset.write_text("extends: demo\nk: 4\nsft:\n  lr: 3.0e-5\nppo:\n  compile: off\n")
    cfg = build_config(PipelineConfig, str(preset), ["ppo.kl_coef=0.02", "rm.epochs=2"], seed=3)
    assert (cfg.k, cfg.seed, cfg.sft.lr, cfg.sft.epochs) == (4, 3, 3e-5, 3.0)  # sft.epochs from demo.yaml
    assert (cfg.ppo.kl_coef, cfg.ppo.compile, cfg.ppo.critic, cfg.rm.epochs) == (0.02, "off", "policy_head", 2.0)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("ppo.critic=value_net", "critic expects one of rm, policy_head, got 'value_net'"),
        ("sft.schedule=cosin", "schedule expects one of cosine, linear, constant"),
        ("labeler=robot", "labeler expects one of simulated, gold, human, mix"),
        ("sft.lrr=1e-4", "unknown setting 'lrr' (did you mean lr?)"),
        ("sft.model=other", "the pipeline sets each stage's model itself"),
        ("ppo.reward_model=x", "the pipeline sets each stage's reward_model itself"),
        ("sft=1", "'sft' is a group of settings"),
        ("k.x=1", "'k' is a single setting"),
    ],
)
def test_bad_pipeline_settings_are_one_line_errors(override, message, tmp_path):
    result = runner.invoke(app, ["pipeline", "--out", str(tmp_path / "o"), override])
    assert result.exit_code == 2
    assert message in _error_line(result)


def test_literal_fields_are_checked_when_a_config_is_built():
    from rlhfkit.config import PPOConfig, ServeConfig, SFTConfig
    from rlhfkit.errors import UserError

    for make in (
        lambda: PPOConfig(score_baseline="mean"),
        lambda: SFTConfig(precision="fp16"),
        lambda: ServeConfig(precision="half"),
    ):
        with pytest.raises(UserError, match="expected one of"):
            make()


def test_serve_options_come_from_its_config(monkeypatch):
    """`rlhfkit serve` is generated from ServeConfig: every field an option, --model repeatable."""
    from rlhfkit.config import ServeConfig

    result = runner.invoke(app, ["serve", "--help"], terminal_width=200)
    text = " ".join(result.output.split())
    for f in dataclasses.fields(ServeConfig):
        assert (f.metadata.get("flag") or "--" + f.name.replace("_", "-")) in text, f.name
    got = []
    monkeypatch.setattr("rlhfkit.web.app.serve", got.append)
    result = runner.invoke(app, ["serve", "--port", "9001", "--model", "a=x", "--model", "b=y", "rate_limit=5"])
    assert result.exit_code == 0, result.output
    assert got == [ServeConfig(port=9001, models=["a=x", "b=y"], rate_limit=5.0)]


def test_the_second_family_preset_is_the_demo_on_qwen3():
    from rlhfkit.config import PipelineConfig

    qwen, demo = build_config(PipelineConfig, "pipeline-qwen"), build_config(PipelineConfig, "demo")
    assert qwen.model == "Qwen/Qwen3-0.6B" and qwen.sft.lr == 2e-5 and qwen.ppo.lr == 3e-6
    assert dataclasses.replace(qwen, model=demo.model, sft=demo.sft, ppo=demo.ppo) == demo


def test_the_gpu_preset_loads_and_says_its_numbers_are_estimates():
    """presets/pipeline-gpu.yaml: the demo scaled up for one CUDA GPU (a 0.5B hub model, vLLM
    rollouts, bf16, a critic from the RM); its per-stage times and memory are marked as estimates
    until a GPU run measures them (docs/gpu.md)."""
    from pathlib import Path

    from rlhfkit.config import PipelineConfig, build_config

    gpu, demo = build_config(PipelineConfig, "pipeline-gpu"), build_config(PipelineConfig, "demo")
    assert (gpu.model, gpu.precision, gpu.rollout_backend) == ("Qwen/Qwen2.5-0.5B-Instruct", "bf16", "vllm")
    assert gpu.ppo.critic == "rm" and gpu.k > demo.k and gpu.max_new_tokens > demo.max_new_tokens
    assert gpu.ppo.batch_size * gpu.ppo.samples_per_prompt > demo.ppo.batch_size * demo.ppo.samples_per_prompt
    assert gpu.sft.max_length > demo.sft.max_length and gpu.rm.max_length > demo.rm.max_length
    text = (Path(__file__).resolve().parents[1] / "rlhfkit" / "presets" / "pipeline-gpu.yaml").read_text()
    assert "ESTIMATE" in text and "NOTHING HAS RUN ON A GPU YET" in text
    for stage in ("sft", "rm", "ppo"):
        assert any(line.lstrip("# ").startswith(stage) and "GB" in line for line in text.splitlines()), stage
