"""The preference store: everything people contribute, in one SQL database (SQLAlchemy).

    store = Store.open("sqlite:///runs/demo/feedback.db")      # or postgresql+psycopg://…
    store.add_tasks("round1", [TaskIn(messages, responses, meta)], labels_per_task=1)
    task = store.next_task(user_id)                            # what a labeler sees next
    store.add_ranking(user_id, task.id, ranks, key="uuid…")   # idempotent by key

Tables (``schema.py``): users, sessions, api_keys, model_versions, tasks (a prompt and K answers),
rankings (one per labeler and task; ``idempotency_key`` unique), skips, flags, demonstrations,
battles (arena).

Concurrency. SQLite (the default, a file in the run directory) runs in WAL mode with a 30 s
busy timeout and every transaction starts with ``BEGIN IMMEDIATE``: a writer takes the write lock
at the start instead of upgrading a read lock mid-transaction (the upgrade is the case SQLite cannot
wait out and reports "database is locked" at once). ``_retry`` repeats a transaction that still
fails with a lock/serialization error, with jittered back-off, so no lock error reaches a user.
PostgreSQL needs none of that; the same code runs on it.
"""

from __future__ import annotations

import json
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, event, func, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from rlhfkit.errors import UserError
from rlhfkit.feedback.schema import (ApiKey, Base, Battle, DemonstrationRow, Flag, ModelVersion, RankingRow, SessionRow,
                                     Skip, Task, User, utc_now, token_hash)

T = TypeVar("T")
FLAG_KINDS = ("harmful", "untruthful", "off-topic")
OUTCOMES = ("a", "b", "tie", "both_bad")


# ---------------------------------------------------------------- plain results


@dataclass
class TaskIn:
    """A task to publish: a prompt (chat messages), K >= 2 answers, and who wrote them."""

    messages: list[dict]
    responses: list[str]
    models: list[str] = field(default_factory=list)
    external_id: str = ""
    meta: dict = field(default_factory=dict)


@dataclass
class TaskView:
    id: int
    batch: str
    messages: list[dict]
    responses: list[str]
    meta: dict


@dataclass
class Submitted:
    ranking_id: int
    duplicate: bool  # True when this idempotency key was already stored (nothing new written)


def _is_lock_error(e: OperationalError) -> bool:
    text = str(e.orig if e.orig is not None else e).lower()
    return any(s in text for s in ("database is locked", "database table is locked", "busy",
                                   "could not serialize", "deadlock detected"))


def sqlite_url_for_run(run_dir: str | Path) -> str:
    return f"sqlite:///{Path(run_dir).resolve() / 'feedback.db'}"


