"""What a watched child job, pod or Kueue Workload changes in its QwenTrainingJob: the resource's new status, the
Events that tell of the change, and whether the next step of a pipeline must be started.

Each `*_decision` takes the resource as read for the status write (it may be read again after a conflict) and
returns a `Decision`; `handlers` writes `status` and, once written, posts `events` and starts the next step when
`advance` is set. Pure functions over the wire form and the time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from qwen_trainer.spec import SpecError

from . import conditions as cnd
from . import kueue_status
from . import pod_failures as pods
from . import step_records as sr
from .reconcile import Event, Problem, drift_state
from .render import JOB_API_PYTORCHJOB, JOB_API_TRAINJOB, TRAINJOB_KIND, render_step

STATUS_ENV = "QWEN_STATUS_RESOURCE"  # rendered into every pod: namespace/name of its resource


@dataclass(frozen=True)
class Decision:
    status: Optional[dict[str, Any]]  # the complete new status; None: write nothing
    events: tuple[Event, ...] = ()  # to post once the status is written
    advance: bool = False  # the current step succeeded and another follows: start it


NOTHING = Decision(None)


# ------------------------------------------------------------------------------------------- children


def live_service_account(child: dict[str, Any]) -> Optional[str]:
    """The service account a live child's pods run as (what it was rendered with)."""
    spec = child.get("spec") or {}
    if child.get("kind") == TRAINJOB_KIND:
        for patch in spec.get("runtimePatches") or []:
            for job in (((patch.get("trainingRuntimeSpec") or {}).get("template") or {}).get("spec") or {}) \
                    .get("replicatedJobs") or []:
                pod = ((((job.get("template") or {}).get("spec") or {}).get("template") or {}).get("spec") or {})
                if pod.get("serviceAccountName"):
                    return pod["serviceAccountName"]
        return None
    return (((spec.get("pytorchReplicaSpecs") or {}).get("Master") or {}).get("template", {}).get("spec", {})
            .get("serviceAccountName"))


def run_policy(child: dict[str, Any]) -> dict[str, Any]:
    """The restart and cleanup policy the child runs with (words the Failed message). A TrainJob's JobSet
    replaces failed pods by restarting all nodes (the runtime's failurePolicy) until it fails, and then keeps the
    failed pods: when its Failed message is written, that is Never."""
    spec = child.get("spec") or {}
    if child.get("kind") == TRAINJOB_KIND:
        return {"restartPolicy": "Never", "cleanPodPolicy": "None"}
    master = (spec.get("pytorchReplicaSpecs") or {}).get("Master") or {}
    return {"restartPolicy": master.get("restartPolicy", "OnFailure"),
            "cleanPodPolicy": (spec.get("runPolicy") or {}).get("cleanPodPolicy", "None"),
            "backoffLimit": (spec.get("runPolicy") or {}).get("backoffLimit")}


def needs_jobset(trainjob: dict[str, Any]) -> bool:
    """The JobSet is read only for what the TrainJob does not say: restarts while no node Job is ready."""
    status = trainjob.get("status") or {}
    finished = any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
                   for c in status.get("conditions") or [])
    ready = sum(int(j.get("ready") or 0) for j in status.get("jobsStatus") or [])
    return not finished and ready == 0 and bool(status.get("jobsStatus"))


def nothing_to_mirror(child: dict[str, Any]) -> bool:
    """A child its controller has not acted on yet. The handler that created it writes the status (with its name)
    right after creating it, so writing here would only race that write (a 409 and a re-read, or a second patch)."""
    status = child.get("status") or {}
    return not status.get("conditions") and not status.get("jobsStatus") and \
        (child["metadata"].get("generation") or 1) <= 1


