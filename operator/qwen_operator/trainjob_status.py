"""A TrainJob's status (and its JobSet's) read as a PyTorchJob's, so that conditions.from_child serves both job
APIs. Pure functions of plain dicts.

A Kubeflow Trainer v2 TrainJob (v2.3.0) reports fewer conditions than a PyTorchJob: `Suspended` (reasons
Suspended/Resumed), `Complete` and `Failed` (copied from its JobSet's Completed/Failed, or reason
DeadlineExceeded / TrainingRuntimeNotSupported from the Trainer itself), plus `jobsStatus`, the JobSet's
per-replicated-job counts of Jobs. The rest is inferred: Created once the TrainJob exists, Running while a
node Job is ready, Restarting while the JobSet has restarted (its `status.restarts`) and no node Job is ready
yet. The result has the shape of a PyTorchJob's status, so `conditions.from_child` applies the same rules to both.
"""

from __future__ import annotations

from typing import Any, Optional

from .object_conditions import by_type as _by_type, is_true as _true

TRAINJOB_CREATED = "TrainJobCreated"
TRAINJOB_RUNNING = "TrainJobRunning"
JOBS_NOT_READY = "JobsNotReady"
JOBSET_RESTARTING = "JobSetRestarting"


def _cond(type_: str, status: str, reason: str, message: str, when: Optional[str]) -> dict[str, Any]:
    out = {"type": type_, "status": status, "reason": reason, "message": message}
    if when:
        out["lastTransitionTime"] = when
    return out


def trainjob_child_status(trainjob: dict[str, Any], jobset: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The TrainJob's status (and its JobSet's, when given) in the form of a PyTorchJob's status: conditions
    Created, Running, Restarting, Suspended, Succeeded and Failed, `replicaStatuses` (Jobs of each replicated job,
    e.g. `Node`), `startTime` and `completionTime`."""
    meta = trainjob.get("metadata") or {}
    name = meta.get("name", "")
    tj = trainjob.get("status") or {}
    js = (jobset or {}).get("status") or {}
    conds = _by_type(tj.get("conditions"))
    complete, failed, suspended = conds.get("Complete"), conds.get("Failed"), conds.get("Suspended")
    jobs = tj.get("jobsStatus") or js.get("replicatedJobsStatus") or []
    ready = sum(int(j.get("ready") or 0) for j in jobs)
    total = len(jobs)
    restarts = int(js.get("restarts") or 0)
    is_suspended = _true(suspended) if suspended is not None else bool((trainjob.get("spec") or {}).get("suspend"))
    done = _true(complete) or _true(failed)

    out: list[dict[str, Any]] = [_cond("Created", "True", TRAINJOB_CREATED, f"TrainJob {name} is created",
                                       meta.get("creationTimestamp"))]
    if suspended is not None:
        out.append(_cond("Suspended", suspended.get("status", "Unknown"), suspended.get("reason") or "Suspended",
                         suspended.get("message", ""), suspended.get("lastTransitionTime")))
    elif is_suspended:
        out.append(_cond("Suspended", "True", "Suspended", f"TrainJob {name} is suspended", None))
    if done:
        end = complete if _true(complete) else failed
        out.append(_cond("Running", "False", end.get("reason") or "Finished", "", end.get("lastTransitionTime")))
    elif is_suspended:
        out.append(_cond("Running", "False", "Suspended", "", None))
    elif ready > 0:
        out.append(_cond("Running", "True", TRAINJOB_RUNNING, f"TrainJob {name} is running: {ready} of {total} "
                         f"replicated Job(s) ready", None))
    else:
        out.append(_cond("Running", "False", JOBS_NOT_READY, "", None))
    if restarts > 0 and not done and not is_suspended and ready == 0:
        out.append(_cond("Restarting", "True", JOBSET_RESTARTING,
                         f"JobSet {name} is restarting all nodes (restart {restarts})", None))
    if _true(complete):
        out.append(_cond("Succeeded", "True", complete.get("reason") or "Complete", complete.get("message", ""),
                         complete.get("lastTransitionTime")))
    if _true(failed):
        out.append(_cond("Failed", "True", failed.get("reason") or "Failed", failed.get("message", ""),
                         failed.get("lastTransitionTime")))
    status: dict[str, Any] = {"conditions": out}
    replicas = {}
    for j in jobs:
        key = str(j.get("name") or "node")
        replicas[key[:1].upper() + key[1:]] = {k: int(j.get(k) or 0) for k in ("active", "succeeded", "failed")}
    if replicas:
        status["replicaStatuses"] = replicas
    if meta.get("creationTimestamp"):
        status["startTime"] = meta["creationTimestamp"]
    if done:
        end = complete if _true(complete) else failed
        if end.get("lastTransitionTime"):
            status["completionTime"] = end["lastTransitionTime"]
    return status
