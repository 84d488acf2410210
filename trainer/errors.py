"""Errors a user can fix. The command line prints them as one line each and exits non-zero, with no traceback."""

from __future__ import annotations

from typing import Iterable


class UserError(Exception):
    """A problem in the spec, the data or the environment that the user must fix (not a bug)."""

    def __init__(self, message: str, *, path: str | None = None):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)

    def lines(self) -> list[str]:
        return [str(self)]


class UserErrors(UserError):
    """Several problems found at once (for example one per broken spec rule)."""

    def __init__(self, messages: Iterable[str]):
        self.messages = list(messages)
        super().__init__("; ".join(self.messages))

    def lines(self) -> list[str]:
        return list(self.messages)


EXIT_USER_ERROR = 2
EXIT_CRASH = 1
