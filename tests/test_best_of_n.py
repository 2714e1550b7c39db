"""Best-of-N: the pure picks and KL bound (hand-computed), the eval (stub generator + stub reward
model: the RM's favourite must be the answer), and the web app (the API answers with the best of 3)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from rlhfkit.algos.best_of_n import best_of, kl_bound

FIXTURES = Path(__file__).parent / "fixtures" / "evals"


def test_kl_bound_hand_computed():
    assert kl_bound(1) == 0.0
    assert kl_bound(2) == pytest.approx(math.log(2) - 0.5)  # 0.1931
    assert kl_bound(4) == pytest.approx(1.3862944 - 0.75, abs=1e-6)  # 0.6363
    assert kl_bound(4) == pytest.approx(0.6363, abs=1e-4)
    assert kl_bound(8) == pytest.approx(2.0794415 - 0.875, abs=1e-6)
    with pytest.raises(ValueError):
        kl_bound(0)


def test_best_of_picks_highest_and_first_on_tie():
    cands = [["a", "b", "c"], ["x", "y"]]
    assert best_of(cands, [[0.1, 0.9, 0.5], [2.0, 2.0]]) == ["b", "x"]
    with pytest.raises(ValueError):
        best_of(cands, [[0.1, 0.9]])


def test_best_of_n_fn_groups_k_by_n():
    from rlhfkit.evals.generation import best_of_n_fn

    calls = []

    def gen(prompts, n, max_new, temp):
        calls.append((n, temp))
        return [[f"{p}-{i}" for i in range(n)] for p in prompts]

    def rm(prompts, responses):  # prefers the sample with the highest index modulo 3 == 1
        assert prompts[0] == "user says"
        return [float(int(r.split("-")[1]) % 3 == 1) for r in responses]

    bo = best_of_n_fn(gen, rm, 3, 0.7, rm_prompts={"<chat>": "user says"})
    assert bo(["<chat>"], 2, 5, 0.0) == [["<chat>-1", "<chat>-4"]]
    assert calls == [(6, 0.7)]


class _StubGen:
    """A GenerateFn: greedy (temperature 0) -> 'greedy'; sampled -> 'noise ...' except the 2nd of each prompt."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, n, max_new_tokens, temperature):
        self.calls.append((len(prompts), n, temperature))
        if temperature == 0:
            return [["greedy"] * n for _ in prompts]
        return [[("the favourite answer" if i == 1 else f"noise {i}") for i in range(n)] for _ in prompts]


def _bon_cfg(tiny_path, **kw):
    from rlhfkit.evals.runner import EvalConfig

    return EvalConfig(
        models=[f"v1={tiny_path}"],
        baseline=f"base={tiny_path}",
        suites=["helpful", "truthful"],
        data_dir=str(FIXTURES),
        limit=2,
        gen_limit=1,
        help_limit=2,
        help_max_new_tokens=3,
        batch_size=8,
        show_progress=False,
        **kw,
    )


def test_eval_best_of_picks_reward_models_favourite(tiny_path, tmp_path, monkeypatch):
    import rlhfkit.evals.generation as generation
    import rlhfkit.evals.helpful as helpful
    from rlhfkit.evals.runner import run_eval

    stub = _StubGen()
    monkeypatch.setattr(generation, "generator_fn", lambda *a, **k: stub)
    seen = []

    def fake_rm(path, batch_size=8):
        def reward(prompts, responses):
            seen.extend(prompts)
            return [1.0 if "favourite" in r else 0.0 for r in responses]

        return reward

    monkeypatch.setattr(helpful, "hf_reward_fn", fake_rm)
    rm_dir = tmp_path / "rm"
    rm_dir.mkdir()
    res = run_eval(_bon_cfg(tiny_path, best_of=3, reward_model=str(rm_dir)))
    assert res["best_of"]["n"] == 3 and res["best_of"]["kl_bound"] == pytest.approx(kl_bound(3))
    h = res["helpful"]["v1"]
    assert all(e["model"] == "the favourite answer" for e in h["examples"])
    assert all(e["baseline"] == "greedy" for e in h["examples"])  # the baseline is never best-of-N
    assert "gold_score_model" in h and "instruction_following_model" in h and "gold_score_baseline" in h
    assert res["models"]["v1"]["best_of"] == 3 and "best_of" not in res["models"]["base"]
    # the RM saw the user's text, not the chat-formatted prompt; 3 samples at temperature 1.0
    assert h["examples"][0]["prompt"] in seen
    assert (2, 3, 1.0) in stub.calls and (1, 3, 1.0) in stub.calls  # helpful (2 prompts) and TruthfulQA gen (1)
    from rlhfkit.evals.report import write_report

    _, page = write_report(res, tmp_path / "report")
    assert "Best-of-N" in page.read_text() and "gold score" in page.read_text()


