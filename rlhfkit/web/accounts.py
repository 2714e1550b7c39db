"""Signing in and out, invite links, and changing one's password.

    GET/POST /login            a name and a password; failures are throttled and logged (``Store.sign_in``)
    POST     /logout           ends the session
    GET      /account          POST /account/password: a new password (ends the user's other sessions)
    GET/POST /invite/{token}   choose a password through an invite link (also how a password is reset)

Signing in sets a new session cookie and a CSRF token bound to it (``security.session_cookie_headers``).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from rlhfkit.errors import UserError
from rlhfkit.web.deps import check_csrf, client_address, require_user
from rlhfkit.web.security import session_cookie_headers, session_token, signed_out_cookie_headers
from rlhfkit.web.templating import render

router = APIRouter()
INVALID_INVITE = "this invite link is not valid (used already, or replaced by a newer one)"


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str = "/label"):
    return render(request, "login.html", next=safe_next(next))


@router.post("/login", dependencies=[Depends(check_csrf)])
def login(
    request: Request,
    name: str = Form(..., max_length=80),
    password: str = Form(..., max_length=200),
    next: str = Form("/label"),
):
    app = request.app
    done = app.state.store.sign_in(name, password, client_address(request), app.state.sign_in_limits)
    if done.throttled:
        page = render(
            request, "login.html", status=429, next=safe_next(next), error=_throttled_message(done.retry_after)
        )
        return _throttled(page, done.retry_after)
    if done.user_id is None:
        return render(request, "login.html", status=401, error="wrong name or password", next=safe_next(next))
    return _signed_in(request, done.user_id, safe_next(next))


@router.post("/logout", dependencies=[Depends(check_csrf)])
def logout(request: Request):
    token = session_token(request)
    if token:
        request.app.state.store.end_session(token)
    resp = RedirectResponse("/login", 303)
    for cookie in signed_out_cookie_headers(request):
        resp.headers.append("set-cookie", cookie)
    return resp


@router.get("/account", response_class=HTMLResponse)
def account_page(request: Request, user=Depends(require_user)):
    return render(request, "account.html", user=user)


@router.post("/account/password", dependencies=[Depends(check_csrf)])
def change_password(
    request: Request,
    current: str = Form(..., max_length=200),
    new: str = Form(..., max_length=200),
    user=Depends(require_user),
):
    """A new password: the current one is checked like a sign-in (throttled, logged), and every
    other session of the user ends."""
    app = request.app
    done = app.state.store.sign_in(user.name, current, client_address(request), app.state.sign_in_limits)
    if done.throttled:
        page = render(request, "account.html", status=429, user=user, error=_throttled_message(done.retry_after))
        return _throttled(page, done.retry_after)
    if done.user_id != user.id:
        return render(request, "account.html", status=403, user=user, error="the current password is wrong")
    try:
        app.state.store.set_password(user.id, new, keep_session=session_token(request))
    except UserError as e:  # too short
        return render(request, "account.html", status=400, user=user, error=str(e))
    return render(request, "account.html", user=user, changed=True)


@router.get("/invite/{token}", response_class=HTMLResponse)
def invite_page(request: Request, token: str):
    u = request.app.state.store.invited_user(token)
    if u is None:
        raise HTTPException(404, INVALID_INVITE)
    return render(request, "invite.html", invited=u.name, token=token)


@router.post("/invite/{token}", dependencies=[Depends(check_csrf)])
def accept_invite(request: Request, token: str, password: str = Form(..., max_length=200)):
    uid = request.app.state.store.accept_invite(token, password)
    if uid is None:
        raise HTTPException(404, INVALID_INVITE)
    return _signed_in(request, uid, "/label")


def safe_next(url: str) -> str:
    """Only local paths: a crafted ?next= must not send people to another site."""
    return url if url.startswith("/") and not url.startswith("//") and "\\" not in url else "/label"


def _signed_in(request: Request, user_id: int, to: str) -> RedirectResponse:
    """Redirect with a new session cookie and a CSRF token bound to that session (the token the
    sign-in form carried is not valid for it: a token planted before sign-in dies here)."""
    resp = RedirectResponse(to, 303)
    for cookie in session_cookie_headers(request, request.app.state.store.new_session(user_id)):
        resp.headers.append("set-cookie", cookie)
    return resp


def _throttled_message(retry_after: float) -> str:
    return f"too many failed sign-ins for this name or from this address: try again in {_seconds(retry_after)} s"


def _throttled(resp, retry_after: float):
    resp.headers["Retry-After"] = str(_seconds(retry_after))
    return resp


def _seconds(s: float) -> int:
    return max(1, int(s + 0.999))
