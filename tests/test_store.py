"""The preference store on SQLite (the same checks run on PostgreSQL in test_store_postgres.py), and
the inter-annotator agreement metrics on hand-computed values."""

from __future__ import annotations

import math
import sqlite3
import threading

import psycopg.errors
import pytest
from sqlalchemy.exc import OperationalError

from rlhfkit.errors import NotFound, UserError
from rlhfkit.feedback.agreement import (
    agreement_summary,
    average_ranks,
    kendalls_w,
    pair_agreement,
    share_agreeing_pairs,
)
from rlhfkit.feedback.store import Conflict, SignIn, SignInLimits, Store, Submitted, TaskIn, _is_lock_error


def exercise_store(store: Store) -> None:
    """Users, tasks, idempotent rankings, the labeler's queue, skips, flags, demonstrations, concurrency,
    arena votes, sign-in throttling and its audit log, sessions ended by a new password, settings."""
    ann, invite = store.create_user("ann")
    assert store.check_password("ann", "whatever1") is None  # no password before the invite is used
    assert store.accept_invite(invite, "ann-password") == ann and store.check_password("ann", "ann-password") == ann
    assert store.accept_invite(invite, "again-password") is None  # an invite works once
    bob, _ = store.create_user("bob", password="bob-password")
    with pytest.raises(UserError, match="exists already"):
        store.create_user("bob")
    msgs = [{"role": "user", "content": "q"}]
    assert store.add_tasks("b1", [TaskIn(msgs, ["x", "y", "z"], external_id=str(i)) for i in range(3)], 2) == 3
    assert store.add_tasks("b1", [TaskIn(msgs, ["x", "y", "z"], external_id="0")]) == 0  # published once
    t = store.next_task(ann)
    sent = {"flags": [(2, "harmful")], "better_answer": "w"}
    first = store.add_ranking(ann, t.id, [0, 1, 1], "key-a-1", **sent)
    # a retry (same key, same payload, flags in any order) writes nothing and answers the first ranking
    assert store.add_ranking(ann, t.id, [0, 1, 1], "key-a-1", **sent) == Submitted(first.ranking_id, True)
    # the same key with anything else changed is a conflict that says so, never a "duplicate" that drops it
    for changed in ({"ranks": [1, 0, 1]}, {"flags": []}, {"flags": [(1, "harmful")]}, {"better_answer": "v"}):
        kw = {"ranks": [0, 1, 1], **sent, **changed}
        with pytest.raises(Conflict, match="key-a-1' was already used for a different ranking of task"):
            store.add_ranking(ann, t.id, kw.pop("ranks"), "key-a-1", **kw)
    with pytest.raises(Conflict, match="already ranked"):
        store.add_ranking(ann, t.id, [1, 0, 2], "key-a-2")
    with pytest.raises(UserError, match="dense"):
        store.add_ranking(bob, t.id, [0, 2, 2], "key-b-0")
    assert store.next_task(bob).id == t.id  # labels_per_task=2: bob still gets it
    # keys are scoped to (user, task): ann's key sent by bob is bob's own submission
    assert store.add_ranking(bob, t.id, [0, 1, 2], "key-a-1").duplicate is False
    assert store.next_task(bob).id != t.id
    # the task has its 2 rankings: a third labeler is refused, though the ranking is valid
    cid, _ = store.create_user("cid", password="cid-password")
    with pytest.raises(Conflict, match=f"task {t.id} already has the 2 rankings it needs"):
        store.add_ranking(cid, t.id, [0, 1, 2], "key-c-1")
    skipped = store.next_task(ann).id
    store.skip(ann, skipped)
    with pytest.raises(Conflict, match=f"you skipped task {skipped}"):
        store.add_ranking(ann, skipped, [0, 1, 2], "key-a-3")
    assert store.progress(ann) == {"done": 1, "left": 1}
    # the same key on another task is another submission: stored, not a "duplicate" of the first
    last = store.next_task(ann).id
    assert store.add_ranking(ann, last, [2, 1, 0], "key-a-1").duplicate is False
    assert store.ranks_by_task() == {t.id: [[0, 1, 1], [0, 1, 2]], last: [[2, 1, 0]]}
    assert store.demonstrations() == [{"messages": msgs, "response": "w", "meta": {"task_id": t.id, "labeler": "ann"}}]
    assert store.batches() == [{"batch": "b1", "tasks": 3, "ranked": 2}]

    # 8 threads x 10 rankings, each sent twice: every ranking stored exactly once
    store.add_tasks("load", [TaskIn(msgs, ["x", "y"], external_id=str(i)) for i in range(80)])
    users = [store.create_user(f"u{i}", password="password123")[0] for i in range(8)]
    failures = []

    def work(u: int) -> None:
        for n in range(10):
            task = store.next_task(u, batch="load")
            for _ in range(2):
                try:
                    store.add_ranking(u, task.id, [0, 1], f"load-{u}-{n}")
                except Exception as e:  # noqa: BLE001 — any error is a failure here
                    failures.append(repr(e))

    threads = [threading.Thread(target=work, args=(u,)) for u in users]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert failures == []
    assert store.count_rankings("load") == 80

    # the queue leases a task to whoever gets it: labelers working at once get different tasks, a
    # reload gets the same one, and a task whose slots are all leased goes to others only as a last resort
    store.add_tasks("lease", [TaskIn(msgs, ["x", "y"], external_id=str(i)) for i in range(2)])
    first, second = store.next_task(users[0], batch="lease").id, store.next_task(users[1], batch="lease").id
    assert first != second and store.next_task(users[0], batch="lease").id == first
    assert store.next_task(users[2], batch="lease").id == first  # everything leased: the oldest open task
    store.skip(users[0], first)  # a skip gives the lease back
    assert store.next_task(users[3], batch="lease").id == first

    bid = store.add_battle(ann, "p", "sft", "ppo1", "a", "b")
    store.vote(ann, bid, "b")
    store.vote(ann, bid, "b")  # the same vote again is a no-op
    with pytest.raises(UserError, match="already has a vote"):
        store.vote(ann, bid, "a")
    with pytest.raises(LookupError):
        store.vote(bob, bid, "a")  # not bob's battle
    assert store.votes() == [("sft", "ppo1", "b")]
    key = store.new_api_key("bob")
    assert store.api_key_user(key).name == "bob" and store.api_key_user("rk-nope") is None
    token = store.new_session(bob)
    assert store.session_user(token).id == bob
    store.end_session(token)
    assert store.session_user(token) is None
    exercise_sign_in(store, ann, bob)


