"""The web app's guards, each tested with the bug it guards against in mind:

- CSRF: every state-changing post with a *wrong* token (a forged one, or the token of another
  session) is refused with 403 and changes nothing; the same post with the right token works.
  (A check that accepts any non-empty token fails here.)
- markup: every template field that shows user- or model-provided text gets injected markup from
  its source, and every page shows it escaped, never raw. (A ``|safe`` on any of them fails here.)
- idempotency: the same ranking with the same key, posted from several threads at once, is stored
  once; every answer is 201 or 200 ``duplicate`` (never 500 or 409). On PostgreSQL the posts are held
  at the INSERT until all of them have passed the duplicate check, so the race branch of
  ``Store.add_ranking`` (the unique key's IntegrityError) is what answers them.

The app runs with a stub model pool: model output is whatever the test says (injected markup), and
no model is loaded, so these tests take seconds.
"""

from __future__ import annotations

import secrets
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from markupsafe import escape
from sqlalchemy import event, func, select
from test_store_postgres import postgres_url  # noqa: F401 — the fixture: a PostgreSQL server started here
from web_support import csrf_of, sign_in

from rlhfkit.config import ServeConfig
from rlhfkit.feedback.schema import Battle, SessionRow
from rlhfkit.feedback.store import Store, TaskIn
from rlhfkit.web.app import create_app
from rlhfkit.web.models import Reply


def payload(where: str) -> str:
    """Markup that runs script if shown raw, in text and in a quoted attribute; ``where`` names its source."""
    return f'"><script>alert(1)</script><img src=x onerror=alert(1) alt={where}>'


RAW = ("<script>alert", "<img src=x")  # what no page may ever contain


class StubPool:
    """The ModelPool interface without models: ``sample`` answers ``answer``, chat and the arena ``reply``."""

    def __init__(self, names: list[str], answer: str = "an answer", reply: str = "a reply"):
        self.versions = {n: f"/nowhere/{i}" for i, n in enumerate(names)}
        self.answer, self.reply_text = answer, reply
        self.calls = 0

    def names(self) -> list[str]:
        return list(self.versions)

    def stream(self, name, messages, max_new_tokens=128, **kw):
        if name not in self.versions:
            raise LookupError(f"no model version {name!r}")
        self.calls += 1
        yield self.reply_text
        yield Reply(self.reply_text, "stop", 1, 1)

    def reply(self, name, messages, **kw) -> Reply:
        return list(self.stream(name, messages, **kw))[-1]

    def sample(self, name, prompts, k, max_new_tokens, temperature=1.0, seed=0):
        self.calls += 1
        return [[(f"{self.answer} {j}", True) for j in range(k)] for _ in prompts]


def make_app(root: Path, pool: StubPool, db: str = "") -> tuple:
    run = root / "run"
    store = Store.for_run(run, db or None)
    app = create_app(ServeConfig(run=str(run), db=db, rate_limit=10_000, max_body_kb=64), store=store, pool=pool)
    return app, store


def client(app, name: str | None = None, **kw) -> TestClient:
    c = TestClient(app, **kw)
    if name:
        sign_in(c, name)
    return c


# ---------------------------------------------------------------- CSRF: a wrong token is refused


@pytest.fixture(scope="module")
def csrf_app(tmp_path_factory):
    app, store = make_app(tmp_path_factory.mktemp("csrf"), StubPool(["sft", "ppo1"]))
    store.create_user("root", role="admin", password="password123")
    for name in ("ann", "bob"):
        store.create_user(name, password="password123")
    yield app
    store.close()


def _sessions(store) -> int:
    return store.tx(lambda s: s.scalar(select(func.count(SessionRow.token_hash))))


def _battles(store) -> int:
    return store.tx(lambda s: s.scalar(select(func.count(Battle.id))))


def _task(store, batch: str) -> int:
    store.add_tasks(batch, [TaskIn([{"role": "user", "content": "q"}], ["a", "b"], external_id="1")])
    return store.next_task(1, batch=batch).id


