"""The main job's loop on tiny-random: every stage runs, writes its files, and is not redone."""

import dataclasses
import json
import math

import pytest
import torch

from rlhfkit.config import PipelineConfig, build_config
from rlhfkit.errors import UserError
from rlhfkit.recipes.pipeline import run_pipeline


def demo_config(sft: dict | None = None, rm: dict | None = None, ppo: dict | None = None, **top) -> PipelineConfig:
    """The demo's recipe (presets/demo.yaml) with these settings changed: the main job, made small."""
    cfg = build_config(PipelineConfig, "demo")
    return dataclasses.replace(
        cfg,
        sft=dataclasses.replace(cfg.sft, **(sft or {})),
        rm=dataclasses.replace(cfg.rm, **(rm or {})),
        ppo=dataclasses.replace(cfg.ppo, **(ppo or {})),
        **top,
    )


def test_pipeline_end_to_end_on_tiny(tiny_path, tmp_path, fixtures):
    cfg = demo_config(
        model=tiny_path,
        out=str(tmp_path / "run"),
        train_prompts=8,
        eval_prompts=4,
        k=3,
        max_new_tokens=12,
        precision="fp32",
        min_demo_score=-2.0,
        rounds=1,
        round_prompts=4,
        rank_sft=True,
        revise_demos=True,
        rank_revisions=True,
        eval_suites="truthful,tax",
        eval_data_dir=str(fixtures / "evals"),
        eval_limit=3,
        sft={"batch_size": 4},
        ppo={"max_steps": 1, "batch_size": 2, "max_new_tokens": 12},
    )
    summary = run_pipeline(cfg)
    run = tmp_path / "run"
    samples = [json.loads(x) for x in (run / "round0" / "samples.jsonl").read_text().splitlines()]
    rankings = [json.loads(x) for x in (run / "round0" / "rankings.jsonl").read_text().splitlines()]
    assert len(samples) == len(rankings) == 8
    assert all(len(s["responses"]) == 3 for s in samples)
    assert all(sorted(set(r["ranks"]))[0] == 0 for r in rankings)
    # rank_revisions: the labeler ranked the 3 samples plus rule-revised versions of them (<= 9 in all)
    for s, r in zip(samples, rankings):
        assert r["responses"][:3] == s["responses"] and 3 <= len(r["responses"]) <= 9
        assert r["meta"]["revised_from"][:3] == [None] * 3 and all(i in range(3) for i in r["meta"]["revised_from"][3:])
    assert any(len(r["responses"]) > 3 for r in rankings)  # tiny-random's answers miss case, commas, phrases
    assert summary["demonstrations"] == 8  # every prompt's best answer passes min_demo_score=-2
    demos = [json.loads(x) for x in (run / "round0" / "demos.jsonl").read_text().splitlines()]
    assert all(d["gold"] >= d["gold_before"] and "original" in d for d in demos)  # revised by rule, never worse
    # round 1: K fresh answers of the SFT model on 4 new prompts, ranked; the RM learns from all 12 rankings
    fresh = [json.loads(x) for x in (run / "round1" / "rankings.jsonl").read_text().splitlines()]
    assert len(fresh) == 4 and not {r["prompt"] for r in fresh} & {r["prompt"] for r in rankings}
    # rank_edit_sets: per prompt at most one more ranking, of an answer and its single-instruction edits
    edit_sets = [
        json.loads(x) for r in (0, 1) for x in (run / f"round{r}" / "edit_rankings.jsonl").read_text().splitlines()
    ]
    assert len(edit_sets) <= 12 and all(e["meta"]["edit_set"] and 2 <= len(e["responses"]) <= 9 for e in edit_sets)
    assert summary["rm_accuracy"][0]["rankings"] == 12 + len(edit_sets)
    gold = summary["rm_accuracy"][0]["gold_after"]  # the simulated labeler's gold scores reach the RM's eval
    assert gold is None or 0.0 <= gold <= 1.0
    for d in ("sft", "round1/rm", "round1/ppo"):
        assert (run / d / "model" / "config.json").exists()
    assert set(summary["versions"]) == {"base", "sft", "ppo1"} and summary["final"] == "ppo1"
    assert 0.0 <= summary["sft_vs_base"]["win_rate"] <= 1.0
    assert summary["ratings"]["sft"]["bt"] == 1000.0  # anchored
    assert len(summary["training"]["ppo1"]) == 1 and "kl" in summary["training"]["ppo1"][0]
    # PPO got the pipeline's settings: 4 samples per prompt, centred on the prompt's others, GAE lambda 1
    import yaml

    ppo_cfg = yaml.safe_load((run / "round1" / "ppo" / "config.yaml").read_text())
    assert (ppo_cfg["samples_per_prompt"], ppo_cfg["score_baseline"], ppo_cfg["lam"], ppo_cfg["batch_size"]) == (
        4,
        "group",
        1.0,
        2,
    )
    # the proxy beside the gold: round 1's RM on each version's held-out answers
    from rlhfkit.evals.helpful import hf_reward_fn
    from rlhfkit.tasks import load_task

    sft_rows = [json.loads(x) for x in (run / "eval" / "sft.jsonl").read_text().splitlines()]
    want = hf_reward_fn(str(run / "round1" / "rm" / "model"))(
        [p.messages for p in load_task("eval")[:4]], [r["responses"][0] for r in sft_rows]
    )
    assert summary["versions"]["sft"]["rm_mean"] == pytest.approx(sum(want) / 4, abs=1e-4)
    assert all(v["rm_round"] == 1 and math.isfinite(v["rm_mean"]) for v in summary["versions"].values())
    page = (run / "report.html").read_text()
    assert page.count("<img") >= 2 and "ppo1" in page and "against the gold rubric" in page
    assert "newest RM&#x27;s score" in page or "newest RM's score" in page
    # the eval suites ran on every version with SFT as the baseline, and the report shows them
    suites = json.loads((run / "eval" / "suites.json").read_text())
    assert suites["versions"] == ["sft", "base", "ppo1"] and suites["baseline"] == "sft"
    assert suites["models"]["ppo1"]["truthful"]["mc"]["n"] == 3
    assert set(suites["alignment_tax"]) == {"base", "ppo1"}
    metrics = {r["metric"] for r in summary["eval_suites"]["rows"]}
    assert any("MC1" in m for m in metrics) and any("erplexity" in m for m in metrics)
    assert "Eval suites" in page and (run / "eval" / "suites.html").exists()
    # run again: nothing is recomputed (samples and models stay as they were)
    mtime = (run / "sft" / "model" / "model.safetensors").stat().st_mtime
    run_pipeline(cfg)
    assert (run / "sft" / "model" / "model.safetensors").stat().st_mtime == mtime


