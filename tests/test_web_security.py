"""The web app's guards, each tested with the bug it guards against in mind:

- CSRF: every state-changing post with a *wrong* token (a forged one, or the token of another
  session) is refused with 403 and changes nothing; the same post with the right token works.
  (A check that accepts any non-empty token fails here.) A token *planted* in the cookie beside an
  admin's session (made up, issued to someone signed out, or another session's) is refused too: the
  token must be signed for the session it comes with.
- markup: every template field that shows user- or model-provided text gets injected markup from
  its source, and every page shows it escaped, never raw. (A ``|safe`` on any of them fails here.)
- idempotency: the same ranking with the same key, posted from several threads at once, is stored
  once; every answer is 201 or 200 ``duplicate`` (never 500 or 409). On PostgreSQL the first INSERT
  is held until every other post is in flight (blocked on the task row's lock).
- the app under attack: two labelers racing for a task's last slot (one 201, one 409, on
  SQLite and on PostgreSQL — there the second reads the task while the first has inserted but not
  committed, so only the row lock saves the quota); rankings only for tasks in one's own queue; an
  idempotency key scoped to (user, task) that never answers "duplicate" for data it did not store;
  sign-in brute force throttled (per name and per address, 429 with Retry-After) and audited, the
  same sign-in time for unknown names; Secure ``__Host-`` cookies and HSTS behind https; a password
  reset or change ends the other sessions; ids past the database's range, non-integer ranks and lone
  surrogates are clear 422s; a 500 is one line of JSON with the security headers and a request id
  found in the log; ``users add`` refuses control characters and links to the server's real URL.

The app runs with a stub model pool: model output is whatever the test says (injected markup), and
no model is loaded, so these tests take seconds.
"""

from __future__ import annotations

import secrets
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from markupsafe import escape
from sqlalchemy import event, func, select
from test_store_postgres import postgres_url  # noqa: F401 — the fixture: a PostgreSQL server started here
from web_support import csrf_of, sign_in

from rlhfkit.config import ServeConfig
from rlhfkit.errors import Conflict, NotFound, UserError
from rlhfkit.feedback.schema import Battle, SessionRow
from rlhfkit.feedback.store import Store, TaskIn
from rlhfkit.web.app import create_app
from rlhfkit.web.models import Reply
from rlhfkit.web.security import CSP


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
    return c.post("/login", data={"name": "ann", "password": "password123", "csrf_token": tok}, follow_redirects=False)


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
    return c.post(
        "/admin/batches",
        data={"model": "sft", "batch": ctx, "prompts": "p1\np2", "k": "2", "csrf_token": tok},
        follow_redirects=False,
    )


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
    body = {
        "ranks": [1, 0],
        "idempotency_key": f"csrf-{ctx}-key",
        "better_answer": "better",
        "flags": [{"answer": 0, "kind": "harmful"}],
    }
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
    return c.post(
        "/api/chat",
        json={"model": "sft", "messages": [{"role": "user", "content": "hi"}]},
        headers={"X-CSRF-Token": tok},
    )


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
    wrong = {
        "forged": secrets.token_urlsafe(24),  # the cookie's length and alphabet, another value
        "another session's": csrf_of(other),  # valid for someone, not for this cookie
        "one character off": mine[:-1] + ("A" if mine[-1] != "A" else "B"),
    }
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
    P = {
        k: payload(k)
        for k in (
            "admin",
            "invitee",
            "model",
            "batch",
            "prompt",
            "answer",
            "role",
            "content",
            "better",
            "arena",
            "reply",
            "next",
            "vote",
            "nomodel",
            "labeler",
            "model2",
            "signin",
        )
    }
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
    r = root.post(
        "/admin/batches",
        data={"model": P["model"], "batch": P["batch"], "prompts": P["prompt"], "k": "3", "csrf_token": tok},
        follow_redirects=False,
    )
    assert r.status_code == 303
    # a task from a data file with an odd role
    store.add_tasks("file", [TaskIn([{"role": P["role"], "content": P["content"]}], ["x", "y"], external_id="1")])
    seen(
        "admin users",
        root.post("/admin/users", data={"name": P["invitee"], "csrf_token": tok}),
        "invitee",
        "admin",
        "labeler",
        "model",
        "model2",
        "batch",
        status=201,
    )
    seen("admin", root.get("/admin"), "invitee", "admin", "labeler", "model", "model2", "batch")
    seen(
        "user exists",
        root.post("/admin/users", data={"name": P["invitee"], "csrf_token": tok}),
        "invitee",
        "admin",
        status=409,
    )
    seen(
        "no such model",
        root.post("/admin/batches", data={"model": P["nomodel"], "csrf_token": tok}),
        "nomodel",
        status=404,
    )
    invite = store.new_invite(P["invitee"])
    seen("invite", client(app).get(f"/invite/{invite}"), "invitee")
    seen("invite signed in", root.get(f"/invite/{invite}"), "invitee", "admin")

    seen("label", root.get("/label"), "admin", "prompt", "answer")
    t = root.get("/api/tasks/next").json()["task"]
    r = root.post(
        f"/api/tasks/{t['id']}/ranking",
        headers={"X-CSRF-Token": tok},
        json={
            "ranks": [0, 1, 2],
            "better_answer": P["better"],
            "idempotency_key": "xss-ranking-1",
            "flags": [{"answer": 1, "kind": "harmful"}],
        },
    )
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
    seen(
        "login failed",
        anon.post(
            "/login", data={"name": "nobody", "password": "wrong-password", "next": nxt, "csrf_token": csrf_of(anon)}
        ),
        "next",
        status=401,
    )
    # the name typed in a failed sign-in is shown in the admin's audit log
    anon.post("/login", data={"name": P["signin"], "password": "wrong-password", "csrf_token": csrf_of(anon)})
    seen("admin audit log", root.get("/admin"), "signin")
    # a planted CSRF cookie is never echoed into forms or the <meta> tag: it is not signed for the
    # session, so the page gets (and sets) a fresh token instead
    planted = '"><script>alert(1)</script><svg/onload=alert(1)>'
    cookie = f"rlhf_session={root.cookies['rlhf_session']}; rlhf_csrf={planted}"
    for path in ("/login", "/label", "/admin"):
        r = TestClient(app).get(path, headers={"Cookie": cookie})
        seen(f"planted cookie {path}", r)
        assert str(escape(planted)) not in r.text and "rlhf_csrf=" in r.headers["set-cookie"]

    # the data itself is kept as typed (escaping is the page's business, not the store's)
    assert store.demonstrations()[0]["response"] == P["better"]
    assert store.rankings(P["batch"])[0]["responses"] == [f"{P['answer']} {j}" for j in range(3)]
    # and the policy forbids inline script anyway
    csp = root.get("/label").headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    store.close()


