"""The QwenTrainingJob API: models, validation and the generated CRD."""

from .resource import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    QwenTrainingJobSpec,
    QwenTrainingJobStatus,
)
from .validation import validate_resource_spec

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "VERSION",
    "QwenTrainingJobSpec",
    "QwenTrainingJobStatus",
    "validate_resource_spec",
]