def test_pipeline_rejects_bad_eval_suites_before_training(tiny_path, tmp_path):
    import pytest

    from rlhfkit.errors import UserError

    with pytest.raises(UserError, match="unknown fluency"):
        run_pipeline(
            PipelineConfig(
                model=tiny_path, out=str(tmp_path / "a"), eval_suites="truthful,fluency", eval_data_dir=str(tmp_path)
            )
        )
    with pytest.raises(UserError, match="eval_data_dir=.*none: no such directory"):
        run_pipeline(
            PipelineConfig(
                model=tiny_path, out=str(tmp_path / "b"), eval_suites="truthful", eval_data_dir=str(tmp_path / "none")
            )
        )
    assert not (tmp_path / "b" / "round0").exists()


def test_a_stage_in_a_child_process_trains_the_same_model_and_reports_errors(tiny_path, tmp_path):
    from safetensors.torch import load_file

    from rlhfkit.config import SFTConfig
    from rlhfkit.errors import UserError
    from rlhfkit.recipes.pipeline import run_stage
    from rlhfkit.recipes.sft import train_sft

    data = tmp_path / "demos.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"Say {w}.", "response": f"{w} {w} {w}."}) + "\n"
            for w in ("red", "blue", "green", "gold", "gray", "pink")
        )
    )
    weights = {}
    for fresh in (True, False):
        out = tmp_path / f"sft_{fresh}"
        res = run_stage(
            PipelineConfig(fresh_process=fresh),
            train_sft,
            SFTConfig(model=tiny_path, data=str(data), out=str(out), epochs=2, batch_size=2, lr=1e-3, precision="fp32"),
        )
        assert res["step"] > 0 and math.isfinite(res["loss"])
        weights[fresh] = load_file(str(out / "model" / "model.safetensors"))
    assert weights[True].keys() == weights[False].keys()
    assert all((weights[True][k] == weights[False][k]).all() for k in weights[True])  # seeded: bit for bit
    # a user's error inside the child reaches the parent as the same one-line error
    with pytest.raises(UserError, match="missing.jsonl"):
        run_stage(
            PipelineConfig(),
            train_sft,
            SFTConfig(model=tiny_path, data=str(tmp_path / "missing.jsonl"), out=str(tmp_path / "x")),
        )


