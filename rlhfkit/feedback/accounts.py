"""People in the preference store: users, invites and passwords, sign-in with throttling and its
audit log, browser sessions and API keys.

Rules, whoever calls it (web app, CLI, scripts):

- sign-in is throttled per name and per client address (``SignInLimits``), costs the same argon2
  work for unknown names as for real ones, and logs every failure (``sign_in``);
- a new password, chosen on the account page or through an invite link (how a forgotten one is
  reset), ends the user's other sessions;
- only hashes of passwords, invite tokens, session tokens and API keys are stored.

``Accounts`` works in the transactions of the ``Store`` that holds it (``store.accounts``); the
store also offers its methods under the same names (``store.sign_in``), so callers keep one object.
"""

from __future__ import annotations

import functools
import secrets
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from rlhfkit.errors import Conflict, NotFound, UserError
from rlhfkit.feedback.schema import ApiKey, SessionRow, SignInFailure, User, token_hash, utc_now


@dataclass
class SignInLimits:
    """Sign-in throttling: at most ``per_name`` failures for one name and ``per_address`` from one
    client address within ``window_s`` seconds; past that, attempts are refused unchecked until the
    oldest failures leave the window."""

    per_name: int = 5
    per_address: int = 20
    window_s: float = 300.0


@dataclass
class SignIn:
    """The outcome of :meth:`Accounts.sign_in`: a user id, or why not."""

    user_id: int | None = None
    retry_after: float | None = None  # set when throttled: seconds until an attempt is counted again

    @property
    def throttled(self) -> bool:
        return self.retry_after is not None


class Accounts:
    """Users, passwords, sign-in, sessions and API keys; ``tx`` runs a function in one transaction
    (``Store.tx``: committed, retried on lock errors)."""

    def __init__(self, tx: Callable[[Callable[[Session], Any]], Any]):
        self.tx = tx

    def create_user(self, name: str, role: str = "labeler", password: str | None = None) -> tuple[int, str]:
        """A new user and their invite token (shown once; only its hash is stored)."""
        name = check_user_name(name)
        if role not in ("labeler", "admin"):
            raise UserError(f"role {role!r}: expected labeler or admin")
        invite = secrets.token_urlsafe(24)
        pw = hash_password(password) if password else None

        def add(s: Session) -> int:
            if s.scalar(select(User.id).where(User.name == name)) is not None:
                raise Conflict(f"user {name!r} exists already")
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
                raise NotFound(f"no user {name!r}")
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
        """Set the password of the invited user (the invite then expires); their id, or None.

        An invite is also how a forgotten password is reset, so every session of the user ends here:
        whoever held the old password (or a stolen session) is signed out."""
        pw = hash_password(check_password_rules(password))

        def acc(s: Session) -> int | None:
            u = s.scalar(select(User).where(User.invite_hash == token_hash(invite)))
            if u is None:
                return None
            u.password_hash, u.invite_hash = pw, None
            s.execute(delete(SessionRow).where(SessionRow.user_id == u.id))
            return u.id

        return self.tx(acc)

    def set_password(self, user_id: int, password: str, keep_session: str | None = None) -> None:
        """A new password for the user; every session of theirs ends except ``keep_session`` (the one
        that asked for the change)."""
        pw = hash_password(check_password_rules(password))
        keep = token_hash(keep_session) if keep_session else ""

        def upd(s: Session) -> None:
            u = s.get(User, user_id)
            if u is None:
                raise NotFound(f"no user {user_id}")
            u.password_hash = pw
            s.execute(delete(SessionRow).where(SessionRow.user_id == user_id, SessionRow.token_hash != keep))

        self.tx(upd)

    def invited_user(self, invite: str) -> User | None:
        return self.tx(lambda s: s.scalar(select(User).where(User.invite_hash == token_hash(invite))))

    def check_password(self, name: str, password: str) -> int | None:
        """The user's id if ``password`` is theirs, else None (no throttling: see :meth:`sign_in`)."""
        return self._verify(name, password)[0]

    def _verify(self, name: str, password: str) -> tuple[int | None, str]:
        """(user id or None, why not). An unknown name, or a user who has not chosen a password yet,
        costs the same argon2 verification as a real one (against a dummy hash), so the answer time
        does not tell which names exist."""
        u = self.tx(lambda s: s.scalar(select(User).where(User.name == name.strip())))
        if u is None or not u.password_hash:
            verify_password(_dummy_hash(), password)
            return None, "unknown name" if u is None else "no password yet"
        if not verify_password(u.password_hash, password):
            return None, "wrong password"
        return u.id, ""

    def sign_in(self, name: str, password: str, address: str, limits: SignInLimits) -> SignIn:
        """Check a password under throttling, and log every failure (the admin page's audit log).

        The attempt is logged as ``pending`` *before* the (slow) password check, in the same
        transaction that counts recent failures, so parallel guesses at one name count against each
        other; the row is removed on success and gets its reason on failure. The per-address count
        leaves pending rows out: many people signing in at once from one address (an office, a proxy)
        must not lock each other out. A throttled attempt checks nothing and does not extend the
        lock-out; it is logged as ``throttled`` once per address and window (a flood of refused
        attempts does not flood the table)."""
        name, address = name.strip()[:80], address[:64]
        window = timedelta(seconds=limits.window_s)

        def failures(s: Session, since, *who) -> list:
            return list(
                s.scalars(
                    select(SignInFailure.at)
                    .where(*who, SignInFailure.at >= since, SignInFailure.reason != "throttled")
                    .order_by(SignInFailure.at)
                )
            )

        def begin(s: Session) -> tuple[int | None, float | None]:
            now = utc_now()
            since = now - window
            by_name = failures(s, since, SignInFailure.name == name)
            by_address = failures(s, since, SignInFailure.address == address, SignInFailure.reason != "pending")
            wait = max(_wait(by_name, limits.per_name, window, now), _wait(by_address, limits.per_address, window, now))
            if wait > 0:
                logged = s.scalar(
                    select(SignInFailure.id).where(
                        SignInFailure.address == address, SignInFailure.reason == "throttled", SignInFailure.at >= since
                    )
                )
                if logged is None:
                    s.add(SignInFailure(at=now, name=name, address=address, reason="throttled"))
                return None, wait
            row = SignInFailure(at=now, name=name, address=address, reason="pending")
            s.add(row)
            s.flush()
            return row.id, None

        attempt, wait = self.tx(begin)
        if attempt is None:
            return SignIn(retry_after=wait)
        user_id, why = self._verify(name, password)

        def finish(s: Session) -> None:
            if user_id is not None:
                s.execute(delete(SignInFailure).where(SignInFailure.id == attempt))
            else:
                s.execute(update(SignInFailure).where(SignInFailure.id == attempt).values(reason=why))

        self.tx(finish)
        return SignIn(user_id=user_id)

    def failed_sign_ins(self, limit: int = 50) -> list[dict]:
        """The latest failed or throttled sign-ins, newest first (the admin page)."""

        def rows(s: Session) -> list[dict]:
            q = (
                select(SignInFailure)
                .where(SignInFailure.reason != "pending")
                .order_by(SignInFailure.id.desc())
                .limit(limit)
            )
            return [
                {
                    "at": _utc(f.at).strftime("%Y-%m-%d %H:%M:%S"),
                    "name": f.name,
                    "address": f.address,
                    "reason": f.reason,
                }
                for f in s.scalars(q)
            ]

        return self.tx(rows)

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
                raise NotFound(f"no user {name!r}")
            s.add(ApiKey(key_hash=token_hash(key), user_id=uid))

        self.tx(add)
        return key

    def api_key_user(self, key: str) -> User | None:
        def get(s: Session) -> User | None:
            row = s.get(ApiKey, token_hash(key))
            return s.get(User, row.user_id) if row else None

        return self.tx(get)


