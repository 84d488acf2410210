"""What a child's Kueue Workload says, as the `Queued` condition's status, reason and message (pure functions of
the Workload as a plain dict; conditions.py sets the condition).

A child with a Kueue queue is created suspended; Kueue makes a Workload for it (owner: the child), reserves
quota in the ClusterQueue behind the LocalQueue, and unsuspends the child when it admits the Workload. The
Workload's conditions (Kueue v0.17, kueue.x-k8s.io/v1beta2) say why it waits: `QuotaReserved` False with
reason `Pending` and a message such as "couldn't assign flavors to pod set master: insufficient unused quota
for nvidia.com/gpu in flavor default, 8 more needed", or `Inadmissible` ("LocalQueue lq doesn't exist");
`Admitted` True once it may run; `Evicted` True (reasons Preempted, PodsReadyTimeout, ...) when Kueue took
the quota back and suspended the child again; `Finished` True at the end. A preempted Workload carries
`Evicted` (reason Preempted) and `Preempted` (reason InClusterQueue, InCohortReclamation, ...) True, both with
"Preempted to accommodate a workload (UID: <its Workload>, JobUID: <its job>) due to prioritization in the
ClusterQueue; ..."; both go False when quota is reserved again.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from .object_conditions import by_type as _by_type, is_true as _true

WORKLOAD_GROUP = "kueue.x-k8s.io"
WORKLOAD_VERSION = "v1beta2"
WORKLOAD_PLURAL = "workloads"

QUEUE_PENDING = "WaitingForWorkload"  # the child exists, Kueue has not reported on its Workload yet
WAITING_FOR_QUOTA = "WaitingForQuota"
INADMISSIBLE = "Inadmissible"
WAITING_FOR_CHECKS = "WaitingForAdmissionChecks"
EVICTED = "Evicted"
PREEMPTED = "Preempted"
ADMITTED = "Admitted"
KUEUE_NOT_INSTALLED = "KueueNotInstalled"


def workload_owner(workload: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The child job (PyTorchJob or TrainJob) a Kueue Workload was made for: its controller owner reference."""
    for ref in (workload.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") in ("PyTorchJob", "TrainJob"):
            return ref
    return None


_JOB_UID = re.compile(r"JobUID: ([0-9a-fA-F-]{8,})")


def preemptor_job_uid(workload: dict[str, Any]) -> Optional[str]:
    """The UID of the job whose Workload preempted this one (from Kueue's eviction message), or None."""
    conds = _by_type((workload.get("status") or {}).get("conditions"))
    for type_ in ("Preempted", "Evicted"):
        c = conds.get(type_)
        if _true(c) and (found := _JOB_UID.search(c.get("message") or "")):
            return found.group(1)
    return None


def workload_queued(workload: dict[str, Any], queue: str = "", preemptor: Optional[str] = None) -> tuple[str, str, str]:
    """(status, reason, message) of the `Queued` condition for a child's Workload. `preemptor`: the name of the
    QwenTrainingJob whose child preempted it, where known."""
    meta = workload.get("metadata") or {}
    status = workload.get("status") or {}
    conds = _by_type(status.get("conditions"))
    queue = queue or str((workload.get("spec") or {}).get("queueName") or "")
    where = f"LocalQueue {queue}" if queue else "its LocalQueue"
    name = meta.get("name", "")
    cq = ((status.get("admission") or {}).get("clusterQueue")) or ""
    reserved, admitted = conds.get("QuotaReserved"), conds.get("Admitted")
    evicted, finished = conds.get("Evicted"), conds.get("Finished")
    if _true(finished):
        return "False", ADMITTED, f"admitted by ClusterQueue {cq} (Kueue workload {name})" if cq else \
            f"admitted by Kueue (workload {name})"
    preempted = conds.get("Preempted")
    if _true(evicted) and (evicted.get("reason") == "Preempted" or _true(preempted)):
        # Evicted stays True until quota is reserved again: the reason holds while the job waits.
        why = (evicted.get("message") or (preempted or {}).get("message") or "").strip()
        by = f" to admit QwenTrainingJob {preemptor}" if preemptor else ""
        return "True", PREEMPTED, f"Kueue preempted workload {name}{by}: {why or 'preempted'}; the job is " \
                                  f"suspended and waits in {where} to be admitted again"
    if _true(admitted):
        return "False", ADMITTED, f"admitted by ClusterQueue {cq} (Kueue workload {name})" if cq else \
            f"admitted by Kueue (workload {name})"
    if _true(evicted) and not _true(reserved):
        why = evicted.get("message") or evicted.get("reason") or "evicted"
        return "True", EVICTED, f"Kueue evicted workload {name} ({evicted.get('reason', '')}): {why}; " \
                                f"it waits in {where} to be admitted again"
    if _true(reserved):
        detail = (admitted or {}).get("message") or "waiting for admission checks"
        return "True", WAITING_FOR_CHECKS, f"quota reserved in ClusterQueue {cq}; {detail} (Kueue workload {name})"
    if reserved is not None:
        reason = WAITING_FOR_QUOTA if reserved.get("reason") in ("Pending", "", None) else INADMISSIBLE
        text = reserved.get("message") or "waiting for quota"
        if reason == WAITING_FOR_QUOTA:
            return "True", reason, f"waiting for quota in {where}: {text} (Kueue workload {name})"
        return "True", reason, f"not admissible in {where}: {text} (Kueue workload {name})"
    return "True", QUEUE_PENDING, f"waiting in {where} for Kueue to admit it (Kueue workload {name})"


def queue_pending(kind: str, child: str, queue: str, field: str) -> tuple[str, str, str]:
    """The `Queued` condition of a child just created for a queue, before Kueue reported on it."""
    return ("True", QUEUE_PENDING, f"{kind} {child} waits in LocalQueue {queue} ({field}) for Kueue to admit "
            f"it; if no Kueue Workload appears, Kueue's integration for {kind} may be off")


def kueue_not_installed(kind: str, child: str, queue: str, field: str) -> tuple[str, str, str]:
    return ("True", KUEUE_NOT_INSTALLED, f"{field} names the Kueue queue {queue!r} but Kueue is not installed "
            f"(the cluster does not serve {WORKLOAD_GROUP}/{WORKLOAD_VERSION}): {kind} {child} stays suspended "
            f"until Kueue admits it; install Kueue, or remove the queue name")
