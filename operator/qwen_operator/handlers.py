"""kopf handlers: read what the event and the cluster say, ask the pure core what to do (`render` for the children,
`reconcile` for the create/resume/update decisions, `mirror` for what a watched child, pod or Kueue Workload changes),
apply its answer (create, patch the status, post Events) and return. Importable on its own for
`kopf run -m qwen_operator.handlers` (configured from QWEN_OPERATOR_* environment variables), or started by
`qwen-operator` (flags).

The child job is a Kubeflow PyTorchJob or, with the `trainjob` job API (`--job-api`), a Kubeflow Trainer v2
TrainJob; only the chosen API's children are watched (`watch_children`), so the operator needs RBAC for that
API alone.

* create/resume: validate and render, create-or-get the ConfigMap and the child job by deterministic name,
  adopt children that carry our controller owner reference, report hand-made changes, write status.
* update of spec.suspend: propagate the user's change to the child's suspend field (Kueue moves that field
  too; the operator never reverts it on its own). Any other spec change is refused (the CRD's CEL rules
  reject it already) and reported.
* child watch events (status-only changes never reach update handlers): map the child's status.
* No finalizer and no delete handler: deletion cascades through owner references (the garbage collector).
"""

from __future__ import annotations

import copy
import datetime
import logging
import os
from typing import Any, Callable, Iterable, Optional

import kopf
from kubernetes.client.exceptions import ApiException

from qwen_trainer.spec import SpecError, derive

from . import conditions as cnd
from . import kueue_status
from . import pod_failures as pods
from . import mirror
from . import reconcile as rc
from . import step_records as sr
from .api import GROUP, PLURAL, VERSION
from .api.devices import memory_fit
from .config import OperatorConfig
from .kube import CHILD_RESOURCES, Kube
from .metrics import CHILDREN_CREATED, PhaseTracker, Readiness, observe, start_server
from .render import LABEL_MANAGED_BY, MANAGED_BY, PYTORCHJOB_GROUP, PYTORCHJOB_KIND, PYTORCHJOB_PLURAL, \
    PYTORCHJOB_VERSION, TRAINJOB_GROUP, TRAINJOB_KIND, TRAINJOB_PLURAL, TRAINJOB_VERSION, child_kind, render_step

FINALIZER = f"{GROUP}/finalizer"  # declared for completeness; no handler here needs a finalizer
ANNOTATION_PREFIX = GROUP

# Replaced by qwen_operator.main before kopf starts; `kopf run -m qwen_operator.handlers` uses the environment.
CONFIG: OperatorConfig = OperatorConfig.from_env()

log = logging.getLogger("qwen_operator")


def failpoint(name: str) -> None:
    """Crash the process here when QWEN_OPERATOR_FAILPOINT names this point: lets the restart tests kill the
    operator at an exact step of a reconcile (e.g. between the ConfigMap and the PyTorchJob)."""
    if os.environ.get("QWEN_OPERATOR_FAILPOINT") == name:
        logging.getLogger("qwen_operator").error("failpoint %s: exiting", name)
        logging.shutdown()
        os._exit(70)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def apply_settings(settings: kopf.OperatorSettings, cfg: OperatorConfig) -> None:
    """Every kopf setting the operator relies on, pinned in one place (see docs/operator.md)."""
    # No finalizer: nothing needs to run before a QwenTrainingJob goes away (children are garbage-collected
    # through owner references), and a finalizer would block deletion whenever the operator is down.
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration")
    # After its own patch kopf holds the change handlers of that resource until the watch shows the patched
    # version. Under a burst the watch lags by more than kopf's default 5 s, and the create handler then ran a
    # second time on the stale body (up to 57% of the jobs of a 100-job burst: a duplicate ConfigMap and
    # PyTorchJob create refused with 409, their reads, and another annotation patch each; at 500 nearly all).
    # Waiting longer costs nothing when the watch keeps up: kopf wakes up on the awaited event.
    settings.persistence.consistency_timeout = 60.0
    settings.posting.enabled = True
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = "qwen-operator"
    settings.posting.event_name_prefix = "qwen-operator-"
    settings.watching.connect_timeout = 10
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.inactivity_timeout = 70
    settings.watching.reconnect_backoff = 1.0
    settings.networking.request_timeout = 60
    settings.networking.connect_timeout = 10
    settings.execution.max_workers = cfg.workers
    settings.execution.default_backoff = 10
    settings.scanning.disabled = cfg.explicit_namespaces
    # Peering (HA): only set here what the configuration names explicitly, so `kopf run` flags keep working.
    settings.peering.stealth = True
    settings.peering.lifetime = cfg.peering_lifetime
    if cfg.standalone:
        settings.peering.standalone = True
    elif cfg.peering:
        settings.peering.name = cfg.peering
        settings.peering.mandatory = True
        settings.peering.standalone = False
    if not settings.peering.standalone and (cfg.peering or cfg.priority is not None):
        settings.peering.priority = cfg.effective_priority()


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    cfg = CONFIG
    apply_settings(settings, cfg)
    memo.kube = Kube.connect(pool_size=cfg.workers + 4)
    memo.phases = PhaseTracker()
    readiness = memo.readiness = getattr(memo, "readiness", None) or Readiness()
    # With mandatory peering kopf starts paused and only logs when it resumes; so does readiness.
    readiness.paused = bool(settings.peering.mandatory and not settings.peering.standalone)
    readiness.attach()
    if cfg.metrics_port:
        memo.metrics_server = await start_server(cfg.metrics_host, cfg.metrics_port, readiness)
    readiness.started = True
    logger.info("qwen-operator started: namespaces=%s peering=%s priority=%s",
                cfg.namespaces or "*", "standalone" if settings.peering.standalone else settings.peering.name,
                settings.peering.priority)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    server = getattr(memo, "metrics_server", None)
    if server is not None:
        await server.cleanup()


