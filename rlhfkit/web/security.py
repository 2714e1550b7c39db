"""Who may do what, and the guards around every request.

- Sign-in: a session token in an HttpOnly, SameSite=Lax cookie; the store keeps only its hash.
  The OpenAI-compatible API takes ``Authorization: Bearer <api key>`` instead.
- CSRF: double-submit token. Every response carries a random ``rlhf_csrf`` cookie (SameSite=Strict);
  a state-changing request with the session cookie must repeat it in the form field ``csrf_token``
  or the ``X-CSRF-Token`` header. Another site can make a browser send the cookie, but cannot read
  it to repeat it.
- ``GuardMiddleware``: request-size limit (413 before the app sees the body), the CSRF cookie, and
  security headers (a Content-Security-Policy that allows scripts from this server only: no inline
  script runs, so injected markup stays inert even if it were ever rendered unescaped).
- ``RateLimiter``: a token bucket per user for generation (chat, arena, the API).
"""

from __future__ import annotations

import json
import secrets
import threading
import time

from fastapi import HTTPException, Request

SESSION_COOKIE = "rlhf_session"
CSRF_COOKIE = "rlhf_csrf"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; object-src 'none'; "
       "base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


class NeedLogin(Exception):
    """Raised by ``require_user``: pages redirect to /login, the JSON routes answer 401."""


class GuardMiddleware:
    """Pure ASGI middleware (streaming responses pass through untouched)."""

    def __init__(self, app, max_body: int):
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await _json(send, 413, f"request body over the limit of {self.max_body} bytes")
        if scope["method"] in ("POST", "PUT", "PATCH") and length is None:
            # chunked body: read it here, up to the limit, and replay it to the app
            body, more = b"", True
            while more:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                body += msg.get("body", b"")
                more = msg.get("more_body", False)
                if len(body) > self.max_body:
                    return await _json(send, 413, f"request body over the limit of {self.max_body} bytes")
            sent = False

            async def receive():  # noqa: F811
                nonlocal sent
                if sent:
                    return {"type": "http.disconnect"}
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}

        cookie = _cookie(headers.get("cookie", ""), CSRF_COOKIE)
        new = not cookie or len(cookie) < 20
        token = secrets.token_urlsafe(24) if new else cookie
        scope.setdefault("state", {})["csrf"] = token

        async def send_with_headers(msg):
            if msg["type"] == "http.response.start":
                h = list(msg.get("headers", []))
                h += [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                      (b"referrer-policy", b"same-origin"), (b"x-frame-options", b"DENY")]
                if new:
                    h.append((b"set-cookie", f"{CSRF_COOKIE}={token}; Path=/; SameSite=Strict".encode()))
                msg = {**msg, "headers": h}
            await send(msg)

        await self.app(scope, receive, send_with_headers)


async def _json(send, status: int, message: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "code": status}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _cookie(header: str, name: str) -> str:
    for part in header.split(";"):
        k, _, v = part.strip().partition("=")
        if k == name:
            return v
    return ""


async def check_csrf(request: Request) -> None:
    """FastAPI dependency for state-changing routes used from the browser."""
    expected = request.cookies.get(CSRF_COOKIE, "")
    given = request.headers.get("x-csrf-token", "")
    if not given and "form" in request.headers.get("content-type", ""):
        form = await request.form()  # cached: the route's Form() parameters read it again
        given = str(form.get("csrf_token", ""))
    if not expected or not given or not secrets.compare_digest(expected, given):
        raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")


def current_user(request: Request):
    """The signed-in user (session cookie), or None."""
    token = request.cookies.get(SESSION_COOKIE)
    return request.app.state.store.session_user(token) if token else None


def require_user(request: Request):
    user = current_user(request)
    if user is None:
        raise NeedLogin()
    return user


def require_admin(request: Request):
    user = require_user(request)
    if user.role != "admin":
        raise HTTPException(403, "this page needs the admin role")
    return user


def api_user(request: Request):
    """The OpenAI-compatible API: a Bearer API key (``rlhfkit users key NAME``)."""
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        user = request.app.state.store.api_key_user(auth[7:].strip())
        if user is None:
            raise HTTPException(401, "invalid API key")
        return user
    raise HTTPException(401, "missing API key: send 'Authorization: Bearer <key>' (rlhfkit users key NAME makes one)")


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
                raise HTTPException(429, f"rate limit: at most {self.rate * 60:g} requests a minute; "
                                         f"try again in {wait:.0f} s", headers={"Retry-After": str(max(1, round(wait)))})
            self._buckets[key] = (tokens - 1, now)