CRASH = """
import os, signal, sys
from pathlib import Path

import rlhfkit.recipes.common as common
import rlhfkit.recipes.ppo_saving as ppo_saving
from rlhfkit.config import PipelineConfig
from rlhfkit.recipes.pipeline import run_pipeline

stage, at = sys.argv[2], int(sys.argv[3])
save = common.save_checkpoint


def save_then_die(out, step, *args, **kw):  # a real SIGKILL right after the checkpoint of `step`
    path = save(out, step, *args, **kw)
    if Path(out).name == stage and step == at:
        os.kill(os.getpid(), signal.SIGKILL)
    return path


common.save_checkpoint = ppo_saving.save_checkpoint = save_then_die
run_pipeline(PipelineConfig(**__import__("json").loads(sys.argv[1])))
"""


def test_a_killed_pipeline_resumes_each_stage_from_its_checkpoint(tiny_path, tmp_path):
    """SIGKILL the main job in the middle of SFT, then of the RM, then of PPO; each rerun continues
    the stage from its last checkpoint, and the final models are bit for bit an uninterrupted run's."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    settings = dataclasses.asdict(
        demo_config(
            model=tiny_path,
            train_prompts=8,
            eval_prompts=3,
            k=3,
            max_new_tokens=10,
            precision="fp32",
            min_demo_score=-2.0,
            round_prompts=4,
            save_every=1,
            fresh_process=False,
            sft={"batch_size": 4},
            rm={"batch_size": 4},
            ppo={"max_steps": 4, "batch_size": 2, "max_new_tokens": 10},
        )
    )
    from rlhfkit.recipes.common import read_metrics

    def assert_continued(stage_dir, at, before):
        """The steps up to the checkpoint were not redone: their metrics lines, timestamps
        included, are those the killed run wrote."""
        assert before and [m for m in read_metrics(stage_dir) if m["step"] <= at] == before

    whole = run_pipeline(PipelineConfig(**{**settings, "out": str(tmp_path / "whole")}))
    run = tmp_path / "killed"
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    resumed = None  # the stage the previous kill interrupted, and its checkpoint
    for stage, at in (("sft", 2), ("rm", 1), ("ppo", 2)):
        proc = subprocess.run(
            [sys.executable, str(script), json.dumps({**settings, "out": str(run)}), stage, str(at)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == -9, proc.stderr[-2000:]  # killed, as planned, mid-stage
        stage_dir = run / ("sft" if stage == "sft" else f"round1/{stage}")
        assert (stage_dir / "checkpoints" / f"step-{at:06d}").is_dir() and not (stage_dir / "model").exists()
        if resumed:
            assert f"{resumed[0]}: resuming from step-{resumed[1]:06d}" in proc.stdout
            assert_continued(*resumed)
        resumed = (stage_dir, at, [m for m in read_metrics(stage_dir) if m["step"] <= at])
    said = []
    summary = run_pipeline(PipelineConfig(**{**settings, "out": str(run)}), say=said.append)
    assert f"{run / 'round1' / 'ppo'}: resuming from step-000002" in said
    assert_continued(*resumed)
    for d in ("sft", "round1/rm", "round1/ppo"):
        a, b = (
            load_file(str(tmp_path / "whole" / d / "model" / "model.safetensors")),
            load_file(str(run / d / "model" / "model.safetensors")),
        )
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), d
        assert not (run / d / "checkpoints").exists()  # a finished stage keeps only its model
    assert summary["versions"] == whole["versions"]
    # the resumed stages' metrics logs hold each step once, as the uninterrupted run's do
    for d in ("sft", "round1/rm", "round1/ppo"):
        steps = [[m["step"] for m in read_metrics(where / d)] for where in (run, tmp_path / "whole")]
        assert steps[0] == steps[1], d


def _lines(path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _children(pid: int) -> list[int]:
    from pathlib import Path

    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            pass
    return kids


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_stage_child_dies_with_the_pipeline(tiny_path, tmp_path, fixtures):
    """SIGKILL the pipeline's process while a stage trains in its child: the child dies too, so
    running the command again never races an orphan writing the same directory."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "sft"
    script = (
        f"from rlhfkit.config import PipelineConfig, SFTConfig\n"
        f"from rlhfkit.recipes.pipeline import run_stage\nfrom rlhfkit.recipes.sft import train_sft\n"
        f"run_stage(PipelineConfig(), train_sft, SFTConfig(model={tiny_path!r}, "
        f"data={str(fixtures / 'demos.jsonl')!r}, "
        f"out={str(out)!r}, max_steps=100000, batch_size=2, precision='fp32'))\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while _lines(out / "metrics.jsonl") < 3:  # training in the child
            assert parent.poll() is None and time.monotonic() < deadline, "the stage did not start training"
            time.sleep(0.2)
        kids = _children(parent.pid)
        assert kids  # the stage runs in a child process
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 30
    while any(_alive(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.2)
    orphans = [k for k in kids if _alive(k)]
    for k in orphans:  # leave nothing running whatever the outcome
        os.kill(k, signal.SIGKILL)
    assert not orphans
    lines = _lines(out / "metrics.jsonl")
    time.sleep(1.0)
    assert _lines(out / "metrics.jsonl") == lines  # nobody trains on


ODD_TEXT = 'a\u2028b\u2029c\x85d\x0be\x0cf\x1cg\x1ei\x00 世界 🎉 "quoted" \\ back'  # (the tokenizer drops \x1d)


def odd_answers(tok) -> list[tuple[list[int], str]]:
    """What a model may write, as (token ids, finish reason): nothing, only whitespace, only special
    tokens, every line-break character, no EOS at all, and a plain answer."""
    eos = tok.eos_token_id
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return [
        ([eos], "stop"),
        (ids("   \n\t \n") + [eos], "stop"),
        ([1, 0, 1, 0] + [eos], "stop"),
        (ids(ODD_TEXT) + [eos], "stop"),
        (ids(ODD_TEXT * 4), "length"),
        (ids("Sure, here it is.") + [eos], "stop"),
    ]


def stub_generate(self, prompts, params=None, n=1, progress=False):
    """Engine.generate's contract (prompt-major samples, max_new_tokens, text without special
    tokens) with the answers of odd_answers, in turn."""
    from rlhfkit.rollout.engine import Completion

    answers, out = odd_answers(self.tokenizer), []
    for i, p in enumerate(prompts):
        prm = params[i] if isinstance(params, list) else params
        for s in range(n):
            ids, reason = answers[(i * n + s + stub_generate.calls) % len(answers)]
            ids = ids[: prm.max_new_tokens]
            reason = (
                reason
                if len(ids) < prm.max_new_tokens or reason == "stop" and ids[-1] == self.tokenizer.eos_token_id
                else "length"
            )
            out.append(
                Completion(
                    i,
                    s,
                    list(p),
                    ids,
                    [-1.0] * len(ids),
                    self.tokenizer.decode(ids, skip_special_tokens=True),
                    reason,
                    ids[-1] if reason == "stop" else None,
                )
            )
    stub_generate.calls += 1
    return out


def test_the_main_job_survives_what_a_model_writes(tiny_path, tmp_path, monkeypatch):
    """Answers that are empty, only whitespace, only special tokens, full of U+2028/U+2029/U+0085
    and controls, or never ended go through labeling, SFT, the RM, PPO, judging and the report."""
    from rlhfkit.data.jsonl import read_jsonl
    from rlhfkit.rollout.engine import Engine

    stub_generate.calls = 0
    monkeypatch.setattr(Engine, "generate", stub_generate)
    cfg = demo_config(
        model=tiny_path,
        out=str(tmp_path / "run"),
        train_prompts=6,
        eval_prompts=6,
        k=6,
        max_new_tokens=40,
        precision="fp32",
        min_demo_score=-9.0,
        round_prompts=3,
        fresh_process=False,
        report_to="tensorboard",
        sft={"batch_size": 4},
        ppo={"max_steps": 2, "batch_size": 2, "max_new_tokens": 40},
    )
    summary = run_pipeline(cfg)
    run = tmp_path / "run"
    samples = read_jsonl(run / "round0" / "samples.jsonl")
    texts = {t for s in samples for t in s["responses"]}
    assert "" in texts and any(ODD_TEXT in t for t in texts)  # what was sampled was kept, whole
    rankings = read_jsonl(run / "round0" / "rankings.jsonl")
    assert len(rankings) == 6 and all(len(r["responses"]) >= 6 for r in rankings)
    for d in ("sft", "round1/rm", "round1/ppo"):
        assert (run / d / "model" / "config.json").exists()
    ppo = read_jsonl(run / "round1" / "ppo" / "metrics.jsonl")
    assert len(ppo) == 2 and all(math.isfinite(m["policy_loss"]) and math.isfinite(m["kl"]) for m in ppo)
    assert 0 < ppo[0]["no_eos_fraction"] < 1  # the answer that never ended was scored as one
    assert set(summary["versions"]) == {"base", "sft", "ppo1"}
    assert all(math.isfinite(v["gold_mean"]) for v in summary["versions"].values())
    held = read_jsonl(run / "eval" / "ppo1.jsonl")
    assert {r["responses"][0] for r in held} >= {"", ODD_TEXT}
    assert "ppo1" in (run / "report.html").read_text(encoding="utf-8")
    for d in ("sft", "round1/rm", "round1/ppo"):  # the pipeline's report_to reached every stage
        assert list((run / d / "tensorboard").rglob("events.out.tfevents.*")), d


def test_pipeline_generates_and_runs_ppo_with_its_rollout_backend(tiny_path, monkeypatch):
    """rollout_backend reaches the sampling (and judging) generator and every round's PPO config;
    a stage's own ppo.rollout_backend is refused like the other settings the pipeline owns."""
    from rlhfkit.errors import UserError
    from rlhfkit.recipes import pipeline
    from rlhfkit.rollout import backends
    from rlhfkit.tasks import load_task

    cfg = demo_config(rollout_backend="hf", max_new_tokens=4)
    assert pipeline.ppo_config(cfg, "sft", "rm", "out", 1).rollout_backend == "hf"
    with pytest.raises(UserError, match="ppo.rollout_backend: the pipeline sets"):
        demo_config(ppo={"rollout_backend": "hf"})
    made = []
    real = backends.make_generator
    monkeypatch.setattr(pipeline, "make_generator", lambda *a, **kw: made.append(a[2]) or real(*a, **kw))
    rows = pipeline.sample_answers(tiny_path, load_task("train")[:2], 3, cfg, 1.0, say=lambda *a: None)
    assert made == ["hf"] and [len(r["responses"]) for r in rows] == [3, 3]


def test_pipeline_with_dpo_as_the_optimizer(tiny_path, tmp_path):
    """optimizer=dpo: after SFT and the round's reward model, DPO from SFT on the same rankings; the
    version dpo1 is judged, rated, reported and served like ppo1."""
    from rlhfkit.web.models import discover_versions

    run = tmp_path / "run"
    cfg = demo_config(
        model=tiny_path, out=str(run), train_prompts=6, eval_prompts=4, k=3, max_new_tokens=10, precision="fp32",
        min_demo_score=-9.0, round_prompts=3, fresh_process=False, optimizer="dpo",
        sft={"batch_size": 4}, dpo={"max_steps": 2, "batch_size": 4, "lr": 1e-4},
    )  # fmt: skip
    summary = run_pipeline(cfg)
    assert summary["final"] == "dpo1" and set(summary["versions"]) == {"base", "sft", "dpo1"}
    dpo_rows = summary["training"]["dpo1"]
    assert [m["step"] for m in dpo_rows if "loss" in m] and "ppo" not in {p.name for p in (run / "round1").iterdir()}
    assert read_dpo_data(run) == (run / "round1" / "rm_data.jsonl").read_text()  # the RM's rankings
    assert set(summary["ratings"]) == {"base", "sft", "dpo1"} and "dpo1" in (run / "report.html").read_text()
    assert discover_versions(run)["dpo1"] == str(run / "round1" / "dpo" / "model")


def read_dpo_data(run) -> str:
    from pathlib import Path

    import yaml

    return Path(yaml.safe_load((run / "round1" / "dpo" / "config.yaml").read_text())["data"]).read_text()


@pytest.mark.parametrize("optimizer", ["a2c", "rloo", "grpo"])
def test_pipeline_with_another_rl_optimizer(optimizer, tiny_path, tmp_path):
    """optimizer=a2c|rloo|grpo: the round's policy is trained against its reward model (A2C with a
    critic, RLOO and GRPO without), with the gold rubric logged beside the RM's score, and judged
    and served as a2c1 / rloo1 / grpo1."""
    from rlhfkit.web.models import discover_versions

    run = tmp_path / "run"
    cfg = demo_config(
        model=tiny_path, out=str(run), train_prompts=6, eval_prompts=4, k=3, max_new_tokens=10, precision="fp32",
        min_demo_score=-9.0, round_prompts=3, fresh_process=False, optimizer=optimizer, sft={"batch_size": 4},
    )  # fmt: skip
    cfg = dataclasses.replace(cfg, **{optimizer: dataclasses.replace(getattr(cfg, optimizer), max_steps=2,
                                                                     batch_size=2, max_new_tokens=10)})  # fmt: skip
    summary = run_pipeline(cfg)
    name = f"{optimizer}1"
    assert summary["final"] == name and set(summary["versions"]) == {"base", "sft", name}
    rows = summary["training"][name]
    assert len(rows) == 2 and all("gold_score" in m and "kl" in m for m in rows)
    assert (run / "round1" / optimizer / "critic").exists() == (optimizer == "a2c")
    assert discover_versions(run)[name] == str(run / "round1" / optimizer / "model")
    with pytest.raises(UserError, match=f"{optimizer}.reward_model: the pipeline sets"):
        build_config(PipelineConfig, "demo", [f"{optimizer}.reward_model=x"])


def test_pipeline_with_best_of_n_as_the_optimizer(tiny_path, tmp_path):
    """optimizer=best_of_n: no training after SFT and the round's RM; bon1's held-out answers are the
    RM's best of N SFT samples (each the highest-scored of its prompt's N), judged, rated and
    reported with the KL bound log N − (N−1)/N."""
    import math

    from rlhfkit.data.jsonl import read_jsonl
    from rlhfkit.evals.helpful import hf_reward_fn

    run = tmp_path / "run"
    cfg = demo_config(
        model=tiny_path, out=str(run), train_prompts=6, eval_prompts=4, k=3, max_new_tokens=10, precision="fp32",
        min_demo_score=-9.0, round_prompts=3, fresh_process=False, optimizer="best_of_n", best_of_n=3,
        sft={"batch_size": 4},
    )  # fmt: skip
    summary = run_pipeline(cfg)
    assert summary["final"] == "bon1" and set(summary["versions"]) == {"base", "sft", "bon1"}
    assert "bon1" not in summary["training"] and set(summary["ratings"]) == {"base", "sft", "bon1"}
    bound = math.log(3) - 2 / 3
    assert summary["final_kl_to_sft"] == pytest.approx(bound) and summary["best_of_n"]["n"] == 3
    assert {p.name for p in (run / "round1").iterdir()} >= {"rm", "bon"} and not (run / "round1" / "ppo").exists()
    picked = read_jsonl(run / "eval" / "bon1.jsonl")
    assert len(picked) == 4 and all(len(r["responses"]) == 1 for r in picked)
    # each pick is its prompt's best: no other of its N samples scores higher with the round's RM
    assert all(len(r["rm_scores"]) == 3 and r["rm_score"] == max(r["rm_scores"]) for r in picked)
    b = summary["best_of_n"]
    assert b["rm_mean_picked"] >= b["rm_mean_samples"]
    reward = hf_reward_fn(str(run / "round1" / "rm" / "model"))
    from rlhfkit.tasks import load_task

    prompts = load_task("eval")[:4]
    again = reward([p.messages for p in prompts], [r["responses"][0] for r in picked])
    assert again == pytest.approx([r["rm_score"] for r in picked], abs=1e-4)
    assert "bon1" in (run / "report.html").read_text() and f"{bound:.3f}" in (run / "report.html").read_text()
    with pytest.raises(UserError, match="best_of_n=0"):
        run_pipeline(dataclasses.replace(cfg, best_of_n=0))


def test_the_report_compares_the_final_version_with_sft_only_when_it_is_not_sft(tmp_path):
    """optimizer=none ends at SFT: its "SFT vs SFT" win-rate (all ties) says nothing, and neither the
    summary's markdown nor the HTML report shows it; a trained final version is compared."""
    from rlhfkit.recipes.pipeline_judge import render_summary
    from rlhfkit.recipes.pipeline_report import write_report

    scores = {"gold_mean": 0.1, "instruction_rate": 0.5, "prompt_rate": 0.4}
    w = {"win_rate": 0.625, "ci95": [0.4, 0.8], "wins": 2, "ties": 1, "losses": 1}
    for final in ("sft", "ppo1"):
        names = ["base", "sft"] + ([final] if final != "sft" else [])
        summary = {
            "versions": {n: dict(scores) for n in names},
            "ratings": {n: {"bt": 1000.0, "ci95": [990.0, 1010.0], "elo": 1000.0} for n in names},
            "final": final, "sft_vs_base": w, "final_vs_sft": w, "rm_accuracy": [], "training": {},
            "seconds": {"total": 1.0}, "prompts": {"held_out": 4},
        }  # fmt: skip
        write_report(tmp_path / f"{final}.html", summary, [], {})
        page, text = (tmp_path / f"{final}.html").read_text(), render_summary(summary)
        assert ("ppo1 vs SFT" in page and "ppo1 vs SFT" in text) == (final == "ppo1")
        assert "sft vs SFT" not in page and "sft vs SFT" not in text
        assert "SFT vs base" in page and "SFT vs base" in text
