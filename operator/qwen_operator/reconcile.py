"""What a reconcile of a QwenTrainingJob decides (the create, resume and update handlers), given the resource, the
children rendered for its current step and what the cluster holds: whether a live child is ours and still matches
the rendering, the status to write, the Events to post and how long to wait before trying again.

Pure functions over the wire form (plain dicts) and the time; `handlers` reads the cluster, calls these and applies
the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

from . import conditions as cnd
from . import kueue_status
from . import step_records as sr
from .api import API_VERSION, GROUP, KIND
from .api.pipeline import is_pipeline
from .drift import child_drift
from .render import CHILD_KINDS, HASH_ANNOTATION, queue_of, steps

Event = tuple[str, str, str]  # (type, reason, message) of a Kubernetes Event: type "Normal" or "Warning"
Problem = tuple[str, str]  # (reason, message) of a Warning
IN_SYNC: tuple[str, str, str] = ("True", cnd.IN_SYNC, "")


def controller(obj: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The owner reference that says who controls `obj`, if any."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return ref
    return None


def owner_of(child: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The controller reference of a child when a QwenTrainingJob controls it."""
    ref = controller(child)
    if ref and ref.get("kind") == KIND and str(ref.get("apiVersion", "")).startswith(GROUP + "/"):
        return ref
    return None


def resource_ref(namespace: str, name: str, uid: str) -> dict[str, Any]:
    """The object an Event about a QwenTrainingJob is posted for."""
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name, "namespace": namespace, "uid": uid}}


def ref_of(resource: dict[str, Any]) -> dict[str, Any]:
    meta = resource["metadata"]
    return resource_ref(meta["namespace"], meta["name"], meta["uid"])


def step_records(resource: dict[str, Any]) -> list[dict[str, Any]]:
    """status.stages for the resource's steps (raises SpecError for an invalid spec)."""
    return sr.init_stages((resource.get("status") or {}).get("stages"),
                          [(step or stage, stage) for step, stage, _ in steps(resource)])


def refusal_delay(retry: int) -> float:
    """Seconds until a refused child is tried again: 10 s, doubling up to 5 minutes (the missing API or runtime
    may be installed meanwhile)."""
    return float(min(10 * 2 ** max(retry, 0), 300))


def refusal_is_new(previous: dict[str, Any], reason: str) -> bool:
    """One Warning Event per cause of a refused child, not one per retry."""
    return (cnd.get_condition(previous, "Created") or {}).get("reason") != reason


def drift_state(desired: dict[str, Any], live: dict[str, Any]) -> Optional[Problem]:
    """(reason, message) when a live child no longer matches what we render, else None."""
    kind, name = desired["kind"], desired["metadata"]["name"]
    live_hash = ((live.get("metadata") or {}).get("annotations") or {}).get(HASH_ANNOTATION)
    if live_hash != desired["metadata"]["annotations"][HASH_ANNOTATION]:
        return (cnd.SPEC_CHANGE_IGNORED,
                f"{kind} {name} was rendered from a different spec (or operator version); only spec.suspend is "
                f"applied to an existing job: delete and recreate the QwenTrainingJob to change anything else")
    paths = child_drift(desired, live)
    if paths:
        shown = ", ".join(paths[:10]) + (f" (+{len(paths) - 10} more)" if len(paths) > 10 else "")
        return cnd.CHILD_MODIFIED, f"{kind} {name} was changed by hand and no longer matches the spec: {shown}"
    return None


@dataclass(frozen=True)
class ChildSeen:
    """What create-or-get of one rendered child found.

    created: we created it just now. leftover: an earlier resource of the same name still controls it (the
    garbage collector removes it soon: try again shortly). conflict: something else owns it, it is left alone
    and nothing after it is created. Otherwise it is ours, `drift` says whether it still matches."""

    label: str  # "Kind name"
    created: bool = False
    leftover: Optional[str] = None
    conflict: Optional[str] = None
    drift: Optional[Problem] = None


