"""What the routes depend on: who is asking (session cookie or API key), the CSRF check, and the
bounds of ids in paths. Used as FastAPI dependencies (``user=Depends(require_user)``) by every
router; the mechanisms behind them (cookies, signed CSRF tokens) are in ``security.py``.
"""

from __future__ import annotations

import secrets

from fastapi import HTTPException, Request

from rlhfkit.web.security import cookie_value, session_token

DB_ID_MAX = 2**31 - 1  # ids are INTEGER columns: 32-bit on PostgreSQL (SQLite's are wider)


class NeedLogin(Exception):
    """Raised by ``require_user``: pages redirect to /login, the JSON routes answer 401."""


def current_user(request: Request):
    """The signed-in user (session cookie), or None."""
    token = session_token(request)
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


def client_address(request: Request) -> str:
    """The client's address as uvicorn saw it (behind a local proxy, its X-Forwarded-For)."""
    return request.client.host if request.client else "unknown"


async def check_csrf(request: Request) -> None:
    """For state-changing routes used from the browser: the token sent must equal the CSRF cookie
    and be signed for the session this request carries."""
    app = request.app
    cookie = cookie_value(request.headers.get("cookie", ""), app.state.cookies.csrf)
    given = request.headers.get("x-csrf-token", "")
    if not given and "form" in request.headers.get("content-type", ""):
        form = await request.form()  # cached: the route's Form() parameters read it again
        given = str(form.get("csrf_token", ""))
    binding = app.state.csrf.binding(session_token(request))
    if not (cookie and given and secrets.compare_digest(cookie, given) and app.state.csrf.valid(given, binding)):
        raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")