# Each case: (signed-in user or None, prepare(app, client) -> ctx, post(client, token, ctx) -> response,
# state(app, ctx) -> what the post would change, status of the post with the right token).
def _nothing(app, c):
    return None


def _login_post(c, tok, ctx):
    return c.post("/login", data={"name": "ann", "password": "password123", "csrf_token": tok},
                  follow_redirects=False)


def _login_state(app, ctx):
    return _sessions(app.state.store)


def _logout_post(c, tok, ctx):
    return c.post("/logout", data={"csrf_token": tok}, follow_redirects=False)


def _logout_state(app, ctx):
    return app.state.store.session_user(ctx) is not None


def _invite_prepare(app, c):
    return app.state.store.create_user(f"inv-{secrets.token_hex(4)}")[1]


def _invite_post(c, tok, ctx):
    return c.post(f"/invite/{ctx}", data={"password": "a-good-password", "csrf_token": tok}, follow_redirects=False)


def _invite_state(app, ctx):
    u = app.state.store.invited_user(ctx)
    return (u is not None, u.password_hash if u else "used")


def _users_prepare(app, c):
    return f"new-{secrets.token_hex(4)}"


def _users_post(c, tok, ctx):
    return c.post("/admin/users", data={"name": ctx, "role": "admin", "csrf_token": tok})


def _users_state(app, ctx):
    return [(u.name, u.role) for u in app.state.store.users()]


def _batches_prepare(app, c):
    return f"batch-{secrets.token_hex(4)}"


def _batches_post(c, tok, ctx):
    return c.post("/admin/batches", data={"model": "sft", "batch": ctx, "prompts": "p1\np2", "k": "2",
                                          "csrf_token": tok}, follow_redirects=False)


def _batches_state(app, ctx):
    return (app.state.store.batches(), app.state.pool.calls)


def _export_post(c, tok, ctx):
    return c.post("/admin/export", data={"csrf_token": tok})


def _export_state(app, ctx):
    return (Path(app.state.cfg.run) / "exports").exists()


def _arena_post(c, tok, ctx):
    return c.post("/arena", data={"prompt": "Name a colour.", "csrf_token": tok}, follow_redirects=False)


def _arena_state(app, ctx):
    return (_battles(app.state.store), app.state.pool.calls)


def _vote_prepare(app, c):
    uid = app.state.store.session_user(c.cookies["rlhf_session"]).id
    return app.state.store.add_battle(uid, "p", "sft", "ppo1", "x", "y")


def _vote_post(c, tok, ctx):
    return c.post(f"/arena/{ctx}/vote", data={"outcome": "a", "csrf_token": tok}, follow_redirects=False)


def _vote_state(app, ctx):
    b = app.state.store.battle(ctx)
    return (b.outcome, b.revealed)


def _ranking_prepare(app, c):
    return _task(app.state.store, f"rank-{secrets.token_hex(4)}")


def _ranking_post(c, tok, ctx):
    body = {"ranks": [1, 0], "idempotency_key": f"csrf-{ctx}-key", "better_answer": "better",
            "flags": [{"answer": 0, "kind": "harmful"}]}
    return c.post(f"/api/tasks/{ctx}/ranking", json=body, headers={"X-CSRF-Token": tok})


def _ranking_state(app, ctx):
    s = app.state.store
    return (s.count_rankings(), len(s.demonstrations()), s.per_labeler())


def _skip_prepare(app, c):
    return _task(app.state.store, f"skip-{secrets.token_hex(4)}")


def _skip_post(c, tok, ctx):
    return c.post(f"/api/tasks/{ctx}/skip", headers={"X-CSRF-Token": tok})


def _skip_state(app, ctx):
    return app.state.store.per_labeler()