def judge_child(desired: dict[str, Any], live: dict[str, Any], was_created: bool, uid: str) -> ChildSeen:
    kind, name = desired["kind"], desired["metadata"]["name"]
    label = f"{kind} {name}"
    if was_created:
        return ChildSeen(label, created=True)
    owner = controller(live)
    if owner is None or owner.get("uid") != uid:
        if owner is not None and owner.get("kind") == KIND:
            return ChildSeen(label, leftover=f"{label} still belongs to an earlier {KIND} {owner.get('uid')}")
        return ChildSeen(label, conflict=f"{label} exists and is not owned by this {KIND}; it is left alone")
    return ChildSeen(label, drift=drift_state(desired, live))


def children_synced(seen: Iterable[ChildSeen]) -> tuple[tuple[str, str, str], list[Problem]]:
    """The `Synced` condition (status, reason, message) the children give, and the Warnings they are worth: the
    first problem names the condition; every drift found is a Warning."""
    synced, problems = IN_SYNC, []
    for child in seen:
        if child.conflict:
            problems.append((cnd.NAME_CONFLICT, child.conflict))
            return ("False", cnd.NAME_CONFLICT, child.conflict), problems
        if child.drift is not None and synced[0] == "True":
            synced = ("False", child.drift[0], child.drift[1])
            problems.append(child.drift)
    return synced, problems


def memory_problem(previous: dict[str, Any], memory: tuple[str, str, str]) -> Optional[Problem]:
    """A Warning when the stage's memory estimate misses the card, once (when the condition first turns False)."""
    if memory[0] == "False" and (cnd.get_condition(previous, cnd.MEMORY_FITS) or {}).get("status") != "False":
        return memory[1], memory[2]
    return None


def queue_source(resource: dict[str, Any], spec: Any, index: int) -> Optional[tuple[str, str]]:
    """(queue, field naming it) when the step's child goes through a Kueue queue."""
    return queue_of(resource, spec, f"spec.pipeline[{index}]" if is_pipeline(resource.get("spec")) else "spec")


def queue_condition(child: dict[str, Any], source: tuple[str, str], kueue_served: bool) -> tuple[str, str, str]:
    """The first `Queued` condition of a child with a Kueue queue."""
    queue, field = source
    kind, name = child["kind"], child["metadata"]["name"]
    if not kueue_served:
        return kueue_status.kueue_not_installed(kind, name, queue, field)
    return kueue_status.queue_pending(kind, name, queue, field)


def queue_problem(previous: dict[str, Any], queue: Optional[tuple[str, str, str]]) -> Optional[Problem]:
    """A Warning when a queue is named and Kueue is not installed, once."""
    if queue is not None and queue[1] == kueue_status.KUEUE_NOT_INSTALLED and \
            (cnd.get_condition(previous, cnd.QUEUED) or {}).get("reason") != kueue_status.KUEUE_NOT_INSTALLED:
        return kueue_status.KUEUE_NOT_INSTALLED, queue[2]
    return None


def reconciled_status(resource: dict[str, Any], now: str, *, records: list[dict[str, Any]], index: int,
                      child: Optional[str], config_map: str, derived: dict[str, Any],
                      synced: tuple[str, str, str], memory: tuple[str, str, str],
                      queue: Optional[tuple[str, str, str]]) -> dict[str, Any]:
    """The resource's status once its current step's children exist (`child`: the child job's name, None when a
    name conflict kept it from being ours)."""
    generation = resource["metadata"].get("generation")
    status = cnd.reconciled(resource.get("status"), generation, now, pytorch_job=child,
                            config_map=config_map, derived=derived, synced=synced, memory=memory)
    if queue is not None:
        status = cnd.queued(status, queue, generation, now, initial=True) or status
    return sr.started(status, sr.init_stages(status.get("stages"), [(r["name"], r["stage"]) for r in records]),
                      index, child, now)


def created_event(created: list[str]) -> Optional[Event]:
    """One Normal Event naming what was created, when a child job is among it."""
    if any(c.startswith(kind) for c in created for kind in CHILD_KINDS):
        return "Normal", "Created", ", ".join(created)
    return None


def changed_spec_fields(diff: Iterable[Any]) -> list[str]:
    """The spec fields a kopf diff changes, spec.suspend (which may change) left out."""
    return sorted({".".join(str(p) for p in d[1]) for d in diff
                   if len(d[1]) >= 1 and d[1][0] == "spec" and tuple(d[1][:2]) != ("spec", "suspend")})


def spec_change_ignored(fields: list[str]) -> str:
    return "only spec.suspend may change after creation; ignored changes to " + ", ".join(fields)