def _wait(times: list[datetime], limit: int, window: timedelta, now: datetime) -> float:
    """Seconds until fewer than ``limit`` of ``times`` (ascending, all within the window) are left in
    it; 0 when there are fewer already (or ``limit`` is 0: no limit)."""
    if limit <= 0 or len(times) < limit:
        return 0.0
    first_to_leave = _utc(times[len(times) - limit])
    return max(0.001, (first_to_leave + window - now).total_seconds())


def _utc(t: datetime) -> datetime:
    """A stored time in UTC: SQLite gives back naive datetimes (stored in UTC), PostgreSQL aware ones
    in the server's time zone."""
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def check_user_name(name: str) -> str:
    """A user name as shown on pages and in logs: 1-80 characters after trimming, none of them a
    control, format (e.g. right-to-left override) or other invisible/unassigned code point."""
    name = name.strip()
    if not name or len(name) > 80:
        raise UserError("a user name must be 1-80 characters")
    for pos, ch in enumerate(name):
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            raise UserError(
                f"a user name cannot contain control or invisible characters (U+{ord(ch):04X} at position {pos + 1})"
            )
    return name


def check_password_rules(password: str) -> str:
    if len(password) < 8:
        raise UserError("a password needs at least 8 characters")
    return password


@functools.cache
def _dummy_hash() -> str:
    """An argon2 hash of a random password, made once: unknown names are verified against it."""
    return hash_password(secrets.token_urlsafe(16))


def _argon2():
    """argon2-cffi, imported here: it comes with the web extra (only signing in and choosing a
    password need it), so the store's other users (the pipeline, ``rlhfkit users``) work without it."""
    try:
        import argon2
        import argon2.exceptions
    except ImportError:
        raise UserError("passwords need the web extra: pip install 'rlhfkit[web]'") from None
    return argon2


def hash_password(password: str) -> str:
    """argon2id (argon2-cffi's defaults, RFC 9106's second recommended option)."""
    return _argon2().PasswordHasher().hash(password)


def verify_password(stored: str, password: str) -> bool:
    argon2 = _argon2()
    try:
        return argon2.PasswordHasher().verify(stored, password)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False
