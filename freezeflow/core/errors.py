"""Errors a user can cause. Each one renders as a single line naming what to fix."""

from __future__ import annotations


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's first line (at most `limit` characters), or its type's name when it has no text:
    what a one-line message quotes of a library's error."""
    text = str(exc).strip()
    return text.splitlines()[0].strip()[:limit] if text else type(exc).__name__


class UserError(Exception):
    """A mistake in the user's input (file, param, environment): exit code 2, no traceback."""

    exit_code = 2


class ParamsError(UserError):
    """A bad value, unknown key or malformed params file."""

    def __init__(self, file: str, key: str, problem: str):
        self.file, self.key, self.problem = file, key, problem
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {problem}")


class DataError(UserError):
    """A dataset folder that cannot be used as it is."""
