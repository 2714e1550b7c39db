"""The preference store: everything people contribute, in one SQL database (SQLAlchemy).

    store = Store("sqlite:///runs/demo/feedback.db")          # or postgresql+psycopg://…
    store.add_tasks("round1", [TaskIn(messages, responses, meta)], labels_per_task=1)
    task = store.next_task(user_id)                            # what a labeler sees next
    store.add_ranking(user_id, task.id, ranks, key="uuid…")   # idempotent by (user, task, key)

Tables (``schema.py``): users, sessions, api_keys, model_versions, tasks (a prompt and K answers),
rankings (one per labeler and task; ``idempotency_key`` unique), skips, flags, demonstrations,
battles (arena), task_leases (who works on which task now), sign_in_failures (audit log and
throttling), settings. Users, passwords, sign-in, sessions and API keys are ``accounts.py``
(``store.accounts``; the store offers its methods under the same names: ``store.sign_in``).

Rules the store enforces, whoever calls it (web app, CLI, scripts):

- a ranking only for a task in the labeler's own queue (not skipped by them, fewer rankings than
  its ``labels_per_task``), decided inside the transaction that writes it (``add_ranking``);
- the queue hands labelers working at the same time different tasks: ``next_task`` leases the task
  to the labeler for ``LEASE_S`` (a lease takes one of the task's slots when picking for others);
  leases only spread the work, the rule above is what keeps a task from getting too many rankings;
- an idempotency key means "this exact submission": a retry with the same key and payload is a
  duplicate (nothing written), the same key with another payload is a ``Conflict``;
- the rules about people (sign-in throttling, sessions ended by a new password): ``accounts.py``.

Concurrency. SQLite (the default, a file in the run directory) runs in WAL mode with a 30 s
busy timeout and every transaction starts with ``BEGIN IMMEDIATE``: a writer takes the write lock
at the start instead of upgrading a read lock mid-transaction (the upgrade is the case SQLite cannot
wait out and reports "database is locked" at once). ``_retry`` repeats a transaction that still
fails with a lock/serialization error (told by the driver's error code), with jittered back-off,
so no lock error reaches a user. PostgreSQL needs none of that; the same code runs on it.
"""

from __future__ import annotations

import json
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, delete, event, func, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from rlhfkit.errors import Conflict, NotFound, UserError
from rlhfkit.feedback.accounts import Accounts, SignIn, SignInLimits
from rlhfkit.feedback.schema import (
    Base,
    Battle,
    DemonstrationRow,
    Flag,
    ModelVersion,
    RankingRow,
    Setting,
    Skip,
    Task,
    TaskLease,
    User,
    token_hash,
    utc_now,
)

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
    duplicate: bool  # True when this exact submission (key and payload) was already stored: nothing written


SQLITE_BUSY, SQLITE_LOCKED = 5, 6  # primary result codes: "database is locked", "database table is locked"
PG_RETRY = ("40001", "40P01")  # SQLSTATE serialization_failure, deadlock_detected