def _chat_post(c, tok, ctx):
    return c.post("/api/chat", json={"model": "sft", "messages": [{"role": "user", "content": "hi"}]},
                  headers={"X-CSRF-Token": tok})


def _chat_state(app, ctx):
    return app.state.pool.calls


CSRF_CASES = {
    "login": (None, _nothing, _login_post, _login_state, 303),
    "logout": ("ann", lambda app, c: c.cookies["rlhf_session"], _logout_post, _logout_state, 303),
    "invite": (None, _invite_prepare, _invite_post, _invite_state, 303),
    "admin-users": ("root", _users_prepare, _users_post, _users_state, 201),
    "admin-batches": ("root", _batches_prepare, _batches_post, _batches_state, 303),
    "admin-export": ("root", _nothing, _export_post, _export_state, 200),
    "arena": ("ann", _nothing, _arena_post, _arena_state, 303),
    "arena-vote": ("ann", _vote_prepare, _vote_post, _vote_state, 303),
    "ranking": ("bob", _ranking_prepare, _ranking_post, _ranking_state, 201),
    "skip": ("bob", _skip_prepare, _skip_post, _skip_state, 200),
    "chat": ("bob", _nothing, _chat_post, _chat_state, 200),
}


@pytest.mark.parametrize("case", list(CSRF_CASES))
def test_wrong_csrf_token_is_refused_and_changes_nothing(csrf_app, case):
    user, prepare, post, state, ok_status = CSRF_CASES[case]
    c = client(csrf_app, user)
    other = client(csrf_app, "root" if user != "root" else "ann")  # another person's session and token
    mine = csrf_of(c)
    ctx = prepare(csrf_app, c)
    before = state(csrf_app, ctx)
    wrong = {"forged": secrets.token_urlsafe(24),      # the cookie's length and alphabet, another value
             "another session's": csrf_of(other),       # valid for someone, not for this cookie
             "one character off": mine[:-1] + ("A" if mine[-1] != "A" else "B")}
    assert len(set(wrong.values()) | {mine}) == 4
    for kind, tok in wrong.items():
        r = post(c, tok, ctx)
        assert r.status_code == 403 and "CSRF" in r.text, (kind, r.status_code, r.text[:300])
        assert state(csrf_app, ctx) == before, f"{case}: a post with {kind} token changed the store"
        assert "rlhf_session" not in r.headers.get("set-cookie", "")
    # the cookie right but the form/header token missing, and a right token without its cookie
    assert post(c, "", ctx).status_code == 403
    stranger = TestClient(csrf_app)
    stranger.cookies.update({k: v for k, v in c.cookies.items() if k != "rlhf_csrf"})
    assert post(stranger, mine, ctx).status_code == 403
    assert state(csrf_app, ctx) == before
    # the same post with the right token does what it should: the refusals above were the token's doing
    r = post(c, mine, ctx)
    assert r.status_code == ok_status, (case, r.status_code, r.text[:300])
    assert state(csrf_app, ctx) != before, f"{case}: the right token changed nothing"


# ---------------------------------------------------------------- markup stays text on every page