@kopf.on.probe(id="ready")
def probe_ready(memo: kopf.Memo, **_: Any) -> bool:
    readiness = getattr(memo, "readiness", None)
    return bool(readiness and readiness.ready)


# ------------------------------------------------------------------------------------------ helpers


def _plain(body: Any) -> dict[str, Any]:
    return copy.deepcopy({k: body[k] for k in body})


def _view(body: Any) -> dict[str, Any]:
    """A plain dict over kopf's body without copying it, for handlers that only read it (the child watch runs on
    every PyTorchJob event; a deep copy of each body was a visible share of the operator's CPU)."""
    return {k: body[k] for k in body}


def _post(target: dict[str, Any], events: Iterable[rc.Event], logger: Optional[logging.Logger] = None) -> None:
    """Post Events about `target` through kopf's background poster; Warnings are logged too when a logger is given."""
    for type_, reason, message in events:
        if type_ == "Warning":
            kopf.warn(target, reason=reason, message=message[:1024])
            if logger is not None:
                logger.warning(message)
        else:
            kopf.event(target, type=type_, reason=reason, message=message[:1024])


def _write(kube: Kube, namespace: str, name: str,
           decide: Callable[[dict[str, Any]], mirror.Decision]) -> tuple[Optional[dict[str, Any]], mirror.Decision]:
    """Write the status `decide` gives for the resource as read (again after a conflict): (the status written or
    None, the decision it came from)."""
    last = mirror.NOTHING

    def compute(resource: dict[str, Any]) -> Optional[dict[str, Any]]:
        nonlocal last
        last = decide(resource)
        return last.status

    written = kube.update_status(namespace, name, compute)
    return written, (last if written is not None else mirror.NOTHING)


# ------------------------------------------------------------------------------------ create/resume


@kopf.on.resume(GROUP, VERSION, PLURAL, id="reconcile-resume")
@kopf.on.create(GROUP, VERSION, PLURAL, id="reconcile", retries=20, backoff=5)
def reconcile(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, retry: int = 0, **_: Any) -> None:
    with observe("reconcile"):
        _reconcile(_plain(body), memo, logger, retry=retry)


