"""Reading a Kubernetes object's `status.conditions` (the QwenTrainingJob's own, a child job's, a Kueue Workload's)."""

from __future__ import annotations

from typing import Any, Iterable, Optional


def by_type(conditions: Optional[Iterable[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The conditions keyed by their type (never by list position)."""
    return {c["type"]: c for c in (conditions or []) if isinstance(c, dict) and c.get("type")}


def is_true(c: Optional[dict[str, Any]]) -> bool:
    return c is not None and c.get("status") == "True"