def test_injected_markup_is_escaped_in_every_field(tmp_path):
    """Every ``{{ ... }}`` that shows user or model text, fed from its real source (forms, tasks, model
    output, cookies, the URL): the page has the escaped text and never the raw markup."""
    P = {k: payload(k) for k in ("admin", "invitee", "model", "batch", "prompt", "answer", "role", "content",
                                 "better", "arena", "reply", "next", "vote", "nomodel", "labeler", "model2")}
    pool = StubPool([P["model"], P["model2"]], answer=P["answer"], reply=P["reply"])  # the arena shows both
    app, store = make_app(tmp_path, pool)
    store.create_user(P["admin"], role="admin", password="password123")  # the header's name on every page
    store.create_user(P["labeler"], password="password123")  # listed on the dashboard

    pages: dict[str, str] = {}

    def seen(name: str, r, *expected: str, status: int = 200) -> None:
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        pages[name] = r.text
        for raw in RAW:
            assert raw not in r.text, f"{name}: raw markup {raw!r} in the page"
        for key in expected:
            assert str(escape(P[key])) in r.text, f"{name}: the escaped {key} text is missing"
            assert P[key] not in r.text

    root = client(app, P["admin"])
    tok = csrf_of(root)
    # a labeling batch from a served version: batch name and prompt typed by the admin, answers by the model
    r = root.post("/admin/batches", data={"model": P["model"], "batch": P["batch"], "prompts": P["prompt"], "k": "3",
                                          "csrf_token": tok}, follow_redirects=False)
    assert r.status_code == 303
    # a task from a data file with an odd role
    store.add_tasks("file", [TaskIn([{"role": P["role"], "content": P["content"]}], ["x", "y"], external_id="1")])
    seen("admin users", root.post("/admin/users", data={"name": P["invitee"], "csrf_token": tok}),
         "invitee", "admin", "labeler", "model", "model2", "batch", status=201)
    seen("admin", root.get("/admin"), "invitee", "admin", "labeler", "model", "model2", "batch")
    seen("user exists", root.post("/admin/users", data={"name": P["invitee"], "csrf_token": tok}),
         "invitee", "admin", status=409)
    seen("no such model", root.post("/admin/batches", data={"model": P["nomodel"], "csrf_token": tok}),
         "nomodel", status=404)
    invite = store.new_invite(P["invitee"])
    seen("invite", client(app).get(f"/invite/{invite}"), "invitee")
    seen("invite signed in", root.get(f"/invite/{invite}"), "invitee", "admin")

    seen("label", root.get("/label"), "admin", "prompt", "answer")
    t = root.get("/api/tasks/next").json()["task"]
    r = root.post(f"/api/tasks/{t['id']}/ranking", headers={"X-CSRF-Token": tok},
                  json={"ranks": [0, 1, 2], "better_answer": P["better"], "idempotency_key": "xss-ranking-1",
                        "flags": [{"answer": 1, "kind": "harmful"}]})
    assert r.status_code == 201
    seen("label, second task", root.get("/label"), "role", "content")

    r = root.post("/arena", data={"prompt": P["arena"], "csrf_token": tok}, follow_redirects=False)
    assert r.status_code == 303
    battle = r.headers["location"]
    seen("battle", root.get(battle), "arena", "reply", "admin")
    assert pages["battle"].count(str(escape(P["reply"]))) == 2  # answer A and answer B
    assert "model-name" not in pages["battle"]  # the names stay hidden until the vote
    seen("bad vote", root.post(battle + "/vote", data={"outcome": P["vote"], "csrf_token": tok}), "vote", status=400)
    root.post(battle + "/vote", data={"outcome": "a", "csrf_token": tok})
    seen("battle revealed", root.get(battle), "arena", "reply", "model", "model2")
    seen("leaderboard", root.get("/leaderboard"), "model", "model2", "admin")
    seen("chat", root.get("/chat"), "model", "model2", "admin")
    seen("not found", root.get("/arena/999999"), "admin", status=404)

    # a crafted ?next= is reflected into the sign-in form
    nxt = "/" + P["next"]
    P["next"] = nxt
    anon = client(app)
    seen("login", anon.get("/login", params={"next": nxt}), "next")
    seen("login failed", anon.post("/login", data={"name": "nobody", "password": "wrong-password", "next": nxt,
                                                    "csrf_token": csrf_of(anon)}), "next", status=401)
    # a planted CSRF cookie is echoed into every form and the <meta> tag
    planted = '"><script>alert(1)</script><svg/onload=alert(1)>'
    P["cookie"] = planted
    cookie = f"rlhf_session={root.cookies['rlhf_session']}; rlhf_csrf={planted}"
    for path in ("/login", "/label", "/admin"):
        seen(f"planted cookie {path}", TestClient(app).get(path, headers={"Cookie": cookie}), "cookie")

    # the data itself is kept as typed (escaping is the page's business, not the store's)
    assert store.demonstrations()[0]["response"] == P["better"]
    assert store.rankings(P["batch"])[0]["responses"] == [f"{P['answer']} {j}" for j in range(3)]
    # and the policy forbids inline script anyway
    csp = root.get("/label").headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    store.close()


