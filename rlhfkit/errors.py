"""User-facing errors: one clear line, exit code 2, never a traceback."""


class UserError(Exception):
    """Bad input from the user (a file, a record, a field, an option).

    The CLI prints ``error: <message>`` on one line and exits with code 2. Messages name the
    file, the line or record, and the field, and say what was expected.
    """

    exit_code = 2
