"""The web app: ``create_app(config)`` builds it, ``serve(config)`` runs it under uvicorn.

Routes (each module holds one area):

    /login /logout /invite/{token}          sign-in (this file)
    /account                                change one's password (this file)
    /label, /api/tasks/...                  labeling queue (labeling.py)
    /arena, /arena/{id}, /leaderboard       arena and ratings (arena.py)
    /chat, /api/chat                        chat with streamed tokens (chat.py)
    /v1/models, /v1/chat/completions        OpenAI-compatible API (chat.py)
    /admin/...                              dashboard, batches, export, users (admin.py)

Pages are server-rendered Jinja2 templates with autoescaping: every prompt, answer and comment is
text. Errors are one clear message: JSON ``{"error": {"message": ...}}`` for /api and /v1, a small
page otherwise; never a traceback. Should a bug still raise, the answer is one line of JSON with a
request id that the server log shows next to the traceback (``security.GuardMiddleware``).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from fastapi import Depends, FastAPI, Form, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from rlhfkit.config import ServeConfig
from rlhfkit.errors import UserError
from rlhfkit.feedback.store import Conflict, SignInLimits, Store
from rlhfkit.web.models import ModelPool, discover_versions
from rlhfkit.web.security import (Cookies, CsrfTokens, GuardMiddleware, NeedLogin, RateLimiter, check_csrf,
                                  client_address, current_user, require_user, session_cookie_headers,
                                  session_token, signed_out_cookie_headers)

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=str(HERE / "templates"))  # autoescape on for .html


def render(request: Request, name: str, status: int = 200, **context) -> HTMLResponse:
    """A page, with the signed-in user and the CSRF token every form repeats."""
    user = context.pop("user", None) or current_user(request)
    return templates.TemplateResponse(request, name, {"user": user, "csrf": request.state.csrf, **context},
                                      status_code=status)


def _wants_json(request: Request) -> bool:
    p = request.url.path
    return p.startswith(("/api/", "/v1/")) or "application/json" in request.headers.get("accept", "")


def _error(request: Request, status: int, message: str, headers: dict | None = None):
    if _wants_json(request):
        kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                413: "invalid_request_error", 429: "rate_limit_error"}.get(status, "invalid_request_error")
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status, headers=headers)
    return render(request, "error.html", status=status, message=message)


def create_app(cfg: ServeConfig, store: Store | None = None, pool: ModelPool | None = None) -> FastAPI:
    store = store or Store.for_run(cfg.run, cfg.db or None)
    if pool is None:
        pool = ModelPool(discover_versions(cfg.run, cfg.models), precision=cfg.precision)
    store.register_models(pool.versions)
    app = FastAPI(title="rlhfkit", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store, app.state.pool, app.state.cfg = store, pool, cfg
    app.state.limiter = RateLimiter(cfg.rate_limit)
    app.state.cookies = Cookies.for_url(cfg.public_url)
    app.state.csrf = CsrfTokens(store.secret("csrf_secret"))
    app.state.sign_in_limits = SignInLimits(cfg.login_failures, cfg.login_failures_per_address, cfg.login_window_s)
    app.add_middleware(GuardMiddleware, max_body=cfg.max_body_kb * 1024, cookies=app.state.cookies,
                       csrf=app.state.csrf)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    @app.exception_handler(NeedLogin)
    async def need_login(request: Request, exc: NeedLogin):
        if _wants_json(request) or request.method != "GET":
            return _error(request, 401, "sign in first")
        return RedirectResponse(f"/login?next={request.url.path}", 303)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(request, exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError):
        return _error(request, 409 if isinstance(exc, Conflict) else 400, str(exc))

    @app.exception_handler(LookupError)
    async def not_found(request: Request, exc: LookupError):
        return _error(request, 404, str(exc.args[0]) if exc.args else "not found")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors()[:5]:
            where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path", "form"))
            parts.append(f"{where or 'body'}: {e.get('msg', 'invalid')}")
        status = 400 if request.url.path.startswith("/v1/") else 422  # OpenAI answers 400 to a bad body
        return _error(request, status, "; ".join(parts) or "invalid request")

    from rlhfkit.web import admin, arena, chat, labeling

    for module in (labeling, arena, chat, admin):
        app.include_router(module.router)

    @app.get("/", include_in_schema=False)
    def home(request: Request):
        user = current_user(request)
        return RedirectResponse("/label" if user else "/login", 303)

    @app.get("/healthz")
    def healthz():
        return {"ok": True, "models": pool.names()}

    @app.get("/login", response_class=HTMLResponse)
    def login_page(request: Request, next: str = "/label"):
        return render(request, "login.html", next=_safe_next(next))

    @app.post("/login", dependencies=[Depends(check_csrf)])
    def login(request: Request, name: str = Form(..., max_length=80), password: str = Form(..., max_length=200),
              next: str = Form("/label")):
        done = store.sign_in(name, password, client_address(request), app.state.sign_in_limits)
        if done.throttled:
            return _throttled(render(request, "login.html", status=429, next=_safe_next(next),
                                     error=_throttled_message(done.retry_after)), done.retry_after)
        if done.user_id is None:
            return render(request, "login.html", status=401, error="wrong name or password", next=_safe_next(next))
        return _signed_in(request, store, done.user_id, _safe_next(next))

    @app.post("/logout", dependencies=[Depends(check_csrf)])
    def logout(request: Request):
        token = session_token(request)
        if token:
            store.end_session(token)
        resp = RedirectResponse("/login", 303)
        for cookie in signed_out_cookie_headers(request):
            resp.headers.append("set-cookie", cookie)
        return resp

    @app.get("/account", response_class=HTMLResponse)
    def account_page(request: Request, user=Depends(require_user)):
        return render(request, "account.html", user=user)

    @app.post("/account/password", dependencies=[Depends(check_csrf)])
    def change_password(request: Request, current: str = Form(..., max_length=200),
                        new: str = Form(..., max_length=200), user=Depends(require_user)):
        """A new password: the current one is checked like a sign-in (throttled, logged), and every
        other session of the user ends."""
        done = store.sign_in(user.name, current, client_address(request), app.state.sign_in_limits)
        if done.throttled:
            return _throttled(render(request, "account.html", status=429, user=user,
                                     error=_throttled_message(done.retry_after)), done.retry_after)
        if done.user_id != user.id:
            return render(request, "account.html", status=403, user=user, error="the current password is wrong")
        try:
            store.set_password(user.id, new, keep_session=session_token(request))
        except UserError as e:  # too short
            return render(request, "account.html", status=400, user=user, error=str(e))
        return render(request, "account.html", user=user, changed=True)

    @app.get("/invite/{token}", response_class=HTMLResponse)
    def invite_page(request: Request, token: str):
        u = store.invited_user(token)
        if u is None:
            raise HTTPException(404, "this invite link is not valid (used already, or replaced by a newer one)")
        return render(request, "invite.html", invited=u.name, token=token)

    @app.post("/invite/{token}", dependencies=[Depends(check_csrf)])
    def accept_invite(request: Request, token: str, password: str = Form(..., max_length=200)):
        uid = store.accept_invite(token, password)
        if uid is None:
            raise HTTPException(404, "this invite link is not valid (used already, or replaced by a newer one)")
        return _signed_in(request, store, uid, "/label")

    return app


def _safe_next(url: str) -> str:
    """Only local paths: a crafted ?next= must not send people to another site."""
    return url if url.startswith("/") and not url.startswith("//") and "\\" not in url else "/label"


def _signed_in(request: Request, store: Store, user_id: int, to: str) -> RedirectResponse:
    """Redirect with a new session cookie and a CSRF token bound to that session (the token the
    sign-in form carried is not valid for it: a token planted before sign-in dies here)."""
    resp = RedirectResponse(to, 303)
    for cookie in session_cookie_headers(request, store.new_session(user_id)):
        resp.headers.append("set-cookie", cookie)
    return resp


def _throttled_message(retry_after: float) -> str:
    return (f"too many failed sign-ins for this name or from this address: try again in "
            f"{_seconds(retry_after)} s")


def _throttled(resp, retry_after: float):
    resp.headers["Retry-After"] = str(_seconds(retry_after))
    return resp


def _seconds(s: float) -> int:
    return max(1, int(s + 0.999))


def serve(cfg: ServeConfig, say=print) -> None:
    """Run the app under uvicorn; with no users yet, print an admin invite link first."""
    import uvicorn

    store = Store.for_run(cfg.run, cfg.db or None)
    base = cfg.public_url.rstrip("/") or f"http://{cfg.host}:{cfg.port}"
    store.set_setting("base_url", base)  # `rlhfkit users add/invite` print links with it
    _log_to_stderr()
    if store.count_users() == 0:
        _, invite = store.create_user("admin", role="admin")
        say(f"no users yet: sign in as 'admin' through {base}/invite/{invite}")
    app = create_app(cfg, store=store)
    say(f"serving {', '.join(app.state.pool.names()) or 'no model versions'} at {base} (store: {store.url})")
    # keep idle connections 75 s (uvicorn: 5 s): a browser or proxy reusing a connection the server
    # is closing gets a reset; with 50 labelers on a loaded 2-core CI machine that happened within 5 s
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", timeout_keep_alive=75)


def _log_to_stderr() -> None:
    """Errors of the app (a 500's traceback under its request id) go to stderr, as uvicorn's do."""
    logger = logging.getLogger("rlhfkit.web")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