def exercise_sign_in(store: Store, ann: int, bob: int) -> None:
    """Throttling per name and per address, the audit log, sessions ended by a new password, settings."""
    limits = SignInLimits(per_name=3, per_address=5, window_s=60)
    assert store.sign_in("ann", "ann-password", "10.0.0.1", limits) == SignIn(user_id=ann)
    for _ in range(3):
        assert store.sign_in("ann", "wrong-password", "10.0.0.1", limits) == SignIn()
    refused = store.sign_in("ann", "ann-password", "10.0.0.2", limits)  # the right password, another address
    assert refused.throttled and refused.user_id is None and 55 < refused.retry_after <= 60
    assert store.sign_in("bob", "bob-password", "10.0.0.1", limits).user_id == bob  # per name, not per address yet
    assert store.sign_in("nobody", "x", "10.0.0.1", limits) == SignIn()  # the address's 4th failure
    store.sign_in("cid", "x", "10.0.0.1", limits)  # its 5th
    assert store.sign_in("bob", "bob-password", "10.0.0.1", limits).throttled  # now the address is throttled
    assert store.sign_in("bob", "bob-password", "10.0.0.3", limits).user_id == bob
    log = store.failed_sign_ins()
    assert [(f["name"], f["address"], f["reason"]) for f in log] == [
        ("bob", "10.0.0.1", "throttled"),
        ("cid", "10.0.0.1", "wrong password"),
        ("nobody", "10.0.0.1", "unknown name"),
        ("ann", "10.0.0.2", "throttled"),
    ] + [("ann", "10.0.0.1", "wrong password")] * 3
    assert store.sign_in("ann", "x", "10.0.0.4", SignInLimits(window_s=0.001)) == SignIn()  # old failures left
    # a new password ends every other session; accepting a (reset) invite ends them all
    a, b, c = (store.new_session(ann) for _ in range(3))
    store.set_password(ann, "new-ann-password", keep_session=a)
    assert store.session_user(a).id == ann and store.session_user(b) is None and store.session_user(c) is None
    assert store.check_password("ann", "new-ann-password") == ann
    assert store.check_password("ann", "ann-password") is None
    invite = store.new_invite("ann")
    assert store.accept_invite(invite, "reset-password") == ann and store.session_user(a) is None
    # settings: a secret is made once and then kept
    assert store.setting("nothing") is None
    assert store.secret("s") == store.secret("s") and len(store.secret("s")) >= 40
    store.set_setting("base_url", "http://x:1")
    store.set_setting("base_url", "http://x:2")
    assert store.setting("base_url") == "http://x:2"


def test_store_on_sqlite(tmp_path):
    store = Store.for_run(tmp_path)
    exercise_store(store)
    with store.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    assert (tmp_path / "feedback.db").exists()


