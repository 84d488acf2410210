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
* `Queued` (only for a child with a Kueue queue): True while Kueue holds the child back, with the reason and message
  of its Workload (`WaitingForQuota`: "insufficient unused quota for nvidia.com/gpu ..."), False once admitted; also
  True with `KueueNotInstalled` when a queue is named and the cluster does not serve Kueue's API, and True with
  `Preempted` while Kueue has evicted it for a higher-priority workload (until it is admitted again).

Terminal states stay terminal: once `phase` is Succeeded, Failed or Invalid, child updates no longer change
the conditions or the phase (the training-operator behaves the same way for Failed).
"""

from __future__ import annotations

import copy
from typing import Any, Iterable, Optional

from . import kueue_status, trainjob_status
from . import pod_failures as pods
from .object_conditions import by_type as _by_type

MIRRORED = ("Created", "Running", "Restarting", "Suspended", "Failed")
SUMMARY = "Succeeded"
SYNCED = "Synced"
MEMORY_FITS = "MemoryFits"  # the stage's memory estimate against the card (api.devices): a warning, never a stop
QUEUED = "Queued"  # Kueue's verdict on the child's Workload (see `kueue_status.workload_queued`)
ORDER = ("Created", "Queued", "Running", "Restarting", "Suspended", "Succeeded", "Failed", "Synced", "MemoryFits")
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
    ("Queued", "Queued"),  # the child is suspended because Kueue has not admitted it: say why, not just Suspended
    ("Suspended", "Suspended"),
    ("Restarting", "Restarting"),
    ("Running", "Running"),
    ("Created", "Created"),
)


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


def _replicas(child_status: dict[str, Any], previous: Optional[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Pod counts by replica type: the child's, with the failed runs and restarts the pods' watch counted (the
    training-operator deletes a pod it replaces, so its own `failed` stays 0), and nothing active once it is over."""
    ours = (previous or {}).get("replicas") or {}
    over = any(c.get("type") in ("Succeeded", "Failed") and c.get("status") == "True"
               for c in child_status.get("conditions") or [])
    out = {}
    for rtype, counts in (child_status.get("replicaStatuses") or {}).items():
        counts = counts or {}
        mine = ours.get(rtype) or {}
        row = {k: int(counts.get(k) or 0) for k in ("active", "succeeded", "failed")}
        row["failed"] = max(row["failed"], int(mine.get("failed") or 0))
        row["restarts"] = int(mine.get("restarts") or 0)
        if over:
            row["active"] = 0
        out[rtype] = row
    return out


def duration(start: Optional[str], end: Optional[str]) -> Optional[str]:
    """'1h2m3s' between two RFC 3339 times (None when either is missing)."""
    import datetime

    try:
        a = datetime.datetime.fromisoformat(str(start).replace("Z", "+00:00"))
        b = datetime.datetime.fromisoformat(str(end).replace("Z", "+00:00"))
    except ValueError:
        return None
    seconds = max(int((b - a).total_seconds()), 0)
    h, rest = divmod(seconds, 3600)
    m, sec = divmod(rest, 60)
    return (f"{h}h" if h else "") + (f"{m}m" if h or m else "") + f"{sec}s"


def from_child(child_status: Optional[dict[str, Any]], previous: Optional[dict[str, Any]],
               generation: Optional[int], now: str, *, run_policy: Optional[dict[str, Any]] = None,
               namespace: str = "") -> dict[str, Any]:
    """The resource's status after observing the PyTorchJob's `status` (None or {} before the training-operator
    has written any). `run_policy` (the resource's spec.runPolicy) and `namespace` word the Failed message."""
    status = _carried_over(previous, generation)
    child_status = child_status or {}
    replicas = _replicas(child_status, previous)
    if replicas:
        status["replicas"] = replicas
    if child_status.get("startTime"):
        status["startTime"] = child_status["startTime"]
    if child_status.get("completionTime"):
        status["completionTime"] = child_status["completionTime"]
        took = duration(status.get("startTime"), child_status["completionTime"])
        if took:
            status["duration"] = took
    if is_terminal(previous):
        return status  # conditions and phase are frozen

    prev = _by_type(status.get("conditions"))
    child = _by_type(child_status.get("conditions"))
    conds: dict[str, dict[str, Any]] = dict(prev)
    for type_ in MIRRORED:
        c = child.get(type_)
        if c is not None and c.get("status") in ("True", "False", "Unknown"):
            if type_ == "Restarting" and c["status"] != "True" and \
                    prev.get(type_, {}).get("reason") == POD_FAILED and prev[type_].get("status") == "True" and \
                    child.get("Failed", {}).get("status") != "True":
                continue  # the pods' watch turned it on; a running replacement turns it off
            message = c.get("message", "")
            if type_ == "Failed" and c["status"] == "True":
                message = pods.failed_message(message, pods.failure_detail(status), run_policy or {}, namespace,
                                          len(status.get("failures") or []))
            conds[type_] = condition(type_, c["status"], c.get("reason") or type_, message,
                                     previous=prev.get(type_), now=now, generation=generation,
                                     transition_hint=c.get("lastTransitionTime"))
        elif type_ == "Restarting" and prev.get(type_, {}).get("reason") == POD_FAILED and \
                prev[type_].get("status") == "True" and child.get("Failed", {}).get("status") != "True":
            continue
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
               memory: Optional[tuple[str, str, str]] = None) -> dict[str, Any]:
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
    if not terminal and pytorch_job is not None and \
            conds.get("Created", {}).get("reason") in (JOB_API_NOT_INSTALLED, RUNTIME_NOT_FOUND, CHILD_REJECTED):
        del conds["Created"]  # the child exists now: the refusal is over; its watch reports from here on
    if not terminal:
        for type_ in MIRRORED:
            if type_ not in conds:
                conds[type_] = condition(type_, "False", f"Not{type_}", "", previous=None, now=now,
                                         generation=generation)
    s, reason, message = synced
    conds[SYNCED] = condition(SYNCED, s, reason, message, previous=prev.get(SYNCED), now=now, generation=generation)
    if memory is not None:
        conds[MEMORY_FITS] = condition(MEMORY_FITS, *memory, previous=prev.get(MEMORY_FITS), now=now,
                                       generation=generation)
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