# ---------------------------------------------------------------- rankings posted at once


@contextmanager
def first_ranking_insert_held(engine, others: int, timeout: float = 20.0):
    """Hold the first ``INSERT INTO rankings`` until ``others`` other threads have sent their SELECT of the
    task row (``FOR UPDATE`` on PostgreSQL: they block on the lock), and 0.3 s more: every request is then
    in flight while the first one writes, whatever the scheduling. Yields the threads that inserted.
    (Only for PostgreSQL: on SQLite the others wait at BEGIN IMMEDIATE and never send that SELECT.)"""
    cond = threading.Condition()
    readers: set[int] = set()
    inserters: list[int] = []

    def hook(conn, cursor, statement, parameters, context, executemany):
        sql = " ".join(statement.split()).upper()
        me = threading.get_ident()
        if sql.startswith("SELECT") and "FROM TASKS WHERE TASKS.ID =" in sql:
            with cond:
                readers.add(me)
                cond.notify_all()
        elif sql.startswith("INSERT INTO RANKINGS"):
            with cond:
                inserters.append(me)
                if len(inserters) > 1:
                    return
                assert cond.wait_for(lambda: len(readers - {me}) >= others, timeout), (len(readers), others)
            time.sleep(0.3)

    event.listen(engine, "before_cursor_execute", hook)
    try:
        yield inserters
    finally:
        event.remove(engine, "before_cursor_execute", hook)


