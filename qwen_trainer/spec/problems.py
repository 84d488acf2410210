"""Turn validation failures into one readable problem per field, never a traceback."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class SpecError(Exception):
    """A spec that cannot run; carries every problem found, each naming its field."""

    def __init__(self, problems: Iterable[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def _join(prefix: str, loc: tuple[Any, ...]) -> str:
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path = f"{path}.{part}" if path else str(part)
    return path


_FRIENDLY = {
    "extra_forbidden": "unknown field",
    "missing": "required field is missing",
}


def from_validation_error(err: ValidationError, prefix: str = "") -> list[Problem]:
    problems = []
    for e in err.errors(include_url=False):
        message = _FRIENDLY.get(e["type"], e["msg"])
        if e["type"] not in _FRIENDLY and "input" in e and not isinstance(e["input"], (dict, list)):
            message = f"{message} (got {e['input']!r})"
        problems.append(Problem(_join(prefix, tuple(e["loc"])), message))
    return problems


def parse(model: type[M], data: Any, prefix: str = "") -> M:
    """Validate `data` as `model`, raising SpecError with field-path problems."""
    if not isinstance(data, dict):
        raise SpecError([Problem(prefix or "(document)", f"expected a mapping, got {type(data).__name__}")])
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise SpecError(from_validation_error(err, prefix)) from None
