"""Errors as answers: the status code of each error class, and the handlers that turn an exception
into one clear message (JSON ``{"error": {"message", "type", "code"}}`` for /api and /v1, a small
page otherwise; never a traceback).

The status comes from the exception's class (``status_for``), never from its message: the store
raises ``NotFound`` (404) and ``Conflict`` (409), any other ``UserError`` is bad input (400).
The OpenAI-compatible routes answer in OpenAI's shape through the same ``status_for``
(``chat.OpenAIRoute``).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rlhfkit.errors import Conflict, NotFound, UserError
from rlhfkit.web.deps import NeedLogin
from rlhfkit.web.templating import render

STATUS = {NotFound: 404, Conflict: 409}  # any other UserError: 400
ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def status_for(exc: UserError) -> int:
    """The HTTP status of a user error, by its class."""
    return next((status for cls, status in STATUS.items() if isinstance(exc, cls)), 400)


def wants_json(request: Request) -> bool:
    p = request.url.path
    return p.startswith(("/api/", "/v1/")) or "application/json" in request.headers.get("accept", "")


def error_response(request: Request, status: int, message: str, headers: dict | None = None):
    """JSON for /api, /v1 and clients that accept JSON; the error page otherwise."""
    if wants_json(request):
        kind = ERROR_TYPES.get(status, "invalid_request_error")
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status, headers=headers)
    return render(request, "error.html", status=status, message=message)


def add_error_handlers(app: FastAPI) -> None:
    """Sign in first (401 or a redirect), HTTP errors, user errors by class, invalid requests."""

    @app.exception_handler(NeedLogin)
    async def need_login(request: Request, exc: NeedLogin):
        if wants_json(request) or request.method != "GET":
            return error_response(request, 401, "sign in first")
        return RedirectResponse(f"/login?next={request.url.path}", 303)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(request, exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError):
        return error_response(request, status_for(exc), str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors()[:5]:
            where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path", "form"))
            parts.append(f"{where or 'body'}: {e.get('msg', 'invalid')}")
        status = 400 if request.url.path.startswith("/v1/") else 422  # OpenAI answers 400 to a bad body
        return error_response(request, status, "; ".join(parts) or "invalid request")
