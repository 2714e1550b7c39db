"""The web app (``rlhfkit serve``): labeling queue, arena, chat, admin, OpenAI-compatible API.

Its packages (FastAPI, uvicorn, python-multipart, argon2-cffi) come with the ``web`` extra:
``pip install 'rlhfkit[web]'``. This file imports none of them, so ``require_web_extra()`` can say
so in one line before ``rlhfkit.web.app`` is imported.
"""

from __future__ import annotations

import importlib

from rlhfkit.errors import UserError

WEB_EXTRA = ("fastapi", "uvicorn", "python_multipart", "argon2")  # import names of the extra's packages


def require_web_extra() -> None:
    """Raise a one-line ``UserError`` naming the install command when a package of the web extra is missing."""
    for name in WEB_EXTRA:
        try:
            importlib.import_module(name)
        except ImportError:
            raise UserError(
                f"the web app needs its extra ({name} is not installed): pip install 'rlhfkit[web]'"
            ) from None