def _reconcile(body: dict[str, Any], memo: kopf.Memo, logger: logging.Logger, rerun: bool = False,
               retry: int = 0) -> None:
    kube: Kube = memo.kube
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    previous = body.get("status") or {}
    if cnd.is_terminal(previous) and not rerun:
        return
    if meta.get("deletionTimestamp"):
        return
    ref = rc.ref_of(body)

    try:
        records = rc.step_records(body)
        if rerun:
            previous = kube.update_status(ns, name, lambda res: sr.rerun(
                res.get("status") or {}, rc.step_records(res), res["metadata"].get("generation"))) or previous
            records = sr.init_stages(previous.get("stages"), [(r["name"], r["stage"]) for r in records])
            logger.info("spec fixed after %s: running again from %s", "failure", previous.get("currentStage"))
        index = sr.current_index(records)
        if index is None:
            return  # every step has succeeded
        account = kube.service_account(ns, CONFIG.trainer_service_account)
        spec, (cm, job) = render_step(body, index, int(records[index].get("attempt") or 0), account,
                                      job_api=CONFIG.job_api, runtime=CONFIG.trainjob_runtime)
    except SpecError as err:
        problems = [str(p) for p in err.problems]
        kube.update_status(ns, name, lambda res: cnd.invalid(res.get("status"), problems,
                                                             res["metadata"].get("generation"), now()), body=body)
        _post(ref, [("Warning", cnd.INVALID_SPEC, "; ".join(problems))])
        logger.warning("invalid spec, nothing created: %s", "; ".join(problems))
        return

    job_kind, job_name = job["kind"], job["metadata"]["name"]
    # A child job this resource already created and that is gone now was deleted by someone: do not rerun it.
    if previous.get("pytorchJob") == job_name and kube.get_child(job) is None:
        kube.update_status(ns, name, lambda res: cnd.child_deleted(
            res.get("status"), res["metadata"].get("generation"), now(), job_name, kind=job_kind))
        _post(ref, [("Warning", cnd.CHILD_DELETED, f"{job_kind} {job_name} was deleted")])
        return

    seen: list[rc.ChildSeen] = []
    for desired in (cm, job):  # ConfigMap first: the pods mount it
        try:
            live, was_created = kube.create_or_get(desired)
        except ApiException as err:
            if desired is not job:
                raise
            _refused(kube, err, job, ref, previous, retry)
        child = rc.judge_child(desired, live, was_created, meta["uid"])
        if child.leftover:
            raise kopf.TemporaryError(child.leftover, delay=2)
        seen.append(child)
        if child.created:
            CHILDREN_CREATED.labels(desired["kind"]).inc()
            failpoint(f"after-{desired['kind'].lower()}")
        if child.conflict:
            break
    synced, problems = rc.children_synced(seen)

    memory = memory_fit(spec, CONFIG.gpu_memory_gib)
    child_name = job_name if synced[1] != cnd.NAME_CONFLICT else None
    source = rc.queue_source(body, spec, index) if child_name else None
    queue = rc.queue_condition(job, source, kube.api_served(kueue_status.WORKLOAD_GROUP, kueue_status.WORKLOAD_VERSION,
                                                            kueue_status.WORKLOAD_PLURAL)) if source else None
    derived = derive(spec.job_spec(), spec.world_size()).to_dict()
    kube.update_status(ns, name, lambda res: rc.reconciled_status(
        res, now(), records=records, index=index, child=child_name, config_map=cm["metadata"]["name"],
        derived=derived, synced=synced, memory=memory, queue=queue))

    created = [c.label for c in seen if c.created]
    if created:
        logger.info("created %s", ", ".join(created))
        _post(ref, [e for e in [rc.created_event(created)] if e])
    warnings = [p for p in [rc.memory_problem(previous, memory), *problems, rc.queue_problem(previous, queue)] if p]
    _post(ref, [("Warning", reason, message) for reason, message in warnings], logger)
    if synced[1] == cnd.NAME_CONFLICT:
        raise kopf.TemporaryError(synced[2], delay=30)


def _refused(kube: Kube, err: ApiException, job: dict[str, Any], ref: dict[str, Any], previous: dict[str, Any],
             retry: int) -> None:
    """The API server refused the child job: say why in the status (one Warning per cause) and try again later;
    anything else is raised as it is."""
    kind, name = job["kind"], job["metadata"]["name"]
    served = True
    if err.status == 404:
        served = kube.api_served(*CHILD_RESOURCES[kind], ttl=0)
    refused = cnd.child_refused(kind, name, err.status or 0, err.body, api_served=served,
                                runtime=((job.get("spec") or {}).get("runtimeRef") or {}).get("name", ""),
                                job_api_setting=CONFIG.job_api)
    if refused is None:
        raise err
    reason, message = refused
    kube.update_status(ref["metadata"]["namespace"], ref["metadata"]["name"], lambda res: cnd.not_created(
        res.get("status"), reason, message, res["metadata"].get("generation"), now()))
    if rc.refusal_is_new(previous, reason):
        _post(ref, [("Warning", reason, message)])
    raise kopf.TemporaryError(message, delay=rc.refusal_delay(retry))


