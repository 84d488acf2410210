"""Find where a live child object no longer matches what was rendered. Pure.

The comparison is a subset check: every value we rendered must still be there, while fields added by others
are allowed: API-server and training-operator defaulting (ports, restart policies), and Kueue, which merges a
ResourceFlavor's nodeSelector, tolerations, labels and annotations into the pod templates on admission and
moves `runPolicy.suspend`. Lists of scalars (a command line) must match exactly; lists of objects must keep
our items, in order, at the front (Kueue appends tolerations).
"""

from __future__ import annotations

from typing import Any

# Paths that others legitimately change: Kueue suspends/resumes (PyTorchJob runPolicy.suspend, TrainJob
# spec.suspend), MultiKueue may set managedBy.
IGNORED = ("spec.runPolicy.suspend", "spec.runPolicy.managedBy", "spec.suspend", "spec.managedBy")


def _scalar_equal(a: Any, b: Any) -> bool:
    if a == b:
        return True
    # Quantities and integer strings may come back in either form (e.g. 8 vs "8").
    if isinstance(a, (int, float, str)) and isinstance(b, (int, float, str)) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return str(a) == str(b)
    return False


def differences(desired: Any, live: Any, path: str = "") -> list[str]:
    """Paths (dotted, with [i] for list items) where `live` lacks or changed a value of `desired`."""
    if path in IGNORED:
        return []
    if isinstance(desired, dict):
        if not isinstance(live, dict):
            return [path or "(root)"]
        out: list[str] = []
        for key, value in desired.items():
            sub = f"{path}.{key}" if path else str(key)
            if key not in live:
                if sub not in IGNORED:
                    out.append(sub)
                continue
            out.extend(differences(value, live[key], sub))
        return out
    if isinstance(desired, list):
        if not isinstance(live, list):
            return [path]
        if all(not isinstance(x, (dict, list)) for x in desired):
            if len(desired) != len(live) or not all(_scalar_equal(a, b) for a, b in zip(desired, live)):
                return [path]
            return []
        if len(live) < len(desired):
            return [path]
        out = []
        for i, item in enumerate(desired):
            out.extend(differences(item, live[i], f"{path}[{i}]"))
        return out
    return [] if _scalar_equal(desired, live) else [path]


def child_drift(desired: dict[str, Any], live: dict[str, Any]) -> list[str]:
    """Differences in the parts we own: the spec (PyTorchJob) or the data (ConfigMap), and our labels."""
    paths: list[str] = []
    for part in ("spec", "data"):
        if part in desired:
            paths.extend(differences(desired[part], live.get(part), part))
    labels = (desired.get("metadata") or {}).get("labels") or {}
    paths.extend(differences(labels, (live.get("metadata") or {}).get("labels") or {}, "metadata.labels"))
    return paths
