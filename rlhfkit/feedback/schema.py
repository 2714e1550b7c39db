"""The preference store's tables (SQLAlchemy ORM); the transactions on them are ``store.py``.

users (invite token or argon2 password hash, role), sessions, api_keys (hashed), model_versions,
tasks (a prompt and K answers; the model of each answer is kept for analysis but never shown),
rankings (one per labeler and task; ``idempotency_key`` unique), skips, flags, demonstrations,
battles (arena: two anonymous versions, one vote), task_leases (who is working on which task right
now, so that labelers working at once get different tasks), sign_in_failures (the audit log that
also drives sign-in throttling), settings (server-wide values: the CSRF signing secret, the
server's base URL).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utc_now() -> datetime:
    return datetime.now(UTC)


def token_hash(token: str) -> str:
    """Session tokens, invite tokens and API keys are stored as SHA-256 hashes, never in clear."""
    return hashlib.sha256(token.encode()).hexdigest()


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(80), unique=True)
    role: Mapped[str] = mapped_column(String(16), default="labeler")  # labeler | admin
    password_hash: Mapped[str | None] = mapped_column(String(200), nullable=True)
    invite_hash: Mapped[str | None] = mapped_column(String(64), unique=True, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class SessionRow(Base):
    __tablename__ = "sessions"
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class ApiKey(Base):
    __tablename__ = "api_keys"
    key_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class ModelVersion(Base):
    __tablename__ = "model_versions"
    name: Mapped[str] = mapped_column(String(120), primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (UniqueConstraint("batch", "external_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    batch: Mapped[str] = mapped_column(String(120), index=True)
    external_id: Mapped[str] = mapped_column(String(120))  # e.g. the prompt id: publishing twice adds nothing
    messages: Mapped[list] = mapped_column(JSON)
    responses: Mapped[list] = mapped_column(JSON)  # list[str]
    models: Mapped[list] = mapped_column(JSON)  # the version that wrote each response (never shown)
    meta: Mapped[dict] = mapped_column(JSON, default=dict)
    labels_per_task: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class RankingRow(Base):
    __tablename__ = "rankings"
    __table_args__ = (UniqueConstraint("task_id", "user_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    ranks: Mapped[list] = mapped_column(JSON)  # ranks[i] of tasks.responses[i]; 0 = best, equal = tie
    idempotency_key: Mapped[str] = mapped_column(String(80), unique=True)
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class TaskLease(Base):
    """A task handed to a labeler by the queue and not yet ranked or skipped by them: until ``until``,
    it takes one of the task's ``labels_per_task`` slots when the queue picks tasks for others."""

    __tablename__ = "task_leases"
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), primary_key=True)
    until: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class Skip(Base):
    __tablename__ = "skips"
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), primary_key=True)


class Flag(Base):
    __tablename__ = "flags"
    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    response: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))


class DemonstrationRow(Base):
    __tablename__ = "demonstrations"
    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int | None] = mapped_column(ForeignKey("tasks.id"), nullable=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    messages: Mapped[list] = mapped_column(JSON)
    response: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class Battle(Base):
    __tablename__ = "battles"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    prompt: Mapped[str] = mapped_column(Text)
    model_a: Mapped[str] = mapped_column(String(120))
    model_b: Mapped[str] = mapped_column(String(120))
    answer_a: Mapped[str] = mapped_column(Text)
    answer_b: Mapped[str] = mapped_column(Text)
    outcome: Mapped[str | None] = mapped_column(String(16), nullable=True)  # a | b | tie | both_bad
    voted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revealed: Mapped[bool] = mapped_column(Boolean, default=False)


class SignInFailure(Base):
    """One failed (or, while ``reason`` is ``pending``, in-flight) sign-in: the admin page's audit log,
    and what sign-in throttling counts per name and per client address within a time window."""

    __tablename__ = "sign_in_failures"
    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now, index=True)
    name: Mapped[str] = mapped_column(String(80), index=True)  # as typed: unknown names are logged too
    address: Mapped[str] = mapped_column(String(64), index=True)
    # pending | wrong password | unknown name | no password yet | throttled
    reason: Mapped[str] = mapped_column(String(32))


class Setting(Base):
    """A server-wide value shared by every server process on the store (key -> text)."""

    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
