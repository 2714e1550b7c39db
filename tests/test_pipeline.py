"""The main job's loop on tiny-random: every stage runs, writes its files, and is not redone."""

import json

from rlhfkit.config import PipelineConfig
from rlhfkit.recipes.pipeline import run_pipeline


def test_pipeline_end_to_end_on_tiny(tiny_path, tmp_path):
    cfg = PipelineConfig(model=tiny_path, out=str(tmp_path / "run"), train_prompts=8, eval_prompts=4, k=3,
                         max_new_tokens=12, batch_size=4, precision="fp32", min_demo_score=-2.0,
                         rounds=1, ppo_iterations=1, ppo_batch_size=2)
    summary = run_pipeline(cfg)
    run = tmp_path / "run"
    samples = [json.loads(x) for x in (run / "round0" / "samples.jsonl").read_text().splitlines()]
    rankings = [json.loads(x) for x in (run / "round0" / "rankings.jsonl").read_text().splitlines()]
    assert len(samples) == len(rankings) == 8
    assert all(len(s["responses"]) == 3 for s in samples)
    assert all(sorted(set(r["ranks"]))[0] == 0 for r in rankings)
    assert summary["demonstrations"] == 8  # every prompt's best answer passes min_demo_score=-2
    for d in ("sft", "round1/rm", "round1/ppo"):
        assert (run / d / "model" / "config.json").exists()
    assert set(summary["versions"]) == {"base", "sft", "ppo1"} and summary["final"] == "ppo1"
    assert 0.0 <= summary["sft_vs_base"]["win_rate"] <= 1.0
    assert summary["ratings"]["sft"]["bt"] == 1000.0  # anchored
    assert len(summary["ppo"]["ppo1"]) == 1 and "kl" in summary["ppo"]["ppo1"][0]
    page = (run / "report.html").read_text()
    assert page.count("<img") >= 2 and "ppo1" in page
    # run again: nothing is recomputed (samples and models stay as they were)
    mtime = (run / "sft" / "model" / "model.safetensors").stat().st_mtime
    run_pipeline(cfg)
    assert (run / "sft" / "model" / "model.safetensors").stat().st_mtime == mtime
