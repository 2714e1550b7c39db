"""Training with people: ``rlhfkit pipeline labeler=human`` publishes the round's tasks, waits (and
times out resumably), people rank in the web app, and the reward model trains on their rankings."""

from __future__ import annotations

import dataclasses
import json

import pytest
from fastapi.testclient import TestClient
from web_support import csrf_of, sign_in

from rlhfkit.config import PipelineConfig, ServeConfig, SFTConfig
from rlhfkit.errors import UserError
from rlhfkit.recipes.pipeline import run_pipeline
from rlhfkit.web.app import create_app


def test_pipeline_waits_for_people_and_trains_on_their_rankings(tiny_path, tmp_path):
    out = tmp_path / "run"
    cfg = PipelineConfig(
        model=tiny_path,
        out=str(out),
        train_prompts=3,
        eval_prompts=2,
        k=2,
        max_new_tokens=6,
        sft=SFTConfig(batch_size=2),
        precision="fp32",
        min_demo_score=-2.0,
        rounds=1,
        optimizer="none",
        rank_sft=False,
        labeler="human",
        human_timeout=0.3,
        human_poll=0.1,
    )
    lines: list[str] = []
    with pytest.raises(UserError, match=r"timed out .*\(0/3 ranked\).*run the same command again"):
        run_pipeline(cfg, say=lines.append)
    assert any("[round0] 0/3 tasks ranked by people (3 published" in x for x in lines)

    # people rank the published tasks in the web app
    app = create_app(ServeConfig(run=str(out), precision="fp32"))
    app.state.store.create_user("ann", password="password123")
    c = TestClient(app)
    sign_in(c, "ann")
    for n in range(3):
        task = c.get("/api/tasks/next").json()["task"]
        assert task is not None and len(task["answers"]) == 2
        r = c.post(
            f"/api/tasks/{task['id']}/ranking",
            json={"ranks": [1, 0], "idempotency_key": f"pipe-{n}-key"},
            headers={"X-CSRF-Token": csrf_of(c)},
        )
        assert r.status_code == 201
    assert c.get("/api/tasks/next").json()["task"] is None  # publishing again (the rerun) added nothing

    lines.clear()
    summary = run_pipeline(dataclasses.replace(cfg, human_timeout=30.0), say=lines.append)
    assert any("[round0] 3/3 tasks ranked by people" in x for x in lines)
    rows = [json.loads(x) for x in (out / "round0" / "rankings.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["meta"]["labeler"] == "ann" and r["ranks"] == [1, 0] for r in rows)
    assert len(rows[0]["meta"]["gold"]) == 2
    assert (out / "round1" / "rm" / "model" / "config.json").exists()
    assert summary["rm_accuracy"][0]["rankings"] == 3


def test_mix_fills_in_with_the_simulated_labeler(tiny_path, tmp_path):
    from rlhfkit.feedback.human import rank_round_by_people
    from rlhfkit.feedback.labelers import SimulatedLabeler
    from rlhfkit.feedback.store import Store
    from rlhfkit.tasks import load_task

    prompts = load_task("train")[:3]
    samples = [
        {"id": p.meta["id"], "prompt": p.text, "responses": ["yes", "no"], "finished": [True, True]} for p in prompts
    ]
    store = Store.for_run(tmp_path)
    uid, _ = store.create_user("bob", password="password123")
    from rlhfkit.feedback.human import publish

    publish(store, "round0", samples)
    store.add_ranking(uid, store.next_task(uid).id, [0, 1], "mix-key-1")
    rows = rank_round_by_people(
        store,
        "round0",
        prompts,
        samples,
        needed=1,
        timeout=5,
        poll=0.1,
        fallback=SimulatedLabeler(),
        say=lambda _: None,
    )
    assert [r["meta"]["labeler"] for r in rows] == ["bob", "simulated", "simulated"]