# ---------------------------------------------------------------------------------------- updates


@kopf.on.update(GROUP, VERSION, PLURAL, id="suspend", field="spec.suspend", retries=20, backoff=5)
def suspend_changed(body: kopf.Body, new: Any, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    with observe("suspend"):
        resource = _plain(body)
        if cnd.is_terminal(resource.get("status")):
            return
        name = (resource.get("status") or {}).get("pytorchJob")
        if not name:
            return  # not created yet: the create handler renders the current value
        try:
            memo.kube.set_suspend(resource["metadata"]["namespace"], name, bool(new), child_kind(CONFIG.job_api))
        except Exception as err:
            if getattr(err, "status", None) == 404:
                return
            raise
        logger.info("%s %s: suspend=%s", child_kind(CONFIG.job_api), name, bool(new))


@kopf.on.update(GROUP, VERSION, PLURAL, id="immutable")
def spec_changed(body: kopf.Body, diff: kopf.Diff, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """The CRD's CEL rules refuse these changes; without them (an older CRD) the change is reported and ignored."""
    with observe("immutable"):
        fields = rc.changed_spec_fields(diff)
        if not fields:
            return
        resource = _plain(body)
        if sr.is_fixable(resource.get("status")):
            _reconcile(resource, memo, logger, rerun=True)  # a failed or refused job, fixed and re-applied
            return
        message = rc.spec_change_ignored(fields)
        meta = resource["metadata"]
        memo.kube.update_status(meta["namespace"], meta["name"], lambda res: cnd.reconciled(
            res.get("status"), res["metadata"].get("generation"), now(),
            synced=("False", cnd.SPEC_CHANGE_IGNORED, message)))
        _post(rc.ref_of(resource), [("Warning", cnd.SPEC_CHANGE_IGNORED, message)], logger)


# --------------------------------------------------------------------------------- child watching


def pytorchjob_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, logger: logging.Logger,
                     **_: Any) -> None:
    _child_event(PYTORCHJOB_KIND, event, body, memo, logger)


def trainjob_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, logger: logging.Logger,
                   **_: Any) -> None:
    _child_event(TRAINJOB_KIND, event, body, memo, logger)


_CHILD_WATCHES = {
    "pytorchjob": ((PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, PYTORCHJOB_PLURAL), pytorchjob_event),
    "trainjob": ((TRAINJOB_GROUP, TRAINJOB_VERSION, TRAINJOB_PLURAL), trainjob_event),
}
_WATCHED: set[str] = set()


def watch_children(job_api: str) -> None:
    """Register the watch of the chosen job API's children (once). Called at import with the environment's
    setting (`kopf run -m qwen_operator.handlers`) and by `qwen-operator` with its flags, before kopf starts."""
    child_kind(job_api)  # validates
    if job_api in _WATCHED:
        return
    (group, version, plural), fn = _CHILD_WATCHES[job_api]
    kopf.on.event(group, version, plural, labels={LABEL_MANAGED_BY: MANAGED_BY}, id=fn.__name__)(fn)
    _WATCHED.add(job_api)


def _child_event(kind: str, event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, logger: logging.Logger) -> None:
    with observe("child-status"):
        child = _view(body)
        child.setdefault("kind", kind)
        owner = rc.owner_of(child)
        if owner is None:
            return
        ns, child_name = child["metadata"]["namespace"], child["metadata"]["name"]
        target = rc.resource_ref(ns, owner["name"], owner["uid"])
        kube: Kube = memo.kube
        if event.get("type") == "DELETED":
            _, decision = _write(kube, ns, owner["name"],
                                 lambda res: mirror.child_deleted_decision(res, owner["uid"], child, now()))
            _post(target, decision.events)
            return
        if mirror.nothing_to_mirror(child):
            return
        jobset = kube.get_jobset(ns, child_name) if kind == TRAINJOB_KIND and mirror.needs_jobset(child) else None
        _, decision = _write(kube, ns, owner["name"], lambda res: mirror.child_changed_decision(
            res, owner["uid"], child, now(), jobset=jobset, default_runtime=CONFIG.trainjob_runtime))
        _post(target, decision.events, logger)
        if decision.advance:  # the step succeeded and another follows: start it now
            latest = kube.get_job(ns, owner["name"])
            if latest is not None:
                _reconcile(latest, memo, logger)


