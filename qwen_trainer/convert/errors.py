"""The one exception type the converter raises for problems a user can fix."""

from __future__ import annotations


class ConversionError(Exception):
    """A conversion cannot proceed. `problems` holds one human-readable line per problem."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


def check(problems: list[str]) -> None:
    if problems:
        raise ConversionError(problems)