def _failed_for_good(previous: Optional[dict[str, Any]], generation: Optional[int], now: str, reason: str,
                     message: str, phase: str, others: dict[str, tuple[str, str, str]]) -> dict[str, Any]:
    """A terminal status: Failed True and Succeeded/Synced False, all with `reason` and `message`, plus the
    `others` conditions (type -> status, reason, message)."""
    status = _carried_over(previous, generation)
    prev = _by_type(status.get("conditions"))
    conds = dict(prev)
    kw = dict(now=now, generation=generation)
    for type_, (s, r, m) in others.items():
        conds[type_] = condition(type_, s, r, m, previous=prev.get(type_), **kw)
    conds["Failed"] = condition("Failed", "True", reason, message, previous=prev.get("Failed"), **kw)
    for type_ in (SUMMARY, SYNCED):
        conds[type_] = condition(type_, "False", reason, message, previous=prev.get(type_), **kw)
    status["conditions"] = _ordered(conds)
    status["phase"] = phase
    return status


def invalid(previous: Optional[dict[str, Any]], problems: Iterable[str], generation: Optional[int],
            now: str) -> dict[str, Any]:
    """An invalid spec: nothing is created. The spec is immutable, so this is terminal."""
    message = "; ".join(problems) or "the spec is invalid"
    others = {type_: ("False", f"Not{type_}", "") for type_ in ("Running", "Restarting", "Suspended")}
    others["Created"] = ("False", INVALID_SPEC, "nothing was created")
    return _failed_for_good(previous, generation, now, INVALID_SPEC, message, "Invalid", others)


def child_deleted(previous: Optional[dict[str, Any]], generation: Optional[int], now: str,
                  name: str, kind: str = "PyTorchJob") -> dict[str, Any]:
    """The child job (PyTorchJob or TrainJob) disappeared. After the job finished that is expected
    (ttlSecondsAfterFinished) and changes nothing; before, the job cannot finish any more and is marked Failed
    (it is not recreated)."""
    if is_terminal(previous):
        return copy.deepcopy(previous)
    message = f"{kind} {name} was deleted before it finished; it is not recreated"
    return _failed_for_good(previous, generation, now, CHILD_DELETED, message, "Failed",
                            {"Running": ("False", CHILD_DELETED, message)})


def get_condition(status: Optional[dict[str, Any]], type_: str) -> Optional[dict[str, Any]]:
    return _by_type((status or {}).get("conditions")).get(type_)


# ---------------------------------------------------------------------------------------- pod failures
# The training-operator's own messages say only that a replica failed; the pod says which, with what exit code and
# termination reason, and the trainer's last `error:` lines (its termination message). The pods' watch records
# each failed run once (pod uid + container restart count) in `status.failures`, counts it in `status.replicas`,
# and turns `Restarting` True until a replacement runs; the Failed condition names the failed pod.

POD_FAILED = "PodFailed"
MAX_FAILURES = 8


def pending_restart(status: Optional[dict[str, Any]]) -> bool:
    """Whether a recorded failure still waits for its replacement (the pods' watch only looks at running pods
    then)."""
    return not is_terminal(status) and any(not f.get("replaced") for f in (status or {}).get("failures") or [])


def _counts(status: dict[str, Any], replica: str) -> dict[str, int]:
    replicas = status.setdefault("replicas", {})
    return replicas.setdefault(replica, {"active": 0, "succeeded": 0, "failed": 0, "restarts": 0})