def _is_lock_error(e: OperationalError) -> bool:
    """Whether repeating the transaction can help, by the driver's error code (not its message)."""
    code = getattr(e.orig, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (SQLITE_BUSY, SQLITE_LOCKED)  # & 0xFF: extended codes such as SQLITE_BUSY_SNAPSHOT
    return getattr(e.orig, "sqlstate", None) in PG_RETRY


def sqlite_url_for_run(run_dir: str | Path) -> str:
    return f"sqlite:///{Path(run_dir).resolve() / 'feedback.db'}"


class Store:
    """The preference store; thread-safe (one SQLAlchemy session per call)."""

    LEASE_S = 20 * 60  # how long a task handed out by the queue stays reserved for its labeler

    def __init__(self, url: str, echo: bool = False):
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url[len("postgresql://") :]  # psycopg 3, not psycopg2
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
        self.accounts = Accounts(self.tx)
        try:
            self._retry(lambda: Base.metadata.create_all(self.engine))
        except OperationalError as e:
            raise UserError(f"--db {url}: cannot open the database ({str(e.orig).strip().splitlines()[0]})") from None

    @classmethod
    def for_run(cls, run_dir: str | Path, url: str | None = None) -> Store:
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

    # ------------------------------------------------------------ people: accounts.py, under the same names

    def create_user(self, name: str, role: str = "labeler", password: str | None = None) -> tuple[int, str]:
        return self.accounts.create_user(name, role, password)

    def new_invite(self, name: str) -> str:
        return self.accounts.new_invite(name)

    def user(self, user_id: int) -> User | None:
        return self.accounts.user(user_id)

    def users(self) -> list[User]:
        return self.accounts.users()

    def count_users(self) -> int:
        return self.accounts.count_users()

    def accept_invite(self, invite: str, password: str) -> int | None:
        return self.accounts.accept_invite(invite, password)

    def set_password(self, user_id: int, password: str, keep_session: str | None = None) -> None:
        return self.accounts.set_password(user_id, password, keep_session)

    def invited_user(self, invite: str) -> User | None:
        return self.accounts.invited_user(invite)

    def check_password(self, name: str, password: str) -> int | None:
        return self.accounts.check_password(name, password)

    def sign_in(self, name: str, password: str, address: str, limits: SignInLimits) -> SignIn:
        return self.accounts.sign_in(name, password, address, limits)

    def failed_sign_ins(self, limit: int = 50) -> list[dict]:
        return self.accounts.failed_sign_ins(limit)

    def new_session(self, user_id: int) -> str:
        return self.accounts.new_session(user_id)

    def session_user(self, token: str) -> User | None:
        return self.accounts.session_user(token)

    def end_session(self, token: str) -> None:
        return self.accounts.end_session(token)

    def new_api_key(self, name: str) -> str:
        return self.accounts.new_api_key(name)

    def api_key_user(self, key: str) -> User | None:
        return self.accounts.api_key_user(key)

    # ------------------------------------------------------------ server settings

    def setting(self, key: str) -> str | None:
        return self.tx(lambda s: row.value if (row := s.get(Setting, key)) else None)

    def set_setting(self, key: str, value: str) -> None:
        def put(s: Session) -> None:
            row = s.get(Setting, key)
            if row is None:
                s.add(Setting(key=key, value=value))
            else:
                row.value = value

        try:
            self.tx(put)
        except IntegrityError:  # another process inserted it at the same moment: write again, as an update
            self.tx(put)

    def secret(self, key: str) -> str:
        """A random secret kept in the store (created on first use): every server process on this
        store, and a restarted one, signs with the same value."""
        value = self.setting(key)
        if value is None:
            try:
                self.tx(lambda s: s.add(Setting(key=key, value=secrets.token_urlsafe(32))))
            except IntegrityError:
                pass  # another process created it first: use theirs
            value = self.setting(key)
        assert value is not None
        return value

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
                s.add(
                    Task(
                        batch=batch,
                        external_id=ext,
                        messages=t.messages,
                        responses=list(t.responses),
                        models=list(t.models) or [""] * len(t.responses),
                        meta=t.meta,
                        labels_per_task=labels_per_task,
                    )
                )
                n += 1
            return n

        return self.tx(add)

    def task(self, task_id: int) -> TaskView | None:
        t = self.tx(lambda s: s.get(Task, task_id))
        return None if t is None else TaskView(t.id, t.batch, t.messages, t.responses, t.meta)

    def next_task(self, user_id: int, batch: str | None = None) -> TaskView | None:
        """The task this user should label now, leased to them for ``LEASE_S`` seconds.

        The task they already hold (a reload shows the same task), else the oldest task open to them
        (neither ranked nor skipped by them, fewer rankings than its ``labels_per_task``) whose free
        slots are not all leased to others; when every open task is leased to others, the oldest open
        one anyway (whoever submits first gets the slot, the other a clear 409)."""

        def pick(s: Session) -> Task | None:
            now = utc_now()
            held = s.scalar(
                select(Task)
                .join(TaskLease, TaskLease.task_id == Task.id)
                .where(TaskLease.user_id == user_id, TaskLease.until > now, *_open_to(user_id, batch))
                .order_by(Task.id)
                .limit(1)
            )
            if held is not None:
                return held
            t = _free_task(s, user_id, batch, now) or s.scalar(
                select(Task).where(*_open_to(user_id, batch)).order_by(Task.id).limit(1)
            )
            s.execute(delete(TaskLease).where(TaskLease.user_id == user_id))  # one task at a time
            if t is not None:
                s.add(TaskLease(task_id=t.id, user_id=user_id, until=now + timedelta(seconds=self.LEASE_S)))
            return t

        try:
            t = self.tx(pick)
        except IntegrityError:  # the same user asked twice at once: the other request leased it
            t = self.tx(pick)
        return None if t is None else TaskView(t.id, t.batch, t.messages, t.responses, t.meta)

    def progress(self, user_id: int) -> dict:
        """Tasks this user ranked, and tasks still open to them."""

        def prog(s: Session) -> dict:
            mine = s.scalar(select(func.count(RankingRow.id)).where(RankingRow.user_id == user_id)) or 0
            left = s.scalar(select(func.count(Task.id)).where(*_open_to(user_id))) or 0
            return {"done": mine, "left": left}

        return self.tx(prog)

    def add_ranking(
        self,
        user_id: int,
        task_id: int,
        ranks: list[int],
        key: str,
        flags: list[tuple[int, str]] = (),
        better_answer: str = "",
        seconds: float | None = None,
    ) -> Submitted:
        """Store one labeler's ranking of a task, with its flags and better answer, in one transaction.

        Accepted only while the task is in the labeler's queue: not skipped by them, and with fewer
        rankings than its ``labels_per_task``. The task row is locked for the transaction (``SELECT …
        FOR UPDATE`` on PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` already serialises writers), so two
        labelers racing for the last slot cannot both get it: the second gets a :class:`Conflict`.

        Idempotency: ``key`` names this submission of this user for this task. The same key and the
        same payload again (a retried request) writes nothing and returns the first ranking with
        ``duplicate=True``; the same key with another payload, or a second ranking under another
        key, is a :class:`Conflict` — never a "duplicate" that silently drops what was sent.
        """
        if not key or len(key) > 80:
            raise UserError("idempotency_key: expected 1-80 characters")
        flags = sorted((int(i), kind) for i, kind in flags)
        better = better_answer.strip()

        def repeat(s: Session, row: RankingRow) -> Submitted:
            """The user already ranked this task: a retry of that submission, or a conflict."""
            if row.idempotency_key not in (_scoped_key(user_id, task_id, key), key):  # raw: rows stored before scoping
                raise Conflict(f"you have already ranked task {task_id}")
            if not _same_submission(s, row, ranks, flags, better):
                raise Conflict(
                    f"idempotency_key {key!r} was already used for a different ranking of task {task_id} "
                    f"(stored ranks {row.ranks}): the first one is kept, a ranking cannot be changed"
                )
            return Submitted(row.id, True)

        def add(s: Session) -> Submitted:
            t = s.get(Task, task_id, with_for_update=True)
            if t is None:
                raise NotFound(f"no task {task_id}")
            mine = s.scalar(select(RankingRow).where(RankingRow.task_id == task_id, RankingRow.user_id == user_id))
            if mine is not None:
                return repeat(s, mine)
            check_ranks(ranks, len(t.responses))
            check_flags(flags, len(t.responses))
            check_in_queue(s, t, user_id)
            row = RankingRow(
                task_id=task_id,
                user_id=user_id,
                ranks=[int(r) for r in ranks],
                idempotency_key=_scoped_key(user_id, task_id, key),
                seconds=seconds,
            )
            s.add(row)
            s.execute(delete(TaskLease).where(TaskLease.task_id == task_id, TaskLease.user_id == user_id))
            for i, kind in flags:
                s.add(Flag(task_id=task_id, user_id=user_id, response=i, kind=kind))
            if better:
                s.add(DemonstrationRow(task_id=task_id, user_id=user_id, messages=t.messages, response=better))
            s.flush()
            return Submitted(row.id, False)

        def after_race(s: Session) -> Submitted:
            mine = s.scalar(select(RankingRow).where(RankingRow.task_id == task_id, RankingRow.user_id == user_id))
            if mine is None:
                raise Conflict(f"task {task_id} changed while your ranking was saved: reload and try again")
            return repeat(s, mine)

        try:
            return self.tx(add)
        except IntegrityError:  # a concurrent request of this user for this task inserted first
            return self.tx(after_race)

    def skip(self, user_id: int, task_id: int) -> None:
        def add(s: Session) -> None:
            if s.get(Task, task_id) is None:
                raise NotFound(f"no task {task_id}")
            if s.get(Skip, (task_id, user_id)) is None:
                s.add(Skip(task_id=task_id, user_id=user_id))
            s.execute(delete(TaskLease).where(TaskLease.task_id == task_id, TaskLease.user_id == user_id))

        try:
            self.tx(add)
        except IntegrityError:
            pass  # skipped twice at once: one row is enough

    def rankings(self, batch: str | None = None) -> list[dict]:
        """Every ranking as a record: prompt messages, responses, ranks, and meta (task, labeler, flags)."""

        def rows(s: Session) -> list[dict]:
            q = (
                select(RankingRow, Task, User)
                .join(Task, RankingRow.task_id == Task.id)
                .join(User, RankingRow.user_id == User.id)
                .order_by(RankingRow.id)
            )
            if batch:
                q = q.where(Task.batch == batch)
            flags: dict[tuple[int, int], list] = {}
            for f in s.scalars(select(Flag)):
                flags.setdefault((f.task_id, f.user_id), []).append({"response": f.response, "kind": f.kind})
            out = []
            for r, t, u in s.execute(q):
                out.append(
                    {
                        "messages": t.messages,
                        "responses": t.responses,
                        "ranks": r.ranks,
                        "meta": {
                            **t.meta,
                            "task_id": t.id,
                            "batch": t.batch,
                            "external_id": t.external_id,
                            "labeler": u.name,
                            "models": t.models,
                            "flags": flags.get((t.id, u.id), []),
                            "ranking_id": r.id,
                        },
                    }
                )
            return out

        return self.tx(rows)

    def demonstrations(self) -> list[dict]:
        def rows(s: Session) -> list[dict]:
            q = select(DemonstrationRow, User).join(User).order_by(DemonstrationRow.id)
            return [
                {"messages": d.messages, "response": d.response, "meta": {"task_id": d.task_id, "labeler": u.name}}
                for d, u in s.execute(q)
            ]

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
        return self.tx(
            lambda s: (
                s.scalar(
                    select(func.count(func.distinct(RankingRow.task_id)))
                    .join(Task, RankingRow.task_id == Task.id)
                    .where(Task.batch == batch)
                )
                or 0
            )
        )

    def count_tasks(self, batch: str | None = None) -> int:
        q = select(func.count(Task.id))
        if batch:
            q = q.where(Task.batch == batch)
        return self.tx(lambda s: s.scalar(q) or 0)

    def batches(self) -> list[dict]:
        """Each batch with its task count and how many of its tasks have at least one ranking."""

        def rows(s: Session) -> list[dict]:
            tasks = dict(s.execute(select(Task.batch, func.count(Task.id)).group_by(Task.batch)).all())
            ranked = dict(
                s.execute(
                    select(Task.batch, func.count(func.distinct(RankingRow.task_id)))
                    .join(RankingRow, RankingRow.task_id == Task.id)
                    .group_by(Task.batch)
                ).all()
            )
            return [{"batch": b, "tasks": n, "ranked": ranked.get(b, 0)} for b, n in sorted(tasks.items())]

        return self.tx(rows)

    def per_labeler(self) -> list[dict]:
        """Rankings, skips, flags and demonstrations per user (the admin dashboard)."""

        def rows(s: Session) -> list[dict]:
            def counts(col):
                return dict(s.execute(select(col, func.count()).group_by(col)).all())

            r, sk = counts(RankingRow.user_id), counts(Skip.user_id)
            fl, dm = counts(Flag.user_id), counts(DemonstrationRow.user_id)
            return [
                {
                    "name": u.name,
                    "role": u.role,
                    "rankings": r.get(u.id, 0),
                    "skips": sk.get(u.id, 0),
                    "flags": fl.get(u.id, 0),
                    "demonstrations": dm.get(u.id, 0),
                }
                for u in s.scalars(select(User).order_by(User.id))
            ]

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
            b = Battle(
                user_id=user_id, prompt=prompt, model_a=model_a, model_b=model_b, answer_a=answer_a, answer_b=answer_b
            )
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
                raise NotFound(f"no battle {battle_id}")
            if b.outcome is not None and b.outcome != outcome:
                raise Conflict(f"battle {battle_id} already has a vote ({b.outcome})")
            if b.outcome is None:
                b.outcome, b.voted_at, b.revealed = outcome, utc_now(), True
            return b

        return self.tx(v)

    def votes(self) -> list[tuple[str, str, str]]:
        """(model_a, model_b, outcome) of every voted battle, in vote order."""
        return self.tx(
            lambda s: [
                (b.model_a, b.model_b, b.outcome)
                for b in s.scalars(
                    select(Battle).where(Battle.outcome.is_not(None)).order_by(Battle.voted_at, Battle.id)
                )
            ]
        )


def check_ranks(ranks: list[int], k: int) -> None:
    """Ranks of K answers: K integers, 0 = best, dense (ties share a rank, no rank skipped)."""
    if not isinstance(ranks, list) or len(ranks) != k:
        raise UserError(f"ranks: expected {k} integers (one per answer), got {json.dumps(ranks)[:80]}")
    if any(not isinstance(r, int) or isinstance(r, bool) or r < 0 for r in ranks):
        raise UserError("ranks: expected integers >= 0 (0 = best)")
    if sorted(set(ranks)) != list(range(len(set(ranks)))):
        raise UserError(f"ranks {ranks}: expected dense ranks starting at 0 (ties share a rank)")


def check_flags(flags: list[tuple[int, str]], k: int) -> None:
    """Flags name an answer of the task (0..K-1) and one of ``FLAG_KINDS``."""
    for i, kind in flags:
        if kind not in FLAG_KINDS:
            raise UserError(f"flag {kind!r}: expected one of {', '.join(FLAG_KINDS)}")
        if not 0 <= i < k:
            raise UserError(f"flag on answer {i}: the task has {k} answers")


def _ranking_count():
    """The number of rankings of the task in the enclosing query (a correlated subquery)."""
    return select(func.count(RankingRow.id)).where(RankingRow.task_id == Task.id).correlate(Task).scalar_subquery()


def _open_to(user_id: int, batch: str | None = None) -> list:
    """Conditions on ``Task``: in this user's queue (not ranked or skipped by them, not full)."""
    done = select(RankingRow.task_id).where(RankingRow.user_id == user_id)
    skipped = select(Skip.task_id).where(Skip.user_id == user_id)
    where = [Task.id.not_in(done), Task.id.not_in(skipped), _ranking_count() < Task.labels_per_task]
    return where + ([Task.batch == batch] if batch else [])


def _free_task(s: Session, user_id: int, batch: str | None, now: datetime, tries: int = 10) -> Task | None:
    """The oldest task open to the user with a slot neither ranked nor leased to someone else.

    On PostgreSQL the row is locked ``FOR UPDATE SKIP LOCKED`` (concurrent pickers pass on to the next
    task) and its slots are counted again once locked: the first query's snapshot may predate a lease
    committed by the picker that held the lock, a new statement sees it. (SQLite runs one writer at a
    time: the recount just agrees.)"""

    def taken():
        leased = (
            select(func.count())
            .select_from(TaskLease)
            .where(TaskLease.task_id == Task.id, TaskLease.user_id != user_id, TaskLease.until > now)
            .correlate(Task)
            .scalar_subquery()
        )
        return _ranking_count() + leased

    passed: list[int] = []
    for _ in range(tries):
        q = select(Task).where(*_open_to(user_id, batch), taken() < Task.labels_per_task)
        if passed:
            q = q.where(Task.id.not_in(passed))
        t = s.scalar(q.order_by(Task.id).limit(1).with_for_update(skip_locked=True, of=Task))
        if t is None or s.scalar(select(taken()).select_from(Task).where(Task.id == t.id)) < t.labels_per_task:
            return t
        passed.append(t.id)
    return None


def check_in_queue(s: Session, t: Task, user_id: int) -> None:
    """A ranking is for a task in the labeler's queue: not one they skipped, not one already full."""
    if s.get(Skip, (t.id, user_id)) is not None:
        raise Conflict(f"you skipped task {t.id}, so it is no longer in your queue")
    have = s.scalar(select(func.count(RankingRow.id)).where(RankingRow.task_id == t.id)) or 0
    if have >= t.labels_per_task:  # counted after the task row was locked (add_ranking)
        raise Conflict(
            f"task {t.id} already has the {t.labels_per_task} ranking"
            f"{'' if t.labels_per_task == 1 else 's'} it needs: take the next task in your queue"
        )


def _scoped_key(user_id: int, task_id: int, key: str) -> str:
    """The stored idempotency key: the client's key scoped to (user, task), so the same key sent by
    another user, or for another task, is another submission (the column is unique)."""
    return token_hash(f"{user_id}:{task_id}:{key}")


def _same_submission(s: Session, row: RankingRow, ranks: list, flags: list[tuple[int, str]], better: str) -> bool:
    """Whether a retried ranking carries what was stored: ranks, flags and better answer."""
    stored_flags = sorted(
        (f.response, f.kind)
        for f in s.scalars(select(Flag).where(Flag.task_id == row.task_id, Flag.user_id == row.user_id))
    )
    demo = s.scalar(
        select(DemonstrationRow.response).where(
            DemonstrationRow.task_id == row.task_id, DemonstrationRow.user_id == row.user_id
        )
    )
    return list(row.ranks) == list(ranks) and stored_flags == flags and (demo or "") == better


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
