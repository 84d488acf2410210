"""Map the child PyTorchJob's status onto the QwenTrainingJob's status. Pure functions: inputs are plain dicts
(the wire form), the generation and the current time; the output is the complete new status.

Conditions follow the Kubernetes API conventions: a list keyed by `type`, each with `status`
(True/False/Unknown), a CamelCase `reason`, a `message`, a `lastTransitionTime` that moves only when
`status` flips, and the `observedGeneration` it was computed from.

Condition types:

* `Created`, `Running`, `Restarting`, `Suspended`, `Failed`: mirrored from the PyTorchJob by type (never by
  list position: after a resume the child's last entry is `Suspended=False`). A type the child has not
  reported, or has dropped (the training-operator removes `Running` when it sets `Restarting`), is False.
* `Succeeded`: the summary for a bounded object. True when the child succeeded; False with the failure's
  reason and message when it failed; Unknown, with the current phase as reason, while it runs.
* `Synced`: whether the operator's children match the resource (False with `InvalidSpec`, `ChildModified`,
  `SpecChangeIgnored`, `NameConflict` or `ChildDeleted`).

Terminal states stay terminal: once `phase` is Succeeded, Failed or Invalid, child updates no longer change
the conditions or the phase (the training-operator behaves the same way for Failed).
"""

from __future__ import annotations

import copy
from typing import Any, Iterable, Optional

MIRRORED = ("Created", "Running", "Restarting", "Suspended", "Failed")
SUMMARY = "Succeeded"
SYNCED = "Synced"
ORDER = ("Created", "Running", "Restarting", "Suspended", "Succeeded", "Failed", "Synced")
TERMINAL_PHASES = ("Succeeded", "Failed", "Invalid")

# Synced reasons
IN_SYNC = "ChildrenInSync"
INVALID_SPEC = "InvalidSpec"
CHILD_MODIFIED = "ChildModified"
SPEC_CHANGE_IGNORED = "SpecChangeIgnored"
NAME_CONFLICT = "NameConflict"
CHILD_DELETED = "ChildDeleted"

_PHASE_ORDER = (  # the first condition that is True names the phase
    ("Failed", "Failed"),
    ("Succeeded", "Succeeded"),
    ("Suspended", "Suspended"),
    ("Restarting", "Restarting"),
    ("Running", "Running"),
    ("Created", "Created"),
)


