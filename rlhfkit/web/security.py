"""The guards around every request: cookies, CSRF tokens, the middleware, the rate limiter.

Who may do what (the route dependencies that use these) is ``deps.py``.

- Sign-in: a session token in an HttpOnly, SameSite=Lax cookie; the store keeps only its hash.
  Failed sign-ins are throttled per name and per client address and logged (``Store.sign_in``).
  The OpenAI-compatible API takes ``Authorization: Bearer <api key>`` instead.
- Cookies: behind an https public URL (``--public-url https://…``) both cookies are ``Secure`` and
  named ``__Host-…`` (the browser then refuses them from plain HTTP or a sibling subdomain), and
  every response carries HSTS.
- CSRF: a signed double-submit token. The ``rlhf_csrf`` cookie (SameSite=Strict, HttpOnly) holds
  ``nonce.signature``, the signature an HMAC, under a secret kept in the store, of the nonce and the
  hash of the session cookie. A state-changing request must repeat the cookie's value in the form
  field ``csrf_token`` or the ``X-CSRF-Token`` header, and the value must be signed for *this*
  session: a token planted in the cookie (a sibling subdomain, plain HTTP) or taken from another
  session is refused. Signing in issues a token for the new session.
  (The check itself is the route dependency ``deps.check_csrf``.)
- ``GuardMiddleware``: a request id on every response (``X-Request-ID``), the request-size limit
  (413 before the app sees the body), the CSRF cookie, security headers (a Content-Security-Policy
  that allows scripts from this server only: no inline script runs, so injected markup stays inert
  even if it were ever rendered unescaped) on every response, 413 and 500 included, and a last-resort
  500: one line of JSON naming the request id that the server log also shows with the traceback.
- ``RateLimiter``: a token bucket per user for generation (chat, arena, the API).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass

from fastapi import HTTPException, Request

from rlhfkit.feedback.schema import token_hash

log = logging.getLogger("rlhfkit.web")

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
HSTS = "max-age=31536000"
SESSION_DAYS = 30


# ---------------------------------------------------------------- cookies and CSRF tokens


@dataclass(frozen=True)
class Cookies:
    """The cookies' names and flags: ``__Host-`` names and ``Secure`` when served over https."""

    secure: bool = False

    @property
    def session(self) -> str:
        return "__Host-rlhf_session" if self.secure else "rlhf_session"

    @property
    def csrf(self) -> str:
        return "__Host-rlhf_csrf" if self.secure else "rlhf_csrf"

    @classmethod
    def for_url(cls, public_url: str) -> Cookies:
        return cls(secure=public_url.strip().lower().startswith("https://"))

    def header(self, name: str, value: str, max_age: int | None = None, samesite: str = "Lax") -> str:
        """A Set-Cookie value: HttpOnly, Path=/ (``__Host-`` requires it), Secure when https."""
        parts = [f"{name}={value}", "Path=/", "HttpOnly", f"SameSite={samesite}"]
        if max_age is not None:
            parts.append(f"Max-Age={max_age}")
        if self.secure:
            parts.append("Secure")
        return "; ".join(parts)


class CsrfTokens:
    """CSRF tokens signed for one session: ``nonce.hmac(secret, nonce | sha256(session cookie))``."""

    def __init__(self, secret: str):
        self._key = secret.encode()

    @staticmethod
    def binding(session_token: str | None) -> str:
        """What a token is bound to: the session cookie's hash ("" when signed out)."""
        return token_hash(session_token) if session_token else ""

    def _sign(self, nonce: str, binding: str) -> str:
        return hmac.new(self._key, f"{nonce}|{binding}".encode(), hashlib.sha256).hexdigest()[:32]

    def new(self, binding: str) -> str:
        nonce = secrets.token_urlsafe(18)
        return f"{nonce}.{self._sign(nonce, binding)}"

    def valid(self, token: str, binding: str) -> bool:
        nonce, _, sig = token.partition(".")
        return bool(nonce and sig) and hmac.compare_digest(sig, self._sign(nonce, binding))


def cookie_value(header: str, name: str) -> str:
    """The first cookie called ``name`` in a Cookie header ("" if none)."""
    for part in header.split(";"):
        k, _, v = part.strip().partition("=")
        if k == name:
            return v
    return ""


def session_cookie_headers(request: Request, session_token: str) -> list[str]:
    """Set-Cookie values that sign a browser in: the session, and a CSRF token bound to it."""
    cookies, csrf = request.app.state.cookies, request.app.state.csrf
    return [
        cookies.header(cookies.session, session_token, max_age=SESSION_DAYS * 24 * 3600),
        cookies.header(cookies.csrf, csrf.new(csrf.binding(session_token)), samesite="Strict"),
    ]


