"""User-facing errors: one clear line, exit code 2, never a traceback.

The subclasses say what kind of mistake it is, so that the web app answers with the right status
code by class (``rlhfkit.web.error_pages.status_for``), never by reading the message; the CLI
treats them all as a ``UserError``.
"""


class UserError(Exception):
    """Bad input from the user (a file, a record, a field, an option).

    The CLI prints ``error: <message>`` on one line and exits with code 2. Messages name the
    file, the line or record, and the field, and say what was expected. The web app answers 400.
    """

    exit_code = 2


class NotFound(UserError, LookupError):
    """What the user named does not exist (a task, a battle, a user, a model version): 404.

    Also a ``LookupError``, as these were before they had a class of their own."""


class Conflict(UserError):
    """The request contradicts what is stored (a second ranking of a task, a full task, a name
    taken, a second vote): 409."""