# ---------------------------------------------------------------- the same ranking posted at once


def _race(app, store, n: int, hold_inserts: bool) -> tuple[list[int], list[dict], int]:
    """``n`` threads post the same ranking with the same key at the same moment (one barrier before the
    request; with ``hold_inserts`` a second one at the INSERT). Returns statuses, bodies, INSERTs made."""
    store.create_user("racer", password="password123")
    store.add_tasks("race", [TaskIn([{"role": "user", "content": "q"}], ["a", "b", "c"], external_id="1")])
    task = store.next_task(store.users()[-1].id, batch="race").id
    signed = client(app, "racer")
    cookies, tok = dict(signed.cookies.items()), csrf_of(signed)
    body = {"ranks": [2, 0, 1], "idempotency_key": "race-same-key-1", "better_answer": "better",
            "flags": [{"answer": 0, "kind": "harmful"}]}
    start = threading.Barrier(n, timeout=60)
    at_insert = threading.Barrier(n, timeout=60)
    inserts = []

    def hold(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("INSERT INTO RANKINGS"):
            inserts.append(threading.get_ident())
            at_insert.wait()  # every request has passed the duplicate check: all of them insert

    if hold_inserts:
        event.listen(store.engine, "before_cursor_execute", hold)
    statuses: list[int] = [0] * n
    bodies: list[dict] = [{}] * n

    def post(i: int) -> None:
        c = TestClient(app, raise_server_exceptions=False)
        c.cookies.update(cookies)
        start.wait()
        r = c.post(f"/api/tasks/{task}/ranking", json=body, headers={"X-CSRF-Token": tok})
        statuses[i] = r.status_code
        bodies[i] = r.json()

    threads = [threading.Thread(target=post, args=(i,)) for i in range(n)]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
    finally:
        if hold_inserts:
            event.remove(store.engine, "before_cursor_execute", hold)
    assert not any(th.is_alive() for th in threads)
    return statuses, bodies, len(inserts)


def _check_race(store, statuses, bodies, n) -> None:
    assert sorted(statuses) == [200] * (n - 1) + [201], (statuses, bodies)
    first = bodies[statuses.index(201)]
    assert first["duplicate"] is False
    assert all(b["duplicate"] is True and b["ranking_id"] == first["ranking_id"]
               for s, b in zip(statuses, bodies) if s == 200), bodies
    rows = store.rankings("race")
    assert len(rows) == 1 and rows[0]["ranks"] == [2, 0, 1] and rows[0]["meta"]["ranking_id"] == first["ranking_id"]
    assert rows[0]["meta"]["flags"] == [{"response": 0, "kind": "harmful"}]  # the losers' flags rolled back
    assert [d["response"] for d in store.demonstrations()] == ["better"]


def test_same_ranking_posted_at_once_is_stored_once_sqlite(tmp_path):
    app, store = make_app(tmp_path, StubPool(["sft"]))
    n = 8
    statuses, bodies, _ = _race(app, store, n, hold_inserts=False)
    _check_race(store, statuses, bodies, n)
    store.close()


def test_same_ranking_posted_at_once_is_stored_once_postgresql(postgres_url, tmp_path):  # noqa: F811
    app, store = make_app(tmp_path, StubPool(["sft"]), db=postgres_url)
    n = 6
    statuses, bodies, inserts = _race(app, store, n, hold_inserts=True)
    # every request reached the INSERT, so all but one were answered by the unique key's IntegrityError
    assert inserts == n, inserts
    _check_race(store, statuses, bodies, n)
    store.close()
