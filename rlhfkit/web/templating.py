"""Server-rendered pages: the Jinja2 templates (autoescaping on: every prompt, answer and comment is
text) and ``render``, which every router uses to answer with a page."""

from __future__ import annotations

from pathlib import Path

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from rlhfkit.web.deps import current_user

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=str(HERE / "templates"))  # autoescape on for .html


def render(request: Request, name: str, status: int = 200, **context) -> HTMLResponse:
    """A page, with the signed-in user and the CSRF token every form repeats."""
    user = context.pop("user", None) or current_user(request)
    return templates.TemplateResponse(
        request, name, {"user": user, "csrf": request.state.csrf, **context}, status_code=status
    )
