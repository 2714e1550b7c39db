"""The web app: ``create_app(config)`` builds it, ``serve(config)`` runs it under uvicorn.

Routes (each module holds one area):

    /login /logout /invite/{token}          sign-in (accounts.py)
    /account                                change one's password (accounts.py)
    /label, /api/tasks/...                  labeling queue (labeling.py)
    /arena, /arena/{id}, /leaderboard       arena and ratings (arena.py)
    /chat, /api/chat                        chat with streamed tokens (chat.py)
    /v1/models, /v1/chat/completions        OpenAI-compatible API (chat.py)
    /admin/...                              dashboard, batches, export, users (admin.py)

What they share: ``templating.render`` (pages: Jinja2 templates with autoescaping: every prompt,
answer and comment is text), ``deps`` (the signed-in user, the API key's user, the CSRF check),
``security`` (cookies, CSRF tokens, the middleware, the rate limiter). Errors are one clear message
(``error_pages``): JSON ``{"error": {"message": ...}}`` for /api and /v1, a small page otherwise,
the status code chosen by the error's class; never a traceback. Should a bug still raise, the
answer is one line of JSON with a request id that the server log shows next to the traceback
(``security.GuardMiddleware``).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from rlhfkit.config import ServeConfig
from rlhfkit.errors import UserError
from rlhfkit.feedback.store import SignInLimits, Store
from rlhfkit.web import accounts, admin, arena, chat, labeling
from rlhfkit.web.deps import current_user
from rlhfkit.web.error_pages import add_error_handlers
from rlhfkit.web.models import ModelPool, discover_versions
from rlhfkit.web.security import Cookies, CsrfTokens, GuardMiddleware, RateLimiter

STATIC = Path(__file__).parent / "static"


def serve_reward_fn(cfg: ServeConfig):
    """The reward model that picks best-of-N answers (``--reward-model``), or None; a clear error for
    ``--best-of N`` without one, or a directory that is not there."""
    if cfg.best_of < 1:
        raise UserError(f"--best-of must be >= 1, got {cfg.best_of}")
    if not cfg.reward_model:
        if cfg.best_of > 1:
            raise UserError(
                f"--best-of {cfg.best_of} needs --reward-model RM_DIR (the reward model that picks the best "
                f"of {cfg.best_of} samples), or leave --best-of at 1"
            )
        return None
    if not Path(cfg.reward_model).expanduser().is_dir():
        raise UserError(f"--reward-model {cfg.reward_model}: no such directory (a reward model saved by `rlhfkit rm`)")
    from rlhfkit.evals.helpful import hf_reward_fn

    return hf_reward_fn(cfg.reward_model)


def create_app(cfg: ServeConfig, store: Store | None = None, pool: ModelPool | None = None) -> FastAPI:
    store = store or Store.for_run(cfg.run, cfg.db or None)
    if pool is None:
        pool = ModelPool(
            discover_versions(cfg.run, cfg.models),
            precision=cfg.precision,
            rollout_backend=cfg.rollout_backend,
            best_of=cfg.best_of,
            reward_fn=serve_reward_fn(cfg),
        )
    store.register_models(pool.versions)
    app = FastAPI(title="rlhfkit", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store, app.state.pool, app.state.cfg = store, pool, cfg
    app.state.limiter = RateLimiter(cfg.rate_limit)
    app.state.cookies = Cookies.for_url(cfg.public_url)
    app.state.csrf = CsrfTokens(store.secret("csrf_secret"))
    app.state.sign_in_limits = SignInLimits(cfg.login_failures, cfg.login_failures_per_address, cfg.login_window_s)
    app.add_middleware(GuardMiddleware, max_body=cfg.max_body_kb * 1024, cookies=app.state.cookies, csrf=app.state.csrf)
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    add_error_handlers(app)
    for module in (labeling, arena, chat, admin, accounts):
        app.include_router(module.router)

    @app.get("/", include_in_schema=False)
    def home(request: Request):
        user = current_user(request)
        return RedirectResponse("/label" if user else "/login", 303)

    @app.get("/healthz")
    def healthz():
        return {"ok": True, "models": pool.names()}

    return app


def serve(cfg: ServeConfig, say=print) -> None:
    """Run the app under uvicorn; with no users yet, print an admin invite link first."""
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
    # is closing gets a reset, which under load (many labelers at once) happens within seconds
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", timeout_keep_alive=75)


def _log_to_stderr() -> None:
    """Errors of the app (a 500's traceback under its request id) go to stderr, as uvicorn's do."""
    logger = logging.getLogger("rlhfkit.web")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
