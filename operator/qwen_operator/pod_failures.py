"""What a failed or restarted pod of a child job says: which replica, how it ended, the trainer's own last
error lines, and what the job does next. Pure functions of the pod (and the job's run policy) as plain dicts;
conditions.py turns them into the resource's status.

The training-operator's own messages say only that a replica failed; the pod says which, with what exit code
and termination reason, and the trainer's last `error:` lines (its termination message)."""

from __future__ import annotations

from typing import Any, Optional

JOB_NAME_LABEL = "training.kubeflow.org/job-name"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
# Pods of a TrainJob belong to its JobSet (same name); the replicated job names the replica (`node` -> Node).
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
REPLICATED_JOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
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


def failed_message(child_message: str, failure: Optional[dict[str, Any]], run_policy: dict[str, Any],
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