def signed_out_cookie_headers(request: Request) -> list[str]:
    cookies = request.app.state.cookies
    return [
        cookies.header(cookies.session, "", max_age=0),
        cookies.header(cookies.csrf, "", max_age=0, samesite="Strict"),
    ]


def session_token(request: Request) -> str:
    return cookie_value(request.headers.get("cookie", ""), request.app.state.cookies.session)


# ---------------------------------------------------------------- the middleware


class GuardMiddleware:
    """Pure ASGI middleware (streaming responses pass through untouched); see the module docstring."""

    def __init__(self, app, max_body: int, cookies: Cookies, csrf: CsrfTokens):
        self.app = app
        self.max_body = max_body
        self.cookies = cookies
        self.csrf = csrf

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = secrets.token_hex(8)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        token, fresh = self._csrf_token(headers.get("cookie", ""))
        state = scope.setdefault("state", {})
        state["csrf"], state["request_id"] = token, rid
        started = finished = False

        async def guarded_send(msg):
            nonlocal started, finished
            if msg["type"] == "http.response.start":
                started = True
                msg = {**msg, "headers": self._headers(msg.get("headers", []), rid, token if fresh else None)}
            elif msg["type"] == "http.response.body" and not msg.get("more_body", False):
                finished = True
            await send(msg)

        too_big = f"request body over the limit of {self.max_body} bytes"
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await _json(guarded_send, 413, too_big, rid)
        if scope["method"] in ("POST", "PUT", "PATCH") and length is None:
            body = await _read_chunked(receive, self.max_body)
            if body is _GONE:
                return
            if body is None:
                return await _json(guarded_send, 413, too_big, rid)
            receive = _replay(body)
        try:
            await self.app(scope, receive, guarded_send)
        except Exception:  # noqa: BLE001 — the last resort: log it, answer one clean line, keep the connection
            log.exception("request %s: %s %s failed", rid, scope["method"], scope.get("path", ""))
            if not started:
                await _json(
                    guarded_send, 500, f"internal error: the server log has the details under request id {rid}", rid
                )
            elif not finished:  # a stream was under way: end it
                await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _csrf_token(self, cookie_header: str) -> tuple[str, bool]:
        """The CSRF cookie if it is signed for this request's session, else a new one (to be set)."""
        binding = self.csrf.binding(cookie_value(cookie_header, self.cookies.session))
        token = cookie_value(cookie_header, self.cookies.csrf)
        if token and self.csrf.valid(token, binding):
            return token, False
        return self.csrf.new(binding), True

    def _headers(self, headers, rid: str, new_csrf: str | None) -> list:
        h = list(headers)
        h += [
            (b"content-security-policy", CSP.encode()),
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"same-origin"),
            (b"x-frame-options", b"DENY"),
            (b"x-request-id", rid.encode()),
        ]
        if self.cookies.secure:
            h.append((b"strict-transport-security", HSTS.encode()))
        name = self.cookies.csrf.encode()
        sets_csrf = any(k.lower() == b"set-cookie" and v.startswith(name + b"=") for k, v in h)
        if new_csrf and not sets_csrf:  # a route that signs in or out sets its own
            h.append((b"set-cookie", self.cookies.header(self.cookies.csrf, new_csrf, samesite="Strict").encode()))
        return h


_GONE = b"<client gone>"  # a sentinel, compared by identity


async def _read_chunked(receive, limit: int) -> bytes | None:
    """A body sent without Content-Length, read up to ``limit`` bytes; None when over it, ``_GONE``
    when the client went away before the end."""
    body, more = b"", True
    while more:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return _GONE
        body += msg.get("body", b"")
        more = msg.get("more_body", False)
        if len(body) > limit:
            return None
    return body


def _replay(body: bytes):
    """A ``receive`` that hands the app a body already read."""
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def _json(send, status: int, message: str, rid: str) -> None:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = json.dumps({"error": {"message": message, "type": kind, "code": status, "request_id": rid}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------- rate limits


class RateLimiter:
    """Token bucket per key: ``per_minute`` requests a minute, bursts of up to ``burst``."""

    def __init__(self, per_minute: float, burst: int | None = None):
        self.rate = per_minute / 60.0
        self.burst = float(burst if burst is not None else max(1, int(per_minute)))
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def check(self, key: str) -> None:
        if self.rate <= 0:
            return
        with self._lock:
            now = time.monotonic()
            tokens, last = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens < 1:
                wait = (1 - tokens) / self.rate
                self._buckets[key] = (tokens, now)
                raise HTTPException(
                    429,
                    f"rate limit: at most {self.rate * 60:g} requests a minute; try again in {wait:.0f} s",
                    headers={"Retry-After": str(max(1, round(wait)))},
                )
            self._buckets[key] = (tokens - 1, now)