def _post_at_once(app, posts: list[tuple[dict, str, dict]]) -> tuple[list[int], list[dict]]:
    """Each (cookies, path, body) posted from its own thread, all released at the same moment."""
    n = len(posts)
    start = threading.Barrier(n, timeout=60)
    statuses: list[int] = [0] * n
    bodies: list[dict] = [{}] * n

    def post(i: int) -> None:
        cookies, path, body = posts[i]
        c = TestClient(app, raise_server_exceptions=False)
        c.cookies.update(cookies)
        start.wait()
        r = c.post(path, json=body, headers={"X-CSRF-Token": cookies["rlhf_csrf"]})
        statuses[i] = r.status_code
        bodies[i] = r.json()

    threads = [threading.Thread(target=post, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not any(th.is_alive() for th in threads)
    return statuses, bodies


def _signed_cookies(app, store, name: str) -> dict:
    store.create_user(name, password="password123")
    return dict(client(app, name).cookies.items())


def _race(app, store, n: int, hold: bool) -> tuple[list[int], list[dict], int]:
    """``n`` threads post the same ranking with the same key at the same moment; with ``hold`` (PostgreSQL)
    the first INSERT waits until all the others are in flight. Returns statuses, bodies, INSERTs made."""
    cookies = _signed_cookies(app, store, "racer")
    store.add_tasks("race", [TaskIn([{"role": "user", "content": "q"}], ["a", "b", "c"], external_id="1")])
    task = store.next_task(store.users()[-1].id, batch="race").id
    body = {
        "ranks": [2, 0, 1],
        "idempotency_key": "race-same-key-1",
        "better_answer": "better",
        "flags": [{"answer": 0, "kind": "harmful"}],
    }
    posts = [(cookies, f"/api/tasks/{task}/ranking", body)] * n
    if not hold:
        return (*_post_at_once(app, posts), -1)
    with first_ranking_insert_held(store.engine, others=n - 1) as inserters:
        statuses, bodies = _post_at_once(app, posts)
    return statuses, bodies, len(inserters)


def _check_race(store, statuses, bodies, n) -> None:
    assert sorted(statuses) == [200] * (n - 1) + [201], (statuses, bodies)
    first = bodies[statuses.index(201)]
    assert first["duplicate"] is False
    assert all(
        b["duplicate"] is True and b["ranking_id"] == first["ranking_id"] for s, b in zip(statuses, bodies) if s == 200
    ), bodies
    rows = store.rankings("race")
    assert len(rows) == 1 and rows[0]["ranks"] == [2, 0, 1] and rows[0]["meta"]["ranking_id"] == first["ranking_id"]
    assert rows[0]["meta"]["flags"] == [{"response": 0, "kind": "harmful"}]  # the losers' flags rolled back
    assert [d["response"] for d in store.demonstrations()] == ["better"]


def test_same_ranking_posted_at_once_is_stored_once_sqlite(tmp_path):
    app, store = make_app(tmp_path, StubPool(["sft"]))
    n = 8
    statuses, bodies, _ = _race(app, store, n, hold=False)
    _check_race(store, statuses, bodies, n)
    store.close()


def test_same_ranking_posted_at_once_is_stored_once_postgresql(postgres_url, tmp_path):  # noqa: F811
    """All 6 posts are in flight while the first one writes: the task row's lock makes the others wait
    and then find the stored ranking (one INSERT in all); without the lock they would insert too and be
    answered by the unique (task, user) key's IntegrityError branch — the same answers either way."""
    app, store = make_app(tmp_path, StubPool(["sft"]), db=postgres_url)
    n = 6
    statuses, bodies, inserts = _race(app, store, n, hold=True)
    assert inserts == 1, inserts
    _check_race(store, statuses, bodies, n)
    store.close()


# ---------------------------------------------------------------- ranking integrity


def _last_slot_race(app, store, hold: bool) -> None:
    """Two labelers post a ranking of a task with one slot left (2 labels, 1 given) at the same moment:
    one gets the slot (201), the other a 409 that says the task is full; the task keeps 2 rankings."""
    posts = [
        (_signed_cookies(app, store, name), "", {"ranks": [0, 1], "idempotency_key": f"slot-{name}-1"})
        for name in ("left", "right")
    ]
    first, _ = store.create_user("first", password="password123")
    store.add_tasks(
        "slot", [TaskIn([{"role": "user", "content": "q"}], ["a", "b"], external_id="1")], labels_per_task=2
    )
    task = store.next_task(first, batch="slot").id
    store.add_ranking(first, task, [1, 0], "slot-first-1")
    posts = [(cookies, f"/api/tasks/{task}/ranking", body) for cookies, _, body in posts]
    if hold:
        with first_ranking_insert_held(store.engine, others=1):
            statuses, bodies = _post_at_once(app, posts)
    else:
        statuses, bodies = _post_at_once(app, posts)
    assert sorted(statuses) == [201, 409], (statuses, bodies)
    loser = bodies[statuses.index(409)]["error"]["message"]
    assert f"task {task} already has the 2 rankings it needs" in loser, loser
    assert store.count_rankings("slot") == 2


def test_two_labelers_racing_for_the_last_slot_sqlite(tmp_path):
    app, store = make_app(tmp_path, StubPool(["sft"]))
    _last_slot_race(app, store, hold=False)
    store.close()


def test_two_labelers_racing_for_the_last_slot_postgresql(postgres_url, tmp_path):  # noqa: F811
    """The second request reads the task while the first has inserted but not committed: only the
    row lock (SELECT … FOR UPDATE) makes it wait and then see the slot taken."""
    app, store = make_app(tmp_path, StubPool(["sft"]), db=postgres_url)
    _last_slot_race(app, store, hold=True)
    store.close()


def test_ranking_only_for_a_task_in_ones_own_queue(tmp_path):
    """The bug this guards against: a labeler could rank a task already ranked by someone else at
    labels_per_task=1, or one they skipped, and get 201 (tasks ended with more rankings than allowed)."""
    app, store = make_app(tmp_path, StubPool(["sft"]))
    store.add_tasks(
        "q", [TaskIn([{"role": "user", "content": f"q{i}"}], ["a", "b"], external_id=str(i)) for i in range(3)]
    )
    ann, bob = client_for(app, store, "ann"), client_for(app, store, "bob")
    taken = ann.get("/api/tasks/next").json()["task"]["id"]
    assert bob.get("/api/tasks/next").json()["task"]["id"] != taken  # the queue leased it to ann
    assert rank(ann, taken, [0, 1], "ann-key-0001").status_code == 201
    r = rank(bob, taken, [1, 0], "bob-key-0001")
    assert r.status_code == 409 and f"task {taken} already has the 1 ranking it needs" in message(r)
    skipped = bob.get("/api/tasks/next").json()["task"]["id"]
    assert bob.post(f"/api/tasks/{skipped}/skip", headers={"X-CSRF-Token": csrf_of(bob)}).status_code == 200
    r = rank(bob, skipped, [1, 0], "bob-key-0002")
    assert r.status_code == 409 and f"you skipped task {skipped}" in message(r)
    assert [row["meta"]["labeler"] for row in store.rankings("q")] == ["ann"]
    store.close()


def test_idempotency_key_is_scoped_to_user_and_task_and_never_drops_a_ranking(tmp_path):
    """The bug this guards against: a key reused on another task answered ``200 duplicate`` and stored nothing for that
    task; the same key with other ranks on the same task silently kept the first."""
    app, store = make_app(tmp_path, StubPool(["sft"]))
    store.add_tasks(
        "k", [TaskIn([{"role": "user", "content": f"q{i}"}], ["a", "b", "c"], external_id=str(i)) for i in range(2)]
    )
    ann = client_for(app, store, "ann")
    one = ann.get("/api/tasks/next").json()["task"]["id"]
    assert rank(ann, one, [0, 1, 2], "same-key-0001").status_code == 201
    assert rank(ann, one, [0, 1, 2], "same-key-0001").json()["duplicate"] is True  # a retry
    r = rank(ann, one, [2, 1, 0], "same-key-0001")
    assert r.status_code == 409, r.text
    assert "'same-key-0001' was already used for a different ranking of task" in message(r)
    assert "stored ranks [0, 1, 2]" in message(r)
    two = ann.get("/api/tasks/next").json()["task"]["id"]
    r = rank(ann, two, [2, 1, 0], "same-key-0001")  # the same key on another task: another submission
    assert r.status_code == 201 and r.json()["duplicate"] is False
    assert {row["meta"]["task_id"]: row["ranks"] for row in store.rankings("k")} == {one: [0, 1, 2], two: [2, 1, 0]}
    bob = client_for(app, store, "bob")  # another user's same key is theirs
    store.add_tasks("k2", [TaskIn([{"role": "user", "content": "q"}], ["a", "b"], external_id="1")], labels_per_task=2)
    shared = bob.get("/api/tasks/next").json()["task"]["id"]
    assert rank(ann, shared, [0, 1], "shared-key-01").status_code == 201
    assert rank(bob, shared, [1, 0], "shared-key-01").status_code == 201
    store.close()


def client_for(app, store, name: str) -> TestClient:
    store.create_user(name, password="password123")
    return client(app, name)


def rank(c: TestClient, task: int, ranks: list, key: str, **extra):
    return c.post(
        f"/api/tasks/{task}/ranking",
        json={"ranks": ranks, "idempotency_key": key, **extra},
        headers={"X-CSRF-Token": csrf_of(c)},
    )


def message(r) -> str:
    return r.json()["error"]["message"]


# ---------------------------------------------------------------- sign-in under attack


def throttled_app(root: Path, **limits) -> tuple:
    run = root / "run"
    store = Store.for_run(run)
    cfg = ServeConfig(run=str(run), rate_limit=10_000, **limits)
    app = create_app(cfg, store=store, pool=StubPool(["sft"]))
    store.create_user("root", role="admin", password="password123")
    store.create_user("ann", password="password123")
    return app, store


def login(c: TestClient, name: str, password: str):
    return c.post("/login", data={"name": name, "password": password, "csrf_token": csrf_of(c)}, follow_redirects=False)


def test_brute_force_is_throttled_and_the_user_signs_in_after_the_window(tmp_path, monkeypatch):
    """The bug this guards against: a stream of wrong passwords was answered 401 every time, never throttled.
    The window is long enough for 20 slow password checks on a loaded machine; the clock is then moved past it."""
    import rlhfkit.feedback.accounts as accounts

    window = 120.0
    app, store = throttled_app(tmp_path, login_failures=5, login_failures_per_address=50, login_window_s=window)
    attacker = TestClient(app, client=("203.0.113.9", 4000))
    codes = [login(attacker, "ann", f"guess-{i:04d}").status_code for i in range(20)]
    assert codes == [401] * 5 + [429] * 15, codes
    r = login(attacker, "ann", "guess-x")
    assert "too many failed sign-ins" in r.text and 1 <= int(r.headers["retry-after"]) <= window + 1
    # the name is locked from every address, even with the right password (it is not even checked)...
    user = TestClient(app, client=("198.51.100.7", 5000))
    assert login(user, "ann", "password123").status_code == 429
    # ...and another name from the attacker's address still works (per-address limit not reached)
    assert login(attacker, "root", "password123").status_code == 303
    # the audit log on the admin page: the five wrong passwords and the throttled attempts
    admin = TestClient(app)
    sign_in(admin, "root")
    log = admin.get("/api/admin/stats").json()["failed_sign_ins"]
    assert [(f["name"], f["address"], f["reason"]) for f in log] == [
        ("ann", "198.51.100.7", "throttled"),
        ("ann", "203.0.113.9", "throttled"),
    ] + [("ann", "203.0.113.9", "wrong password")] * 5
    page = admin.get("/admin").text
    assert page.count("<td>203.0.113.9</td><td>wrong password</td>") == 5
    # after the window the real user signs in
    real_now, later = accounts.utc_now, timedelta(seconds=int(r.headers["retry-after"]) + 1)
    monkeypatch.setattr(accounts, "utc_now", lambda: real_now() + later)
    assert login(user, "ann", "password123").status_code == 303
    store.close()


def test_sign_in_is_throttled_per_client_address(tmp_path):
    """Guessing one password for many names (password spraying) is limited by the client address."""
    app, store = throttled_app(tmp_path, login_failures=5, login_failures_per_address=6, login_window_s=60)
    sprayer = TestClient(app, client=("203.0.113.10", 4000))
    codes = [login(sprayer, name, "password123!").status_code for name in ("ann", "root", "x1", "x2", "x3", "x4", "x5")]
    assert codes == [401] * 6 + [429], codes
    assert login(sprayer, "ann", "password123").status_code == 429  # the address is locked, right password or not
    assert login(TestClient(app, client=("198.51.100.8", 5000)), "ann", "password123").status_code == 303
    store.close()


def _ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def test_sign_in_time_does_not_tell_whether_a_name_exists(tmp_path):
    """The bug: a real name took far longer to refuse than an unknown one. Unknown names (and users who
    have not chosen a password yet) now pay the same argon2 verification against a dummy hash."""
    app, store = throttled_app(tmp_path, login_failures=0, login_failures_per_address=0)
    store.create_user("invited-only")
    c = TestClient(app)
    tok = csrf_of(c)

    def attempt(name):
        return lambda: c.post("/login", data={"name": name, "password": "wrong-password", "csrf_token": tok})

    for name in ("ann", "nobody"):  # warm up (the dummy hash is made on first use)
        attempt(name)()
    known, unknown, invited = [], [], []
    for _ in range(9):  # interleaved, so that load from elsewhere hits all three alike
        known.append(_ms(attempt("ann")))
        unknown.append(_ms(attempt(f"nobody-{secrets.token_hex(3)}")))
        invited.append(_ms(attempt("invited-only")))
    k, u, i = (sorted(x)[4] for x in (known, unknown, invited))  # medians
    print(f"\nsign-in medians: known {k:.0f} ms, unknown {u:.0f} ms, invited {i:.0f} ms")
    assert abs(k - u) / max(k, u) < 0.2, (k, u)
    assert abs(k - i) / max(k, i) < 0.2, (k, i)
    store.close()


# ---------------------------------------------------------------- sessions


def test_https_public_url_makes_cookies_secure_host_only_and_turns_on_hsts(tmp_path):
    """The bug this guards against: behind --public-url https://… neither cookie had Secure, and there was no HSTS."""
    run = tmp_path / "run"
    store = Store.for_run(run)
    app = create_app(
        ServeConfig(run=str(run), public_url="https://labels.example.org"), store=store, pool=StubPool(["sft"])
    )
    store.create_user("ann", password="password123")
    c = TestClient(app, base_url="https://testserver")
    r = c.get("/login")
    assert r.headers["strict-transport-security"] == "max-age=31536000"
    csrf_cookie = r.headers["set-cookie"]
    assert csrf_cookie.startswith("__Host-rlhf_csrf=") and "; Secure" in csrf_cookie and "Path=/" in csrf_cookie
    assert "Domain" not in csrf_cookie
    tok = c.cookies["__Host-rlhf_csrf"]
    r = c.post("/login", data={"name": "ann", "password": "password123", "csrf_token": tok}, follow_redirects=False)
    assert r.status_code == 303
    cookies = r.headers.get_list("set-cookie")
    session = next(x for x in cookies if x.startswith("__Host-rlhf_session="))
    assert all(a in session for a in ("; Secure", "; HttpOnly", "; SameSite=Lax", "; Path=/"))
    assert not any(x.startswith("rlhf_") for x in cookies)
    store.add_tasks("h", [TaskIn([{"role": "user", "content": "q"}], ["a", "b"], external_id="1")])
    task = c.get("/api/tasks/next").json()["task"]["id"]
    r = c.post(
        f"/api/tasks/{task}/ranking",
        json={"ranks": [0, 1], "idempotency_key": "https-key-1"},
        headers={"X-CSRF-Token": c.cookies["__Host-rlhf_csrf"]},
    )
    assert r.status_code == 201 and r.headers["strict-transport-security"]
    plain, _ = make_app(tmp_path / "plain", StubPool(["sft"]))
    r = TestClient(plain).get("/login")
    assert "strict-transport-security" not in r.headers and "Secure" not in r.headers["set-cookie"]
    store.close()


def test_password_reset_and_change_end_the_other_sessions(tmp_path):
    """The bug this guards against: after a password reset through a new invite link, the old session kept working."""
    app, store = throttled_app(tmp_path)
    old = TestClient(app)
    sign_in(old, "ann")
    assert old.get("/api/tasks/next").status_code == 200
    invite = store.new_invite("ann")  # `rlhfkit users invite ann`: a reset
    new = TestClient(app)
    r = new.post(
        f"/invite/{invite}", data={"password": "a-new-password", "csrf_token": csrf_of(new)}, follow_redirects=False
    )
    assert r.status_code == 303
    assert old.get("/api/tasks/next").status_code == 401  # the old session ended
    assert new.get("/api/tasks/next").status_code == 200
    # a change on the account page keeps the session that made it and ends the others
    other = TestClient(app)
    sign_in(other, "ann", "a-new-password")
    r = new.post(
        "/account/password", data={"current": "not-the-password", "new": "third-password", "csrf_token": csrf_of(new)}
    )
    assert r.status_code == 403 and "the current password is wrong" in r.text
    assert other.get("/api/tasks/next").status_code == 200  # nothing changed
    r = new.post("/account/password", data={"current": "a-new-password", "new": "short", "csrf_token": csrf_of(new)})
    assert r.status_code == 400 and "at least 8 characters" in r.text
    r = new.post(
        "/account/password", data={"current": "a-new-password", "new": "third-password", "csrf_token": csrf_of(new)}
    )
    assert r.status_code == 200 and "Every other session of yours has been signed out" in r.text
    assert other.get("/api/tasks/next").status_code == 401
    assert new.get("/api/tasks/next").status_code == 200
    assert login(TestClient(app), "ann", "third-password").status_code == 303
    assert 'href="/account"' in new.get("/label").text
    store.close()


def test_a_planted_csrf_cookie_cannot_forge_an_admins_post(tmp_path):
    """The bug this guards against: any 20+ character value in cookie and form was accepted, so whoever
    could plant a cookie (a sibling subdomain, plain HTTP) could make a signed-in admin's browser grant
    the admin role."""
    app, store = throttled_app(tmp_path)
    store.create_user("mallory", password="password123")
    admin = TestClient(app)
    sign_in(admin, "root")
    session = admin.cookies["rlhf_session"]
    mallory = TestClient(app)
    anonymous_token = csrf_of(mallory)  # a token the server issued, to someone else while signed out
    sign_in(mallory, "mallory")
    planted = {
        "made up": secrets.token_urlsafe(24),
        "issued to a signed-out visitor": anonymous_token,
        "mallory's own session's": csrf_of(mallory),
    }
    for kind, token in planted.items():
        victim = TestClient(app)  # the admin's browser with the attacker's cookie planted beside the session
        victim.cookies.update({"rlhf_session": session, "rlhf_csrf": token})
        r = victim.post(
            "/admin/users", data={"name": f"evil-{secrets.token_hex(3)}", "role": "admin", "csrf_token": token}
        )
        assert r.status_code == 403 and "CSRF" in r.text, (kind, r.status_code)
    assert [u.name for u in store.users() if u.role == "admin"] == ["root"]
    r = admin.post("/admin/users", data={"name": "carol", "csrf_token": csrf_of(admin)})
    assert r.status_code == 201  # the admin's own token works
    store.close()


# ---------------------------------------------------------------- bad input at the edge


def test_ids_beyond_the_database_range_are_clear_4xx(tmp_path):
    """The bug this guards against: ids above 2^63 gave a plain-text 500 that reset the connection."""
    app, store = throttled_app(tmp_path)
    c = TestClient(app, raise_server_exceptions=False)
    sign_in(c, "ann")
    h = {"X-CSRF-Token": csrf_of(c)}
    for big in (2**64, 2**63, 2**31):
        r = c.post(f"/api/tasks/{big}/skip", headers=h)
        assert r.status_code == 422 and "task_id: Input should be less than or equal to 2147483647" in message(r)
        r = c.post(f"/api/tasks/{big}/ranking", json={"ranks": [0, 1], "idempotency_key": "big-id-key"}, headers=h)
        assert r.status_code == 422 and "task_id" in message(r)
        r = c.get(f"/arena/{big}")
        assert r.status_code == 422 and "battle_id" in r.text and r.headers["content-security-policy"] == CSP
        r = c.post(f"/arena/{big}/vote", data={"outcome": "a", "csrf_token": h["X-CSRF-Token"]})
        assert r.status_code == 422
    assert c.post("/api/tasks/0/skip", headers=h).status_code == 422
    assert c.post(f"/api/tasks/{2**31 - 1}/skip", headers=h).status_code == 404  # in range: just not there
    store.close()


@pytest.mark.parametrize("ranks", [[0.0, 1.0], [False, True], ["0", "1"], [0, 1.5], [0, 2**70]])
def test_ranks_are_strict_integers(tmp_path, ranks):
    """The bug this guards against: ranks [0.0, 1.0] and [false, true] were accepted."""
    app, store = throttled_app(tmp_path)
    store.add_tasks("r", [TaskIn([{"role": "user", "content": "q"}], ["a", "b"], external_id="1")])
    c = TestClient(app)
    sign_in(c, "ann")
    task = c.get("/api/tasks/next").json()["task"]["id"]
    r = rank(c, task, ranks, "strict-ranks-1")
    assert r.status_code == 422 and message(r).startswith("ranks."), r.text
    r = rank(c, task, [0, 1], "strict-ranks-2", flags=[{"answer": 1.0, "kind": "harmful"}])
    assert r.status_code == 422 and "flags.0.answer" in message(r)
    h = {"X-CSRF-Token": csrf_of(c), "content-type": "application/json"}
    for seconds in ("Infinity", "NaN", "1e400"):
        r = c.post(
            f"/api/tasks/{task}/ranking",
            headers=h,
            content=f'{{"ranks": [0, 1], "idempotency_key": "strict-ranks-3", "seconds": {seconds}}}',
        )
        assert r.status_code == 422 and "seconds" in message(r), (seconds, r.text)
    r = c.post(
        f"/api/tasks/{task}/ranking",
        headers=h,
        content=b'{"ranks": [0, 1], "idempotency_key": "strict-ranks-4", "better_answer": "\\ud800"}',
    )
    assert r.status_code == 422 and "better_answer" in message(r)  # a lone surrogate is not text
    assert store.count_rankings() == 0
    assert rank(c, task, [0, 1], "strict-ranks-5").status_code == 201
    store.close()


def test_an_unexpected_error_is_one_line_of_json_with_headers_and_a_logged_request_id(tmp_path, caplog):
    """The bug this guards against: a 500 was plain text without CSP and reset the keep-alive connection."""
    app, store = throttled_app(tmp_path)

    @app.get("/api/boom")
    def boom():
        raise RuntimeError("a bug")

    c = TestClient(app, raise_server_exceptions=False)
    with caplog.at_level("ERROR", logger="rlhfkit.web"):
        r = c.get("/api/boom")
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    assert r.text.count("\n") == 0 and "a bug" not in r.text and "Traceback" not in r.text
    rid = r.headers["x-request-id"]
    assert r.json()["error"] == {
        "message": f"internal error: the server log has the details under request id {rid}",
        "type": "server_error",
        "code": 500,
        "request_id": rid,
    }
    for h in ("content-security-policy", "x-content-type-options", "x-frame-options", "referrer-policy"):
        assert h in r.headers, h
    logged = [rec for rec in caplog.records if rid in rec.getMessage()]
    assert logged and "RuntimeError: a bug" in caplog.text
    assert c.get("/login").headers["x-request-id"] != rid  # every response has its own
    store.close()


def test_users_add_refuses_control_characters_and_links_to_the_real_server(tmp_path, monkeypatch):
    """The bug this guards against: ``users add`` accepted control characters in names and printed an
    invite link with port 8000 whatever the server's port."""
    import uvicorn
    from typer.testing import CliRunner

    from rlhfkit.cli import app as cli
    from rlhfkit.web.app import serve

    run = str(tmp_path / "run")
    runner = CliRunner()
    for bad in ("ann\x07", "a\x1b[31mred", "\u202eevil", "two\nlines"):
        r = runner.invoke(cli, ["users", "add", bad, "--run", run])
        assert r.exit_code == 2 and "control or invisible characters" in r.output, (bad, r.output)
    r = runner.invoke(cli, ["users", "add", "früh", "--run", run])  # before any server ran: the default, said so
    assert r.exit_code == 0 and r.stdout.startswith("http://127.0.0.1:8000/invite/") and "no server" in r.output
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    serve(ServeConfig(run=run, port=54321), say=lambda *_: None)
    r = runner.invoke(cli, ["users", "add", "ann", "--run", run])
    assert r.exit_code == 0 and r.stdout.strip().startswith("http://127.0.0.1:54321/invite/"), r.output
    serve(ServeConfig(run=run, port=54321, public_url="https://labels.example.org/"), say=lambda *_: None)
    r = runner.invoke(cli, ["users", "invite", "ann", "--run", run])
    assert r.stdout.strip().startswith("https://labels.example.org/invite/"), r.output
    r = runner.invoke(cli, ["users", "add", "bob", "--run", run, "--url", "http://10.1.1.1:9/"])
    assert r.stdout.strip().startswith("http://10.1.1.1:9/invite/")
    # the admin page refuses such names too
    app, store = throttled_app(tmp_path / "web")
    admin = TestClient(app)
    sign_in(admin, "root")
    r = admin.post("/admin/users", data={"name": "bad\x00name", "csrf_token": csrf_of(admin)})
    assert r.status_code == 400 and "U+0000" in r.text
    store.close()


# ---------------------------------------------------------------- the status code comes from the error's class


class FailingPool(StubPool):
    """A pool whose generation raises ``error`` (as a model version that went away would)."""

    def __init__(self, names: list[str], error: Exception):
        super().__init__(names)
        self.error = error

    def stream(self, name, messages, max_new_tokens=128, **kw):
        raise self.error
        yield  # a generator, as the real pool's stream


@pytest.mark.parametrize(
    "error, status, code",
    [
        (NotFound("model version 'sft' went away"), 404, "not_found"),
        (Conflict("model version 'sft' is busy being replaced"), 409, None),
        (UserError("the prompt is longer than the model's context"), 400, "invalid_value"),
    ],
)
def test_user_errors_answer_by_class_on_pages_api_and_openai_routes(tmp_path, error, status, code):
    """NotFound is 404, Conflict 409, any other UserError 400, whatever the message says: on a page
    (the error page), on /api/chat (JSON with a request id header) and on /v1 (OpenAI's shape)."""
    app, store = make_app(tmp_path, FailingPool(["sft", "ppo1"], error))
    store.create_user("ann", password="password123")
    key = store.new_api_key("ann")
    c = client(app, "ann")
    body = {"model": "sft", "messages": [{"role": "user", "content": "hi"}]}

    page = c.post("/arena", data={"prompt": "Name a colour.", "csrf_token": csrf_of(c)}, follow_redirects=False)
    assert page.status_code == status and page.headers["content-type"].startswith("text/html")
    assert str(escape(str(error))) in page.text and page.headers["x-request-id"]

    api = c.post("/api/chat", json=body, headers={"X-CSRF-Token": csrf_of(c)})
    assert api.status_code == status and api.json()["error"]["message"] == str(error)

    v1 = TestClient(app).post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    assert v1.status_code == status
    assert v1.json()["error"] == {
        "message": str(error),
        "type": "not_found_error" if status == 404 else "invalid_request_error",
        "param": None,
        "code": code,
    }
    store.close()