def observe_pod_failure(previous: Optional[dict[str, Any]], failure: dict[str, Any], run_policy: dict[str, Any],
                        namespace: str, generation: Optional[int], now: str) -> Optional[dict[str, Any]]:
    """The status after a pod's failed run, or None when that run is already recorded."""
    known = (previous or {}).get("failures") or []
    if any(f.get("uid") == failure["uid"] and f.get("run") == failure["run"] for f in known):
        return None
    status = _carried_over(previous, generation)
    failure = {**failure, "replaced": not pods.will_restart(failure, run_policy) or is_terminal(previous)}
    status["failures"] = (known + [failure])[-MAX_FAILURES:]
    counts = _counts(status, failure["replica"])
    counts["failed"] = int(counts.get("failed") or 0) + 1
    counts["active"] = max(int(counts.get("active") or 0) - 1, 0)
    prev = _by_type(status.get("conditions"))
    conds = dict(prev)
    kw = dict(now=now, generation=generation)
    if is_terminal(previous):
        if status.get("phase") == "Failed" and prev.get("Failed", {}).get("reason") not in (INVALID_SPEC, CHILD_DELETED):
            # The child's Failed came first: name the pod now.
            base = prev["Failed"].get("message", "")
            message = pods.failed_message(base, failure, run_policy, namespace, len(status["failures"]))
            for type_ in ("Failed", SUMMARY):
                if type_ in conds:
                    conds[type_] = {**conds[type_], "message": message[:32768]}
            status["conditions"] = _ordered(conds)
        return status
    if pods.will_restart(failure, run_policy):
        conds["Restarting"] = condition("Restarting", "True", POD_FAILED,
                                        pods.describe_failure(failure, run_policy, namespace,
                                                         len(status["failures"])) + " Restarting it.",
                                        previous=prev.get("Restarting"), **kw)
        phase = phase_of(conds)
        conds[SUMMARY] = _summary(conds, {}, phase, prev, now, generation)
        status["phase"] = phase
    status["conditions"] = _ordered(conds)
    return status


def observe_pod_running(previous: Optional[dict[str, Any]], replica: str, generation: Optional[int],
                        now: str) -> Optional[dict[str, Any]]:
    """A replacement pod runs: count the restart and turn Restarting off (None when nothing changes)."""
    if is_terminal(previous):
        return None
    status = _carried_over(previous, generation)
    waiting = [f for f in status.get("failures") or [] if f.get("replica") == replica and not f.get("replaced")]
    if not waiting:
        return None
    for f in waiting:
        f["replaced"] = True
    counts = _counts(status, replica)
    counts["restarts"] = int(counts.get("restarts") or 0) + 1
    counts["active"] = int(counts.get("active") or 0) + 1
    prev = _by_type(status.get("conditions"))
    conds = dict(prev)
    total = sum(int(c.get("restarts") or 0) for c in status["replicas"].values())
    conds["Restarting"] = condition("Restarting", "False", "Restarted",
                                    f"{replica} replica running again after {total} restart(s)",
                                    previous=prev.get("Restarting"), now=now, generation=generation)
    phase = phase_of(conds)
    conds[SUMMARY] = _summary(conds, {}, phase, prev, now, generation)
    status["phase"] = phase
    status["conditions"] = _ordered(conds)
    status["restarts"] = total
    return status


def from_trainjob(trainjob: dict[str, Any], previous: Optional[dict[str, Any]], generation: Optional[int], now: str,
                  *, jobset: Optional[dict[str, Any]] = None, run_policy: Optional[dict[str, Any]] = None,
                  namespace: str = "") -> dict[str, Any]:
    """The resource's status after observing its TrainJob (and its JobSet, when given): `from_child` on
    `trainjob_status.trainjob_child_status`."""
    return from_child(trainjob_status.trainjob_child_status(trainjob, jobset), previous, generation, now, run_policy=run_policy,
                      namespace=namespace)




def queued(previous: Optional[dict[str, Any]], queued_: tuple[str, str, str], generation: Optional[int], now: str,
           *, initial: bool = False) -> Optional[dict[str, Any]]:
    """The status with the `Queued` condition set (phase and summary follow), or None when nothing changes.
    `initial`: only where no `Queued` condition exists yet, or where the last one said Kueue was missing (a
    Workload's report is never replaced by the guess made at creation)."""
    if is_terminal(previous):
        return None
    prev = _by_type((previous or {}).get("conditions"))
    old = prev.get(QUEUED)
    if initial and old is not None and old.get("reason") != kueue_status.KUEUE_NOT_INSTALLED and \
            queued_[1] != kueue_status.KUEUE_NOT_INSTALLED:
        return None
    if old is not None and (old.get("status"), old.get("reason"), old.get("message")) == queued_:
        return None
    status = _carried_over(previous, generation)
    conds = dict(prev)
    conds[QUEUED] = condition(QUEUED, *queued_, previous=old, now=now, generation=generation)
    phase = phase_of(conds)
    conds[SUMMARY] = _summary(conds, {}, phase, prev, now, generation)
    status["phase"] = phase
    status["conditions"] = _ordered(conds)
    return status


