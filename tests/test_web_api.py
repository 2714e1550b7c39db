"""Every route of the web app through httpx (Starlette's TestClient): the happy path, auth failures,
CSRF, bad payloads (clear 4xx JSON), size and rate limits. Wrong CSRF tokens, injected markup in every
template field and concurrent duplicate posts: test_web_security.py."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from web_support import csrf_of, make_run, sign_in

from rlhfkit.config import ServeConfig
from rlhfkit.web.app import create_app


@pytest.fixture(scope="module")
def app(tiny_path, tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("web"), tiny_path)
    app = create_app(ServeConfig(run=str(run), max_new_tokens=8, precision="fp32", rate_limit=1000, max_body_kb=64))
    store = app.state.store
    store.create_user("root", role="admin", password="password123")
    store.create_user("ann", password="password123")
    store.create_user("bob", password="password123")
    return app


def client(app, name: str | None = None) -> TestClient:
    c = TestClient(app)
    if name:
        sign_in(c, name)
    return c


def publish(app, prompts: list[str], k: int = 3, batch: str = "b", labels: int = 1) -> None:
    from rlhfkit.feedback.store import TaskIn

    app.state.store.add_tasks(
        batch,
        [
            TaskIn([{"role": "user", "content": p}], [f"{p} answer {i}" for i in range(k)], external_id=p)
            for p in prompts
        ],
        labels_per_task=labels,
    )


def error(r) -> str:
    body = r.json()
    assert set(body) == {"error"} and body["error"]["message"], body
    return body["error"]["message"]


def test_sign_in_invite_and_logout(app):
    c = client(app)
    assert c.get("/", follow_redirects=False).headers["location"] == "/login"
    assert c.get("/label", follow_redirects=False).headers["location"] == "/login?next=/label"
    tok = csrf_of(c)
    r = c.post("/login", data={"name": "ann", "password": "wrong-password", "csrf_token": tok})
    assert r.status_code == 401 and "wrong name or password" in r.text
    r = c.post("/login", data={"name": "ann", "password": "password123"})  # no CSRF token
    assert r.status_code == 403 and "CSRF" in r.text
    # invite link: set a password, signed in at once; the link then expires
    _, invite = app.state.store.create_user("carol")
    assert "Welcome, carol" in c.get(f"/invite/{invite}").text
    r = c.post(f"/invite/{invite}", data={"password": "short", "csrf_token": tok})
    assert r.status_code == 400 and "at least 8" in r.text
    r = c.post(f"/invite/{invite}", data={"password": "carols-password", "csrf_token": tok}, follow_redirects=False)
    assert r.status_code == 303 and "rlhf_session" in c.cookies
    assert c.get("/label").status_code == 200
    assert c.get(f"/invite/{invite}").status_code == 404
    stored = app.state.store.users()[-1].password_hash
    assert stored.startswith("$argon2id$") and "carols-password" not in stored
    # signing in issued a CSRF token bound to the new session: the signed-out one is refused now
    assert c.cookies["rlhf_csrf"] != tok and c.post("/logout", data={"csrf_token": tok}).status_code == 403
    tok = csrf_of(c)
    r = c.post("/logout", data={"csrf_token": tok}, follow_redirects=False)
    assert r.status_code == 303
    assert c.get("/label", follow_redirects=False).status_code == 303
    assert client(app).get("/api/tasks/next").status_code == 401
    # an open redirect through ?next= is refused
    page = c.get("/login?next=//evil.example/x").text
    assert 'value="/label"' in page


def test_labeling_flow_ties_flags_demo_skip_and_idempotency(app):
    publish(app, ["alpha", "beta", "gamma"], batch="flow")
    c = client(app, "ann")
    tok = csrf_of(c)
    page = c.get("/label").text
    assert "Ranked 0" in page and 'draggable="true"' in page and "tie with the answer above" in page
    task = c.get("/api/tasks/next").json()["task"]
    assert sorted(a["index"] for a in task["answers"]) == [0, 1, 2]
    assert "model" not in str(task["answers"])  # no model names reach the labeler
    body = {
        "ranks": [1, 0, 1],
        "flags": [{"answer": 2, "kind": "untruthful"}],
        "better_answer": "a better one",
        "idempotency_key": "key-flow-1",
    }
    r = c.post(f"/api/tasks/{task['id']}/ranking", json=body, headers={"X-CSRF-Token": tok})
    assert r.status_code == 201 and r.json()["duplicate"] is False
    r2 = c.post(f"/api/tasks/{task['id']}/ranking", json=body, headers={"X-CSRF-Token": tok})
    assert r2.status_code == 200 and r2.json() == {**r.json(), "duplicate": True}
    r3 = c.post(
        f"/api/tasks/{task['id']}/ranking",
        json={**body, "idempotency_key": "key-flow-2"},
        headers={"X-CSRF-Token": tok},
    )
    assert r3.status_code == 409 and "already ranked" in error(r3)
    nxt = c.get("/api/tasks/next").json()["task"]
    assert nxt["id"] != task["id"]
    assert c.post(f"/api/tasks/{nxt['id']}/skip", headers={"X-CSRF-Token": tok}).status_code == 200
    assert c.get("/api/tasks/next").json()["task"]["id"] not in (task["id"], nxt["id"])
    rows = [r for r in app.state.store.rankings("flow")]
    assert len(rows) == 1 and rows[0]["ranks"] == [1, 0, 1]
    assert rows[0]["meta"]["flags"] == [{"response": 2, "kind": "untruthful"}]
    assert {
        "messages": [{"role": "user", "content": "alpha"}],
        "response": "a better one",
        "meta": {"task_id": task["id"], "labeler": "ann"},
    } in app.state.store.demonstrations()


@pytest.mark.parametrize(
    "body,needle",
    [
        ({"ranks": [0, 1], "idempotency_key": "k-bad-00001"}, "expected 3 integers"),
        ({"ranks": [0, 2, 2], "idempotency_key": "k-bad-00002"}, "dense"),
        ({"ranks": [0, 1, 2], "idempotency_key": "short"}, "idempotency_key"),
        ({"ranks": "best", "idempotency_key": "k-bad-00003"}, "ranks"),
        (
            {"ranks": [0, 1, 2], "flags": [{"answer": 0, "kind": "boring"}], "idempotency_key": "k-bad-00004"},
            "flag 'boring'",
        ),
        (
            {"ranks": [0, 1, 2], "flags": [{"answer": 7, "kind": "harmful"}], "idempotency_key": "k-bad-00005"},
            "answer 7",
        ),
        ({}, "ranks: Field required"),
    ],
)
def test_bad_ranking_payloads_are_clear_4xx(app, body, needle):
    publish(app, ["delta"], batch="bad")
    c = client(app, "bob")
    tid = next(t for t in range(1, 100) if (v := app.state.store.task(t)) and v.batch == "bad")
    r = c.post(f"/api/tasks/{tid}/ranking", json=body, headers={"X-CSRF-Token": csrf_of(c)})
    assert 400 <= r.status_code < 500 and needle in error(r), (r.status_code, r.text)


def test_bad_requests_unknown_task_and_not_json(app):
    c = client(app, "bob")
    h = {"X-CSRF-Token": csrf_of(c)}
    r = c.post("/api/tasks/99999/ranking", json={"ranks": [0, 1], "idempotency_key": "k-missing-1"}, headers=h)
    assert r.status_code == 404 and "no task 99999" in error(r)
    r = c.post("/api/tasks/abc/ranking", json={}, headers=h)
    assert r.status_code == 422 and "task_id" in error(r)
    r = c.post("/api/tasks/1/ranking", content=b"{not json", headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 422 and "JSON" in error(r)
    assert c.post("/api/tasks/99999/skip", headers=h).status_code == 404


def test_arena_vote_and_leaderboard(app):
    c = client(app, "ann")
    tok = csrf_of(c)
    assert c.get("/leaderboard").status_code == 200
    before = c.get("/api/leaderboard").json()["votes"]
    r = c.post("/arena", data={"prompt": "Name a colour.", "csrf_token": tok}, follow_redirects=False)
    assert r.status_code == 303
    page = c.get(r.headers["location"]).text
    assert "A is better" in page and "model-name" not in page  # anonymous until the vote
    bid = r.headers["location"].rsplit("/", 1)[1]
    r = c.post(f"/arena/{bid}/vote", data={"outcome": "maybe", "csrf_token": tok})
    assert r.status_code == 400 and "expected one of a, b, tie, both_bad" in r.text
    r = c.post(f"/arena/{bid}/vote", data={"outcome": "both_bad"})
    assert r.status_code == 403
    page = c.post(f"/arena/{bid}/vote", data={"outcome": "both_bad", "csrf_token": tok}).text
    assert "both are bad" in page and page.count("model-name") == 2
    r = c.post(f"/arena/{bid}/vote", data={"outcome": "a", "csrf_token": tok})
    assert r.status_code == 409 and "already has a vote" in r.text
    board = c.get("/api/leaderboard").json()
    assert board["votes"] == before + 1
    row = board["rows"][0]
    assert {"model", "elo", "bt", "ci95", "votes", "wins", "ties", "losses", "both_bad"} <= set(row)
    assert row["ci95"][0] <= row["bt"] <= row["ci95"][1]
    assert "Bradley" in c.get("/leaderboard").text
    assert client(app, "bob").get(f"/arena/{bid}").status_code == 404  # someone else's battle
    assert c.post("/arena", data={"prompt": "", "csrf_token": tok}).status_code == 422


def test_chat_page_and_stream(app):
    c = client(app, "bob")
    assert 'id="model"' in c.get("/chat").text
    body = {"model": "sft", "messages": [{"role": "user", "content": "hello"}], "stream": True, "max_tokens": 4}
    with c.stream("POST", "/api/chat", json=body, headers={"X-CSRF-Token": csrf_of(c)}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and '"finish_reason": "length"' in events[-2]
    assert c.post("/api/chat", json=body).status_code == 403  # no CSRF header


def test_admin_needs_admin_and_works(app, tmp_path):
    ann = client(app, "ann")
    for path in ("/admin", "/api/admin/stats", "/admin/export/rankings.jsonl"):
        r = ann.get(path)
        assert r.status_code == 403 and "admin role" in r.text
    assert client(app).get("/api/admin/stats").status_code == 401
    root = client(app, "root")
    tok = csrf_of(root)
    r = root.post(
        "/admin/batches",
        data={
            "model": "sft",
            "k": "3",
            "n_prompts": "2",
            "labels_per_task": "2",
            "max_new_tokens": "4",
            "batch": "admin-made",
            "csrf_token": tok,
        },
        follow_redirects=False,
    )
    assert r.status_code == 303
    assert {"batch": "admin-made", "tasks": 2, "ranked": 0} in root.get("/api/admin/stats").json()["batches"]
    assert root.post("/admin/batches", data={"model": "nope", "csrf_token": tok}).status_code == 404
    assert root.post("/admin/batches", data={"model": "sft", "k": "12", "csrf_token": tok}).status_code == 422
    # both labelers rank the same double-labeled task (the oldest open one): agreement on the dashboard
    for name, ranks in (("ann", [0, 1, 1]), ("bob", [0, 2, 1])):
        c = client(app, name)
        t = c.get("/api/tasks/next").json()["task"]
        while app.state.store.task(t["id"]).batch != "admin-made":
            c.post(f"/api/tasks/{t['id']}/skip", headers={"X-CSRF-Token": csrf_of(c)})
            t = c.get("/api/tasks/next").json()["task"]
        r = c.post(
            f"/api/tasks/{t['id']}/ranking",
            json={"ranks": ranks, "idempotency_key": f"agree-{name}-x"},
            headers={"X-CSRF-Token": csrf_of(c)},
        )
        assert r.status_code == 201, r.text
    assert sorted(app.state.store.ranks_by_task()[t["id"]]) == [[0, 1, 1], [0, 2, 1]]  # one task, ranked twice
    stats = root.get("/api/admin/stats").json()
    # answer pairs (0,1) and (0,2): both prefer answer 0, agree; (1,2): ann ties them, bob prefers 2,
    # disagree -> 2/3. Kendall's W, ann's tie at average rank 2.5: rank sums R = [2, 5.5, 4.5], mean 4,
    # S = 4 + 2.25 + 0.25 = 6.5, tie term T = 2^3 - 2 = 6: W = 12 S / (m^2 (n^3 - n) - m T) = 78 / 84 = 13/14
    assert stats["agreement"] == {
        "tasks": 1,
        "pair_agreement": pytest.approx(2 / 3),
        "kendalls_w": pytest.approx(13 / 14),
    }
    assert any(r["name"] == "ann" and r["rankings"] >= 1 for r in stats["labelers"])
    page = root.get("/admin").text
    assert "agreeing answer pairs <strong>0.67</strong>" in page and "Kendall's W <strong>0.93</strong>" in page
    lines = root.get("/admin/export/rankings.jsonl").text.splitlines()
    assert lines and all('"ranks"' in x for x in lines)
    assert root.get("/admin/export/nothing.jsonl").status_code == 404
    page = root.post("/admin/export", data={"csrf_token": tok}).text
    assert "datasets/rankings" in page
    from rlhfkit.data.loaders import load_records

    exported = app.state.cfg.run + "/exports"
    records = load_records(exported + "/datasets/rankings", "ranking").records
    assert records and all(len(r.responses) >= 2 for r in records)
    r = root.post("/admin/users", data={"name": "dave", "role": "labeler", "csrf_token": tok})
    assert r.status_code == 201 and "/invite/" in r.text
    assert root.post("/admin/users", data={"name": "dave", "csrf_token": tok}).status_code == 409


def test_openai_routes_auth_and_errors(app):
    key = app.state.store.new_api_key("bob")
    c = client(app)
    assert c.get("/v1/models").status_code == 401
    r = c.get("/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and error(r) == "invalid API key"
    h = {"Authorization": f"Bearer {key}"}
    assert [m["id"] for m in c.get("/v1/models", headers=h).json()["data"]] == ["base", "sft", "ppo1"]
    ok = {"model": "sft", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    r = c.post("/v1/chat/completions", json=ok, headers=h)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    for body, status, needle in [
        ({**ok, "model": "gpt-9"}, 404, "does not exist"),
        ({**ok, "messages": []}, 400, "messages"),
        ({**ok, "temperature": 9}, 400, "temperature"),
        ({**ok, "n": 17}, 400, "n:"),
        ({**ok, "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
        ({**ok, "messages": [{"role": "assistant", "content": "x"}]}, 400, "last message"),
    ]:
        r = c.post("/v1/chat/completions", json=body, headers=h)
        assert r.status_code == status and needle in error(r), (body, r.text)


def test_request_size_limit(app):
    c = client(app, "bob")
    big = {"ranks": [0, 1], "better_answer": "x" * 70_000, "idempotency_key": "big-request-1"}
    r = c.post("/api/tasks/1/ranking", json=big, headers={"X-CSRF-Token": csrf_of(c)})
    assert r.status_code == 413 and "over the limit" in error(r)
    assert_security_headers(r)  # the 413 once had none

    def chunks():  # no Content-Length: counted while read
        for _ in range(80):
            yield b"x" * 1024

    r = c.post("/api/tasks/1/ranking", content=chunks(), headers={"X-CSRF-Token": csrf_of(c)})
    assert r.status_code == 413
    assert_security_headers(r)


def assert_security_headers(r) -> None:
    from rlhfkit.web.security import CSP

    assert r.headers["content-security-policy"] == CSP and r.headers["x-frame-options"] == "DENY"
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-request-id"]


def test_rate_limit_on_chat_and_api(tiny_path, tmp_path):
    run = make_run(tmp_path, tiny_path)
    app = create_app(ServeConfig(run=str(run), max_new_tokens=2, precision="fp32", rate_limit=3))
    app.state.store.create_user("eve", password="password123")
    key = app.state.store.new_api_key("eve")
    c = TestClient(app)
    body = {"model": "sft", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    codes = [
        c.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}).status_code
        for _ in range(4)
    ]
    assert codes == [200, 200, 200, 429]
    r = c.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    assert "rate limit" in error(r) and int(r.headers["retry-after"]) >= 1
    sign_in(c, "eve")  # the chat page shares the user's bucket
    assert c.post("/api/chat", json=body, headers={"X-CSRF-Token": csrf_of(c)}).status_code == 429