def child_status(child: dict[str, Any], previous: Optional[dict[str, Any]], generation: Optional[int], now: str,
                 jobset: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The resource's status mirrored from its child job (and, for a TrainJob, its JobSet where read)."""
    ns = child["metadata"].get("namespace", "")
    if child.get("kind") == TRAINJOB_KIND:
        return cnd.from_trainjob(child, previous, generation, now, jobset=jobset, run_policy=run_policy(child),
                                 namespace=ns)
    return cnd.from_child(child.get("status"), previous, generation, now, run_policy=run_policy(child), namespace=ns)


def phase_event(kind: str, child_name: str, status: dict[str, Any]) -> Optional[Event]:
    """Normal Events for Running and Succeeded, a Warning with the failed pod's story for Failed."""
    phase = status.get("phase")
    if phase == "Failed":
        return "Warning", "Failed", (cnd.get_condition(status, "Failed") or {}).get("message") or ""
    if phase == "Running":
        return "Normal", "Running", f"{kind} {child_name} is running"
    if phase == "Succeeded":
        took = f" in {status['duration']}" if status.get("duration") else ""
        return "Normal", "Succeeded", f"{kind} {child_name} succeeded{took}"
    return None


def _owned_by(resource: dict[str, Any], uid: str) -> bool:
    return resource["metadata"].get("uid") == uid and not resource["metadata"].get("deletionTimestamp")


def child_deleted_decision(resource: dict[str, Any], owner_uid: str, child: dict[str, Any], now: str) -> Decision:
    """A child job of the resource went away: Failed when it had not finished (one Warning)."""
    kind, name = child["kind"], child["metadata"]["name"]
    if not _owned_by(resource, owner_uid) or (resource.get("status") or {}).get("pytorchJob") != name:
        return NOTHING
    status = cnd.child_deleted(resource.get("status"), resource["metadata"].get("generation"), now, name, kind=kind)
    events: tuple[Event, ...] = ()
    if status.get("phase") == "Failed" and (cnd.get_condition(status, "Failed") or {}).get("reason") == \
            cnd.CHILD_DELETED:
        events = (("Warning", cnd.CHILD_DELETED, f"{kind} {name} was deleted before it finished"),)
    return Decision(status, events)


def child_changed_decision(resource: dict[str, Any], owner_uid: str, child: dict[str, Any], now: str, *,
                           jobset: Optional[dict[str, Any]] = None, default_runtime: str = "") -> Decision:
    """The child job's status, mirrored: the step's record, the phase Events, and (for a child whose spec changed
    after creation) whether it still matches the rendering."""
    if not _owned_by(resource, owner_uid):
        return NOTHING
    kind, name = child["kind"], child["metadata"]["name"]
    current = (resource.get("status") or {}).get("pytorchJob")
    if current and current != name:
        return NOTHING  # an earlier step's (or attempt's) child job: it no longer drives the status
    generation = resource["metadata"].get("generation")
    new = child_status(child, resource.get("status"), generation, now, jobset=jobset)
    before = (resource.get("status") or {}).get("phase")
    transition = new.get("phase") if new.get("phase") != before and \
        new.get("phase") in ("Running", "Succeeded", "Failed") else None
    new.setdefault("pytorchJob", name)  # the child exists, whichever handler writes first
    records = new.get("stages") or []
    index = next((i for i, r in enumerate(records) if r.get("pytorchJob") == name), sr.current_index(records))
    problem: Optional[Problem] = None
    if index is not None and records:
        new, moved = sr.observed(new, index, now)
        if moved:
            return Decision(new, _phase_events(kind, name, new, transition), advance=True)
    # A spec change of the child after creation (generation > 1): check it still matches the rendering.
    if (child["metadata"].get("generation") or 1) > 1 and not cnd.is_terminal(new):
        try:
            attempt = int(records[index].get("attempt") or 0) if index is not None and records else 0
            desired = render_step(resource, index or 0, attempt, live_service_account(child),
                                  job_api=JOB_API_TRAINJOB if kind == TRAINJOB_KIND else JOB_API_PYTORCHJOB,
                                  runtime=((child.get("spec") or {}).get("runtimeRef") or {}).get("name")
                                  or default_runtime)[1][1]
        except SpecError:
            return Decision(new, _phase_events(kind, name, new, transition))
        drift = drift_state(desired, child)
        synced = cnd.get_condition(new, cnd.SYNCED) or {}
        if drift is not None and synced.get("reason") != drift[0]:
            new = cnd.reconciled(new, generation, now, synced=("False", drift[0], drift[1]))
            problem = drift
        elif drift is None and synced.get("reason") in (cnd.CHILD_MODIFIED,):
            new = cnd.reconciled(new, generation, now)
    events = _phase_events(kind, name, new, transition)
    if problem is not None:
        events += (("Warning", problem[0], problem[1]),)
    return Decision(new, events)


def _phase_events(kind: str, name: str, status: dict[str, Any], transition: Optional[str]) -> tuple[Event, ...]:
    """The phase Event when the written phase is the one the child moved to (a step that succeeded with another
    to follow is Pending again, and says nothing)."""
    if transition is None or status.get("phase") != transition:
        return ()
    event = phase_event(kind, name, status)
    return (event,) if event else ()


# ----------------------------------------------------------------------------------------------- pods


def resource_of_pod(pod: dict[str, Any]) -> Optional[tuple[str, str]]:
    """(namespace, name) of the QwenTrainingJob a pod runs for: rendered into its QWEN_STATUS_RESOURCE."""
    for c in (pod.get("spec") or {}).get("containers") or []:
        for e in c.get("env") or []:
            if e.get("name") == STATUS_ENV and "/" in str(e.get("value") or ""):
                ns, name = str(e["value"]).split("/", 1)
                return ns, name
    return None


def pod_worth_reading(pod: dict[str, Any], failure: Optional[dict[str, Any]],
                      cached: Optional[dict[str, Any]]) -> bool:
    """Most pod events change nothing: a failed pod does; a running one only while the (cached) resource is
    Restarting and the pod is a replacement."""
    if failure is not None:
        return True
    if cached is None or not cnd.pending_restart(cached.get("status")):
        return False
    return pods.pod_running_again(pod, cached.get("status")) is not None


def pod_decision(resource: dict[str, Any], pod: dict[str, Any], failure: Optional[dict[str, Any]], now: str,
                 jobset_policy: Optional[dict[str, Any]] = None) -> Decision:
    """A failed pod run (exit code, reason, the trainer's termination message), or a replacement running again.
    `jobset_policy`: a TrainJob pod's JobSet failure policy (pods.jobset_run_policy), where read."""
    job = pods.pod_job_name(pod)
    status = resource.get("status") or {}
    if status.get("pytorchJob") != job or resource["metadata"].get("deletionTimestamp"):
        return NOTHING
    gen, ns = resource["metadata"].get("generation"), resource["metadata"].get("namespace", "")
    run_policy = (resource.get("spec") or {}).get("runPolicy") or {}
    if failure is not None:
        policy = jobset_policy or {"restartPolicy": run_policy.get("restartPolicy", "OnFailure"),
                                   "cleanPodPolicy": run_policy.get("cleanPodPolicy", "None"),
                                   "backoffLimit": run_policy.get("backoffLimit", 3)}  # the spec's default
        new = cnd.observe_pod_failure(resource.get("status"), failure, policy, ns, gen, now)
        if new is None:
            return NOTHING
        spec_policy = jobset_policy or {"backoffLimit": 3, **run_policy}
        message = pods.describe_failure(failure, spec_policy, ns, len(new.get("failures") or [])) \
            if new.get("phase") != "Failed" else (cnd.get_condition(new, "Failed") or {}).get("message", "")
        return Decision(new, (("Warning", cnd.POD_FAILED, message),))
    replica = pods.pod_running_again(pod, resource.get("status"))
    new = cnd.observe_pod_running(resource.get("status"), replica, gen, now) if replica else None
    if new is None:
        return NOTHING
    return Decision(new, (("Normal", "Restarted", (cnd.get_condition(new, "Restarting") or {}).get("message", "")),))


# ------------------------------------------------------------------------------------------ workloads


def workload_decision(resource: dict[str, Any], owner_uid: str, child_name: str, workload: dict[str, Any], now: str,
                      preemptor: Optional[str] = None) -> Decision:
    """Kueue's Workload of the resource's child job: the `Queued` condition, an Event when it is admitted, held
    for a new reason, found inadmissible or preempted. `preemptor`: the QwenTrainingJob whose child preempted it,
    where known."""
    if not _owned_by(resource, owner_uid):
        return NOTHING
    status = resource.get("status") or {}
    current = status.get("pytorchJob")
    # An earlier step's (or attempt's) child no longer drives the status; the next step's child may show up here
    # before the handler that created it has written its name.
    if current and current != child_name and (not status.get("stages") or
                                              any(r.get("pytorchJob") == child_name for r in status["stages"])):
        return NOTHING
    old = cnd.get_condition(status, cnd.QUEUED) or {}
    new_status = cnd.from_workload(status, workload, resource["metadata"].get("generation"), now, preemptor=preemptor)
    if new_status is None:
        return NOTHING
    return Decision(new_status, queued_events(old, cnd.get_condition(new_status, cnd.QUEUED) or {}))


def queued_events(old: dict[str, Any], new: dict[str, Any]) -> tuple[Event, ...]:
    """Admitted (Normal) when the `Queued` condition turns False; when it turns True or changes its reason: a
    Warning for Inadmissible or Preempted, a Normal `Queued` for waiting for quota or an eviction."""
    message = new.get("message", "")
    if new.get("status") == "False" and old.get("status") == "True":
        return (("Normal", kueue_status.ADMITTED, message),)
    if new.get("status") == "True" and new.get("reason") != old.get("reason"):
        if new.get("reason") in (kueue_status.INADMISSIBLE, kueue_status.PREEMPTED):
            return (("Warning", new["reason"], message),)
        if new.get("reason") in (kueue_status.WAITING_FOR_QUOTA, kueue_status.EVICTED):
            return (("Normal", cnd.QUEUED, message),)
    return ()


__all__ = ["Decision", "NOTHING", "child_changed_decision", "child_deleted_decision",
           "child_status", "live_service_account", "needs_jobset", "nothing_to_mirror", "phase_event",
           "pod_decision", "pod_worth_reading", "queued_events", "resource_of_pod", "run_policy",
           "workload_decision"]