def _by_type(conditions: Optional[Iterable[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (conditions or []) if isinstance(c, dict) and c.get("type")}


def condition(type_: str, status: str, reason: str, message: str = "", *, previous: Optional[dict[str, Any]],
              now: str, generation: Optional[int], transition_hint: Optional[str] = None) -> dict[str, Any]:
    """A condition whose lastTransitionTime is kept from `previous` unless the status flipped."""
    if previous is not None and previous.get("status") == status and previous.get("lastTransitionTime"):
        when = previous["lastTransitionTime"]
    else:
        when = transition_hint or now
    out: dict[str, Any] = {
        "type": type_,
        "status": status,
        "reason": reason or type_,
        "message": (message or "")[:32768],
        "lastTransitionTime": when,
    }
    if generation is not None:
        out["observedGeneration"] = generation
    return out


def phase_of(conditions: dict[str, dict[str, Any]]) -> str:
    for type_, phase in _PHASE_ORDER:
        if conditions.get(type_, {}).get("status") == "True":
            return phase
    return "Pending"


def is_terminal(status: Optional[dict[str, Any]]) -> bool:
    return bool(status) and status.get("phase") in TERMINAL_PHASES


def _ordered(conds: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    known = [conds[t] for t in ORDER if t in conds]
    others = [c for t, c in conds.items() if t not in ORDER]
    return known + others


def _summary(conds: dict[str, dict[str, Any]], child: dict[str, dict[str, Any]], phase: str,
             prev: dict[str, dict[str, Any]], now: str, generation: Optional[int]) -> dict[str, Any]:
    succeeded = child.get("Succeeded")
    if succeeded is not None and succeeded.get("status") == "True":
        return condition(SUMMARY, "True", succeeded.get("reason", "Succeeded"), succeeded.get("message", ""),
                         previous=prev.get(SUMMARY), now=now, generation=generation,
                         transition_hint=succeeded.get("lastTransitionTime"))
    failed = conds.get("Failed")
    if failed is not None and failed.get("status") == "True":
        return condition(SUMMARY, "False", failed["reason"], failed.get("message", ""),
                         previous=prev.get(SUMMARY), now=now, generation=generation)
    driver = conds.get(phase, {})
    return condition(SUMMARY, "Unknown", phase, driver.get("message", ""),
                     previous=prev.get(SUMMARY), now=now, generation=generation)


def _replicas(child_status: dict[str, Any]) -> dict[str, dict[str, int]]:
    out = {}
    for rtype, counts in (child_status.get("replicaStatuses") or {}).items():
        counts = counts or {}
        out[rtype] = {k: int(counts.get(k) or 0) for k in ("active", "succeeded", "failed")}
    return out


def from_child(child_status: Optional[dict[str, Any]], previous: Optional[dict[str, Any]],
               generation: Optional[int], now: str) -> dict[str, Any]:
    """The resource's status after observing the PyTorchJob's `status` (None or {} before the training-operator
    has written any)."""
    status = _carried_over(previous, generation)
    child_status = child_status or {}
    replicas = _replicas(child_status)
    if replicas:
        status["replicas"] = replicas
    if child_status.get("startTime"):
        status["startTime"] = child_status["startTime"]
    if child_status.get("completionTime"):
        status["completionTime"] = child_status["completionTime"]
    if is_terminal(previous):
        return status  # conditions and phase are frozen

    prev = _by_type(status.get("conditions"))
    child = _by_type(child_status.get("conditions"))
    conds: dict[str, dict[str, Any]] = dict(prev)
    for type_ in MIRRORED:
        c = child.get(type_)
        if c is not None and c.get("status") in ("True", "False", "Unknown"):
            conds[type_] = condition(type_, c["status"], c.get("reason") or type_, c.get("message", ""),
                                     previous=prev.get(type_), now=now, generation=generation,
                                     transition_hint=c.get("lastTransitionTime"))
        else:
            conds[type_] = condition(type_, "False", f"Not{type_}", "", previous=prev.get(type_), now=now,
                                     generation=generation)
    if child.get("Succeeded", {}).get("status") == "True":
        conds["Succeeded"] = child["Succeeded"]  # placeholder so phase_of sees it; replaced by _summary below
    phase = phase_of(conds)
    conds[SUMMARY] = _summary(conds, child, phase, prev, now, generation)
    status["conditions"] = _ordered(conds)
    status["phase"] = phase
    return status


def reconciled(previous: Optional[dict[str, Any]], generation: Optional[int], now: str, *,
               pytorch_job: Optional[str] = None, config_map: Optional[str] = None,
               derived: Optional[dict[str, Any]] = None, synced: tuple[str, str, str] = ("True", IN_SYNC, ""),
               ) -> dict[str, Any]:
    """The status written by the create/resume handler: names of the children, derived values and the Synced
    condition. Conditions mirrored from the child are left as they are (the child's watch owns them); types not
    yet present are initialised, so that every condition exists from the first reconcile."""
    status = _carried_over(previous, generation)
    if pytorch_job is not None:
        status["pytorchJob"] = pytorch_job
    if config_map is not None:
        status["configMap"] = config_map
    if derived is not None:
        status["derived"] = derived
    prev = _by_type(status.get("conditions"))
    conds = dict(prev)
    terminal = is_terminal(previous)
    if not terminal:
        for type_ in MIRRORED:
            if type_ not in conds:
                conds[type_] = condition(type_, "False", f"Not{type_}", "", previous=None, now=now,
                                         generation=generation)
    s, reason, message = synced
    conds[SYNCED] = condition(SYNCED, s, reason, message, previous=prev.get(SYNCED), now=now, generation=generation)
    if not terminal:
        phase = phase_of(conds)
        if SUMMARY not in conds or conds[SUMMARY].get("status") == "Unknown":
            conds[SUMMARY] = _summary(conds, {}, phase, prev, now, generation)
        status["phase"] = phase
    status["conditions"] = _ordered(conds)
    return status


def _carried_over(previous: Optional[dict[str, Any]], generation: Optional[int]) -> dict[str, Any]:
    """A copy of the previous status to build the next one on, stamped with the generation it observes."""
    status = copy.deepcopy(previous) if previous else {}
    if generation is not None:
        status["observedGeneration"] = generation
    return status


def invalid(previous: Optional[dict[str, Any]], problems: Iterable[str], generation: Optional[int],
            now: str) -> dict[str, Any]:
    """An invalid spec: nothing is created. The spec is immutable, so this is terminal."""
    message = "; ".join(problems) or "the spec is invalid"
    status = _carried_over(previous, generation)
    prev = _by_type(status.get("conditions"))
    conds = dict(prev)
    kw = dict(now=now, generation=generation)
    for type_ in ("Running", "Restarting", "Suspended"):
        conds[type_] = condition(type_, "False", f"Not{type_}", "", previous=prev.get(type_), **kw)
    conds["Created"] = condition("Created", "False", INVALID_SPEC, "nothing was created", previous=prev.get("Created"), **kw)
    conds["Failed"] = condition("Failed", "True", INVALID_SPEC, message, previous=prev.get("Failed"), **kw)
    conds[SUMMARY] = condition(SUMMARY, "False", INVALID_SPEC, message, previous=prev.get(SUMMARY), **kw)
    conds[SYNCED] = condition(SYNCED, "False", INVALID_SPEC, message, previous=prev.get(SYNCED), **kw)
    status["conditions"] = _ordered(conds)
    status["phase"] = "Invalid"
    return status


def child_deleted(previous: Optional[dict[str, Any]], generation: Optional[int], now: str,
                  name: str) -> dict[str, Any]:
    """The PyTorchJob disappeared. After the job finished that is expected (ttlSecondsAfterFinished) and changes
    nothing; before, the job cannot finish any more and is marked Failed (it is not recreated)."""
    if is_terminal(previous):
        return copy.deepcopy(previous)
    message = f"PyTorchJob {name} was deleted before it finished; it is not recreated"
    status = _carried_over(previous, generation)
    prev = _by_type(status.get("conditions"))
    conds = dict(prev)
    kw = dict(now=now, generation=generation)
    conds["Running"] = condition("Running", "False", CHILD_DELETED, message, previous=prev.get("Running"), **kw)
    conds["Failed"] = condition("Failed", "True", CHILD_DELETED, message, previous=prev.get("Failed"), **kw)
    conds[SUMMARY] = condition(SUMMARY, "False", CHILD_DELETED, message, previous=prev.get(SUMMARY), **kw)
    conds[SYNCED] = condition(SYNCED, "False", CHILD_DELETED, message, previous=prev.get(SYNCED), **kw)
    status["conditions"] = _ordered(conds)
    status["phase"] = "Failed"
    return status


def get_condition(status: Optional[dict[str, Any]], type_: str) -> Optional[dict[str, Any]]:
    return _by_type((status or {}).get("conditions")).get(type_)