def test_bad_database_url_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="--db"):
        Store("nosuchdb://x")
    with pytest.raises(UserError, match="cannot open the database"):
        Store(f"sqlite:///{tmp_path}/missing/dir/x.db")


def test_store_errors_have_a_class_per_kind(tmp_path):
    """The web app picks the status code by class: NotFound 404, Conflict 409, other UserErrors 400."""
    store = Store.for_run(tmp_path)
    ann, _ = store.create_user("ann")
    with pytest.raises(Conflict, match="exists already"):
        store.create_user("ann")
    for missing in (lambda: store.vote(ann, 12345, "a"), lambda: store.skip(ann, 12345),
                    lambda: store.add_ranking(ann, 12345, [0, 1], "key-12345"),
                    lambda: store.set_password(999, "password123"), lambda: store.new_api_key("nobody"),
                    lambda: store.new_invite("nobody")):  # fmt: skip
        with pytest.raises(NotFound):
            missing()
    bid = store.add_battle(ann, "p", "sft", "ppo1", "a", "b")
    store.vote(ann, bid, "a")
    with pytest.raises(Conflict, match="already has a vote"):
        store.vote(ann, bid, "tie")
    with pytest.raises(UserError) as bad:
        store.vote(ann, bid, "maybe")
    assert type(bad.value) is UserError
    store.close()


def test_lock_errors_are_told_apart_by_their_code(tmp_path):
    """Only a lock or serialization error is retried: SQLite's SQLITE_BUSY/LOCKED, PostgreSQL's
    SQLSTATE 40001/40P01; not another OperationalError."""
    path = tmp_path / "x.db"
    a, b = (sqlite3.connect(path, isolation_level=None, timeout=0) for _ in range(2))
    a.execute("CREATE TABLE t (x)")
    a.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError) as busy:
        b.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError) as no_table:
        b.execute("SELECT * FROM nothing")
    a.close(), b.close()
    assert _is_lock_error(OperationalError("BEGIN", {}, busy.value))
    assert not _is_lock_error(OperationalError("SELECT", {}, no_table.value))
    assert _is_lock_error(OperationalError("UPDATE", {}, psycopg.errors.SerializationFailure("x")))
    assert _is_lock_error(OperationalError("UPDATE", {}, psycopg.errors.DeadlockDetected("x")))
    assert not _is_lock_error(OperationalError("UPDATE", {}, psycopg.errors.UndefinedTable("x")))


def test_pair_agreement_by_hand():
    # pairs (0,1): both 0 first, agree; (0,2): both 0 first, agree; (1,2): a ties, b prefers 2 -> disagree
    assert pair_agreement([0, 1, 1], [0, 2, 1]) == (2, 3)
    assert pair_agreement([0, 1], [1, 0]) == (0, 1)
    # two tasks: the first with 3 labelers (3 labeler pairs x 1 answer pair), the second with one ranking
    tasks = [[[0, 1], [0, 1], [1, 0]], [[0, 1, 2]]]
    assert share_agreeing_pairs(tasks) == pytest.approx(1 / 3)  # only (l1, l2) agree
    assert math.isnan(share_agreeing_pairs([[[0, 1]]]))


def test_kendalls_w_by_hand():
    assert average_ranks([0, 1, 1, 2]) == [1, 2.5, 2.5, 4]
    assert kendalls_w([[0, 1, 2], [0, 1, 2]]) == 1.0
    assert kendalls_w([[0, 1, 2], [2, 1, 0]]) == 0.0  # R = (4, 4, 4): S = 0
    # m=3, n=3: ranks 1..3 -> R = (1+1+2, 2+3+1, 3+2+3) = (4, 6, 8), R̄ = 6, S = 8, W = 12*8/(9*24) = 4/9
    assert kendalls_w([[0, 1, 2], [0, 2, 1], [1, 0, 2]]) == pytest.approx(4 / 9)
    # ties: [0,0,1] -> (1.5, 1.5, 3); [0,1,2] -> (1, 2, 3): R = (2.5, 3.5, 6), R̄ = 4, S = 2.25+0.25+4 = 6.5
    # T = 2^3 - 2 = 6 (one tie group of two), W = 12*6.5 / (4*24 - 2*6) = 78/84
    assert kendalls_w([[0, 0, 1], [0, 1, 2]]) == pytest.approx(78 / 84)
    assert math.isnan(kendalls_w([[0, 1]]))
    s = agreement_summary({1: [[0, 1, 2], [0, 1, 2]], 2: [[0, 1], [1, 0]], 3: [[0, 1]]})
    assert s["tasks"] == 2 and s["pair_agreement"] == pytest.approx(3 / 4) and s["kendalls_w"] == pytest.approx(0.5)