class Store:
    """The preference store; thread-safe (one SQLAlchemy session per call)."""

    def __init__(self, url: str, echo: bool = False):
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url[len("postgresql://"):]  # psycopg 3, not psycopg2
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {"echo": echo}
        if self.is_sqlite:
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        else:
            kwargs["pool_pre_ping"] = True
        try:
            self.engine = create_engine(url, **kwargs)
        except Exception as e:  # bad URL, missing driver
            raise UserError(f"--db {url}: {str(e).splitlines()[0]}") from None
        if self.is_sqlite:
            _sqlite_pragmas(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        try:
            self._retry(lambda: Base.metadata.create_all(self.engine))
        except OperationalError as e:
            raise UserError(f"--db {url}: cannot open the database ({str(e.orig).strip().splitlines()[0]})") from None

    @classmethod
    def for_run(cls, run_dir: str | Path, url: str | None = None) -> "Store":
        """The run directory's store: ``url`` if given, else ``RUN/feedback.db`` (SQLite, WAL)."""
        if not url:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
        return cls(url or sqlite_url_for_run(run_dir))

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------ transactions

    def _retry(self, fn: Callable[[], T], attempts: int = 12) -> T:
        """Run ``fn``; on a lock or serialization error wait (jittered, growing) and run it again."""
        for attempt in range(attempts):
            try:
                return fn()
            except OperationalError as e:
                if not _is_lock_error(e) or attempt == attempts - 1:
                    raise
                time.sleep(min(2.0, 0.02 * 2**attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    def tx(self, fn: Callable[[Session], T]) -> T:
        """``fn(session)`` in one transaction, committed, retried on lock errors."""

        def once() -> T:
            with self._session() as s, s.begin():
                return fn(s)

        return self._retry(once)

    # ------------------------------------------------------------ users, sessions, keys

    def create_user(self, name: str, role: str = "labeler", password: str | None = None) -> tuple[int, str]:
        """A new user and their invite token (shown once; only its hash is stored)."""
        name = name.strip()
        if not name or len(name) > 80:
            raise UserError("a user name must be 1-80 characters")
        if role not in ("labeler", "admin"):
            raise UserError(f"role {role!r}: expected labeler or admin")
        invite = secrets.token_urlsafe(24)
        pw = hash_password(password) if password else None

        def add(s: Session) -> int:
            if s.scalar(select(User.id).where(User.name == name)) is not None:
                raise UserError(f"user {name!r} exists already")
            u = User(name=name, role=role, password_hash=pw, invite_hash=token_hash(invite))
            s.add(u)
            s.flush()
            return u.id

        return self.tx(add), invite

    def new_invite(self, name: str) -> str:
        invite = secrets.token_urlsafe(24)

        def upd(s: Session) -> None:
            u = s.scalar(select(User).where(User.name == name))
            if u is None:
                raise UserError(f"no user {name!r}")
            u.invite_hash = token_hash(invite)

        self.tx(upd)
        return invite

    def user(self, user_id: int) -> User | None:
        return self.tx(lambda s: s.get(User, user_id))

    def users(self) -> list[User]:
        return self.tx(lambda s: list(s.scalars(select(User).order_by(User.id))))

    def count_users(self) -> int:
        return self.tx(lambda s: s.scalar(select(func.count(User.id))) or 0)

    def accept_invite(self, invite: str, password: str) -> int | None:
        """Set the password of the invited user (the invite then expires); their id, or None."""
        if len(password) < 8:
            raise UserError("a password needs at least 8 characters")
        pw = hash_password(password)

        def acc(s: Session) -> int | None:
            u = s.scalar(select(User).where(User.invite_hash == token_hash(invite)))
            if u is None:
                return None
            u.password_hash, u.invite_hash = pw, None
            return u.id

        return self.tx(acc)

    def invited_user(self, invite: str) -> User | None:
        return self.tx(lambda s: s.scalar(select(User).where(User.invite_hash == token_hash(invite))))

    def check_password(self, name: str, password: str) -> int | None:
        u = self.tx(lambda s: s.scalar(select(User).where(User.name == name.strip())))
        if u is None or not u.password_hash or not verify_password(u.password_hash, password):
            return None
        return u.id

    def new_session(self, user_id: int) -> str:
        token = secrets.token_urlsafe(32)
        self.tx(lambda s: s.add(SessionRow(token_hash=token_hash(token), user_id=user_id)))
        return token

    def session_user(self, token: str) -> User | None:
        def get(s: Session) -> User | None:
            row = s.get(SessionRow, token_hash(token))
            return s.get(User, row.user_id) if row else None

        return self.tx(get)

    def end_session(self, token: str) -> None:
        def rm(s: Session) -> None:
            row = s.get(SessionRow, token_hash(token))
            if row:
                s.delete(row)

        self.tx(rm)

    def new_api_key(self, name: str) -> str:
        key = "rk-" + secrets.token_urlsafe(32)

        def add(s: Session) -> None:
            uid = s.scalar(select(User.id).where(User.name == name))
            if uid is None:
                raise UserError(f"no user {name!r}")
            s.add(ApiKey(key_hash=token_hash(key), user_id=uid))

        self.tx(add)
        return key

    def api_key_user(self, key: str) -> User | None:
        def get(s: Session) -> User | None:
            row = s.get(ApiKey, token_hash(key))
            return s.get(User, row.user_id) if row else None

        return self.tx(get)

    # ------------------------------------------------------------ model versions

    def register_models(self, versions: dict[str, str]) -> None:
        def reg(s: Session) -> None:
            for name, path in versions.items():
                row = s.get(ModelVersion, name)
                if row is None:
                    s.add(ModelVersion(name=name, path=path))
                else:
                    row.path = path

        self.tx(reg)

    # ------------------------------------------------------------ tasks and rankings

    def add_tasks(self, batch: str, tasks: list[TaskIn], labels_per_task: int = 1) -> int:
        """Publish tasks under ``batch``; a task whose (batch, external_id) exists is not added again.
        Returns the number of new tasks."""
        if labels_per_task < 1:
            raise UserError(f"labels_per_task={labels_per_task}: expected >= 1")
        for t in tasks:
            if len(t.responses) < 2:
                raise UserError(f"task {t.external_id!r}: a ranking task needs K >= 2 answers")

        def add(s: Session) -> int:
            have = set(s.scalars(select(Task.external_id).where(Task.batch == batch)))
            n = 0
            for i, t in enumerate(tasks):
                ext = t.external_id or str(i)
                if ext in have:
                    continue
                have.add(ext)
                s.add(Task(batch=batch, external_id=ext, messages=t.messages, responses=list(t.responses),
                           models=list(t.models) or [""] * len(t.responses), meta=t.meta,
                           labels_per_task=labels_per_task))
                n += 1
            return n

        return self.tx(add)

    def task(self, task_id: int) -> TaskView | None:
        t = self.tx(lambda s: s.get(Task, task_id))
        return None if t is None else TaskView(t.id, t.batch, t.messages, t.responses, t.meta)

    def next_task(self, user_id: int, batch: str | None = None) -> TaskView | None:
        """The oldest task that still needs labels and that this user has neither ranked nor skipped."""

        def pick(s: Session) -> Task | None:
            done = select(RankingRow.task_id).where(RankingRow.user_id == user_id)
            skipped = select(Skip.task_id).where(Skip.user_id == user_id)
            count = (select(func.count(RankingRow.id)).where(RankingRow.task_id == Task.id)
                     .correlate(Task).scalar_subquery())
            q = (select(Task).where(Task.id.not_in(done), Task.id.not_in(skipped), count < Task.labels_per_task)
                 .order_by(Task.id).limit(1))
            if batch:
                q = q.where(Task.batch == batch)
            return s.scalar(q)

        t = self.tx(pick)
        return None if t is None else TaskView(t.id, t.batch, t.messages, t.responses, t.meta)

    def progress(self, user_id: int) -> dict:
        """Tasks this user ranked, and tasks still open to them."""

        def prog(s: Session) -> dict:
            mine = s.scalar(select(func.count(RankingRow.id)).where(RankingRow.user_id == user_id)) or 0
            done = select(RankingRow.task_id).where(RankingRow.user_id == user_id)
            skipped = select(Skip.task_id).where(Skip.user_id == user_id)
            count = (select(func.count(RankingRow.id)).where(RankingRow.task_id == Task.id)
                     .correlate(Task).scalar_subquery())
            left = s.scalar(select(func.count(Task.id)).where(
                Task.id.not_in(done), Task.id.not_in(skipped), count < Task.labels_per_task)) or 0
            return {"done": mine, "left": left}

        return self.tx(prog)

    def add_ranking(self, user_id: int, task_id: int, ranks: list[int], key: str,
                    flags: list[tuple[int, str]] = (), better_answer: str = "",
                    seconds: float | None = None) -> Submitted:
        """Store one labeler's ranking of a task, with its flags and better answer, in one transaction.

        Idempotent: a second call with the same ``key`` (a retried request) writes nothing and returns
        the first ranking. A second, different ranking of the same task by the same user is refused.
        """
        if not key or len(key) > 80:
            raise UserError("idempotency_key: expected 1-80 characters")

        def existing(s: Session) -> Submitted | None:
            row = s.scalar(select(RankingRow).where(RankingRow.idempotency_key == key))
            if row is None:
                return None
            if row.user_id != user_id:
                raise UserError("idempotency_key belongs to another submission")
            return Submitted(row.id, True)

        def add(s: Session) -> Submitted:
            dup = existing(s)
            if dup:
                return dup
            t = s.get(Task, task_id)
            if t is None:
                raise LookupError(f"no task {task_id}")
            check_ranks(ranks, len(t.responses))
            for i, kind in flags:
                if kind not in FLAG_KINDS:
                    raise UserError(f"flag {kind!r}: expected one of {', '.join(FLAG_KINDS)}")
                if not 0 <= i < len(t.responses):
                    raise UserError(f"flag on answer {i}: the task has {len(t.responses)} answers")
            if s.scalar(select(RankingRow.id).where(RankingRow.task_id == task_id, RankingRow.user_id == user_id)):
                raise UserError(f"you have already ranked task {task_id}")
            row = RankingRow(task_id=task_id, user_id=user_id, ranks=[int(r) for r in ranks],
                             idempotency_key=key, seconds=seconds)
            s.add(row)
            for i, kind in flags:
                s.add(Flag(task_id=task_id, user_id=user_id, response=i, kind=kind))
            if better_answer.strip():
                s.add(DemonstrationRow(task_id=task_id, user_id=user_id, messages=t.messages,
                                       response=better_answer.strip()))
            s.flush()
            return Submitted(row.id, False)

        try:
            return self.tx(add)
        except IntegrityError:  # a concurrent request with the same key won the race
            dup = self.tx(existing)
            if dup is None:
                raise UserError(f"you have already ranked task {task_id}") from None
            return dup

    def skip(self, user_id: int, task_id: int) -> None:
        def add(s: Session) -> None:
            if s.get(Task, task_id) is None:
                raise LookupError(f"no task {task_id}")
            if s.get(Skip, (task_id, user_id)) is None:
                s.add(Skip(task_id=task_id, user_id=user_id))

        try:
            self.tx(add)
        except IntegrityError:
            pass  # skipped twice at once: one row is enough

    def rankings(self, batch: str | None = None) -> list[dict]:
        """Every ranking as a record: prompt messages, responses, ranks, and meta (task, labeler, flags)."""

        def rows(s: Session) -> list[dict]:
            q = (select(RankingRow, Task, User).join(Task, RankingRow.task_id == Task.id)
                 .join(User, RankingRow.user_id == User.id).order_by(RankingRow.id))
            if batch:
                q = q.where(Task.batch == batch)
            flags: dict[tuple[int, int], list] = {}
            for f in s.scalars(select(Flag)):
                flags.setdefault((f.task_id, f.user_id), []).append({"response": f.response, "kind": f.kind})
            out = []
            for r, t, u in s.execute(q):
                out.append({"messages": t.messages, "responses": t.responses, "ranks": r.ranks,
                            "meta": {**t.meta, "task_id": t.id, "batch": t.batch, "external_id": t.external_id,
                                     "labeler": u.name, "models": t.models,
                                     "flags": flags.get((t.id, u.id), []), "ranking_id": r.id}})
            return out

        return self.tx(rows)

    def demonstrations(self) -> list[dict]:
        def rows(s: Session) -> list[dict]:
            q = select(DemonstrationRow, User).join(User).order_by(DemonstrationRow.id)
            return [{"messages": d.messages, "response": d.response,
                     "meta": {"task_id": d.task_id, "labeler": u.name}} for d, u in s.execute(q)]

        return self.tx(rows)

    def count_rankings(self, batch: str | None = None) -> int:
        def count(s: Session) -> int:
            q = select(func.count(RankingRow.id))
            if batch:
                q = q.join(Task, RankingRow.task_id == Task.id).where(Task.batch == batch)
            return s.scalar(q) or 0

        return self.tx(count)

    def count_ranked_tasks(self, batch: str) -> int:
        """Tasks of ``batch`` with at least one ranking."""
        return self.tx(lambda s: s.scalar(
            select(func.count(func.distinct(RankingRow.task_id))).join(Task, RankingRow.task_id == Task.id)
            .where(Task.batch == batch)) or 0)

    def count_tasks(self, batch: str | None = None) -> int:
        q = select(func.count(Task.id))
        if batch:
            q = q.where(Task.batch == batch)
        return self.tx(lambda s: s.scalar(q) or 0)

    def batches(self) -> list[dict]:
        """Each batch with its task count and how many of its tasks have at least one ranking."""

        def rows(s: Session) -> list[dict]:
            tasks = dict(s.execute(select(Task.batch, func.count(Task.id)).group_by(Task.batch)).all())
            ranked = dict(s.execute(select(Task.batch, func.count(func.distinct(RankingRow.task_id)))
                                    .join(RankingRow, RankingRow.task_id == Task.id).group_by(Task.batch)).all())
            return [{"batch": b, "tasks": n, "ranked": ranked.get(b, 0)} for b, n in sorted(tasks.items())]

        return self.tx(rows)

    def per_labeler(self) -> list[dict]:
        """Rankings, skips, flags and demonstrations per user (the admin dashboard)."""

        def rows(s: Session) -> list[dict]:
            def counts(col):
                return dict(s.execute(select(col, func.count()).group_by(col)).all())

            r, sk = counts(RankingRow.user_id), counts(Skip.user_id)
            fl, dm = counts(Flag.user_id), counts(DemonstrationRow.user_id)
            return [{"name": u.name, "role": u.role, "rankings": r.get(u.id, 0), "skips": sk.get(u.id, 0),
                     "flags": fl.get(u.id, 0), "demonstrations": dm.get(u.id, 0)}
                    for u in s.scalars(select(User).order_by(User.id))]

        return self.tx(rows)

    def ranks_by_task(self) -> dict[int, list[list[int]]]:
        """Every task's rankings (each a ranks list), for inter-annotator agreement."""

        def rows(s: Session) -> dict[int, list[list[int]]]:
            out: dict[int, list[list[int]]] = {}
            for r in s.scalars(select(RankingRow).order_by(RankingRow.id)):
                out.setdefault(r.task_id, []).append(list(r.ranks))
            return out

        return self.tx(rows)

    # ------------------------------------------------------------ arena

    def add_battle(self, user_id: int, prompt: str, model_a: str, model_b: str, answer_a: str, answer_b: str) -> int:
        def add(s: Session) -> int:
            b = Battle(user_id=user_id, prompt=prompt, model_a=model_a, model_b=model_b,
                       answer_a=answer_a, answer_b=answer_b)
            s.add(b)
            s.flush()
            return b.id

        return self.tx(add)

    def battle(self, battle_id: int) -> Battle | None:
        return self.tx(lambda s: s.get(Battle, battle_id))

    def vote(self, user_id: int, battle_id: int, outcome: str) -> Battle:
        """Record the vote of the user who started the battle; a battle takes one vote (a repeat of
        the same vote is a no-op, a different one is refused)."""
        if outcome not in OUTCOMES:
            raise UserError(f"vote {outcome!r}: expected one of {', '.join(OUTCOMES)}")

        def v(s: Session) -> Battle:
            b = s.get(Battle, battle_id)
            if b is None or b.user_id != user_id:
                raise LookupError(f"no battle {battle_id}")
            if b.outcome is not None and b.outcome != outcome:
                raise UserError(f"battle {battle_id} already has a vote ({b.outcome})")
            if b.outcome is None:
                b.outcome, b.voted_at, b.revealed = outcome, utc_now(), True
            return b

        return self.tx(v)

    def votes(self) -> list[tuple[str, str, str]]:
        """(model_a, model_b, outcome) of every voted battle, in vote order."""
        return self.tx(lambda s: [(b.model_a, b.model_b, b.outcome) for b in s.scalars(
            select(Battle).where(Battle.outcome.is_not(None)).order_by(Battle.voted_at, Battle.id))])


def check_ranks(ranks: list[int], k: int) -> None:
    """Ranks of K answers: K integers, 0 = best, dense (ties share a rank, no rank skipped)."""
    if not isinstance(ranks, list) or len(ranks) != k:
        raise UserError(f"ranks: expected {k} integers (one per answer), got {json.dumps(ranks)[:80]}")
    if any(not isinstance(r, int) or isinstance(r, bool) or r < 0 for r in ranks):
        raise UserError("ranks: expected integers >= 0 (0 = best)")
    if sorted(set(ranks)) != list(range(len(set(ranks)))):
        raise UserError(f"ranks {ranks}: expected dense ranks starting at 0 (ties share a rank)")


def hash_password(password: str) -> str:
    """argon2id (argon2-cffi's defaults, RFC 9106's second recommended option)."""
    from argon2 import PasswordHasher

    return PasswordHasher().hash(password)


def verify_password(stored: str, password: str) -> bool:
    from argon2 import PasswordHasher
    from argon2.exceptions import InvalidHashError, VerificationError

    try:
        return PasswordHasher().verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False


def _sqlite_pragmas(engine) -> None:
    """WAL, a busy timeout, and BEGIN IMMEDIATE transactions (see the module docstring)."""

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process crash
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def on_begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")