def test_eval_best_of_without_reward_model_is_a_user_error(tiny_path):
    from rlhfkit.errors import UserError
    from rlhfkit.evals.runner import run_eval

    with pytest.raises(UserError, match="--best-of 4 needs --reward-model"):
        run_eval(_bon_cfg(tiny_path, best_of=4))
    with pytest.raises(UserError, match="no such directory"):
        run_eval(_bon_cfg(tiny_path, best_of=2, reward_model="/nonexistent/rm"))


# ---------------------------------------------------------------- serve: the API answers with the RM's best of 3


def _scorer():
    """A stub reward model: a deterministic score of each text; records what it scored."""
    seen: list[tuple[list, list[str], list[float]]] = []

    def reward(prompts, responses):
        scores = [float(sum(map(ord, r)) % 97) + 0.001 * len(r) for r in responses]
        seen.append((list(prompts), list(responses), scores))
        return scores

    return reward, seen


def test_serve_best_of_3_returns_the_highest_scored_sample(tiny_path, tmp_path, monkeypatch):
    import json

    from fastapi.testclient import TestClient
    from web_support import make_run

    import rlhfkit.evals.helpful as helpful
    from rlhfkit.algos.best_of_n import best_index
    from rlhfkit.config import ServeConfig
    from rlhfkit.web.app import create_app

    reward, seen = _scorer()
    monkeypatch.setattr(helpful, "hf_reward_fn", lambda path, batch_size=8: reward)
    rm_dir = tmp_path / "rm"
    rm_dir.mkdir()
    run = make_run(tmp_path / "run", tiny_path)
    cfg = ServeConfig(
        run=str(run), max_new_tokens=6, precision="fp32", rate_limit=10_000, best_of=3, reward_model=str(rm_dir)
    )
    app = create_app(cfg)
    app.state.store.create_user("ann", password="password123")
    key = app.state.store.new_api_key("ann")
    c = TestClient(app)
    h = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    msgs = [{"role": "user", "content": "Say hi."}]

    def picked():
        prompts, texts, scores = seen[-1]
        return prompts, texts, texts[best_index(scores)]

    r = c.post("/v1/chat/completions", json={"model": "sft", "messages": msgs, "max_tokens": 6}, headers=h)
    assert r.status_code == 200, r.text
    prompts, texts, best = picked()
    assert len(texts) == 3 and prompts[0] == msgs  # the RM sees the conversation
    assert r.json()["choices"][0]["message"]["content"] == best
    # streaming: the N first, then the picked answer's text
    body = {"model": "sft", "messages": msgs, "max_tokens": 6, "stream": True}
    r = c.post("/v1/chat/completions", json=body, headers=h)
    chunks = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
    text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
    assert text == picked()[2]
    # completions: the request's best_of up to the server's cap (3), n best returned
    r = c.post("/v1/completions", json={"model": "sft", "prompt": "Hello", "max_tokens": 4, "best_of": 3}, headers=h)
    assert r.status_code == 200, r.text
    assert len(seen[-1][1]) == 3 and r.json()["choices"][0]["text"] == picked()[2]
    r = c.post("/v1/completions", json={"model": "sft", "prompt": "Hello", "max_tokens": 4, "best_of": 4}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"


def test_serve_best_of_without_reward_model_is_a_user_error(tmp_path):
    from rlhfkit.config import ServeConfig
    from rlhfkit.errors import UserError
    from rlhfkit.web.app import serve_reward_fn

    with pytest.raises(UserError, match="--best-of 3 needs --reward-model"):
        serve_reward_fn(ServeConfig(run=str(tmp_path), best_of=3))
    with pytest.raises(UserError, match="no such directory"):
        serve_reward_fn(ServeConfig(run=str(tmp_path), best_of=3, reward_model=str(tmp_path / "nope")))
    assert serve_reward_fn(ServeConfig(run=str(tmp_path))) is None
