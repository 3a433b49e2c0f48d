"""User-facing errors: the CLI prints their message without a traceback."""


class UserError(Exception):
    """Bad input from the user (a path, an option, a file's contents); the message says what to do."""