def from_workload(previous: Optional[dict[str, Any]], workload: dict[str, Any], generation: Optional[int],
                  now: str, preemptor: Optional[str] = None) -> Optional[dict[str, Any]]:
    """The resource's status after observing its current child's Kueue Workload (None: nothing changes)."""
    return queued(previous, kueue_status.workload_queued(workload, preemptor=preemptor), generation, now)


# ------------------------------------------------------------------------------- child not created
# The API server can refuse the child itself: its API is not served (Kubeflow Trainer v2 or the training-operator
# not installed), or an admission webhook refused it (Trainer v2 refuses a TrainJob whose ClusterTrainingRuntime
# does not exist). Nothing runs; the resource says why in `Created` (False) and its summary, and the operator
# tries again later (the missing piece may be installed).

JOB_API_NOT_INSTALLED = "JobAPINotInstalled"
RUNTIME_NOT_FOUND = "TrainingRuntimeNotFound"
CHILD_REJECTED = "ChildRejected"


def api_message(body: Any) -> str:
    """The `message` of an API server error body (a Status object), else the body as text."""
    import json

    if isinstance(body, (bytes, bytearray)):
        body = body.decode(errors="replace")
    try:
        doc = json.loads(body) if isinstance(body, str) else body
    except ValueError:
        return str(body or "").strip()
    if isinstance(doc, dict) and doc.get("message"):
        return str(doc["message"])
    return str(body or "").strip()


def child_refused(kind: str, name: str, http_status: int, body: Any, *, api_served: bool, runtime: str = "",
                  job_api_setting: str = "") -> Optional[tuple[str, str]]:
    """(reason, message) for a child create the API server refused, or None for errors that are not about the
    child (conflicts, server errors: retried as they are). `api_served`: whether discovery lists the kind's API."""
    text = api_message(body)
    if http_status == 404 and not api_served:
        what = {"TrainJob": "trainjobs.trainer.kubeflow.org/v1alpha1 (Kubeflow Trainer v2)",
                "PyTorchJob": "pytorchjobs.kubeflow.org/v1 (Kubeflow training-operator)"}.get(kind, kind)
        other = "pytorchjob" if kind == "TrainJob" else "trainjob"
        return JOB_API_NOT_INSTALLED, (
            f"the operator setting jobApi ({job_api_setting or kind.lower()}) creates a {kind}, but this cluster does "
            f"not serve {what}: install it, or run the operator with --job-api {other} (chart value jobApi); "
            f"{kind} {name} is created once the API is served")
    # Two webhooks check the runtime and either may answer first: Trainer v2's ("ClusterTrainingRuntime... not
    # found") and, where Kueue runs with its TrainJob integration, Kueue's ("runtime '<name>' not found").
    lower = text.lower()
    if http_status in (400, 403, 422) and kind == "TrainJob" and "not found" in lower \
            and ("clustertrainingruntime" in lower or (runtime and f"runtime '{runtime}' not found" in text)):
        return RUNTIME_NOT_FOUND, (
            f"TrainJob {name} was refused: its ClusterTrainingRuntime {runtime!r} (operator setting "
            f"--trainjob-runtime, chart value trainJob.runtime.name) does not exist; install it (chart value "
            f"trainJob.runtime.create) or name an existing runtime. The API server said: {text}")
    if http_status in (400, 403, 422):
        return CHILD_REJECTED, f"{kind} {name} was refused by the API server: {text}"
    return None


def not_created(previous: Optional[dict[str, Any]], reason: str, message: str, generation: Optional[int],
                now: str) -> dict[str, Any]:
    """The status while the child cannot be created: `Created` False with the reason, the summary saying it."""
    status = _carried_over(previous, generation)
    if is_terminal(previous):
        return status
    prev = _by_type(status.get("conditions"))
    conds = dict(prev)
    kw = dict(now=now, generation=generation)
    for type_ in ("Running", "Restarting", "Suspended", "Failed"):
        if type_ not in conds:
            conds[type_] = condition(type_, "False", f"Not{type_}", "", previous=None, **kw)
    conds["Created"] = condition("Created", "False", reason, message, previous=prev.get("Created"), **kw)
    conds[SUMMARY] = condition(SUMMARY, "Unknown", reason, message, previous=prev.get(SUMMARY), **kw)
    status["phase"] = phase_of(conds)
    status["conditions"] = _ordered(conds)
    return status
