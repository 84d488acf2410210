"""Shared pydantic configuration for every spec model.

Fields are snake_case in Python and camelCase on the wire (YAML, the CRD), as Kubernetes users expect.
Unknown fields are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class SpecModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        extra="forbid",
        use_attribute_docstrings=True,
        frozen=False,
    )

    def to_wire(self) -> dict:
        """The camelCase form, without unset optional fields (what a user would write)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


AbsolutePath = Annotated[
    str,
    Field(pattern=r"^/", max_length=4096, description="An absolute path inside the pod (on a mounted volume)."),
]
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