@kopf.on.event("", "v1", "pods", labels={LABEL_MANAGED_BY: MANAGED_BY})
def pod_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """Failed pod runs (exit code, reason, the trainer's termination message) and running replacements. Most pod
    events change nothing here and cost no API call: a running pod is only looked at when the cached resource is
    Restarting."""
    pod = _view(body)
    failure = pods.pod_failure(pod)
    kube: Optional[Kube] = getattr(memo, "kube", None)
    where = mirror.resource_of_pod(pod)
    if kube is None or where is None:
        return
    ns, name = where
    if not mirror.pod_worth_reading(pod, failure, kube.cache.get((ns, name))):
        return
    with observe("pod-status"):
        # A TrainJob's pods follow its JobSet's failure policy (from the runtime), read once per failed pod.
        jobset_policy = pods.jobset_run_policy(kube.get_jobset(ns, pods.pod_job_name(pod))) \
            if failure is not None and pods.JOBSET_NAME_LABEL in ((pod.get("metadata") or {}).get("labels") or {}) \
            else None
        written, decision = _write(kube, ns, name,
                                   lambda res: mirror.pod_decision(res, pod, failure, now(), jobset_policy))
        if written is None:
            return
        uid = ((kube.cache.get((ns, name)) or {}).get("metadata") or {}).get("uid", "")
        _post(rc.resource_ref(ns, name, uid), decision.events)
        if failure is not None and decision.events:
            logger.warning("pod %s failed: %s", failure["pod"], decision.events[0][2])


def workload_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, logger: logging.Logger,
                   **_: Any) -> None:
    """Kueue's Workload of one of our child jobs: why the child waits (the `Queued` condition), and when it is
    admitted. Workloads name only the child (owner reference); the child names the resource."""
    workload = _view(body)
    ref = kueue_status.workload_owner(workload)
    kube: Optional[Kube] = getattr(memo, "kube", None)
    if ref is None or kube is None or ref.get("kind") != child_kind(CONFIG.job_api):
        return
    if event.get("type") == "DELETED":
        kube.owners.pop(str(ref.get("uid", "")), None)
        return
    ns, child = workload["metadata"].get("namespace", ""), ref.get("name", "")
    owner = kube.owner_of_child(ref["kind"], ns, child, str(ref.get("uid", "")))
    if owner is None:
        return
    name, uid = owner
    by_uid = kueue_status.preemptor_job_uid(workload)
    by = kube.owner_of_child_uid(ref["kind"], ns, by_uid) if by_uid else None
    with observe("workload-status"):
        _, decision = _write(kube, ns, name, lambda res: mirror.workload_decision(
            res, uid, child, workload, now(), preemptor=by[0] if by else None))
        _post(rc.resource_ref(ns, name, uid), decision.events)


kopf.on.event(kueue_status.WORKLOAD_GROUP, kueue_status.WORKLOAD_VERSION, kueue_status.WORKLOAD_PLURAL, id="workload_event")(workload_event)


@kopf.on.event(GROUP, VERSION, PLURAL)
def job_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """Keeps the jobs-by-phase gauge and the body cache used as the first guess of status writes."""
    obj = event.get("object") or {}
    meta = obj.get("metadata") or {}
    tracker: Optional[PhaseTracker] = getattr(memo, "phases", None)
    kube: Optional[Kube] = getattr(memo, "kube", None)
    if tracker is None or kube is None or not meta.get("name"):
        return
    if event.get("type") == "DELETED":
        tracker.forget(meta.get("namespace", ""), meta["name"])
        kube.forget(meta.get("namespace", ""), meta["name"])
    else:
        tracker.set(meta.get("namespace", ""), meta["name"], (obj.get("status") or {}).get("phase"))
        kube.remember(obj)


watch_children(CONFIG.job_api)

__all__ = ["CONFIG", "apply_settings", "reconcile", "pytorchjob_event", "trainjob_event", "workload_event",
           "watch_children",
           "suspend_changed", "spec_changed", "PYTORCHJOB_KIND"]
