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
import re
from typing import Any, Iterable, Optional

MIRRORED = ("Created", "Running", "Restarting", "Suspended", "Failed")
SUMMARY = "Succeeded"
SYNCED = "Synced"
MEMORY_FITS = "MemoryFits"  # the stage's memory estimate against the card (api.devices): a warning, never a stop
QUEUED = "Queued"  # Kueue's verdict on the child's Workload (see `workload_queued`)
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
                message = _failed_message(message, failure_detail(status), run_policy or {}, namespace,
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

JOB_NAME_LABEL = "training.kubeflow.org/job-name"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
# Pods of a TrainJob belong to its JobSet (same name); the replicated job names the replica (`node` -> Node).
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
REPLICATED_JOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
POD_FAILED = "PodFailed"
MAX_FAILURES = 8
_CONTAINER = "pytorch"
_CONTAINERS = ("pytorch", "node")  # the PyTorchJob's container, the TrainJob runtime's


def pod_job_name(pod: dict[str, Any]) -> Optional[str]:
    """The child job a pod runs for: its PyTorchJob's, else its TrainJob's (= JobSet's) name."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return labels.get(JOB_NAME_LABEL) or labels.get(JOBSET_NAME_LABEL)


def _replica_type(pod: dict[str, Any]) -> str:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    value = labels.get(REPLICA_TYPE_LABEL) or labels.get(REPLICATED_JOB_LABEL) or ""
    return value[:1].upper() + value[1:] if value else "Master"


def _container_status(pod: dict[str, Any]) -> dict[str, Any]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return next((c for c in statuses if c.get("name") in _CONTAINERS), statuses[0] if statuses else {})


def pod_failure(pod: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The failed run a pod shows (its container terminated with a non-zero exit code, now or before an in-place
    restart), or None."""
    meta = pod.get("metadata") or {}
    cs = _container_status(pod)
    restarts = int(cs.get("restartCount") or 0)
    term = (cs.get("state") or {}).get("terminated")
    run = restarts
    if not term or not term.get("exitCode"):
        term = (cs.get("lastState") or {}).get("terminated")
        run = restarts - 1
        if not term or not term.get("exitCode") or restarts == 0:
            if (pod.get("status") or {}).get("phase") != "Failed":
                return None
            term = term or {"exitCode": None, "reason": (pod.get("status") or {}).get("reason") or "Failed",
                            "message": (pod.get("status") or {}).get("message", "")}
            run = restarts
    return {
        "replica": _replica_type(pod),
        "pod": meta.get("name", ""),
        "container": cs.get("name") or _CONTAINER,
        "uid": meta.get("uid", ""),
        "run": max(run, 0),
        "exitCode": term.get("exitCode"),
        "reason": term.get("reason") or "Error",
        "message": " ".join(str(term.get("message") or "").split())[:1024],
        "time": term.get("finishedAt") or "",
    }


def pod_running_again(pod: dict[str, Any], status: Optional[dict[str, Any]]) -> Optional[str]:
    """The replica type when `pod` runs in place of a recorded failure not yet counted as restarted, else None."""
    if (pod.get("status") or {}).get("phase") != "Running":
        return None
    cs = _container_status(pod)
    if not (cs.get("state") or {}).get("running"):
        return None
    uid, runs = (pod.get("metadata") or {}).get("uid"), int(cs.get("restartCount") or 0)
    replica = _replica_type(pod)
    for f in (status or {}).get("failures") or []:
        if f.get("replica") == replica and not f.get("replaced") and (f.get("uid") != uid or f.get("run", 0) < runs):
            return replica
    return None


def jobset_run_policy(jobset: Optional[dict[str, Any]]) -> dict[str, Any]:
    """How the JobSet of a TrainJob treats a failed pod, in run-policy words: it restarts every node (deleting the
    pods) while its `status.restarts` is below `spec.failurePolicy.maxRestarts` (OnFailure), else it fails and
    keeps the failed pods (Never). Without the JobSet, the runtime's restarts are assumed."""
    if not jobset:
        return {"restartPolicy": "OnFailure", "cleanPodPolicy": "None"}
    limit = int(((jobset.get("spec") or {}).get("failurePolicy") or {}).get("maxRestarts") or 0)
    done = int((jobset.get("status") or {}).get("restarts") or 0)
    return {"restartPolicy": "OnFailure" if done < limit else "Never", "cleanPodPolicy": "None"}


def pending_restart(status: Optional[dict[str, Any]]) -> bool:
    """Whether a recorded failure still waits for its replacement (the pods' watch only looks at running pods
    then)."""
    return not is_terminal(status) and any(not f.get("replaced") for f in (status or {}).get("failures") or [])


def will_restart(failure: dict[str, Any], run_policy: dict[str, Any]) -> bool:
    """Whether the training-operator replaces this failed pod (within backoffLimit): OnFailure always, ExitCode for
    retryable exit codes (128 and above: signals, OOM), Never not."""
    policy = run_policy.get("restartPolicy", "OnFailure")
    code = failure.get("exitCode")
    if policy == "Never":
        return False
    if policy == "ExitCode":
        return isinstance(code, int) and code >= 128
    return True


BACKOFF_MESSAGE = "reached the specified backoff limit"  # the training-operator's Failed message on that path


def describe_failure(failure: dict[str, Any], run_policy: dict[str, Any], namespace: str, runs: int = 1) -> str:
    """One paragraph: which pod failed, how, the trainer's own error, and how to get the logs. `runs`: the failed
    runs so far, this one included. The training-operator (v1.9.3) deletes every pod of a job it fails for
    reaching runPolicy.backoffLimit, whatever cleanPodPolicy says, but fails a job of Never replicas either that way
    or through the replica's status (keeping the pods), whichever its reconcile sees first: `run_policy`'s
    `podsDeleted`, when known (from the child's Failed message), says which; unknown, a failure past the limit
    says the pod may go."""
    code = failure.get("exitCode")
    how = f"exited with code {code} ({failure.get('reason')})" if code is not None else f"failed ({failure.get('reason')})"
    text = f"{failure.get('replica')} replica pod {failure.get('pod')} {how}"
    if failure.get("message"):
        text += f": {failure['message']}"
    elif failure.get("reason") == "OOMKilled":
        text += ": out of memory (raise spec.resources.memory, or lower training.microBatchSize)"
    text = text.rstrip(".") + "."
    pod = failure.get("pod")
    logs = f"kubectl logs -n {namespace} {pod} -c {failure.get('container') or _CONTAINER}"
    keep = ("spec.runPolicy {restartPolicy: Never, backoffLimit: 1 or more, cleanPodPolicy: None} or ship logs off "
            "the pod.")
    limit = run_policy.get("backoffLimit")
    backoff = limit is not None and runs > int(limit)
    deleted = run_policy.get("podsDeleted")
    if will_restart(failure, run_policy) or run_policy.get("cleanPodPolicy") == "All":
        text += (" The pod is deleted when it is replaced or cleaned up: its last lines are the message above;"
                 " for full logs, keep failed pods with " + keep)
    elif deleted is True:
        text += (f" The pod is deleted: the job reached spec.runPolicy.backoffLimit ({limit}); its last lines are the "
                 "message above. For full logs, keep failed pods with " + keep)
    elif deleted is None and backoff:
        text += (f" The job reached spec.runPolicy.backoffLimit ({limit}), and the training-operator may delete its "
                 f"pods: logs while the pod exists: {logs}; for full logs, keep failed pods with " + keep)
    else:
        text += f" Logs: {logs}"
    return text


def _failed_message(child_message: str, failure: Optional[dict[str, Any]], run_policy: dict[str, Any],
                    namespace: str, runs: int = 1) -> str:
    if not failure:
        return child_message
    if "backoffLimit" in run_policy:  # a PyTorchJob's: its Failed message says whether the pods were deleted
        run_policy = {**run_policy, "podsDeleted": BACKOFF_MESSAGE in child_message}
    detail = describe_failure(failure, run_policy, namespace, runs)
    return f"{detail} ({child_message.strip()})" if child_message else detail


def failure_detail(status: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    failures = (status or {}).get("failures") or []
    return failures[-1] if failures else None


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
    failure = {**failure, "replaced": not will_restart(failure, run_policy) or is_terminal(previous)}
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
            message = _failed_message(base, failure, run_policy, namespace, len(status["failures"]))
            for type_ in ("Failed", SUMMARY):
                if type_ in conds:
                    conds[type_] = {**conds[type_], "message": message[:32768]}
            status["conditions"] = _ordered(conds)
        return status
    if will_restart(failure, run_policy):
        conds["Restarting"] = condition("Restarting", "True", POD_FAILED,
                                        describe_failure(failure, run_policy, namespace,
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


# ------------------------------------------------------------------------------------------- TrainJob
# A Kubeflow Trainer v2 TrainJob (v2.3.0) reports fewer conditions than a PyTorchJob: `Suspended` (reasons
# Suspended/Resumed), `Complete` and `Failed` (copied from its JobSet's Completed/Failed, or reason
# DeadlineExceeded / TrainingRuntimeNotSupported from the Trainer itself), plus `jobsStatus`, the JobSet's
# per-replicated-job counts of Jobs. The rest is inferred: Created once the TrainJob exists, Running while a
# node Job is ready, Restarting while the JobSet has restarted (its `status.restarts`) and no node Job is ready
# yet. The result has the shape of a PyTorchJob's status, so `from_child` applies the same rules to both.

TRAINJOB_CREATED = "TrainJobCreated"
TRAINJOB_RUNNING = "TrainJobRunning"
JOBS_NOT_READY = "JobsNotReady"
JOBSET_RESTARTING = "JobSetRestarting"


def _true(c: Optional[dict[str, Any]]) -> bool:
    return c is not None and c.get("status") == "True"


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


def from_trainjob(trainjob: dict[str, Any], previous: Optional[dict[str, Any]], generation: Optional[int], now: str,
                  *, jobset: Optional[dict[str, Any]] = None, run_policy: Optional[dict[str, Any]] = None,
                  namespace: str = "") -> dict[str, Any]:
    """The resource's status after observing its TrainJob (and its JobSet, when given): `from_child` on
    `trainjob_child_status`."""
    return from_child(trainjob_child_status(trainjob, jobset), previous, generation, now, run_policy=run_policy,
                      namespace=namespace)


# ---------------------------------------------------------------------------------------------- Kueue
# A child with a Kueue queue is created suspended; Kueue makes a Workload for it (owner: the child), reserves
# quota in the ClusterQueue behind the LocalQueue, and unsuspends the child when it admits the Workload. The
# Workload's conditions (Kueue v0.17, kueue.x-k8s.io/v1beta2) say why it waits: `QuotaReserved` False with
# reason `Pending` and a message such as "couldn't assign flavors to pod set master: insufficient unused quota
# for nvidia.com/gpu in flavor default, 8 more needed", or `Inadmissible` ("LocalQueue lq doesn't exist");
# `Admitted` True once it may run; `Evicted` True (reasons Preempted, PodsReadyTimeout, ...) when Kueue took
# the quota back and suspended the child again; `Finished` True at the end. A preempted Workload carries
# `Evicted` (reason Preempted) and `Preempted` (reason InClusterQueue, InCohortReclamation, ...) True, both with
# "Preempted to accommodate a workload (UID: <its Workload>, JobUID: <its job>) due to prioritization in the
# ClusterQueue; ..."; both go False when quota is reserved again.

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


def queued(previous: Optional[dict[str, Any]], queued_: tuple[str, str, str], generation: Optional[int], now: str,
           *, initial: bool = False) -> Optional[dict[str, Any]]:
    """The status with the `Queued` condition set (phase and summary follow), or None when nothing changes.
    `initial`: only where no `Queued` condition exists yet, or where the last one said Kueue was missing (a
    Workload's report is never replaced by the guess made at creation)."""
    if is_terminal(previous):
        return None
    prev = _by_type((previous or {}).get("conditions"))
    old = prev.get(QUEUED)
    if initial and old is not None and old.get("reason") != KUEUE_NOT_INSTALLED and \
            queued_[1] != KUEUE_NOT_INSTALLED:
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
    return queued(previous, workload_queued(workload, preemptor=preemptor), generation, now)


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
