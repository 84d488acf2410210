"""kopf handlers: read, call the pure functions in `render` and `status`, write. Importable on its own for
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
from typing import Any, Optional

import kopf
from kubernetes.client.exceptions import ApiException

from qwen_trainer.spec import SpecError, derive

from . import step_records as sr
from . import conditions as cnd
from .api import GROUP, KIND, PLURAL, VERSION
from .api.devices import memory_fit
from .api.pipeline import is_pipeline
from .config import OperatorConfig
from .drift import child_drift
from .kube import CHILD_RESOURCES, Kube
from .metrics import CHILDREN_CREATED, PhaseTracker, Readiness, observe, start_server
from .render import CHILD_KINDS, HASH_ANNOTATION, LABEL_MANAGED_BY, MANAGED_BY, PYTORCHJOB_KIND, TRAINJOB_GROUP, \
    TRAINJOB_KIND, TRAINJOB_PLURAL, TRAINJOB_VERSION, child_kind, queue_of, render_step, steps

FINALIZER = "training.qwen.dev/finalizer"  # declared for completeness; no handler here needs a finalizer
ANNOTATION_PREFIX = "training.qwen.dev"

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


def _controller(obj: dict[str, Any]) -> Optional[dict[str, Any]]:
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return ref
    return None


def _owner_of(child: dict[str, Any]) -> Optional[dict[str, Any]]:
    ref = _controller(child)
    if ref and ref.get("kind") == KIND and str(ref.get("apiVersion", "")).startswith(GROUP + "/"):
        return ref
    return None


def _ref(body: dict[str, Any]) -> dict[str, Any]:
    meta = body["metadata"]
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
            "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"]}}


def _drift_state(desired: dict[str, Any], live: dict[str, Any]) -> Optional[tuple[str, str]]:
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


# ------------------------------------------------------------------------------------ create/resume


@kopf.on.resume(GROUP, VERSION, PLURAL, id="reconcile-resume")
@kopf.on.create(GROUP, VERSION, PLURAL, id="reconcile", retries=20, backoff=5)
def reconcile(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, retry: int = 0, **_: Any) -> None:
    with observe("reconcile"):
        _reconcile(_plain(body), memo, logger, retry=retry)


def _step_records(body: dict[str, Any]) -> list[dict[str, Any]]:
    """status.stages for the resource's steps (raises SpecError for an invalid spec)."""
    return sr.init_stages((body.get("status") or {}).get("stages"),
                          [(step or stage, stage) for step, stage, _ in steps(body)])


def _refused(kube: Kube, err: ApiException, child: dict[str, Any]) -> Optional[tuple[str, str]]:
    """(reason, message) when the API server refused the child job itself (see status.child_refused)."""
    kind = child["kind"]
    served = True
    if err.status == 404:
        group, version, plural = CHILD_RESOURCES[kind]
        served = kube.api_served(group, version, plural, ttl=0)
    return cnd.child_refused(kind, child["metadata"]["name"], err.status or 0, err.body, api_served=served,
                            runtime=((child.get("spec") or {}).get("runtimeRef") or {}).get("name", ""),
                            job_api_setting=CONFIG.job_api)


def _refusal_delay(retry: int) -> float:
    """Seconds until a refused child is tried again: 10 s, doubling up to 5 minutes (the missing API or runtime
    may be installed meanwhile)."""
    return float(min(10 * 2 ** max(retry, 0), 300))


def _queue_condition(kube: Kube, resource: dict[str, Any], spec: Any, index: int, pipeline: bool,
                     child: dict[str, Any]) -> Optional[tuple[str, str, str]]:
    """The first `Queued` condition of a child with a Kueue queue (None without a queue)."""
    source = queue_of(resource, spec, f"spec.pipeline[{index}]" if pipeline else "spec")
    if source is None:
        return None
    queue, field = source
    kind, name = child["kind"], child["metadata"]["name"]
    if not kube.api_served(cnd.WORKLOAD_GROUP, cnd.WORKLOAD_VERSION, cnd.WORKLOAD_PLURAL):
        return cnd.kueue_not_installed(kind, name, queue, field)
    return cnd.queue_pending(kind, name, queue, field)


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

    try:
        records = _step_records(body)
        if rerun:
            previous = kube.update_status(ns, name, lambda res: sr.rerun(
                res.get("status") or {}, _step_records(res), res["metadata"].get("generation"))) or previous
            records = sr.init_stages(previous.get("stages"), [(r["name"], r["stage"]) for r in records])
            logger.info("spec fixed after %s: running again from %s", "failure", previous.get("currentStage"))
        index = sr.current_index(records)
        if index is None:
            return  # every step has succeeded
        account = kube.service_account(ns, CONFIG.trainer_service_account)
        spec, (cm, pj) = render_step(body, index, int(records[index].get("attempt") or 0), account,
                                     job_api=CONFIG.job_api, runtime=CONFIG.trainjob_runtime)
    except SpecError as err:
        problems = [str(p) for p in err.problems]
        kube.update_status(ns, name, lambda res: cnd.invalid(res.get("status"), problems,
                                                              res["metadata"].get("generation"), now()), body=body)
        kopf.warn(_ref(body), reason=cnd.INVALID_SPEC, message="; ".join(problems)[:1024])
        logger.warning("invalid spec, nothing created: %s", "; ".join(problems))
        return

    derived = derive(spec.job_spec(), spec.world_size()).to_dict()
    synced: tuple[str, str, str] = ("True", cnd.IN_SYNC, "")
    created: list[str] = []
    warnings: list[tuple[str, str]] = []
    memory = memory_fit(spec, CONFIG.gpu_memory_gib)
    if memory[0] == "False" and (cnd.get_condition(previous, cnd.MEMORY_FITS) or {}).get("status") != "False":
        warnings.append(memory[1:])  # once, when the estimate first misses

    # A child job this resource already created and that is gone now was deleted by someone: do not rerun it.
    if previous.get("pytorchJob") == pj["metadata"]["name"] and kube.get_child(pj) is None:
        kube.update_status(ns, name, lambda res: cnd.child_deleted(res.get("status"), res["metadata"].get("generation"),
                                                                  now(), pj["metadata"]["name"], kind=pj["kind"]))
        kopf.warn(_ref(body), reason=cnd.CHILD_DELETED, message=f"{pj['kind']} {pj['metadata']['name']} was deleted")
        return

    for desired in (cm, pj):  # ConfigMap first: the pods mount it
        try:
            live, was_created = kube.create_or_get(desired)
        except ApiException as err:
            refused = _refused(kube, err, desired) if desired is pj else None
            if refused is None:
                raise
            reason, message = refused
            before = (cnd.get_condition(previous, "Created") or {}).get("reason")
            kube.update_status(ns, name, lambda res: cnd.not_created(res.get("status"), reason, message,
                                                                     res["metadata"].get("generation"), now()))
            if before != reason:  # one Warning Event per cause, not one per retry
                kopf.warn(_ref(body), reason=reason, message=message[:1024])
            raise kopf.TemporaryError(message, delay=_refusal_delay(retry))
        kind, child = desired["kind"], desired["metadata"]["name"]
        if was_created:
            created.append(f"{kind} {child}")
            CHILDREN_CREATED.labels(kind).inc()
            failpoint(f"after-{kind.lower()}")
            continue
        owner = _controller(live)
        if owner is None or owner.get("uid") != meta["uid"]:
            if owner is not None and owner.get("kind") == KIND:
                # Left over from an earlier resource of the same name; the garbage collector removes it soon.
                raise kopf.TemporaryError(f"{kind} {child} still belongs to an earlier {KIND} {owner.get('uid')}",
                                          delay=2)
            message = f"{kind} {child} exists and is not owned by this {KIND}; it is left alone"
            synced = ("False", cnd.NAME_CONFLICT, message)
            warnings.append((cnd.NAME_CONFLICT, message))
            break
        drift = _drift_state(desired, live)
        if drift is not None and synced[0] == "True":
            synced = ("False", drift[0], drift[1])
            warnings.append(drift)

    pj_name = pj["metadata"]["name"] if synced[1] != cnd.NAME_CONFLICT else None
    queue = _queue_condition(kube, body, spec, index, is_pipeline(body.get("spec")), pj) if pj_name else None
    if queue is not None and queue[1] == cnd.KUEUE_NOT_INSTALLED and \
            (cnd.get_condition(previous, cnd.QUEUED) or {}).get("reason") != cnd.KUEUE_NOT_INSTALLED:
        warnings.append((cnd.KUEUE_NOT_INSTALLED, queue[2]))

    def written(res: dict[str, Any]) -> dict[str, Any]:
        status = cnd.reconciled(res.get("status"), res["metadata"].get("generation"), now(), pytorch_job=pj_name,
                               config_map=cm["metadata"]["name"], derived=derived, synced=synced, memory=memory)
        if queue is not None:
            status = cnd.queued(status, queue, res["metadata"].get("generation"), now(), initial=True) or status
        return sr.started(status, sr.init_stages(status.get("stages"), [(r["name"], r["stage"]) for r in records]),
                          index, pj_name, now())

    kube.update_status(ns, name, written)
    if created:
        logger.info("created %s", ", ".join(created))
        if any(c.startswith(kind) for c in created for kind in CHILD_KINDS):
            # One Normal Event per created child job, posted by kopf's background poster.
            kopf.event(_ref(body), type="Normal", reason="Created", message=", ".join(created))
    for reason, message in warnings:
        kopf.warn(_ref(body), reason=reason, message=message[:1024])
        logger.warning(message)
    if synced[1] == cnd.NAME_CONFLICT:
        raise kopf.TemporaryError(synced[2], delay=30)


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
        fields = sorted({".".join(str(p) for p in d[1]) for d in diff
                         if len(d[1]) >= 1 and d[1][0] == "spec" and tuple(d[1][:2]) != ("spec", "suspend")})
        if not fields:
            return
        resource = _plain(body)
        if sr.is_fixable(resource.get("status")):
            _reconcile(resource, memo, logger, rerun=True)  # a failed or refused job, fixed and re-applied
            return
        message = ("only spec.suspend may change after creation; ignored changes to " + ", ".join(fields))
        meta = resource["metadata"]
        memo.kube.update_status(meta["namespace"], meta["name"], lambda res: cnd.reconciled(
            res.get("status"), res["metadata"].get("generation"), now(),
            synced=("False", cnd.SPEC_CHANGE_IGNORED, message)))
        kopf.warn(_ref(resource), reason=cnd.SPEC_CHANGE_IGNORED, message=message[:1024])
        logger.warning(message)


# --------------------------------------------------------------------------------- child watching


def pytorchjob_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, logger: logging.Logger,
                     **_: Any) -> None:
    _child_event(PYTORCHJOB_KIND, event, body, memo, logger)


def trainjob_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, logger: logging.Logger,
                   **_: Any) -> None:
    _child_event(TRAINJOB_KIND, event, body, memo, logger)


_CHILD_WATCHES = {
    "pytorchjob": (("kubeflow.org", "v1", "pytorchjobs"), pytorchjob_event),
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


def _child_status(kind: str, child: dict[str, Any], previous: Optional[dict[str, Any]], generation: Optional[int],
                  kube: Kube, ns: str) -> dict[str, Any]:
    if kind == TRAINJOB_KIND:
        jobset = kube.get_jobset(ns, child["metadata"]["name"]) if _needs_jobset(child) else None
        return cnd.from_trainjob(child, previous, generation, now(), jobset=jobset, run_policy=_run_policy(child),
                                namespace=ns)
    return cnd.from_child(child.get("status"), previous, generation, now(), run_policy=_run_policy(child), namespace=ns)


def _needs_jobset(trainjob: dict[str, Any]) -> bool:
    """The JobSet is read only for what the TrainJob does not say: restarts while no node Job is ready."""
    status = trainjob.get("status") or {}
    finished = any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
                   for c in status.get("conditions") or [])
    ready = sum(int(j.get("ready") or 0) for j in status.get("jobsStatus") or [])
    return not finished and ready == 0 and bool(status.get("jobsStatus"))


def _child_event(kind: str, event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, logger: logging.Logger) -> None:
    with observe("child-status"):
        child = _view(body)
        owner = _owner_of(child)
        if owner is None:
            return
        ns, child_name = child["metadata"]["namespace"], child["metadata"]["name"]
        kube: Kube = memo.kube

        def ours(res: dict[str, Any]) -> bool:
            return res["metadata"].get("uid") == owner.get("uid") and not res["metadata"].get("deletionTimestamp")

        if event.get("type") == "DELETED":
            def on_delete(res: dict[str, Any]) -> Optional[dict[str, Any]]:
                if not ours(res) or (res.get("status") or {}).get("pytorchJob") != child_name:
                    return None
                return cnd.child_deleted(res.get("status"), res["metadata"].get("generation"), now(), child_name,
                                        kind=kind)
            written = kube.update_status(ns, owner["name"], on_delete)
            if written is not None and written.get("phase") == "Failed" and \
                    (cnd.get_condition(written, "Failed") or {}).get("reason") == cnd.CHILD_DELETED:
                kopf.warn({"apiVersion": owner["apiVersion"], "kind": KIND,
                           "metadata": {"name": owner["name"], "namespace": ns, "uid": owner["uid"]}},
                          reason=cnd.CHILD_DELETED, message=f"{kind} {child_name} was deleted before it finished")
            return

        child_status = child.get("status") or {}
        if not child_status.get("conditions") and not child_status.get("jobsStatus") and \
                (child["metadata"].get("generation") or 1) <= 1:
            # A child its controller has not acted on yet: nothing to mirror. The handler that created
            # it writes the status (with its name) right after creating it, so writing here would only race that
            # write (a 409 and a re-read, or a second patch).
            return

        warning: list[tuple[str, str]] = []
        transitions: list[tuple[str, dict[str, Any]]] = []

        advanced: list[bool] = []

        def on_change(res: dict[str, Any]) -> Optional[dict[str, Any]]:
            if not ours(res):
                return None
            current = (res.get("status") or {}).get("pytorchJob")
            if current and current != child_name:
                return None  # an earlier step's (or attempt's) PyTorchJob: it no longer drives the status
            new = _child_status(kind, child, res.get("status"), res["metadata"].get("generation"), kube, ns)
            before = (res.get("status") or {}).get("phase")
            if new.get("phase") != before and new.get("phase") in ("Running", "Succeeded", "Failed"):
                transitions[:] = [(new["phase"], new)]
            new.setdefault("pytorchJob", child_name)  # the child exists, whichever handler writes first
            records = new.get("stages") or []
            index = next((i for i, r in enumerate(records) if r.get("pytorchJob") == child_name),
                         sr.current_index(records))
            if index is not None and records:
                new, moved = sr.observed(new, index, now())
                advanced[:] = [moved]
                if moved:
                    return new
            # A spec change of the child after creation (generation > 1): check it still matches the rendering.
            if (child["metadata"].get("generation") or 1) > 1 and not cnd.is_terminal(new):
                try:
                    attempt = int(records[index].get("attempt") or 0) if index is not None and records else 0
                    desired = render_step(res, index or 0, attempt, _live_service_account(child),
                                          job_api="trainjob" if kind == TRAINJOB_KIND else "pytorchjob",
                                          runtime=((child.get("spec") or {}).get("runtimeRef") or {}).get("name")
                                          or CONFIG.trainjob_runtime)[1][1]
                except SpecError:
                    return new
                drift = _drift_state(desired, child)
                synced = cnd.get_condition(new, cnd.SYNCED) or {}
                if drift is not None and synced.get("reason") != drift[0]:
                    new = cnd.reconciled(new, res["metadata"].get("generation"), now(),
                                        synced=("False", drift[0], drift[1]))
                    warning[:] = [drift]
                elif drift is None and synced.get("reason") in (cnd.CHILD_MODIFIED,):
                    new = cnd.reconciled(new, res["metadata"].get("generation"), now())
            return new

        written = kube.update_status(ns, owner["name"], on_change)
        if written is not None and transitions and written.get("phase") == transitions[0][0]:
            _post_phase(owner, ns, child_name, written, kind)
        if advanced and advanced[0]:  # the step succeeded and another follows: start it now
            latest = kube.get_job(ns, owner["name"])
            if latest is not None:
                _reconcile(latest, memo, logger)
        for reason, message in warning:
            kopf.warn({"apiVersion": owner["apiVersion"], "kind": KIND,
                       "metadata": {"name": owner["name"], "namespace": ns, "uid": owner["uid"]}},
                      reason=reason, message=message[:1024])
            logger.warning(message)


def _live_service_account(child: dict[str, Any]) -> Optional[str]:
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


def _run_policy(child: dict[str, Any]) -> dict[str, Any]:
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


def _owner_ref(owner: dict[str, Any], ns: str) -> dict[str, Any]:
    return {"apiVersion": owner["apiVersion"], "kind": KIND,
            "metadata": {"name": owner["name"], "namespace": ns, "uid": owner["uid"]}}


def _post_phase(owner: dict[str, Any], ns: str, child_name: str, status: dict[str, Any],
                kind: str = PYTORCHJOB_KIND) -> None:
    """Normal Events for Running and Succeeded, a Warning with the failed pod's story for Failed."""
    phase = status.get("phase")
    if phase == "Failed":
        failed = cnd.get_condition(status, "Failed") or {}
        kopf.warn(_owner_ref(owner, ns), reason="Failed", message=(failed.get("message") or "")[:1024])
    elif phase == "Running":
        kopf.event(_owner_ref(owner, ns), type="Normal", reason="Running", message=f"{kind} {child_name} is running")
    elif phase == "Succeeded":
        took = f" in {status['duration']}" if status.get("duration") else ""
        kopf.event(_owner_ref(owner, ns), type="Normal", reason="Succeeded", message=f"{kind} {child_name} succeeded{took}")


def _resource_of(pod: dict[str, Any]) -> Optional[tuple[str, str]]:
    """(namespace, name) of the QwenTrainingJob a pod runs for: rendered into its QWEN_STATUS_RESOURCE."""
    for c in (pod.get("spec") or {}).get("containers") or []:
        for e in c.get("env") or []:
            if e.get("name") == "QWEN_STATUS_RESOURCE" and "/" in str(e.get("value") or ""):
                ns, name = str(e["value"]).split("/", 1)
                return ns, name
    return None


@kopf.on.event("", "v1", "pods", labels={LABEL_MANAGED_BY: MANAGED_BY})
def pod_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """Failed pod runs (exit code, reason, the trainer's termination message) and running replacements. Most pod
    events change nothing here and cost no API call: a running pod is only looked at when the cached resource is
    Restarting."""
    pod = _view(body)
    failure = cnd.pod_failure(pod)
    kube: Optional[Kube] = getattr(memo, "kube", None)
    where = _resource_of(pod)
    if kube is None or where is None:
        return
    ns, name = where
    job = cnd.pod_job_name(pod)
    if failure is None:
        cached = kube.cache.get((ns, name))
        if cached is None or not cnd.pending_restart(cached.get("status")):
            return
        if cnd.pod_running_again(pod, cached.get("status")) is None:
            return
    with observe("pod-status"):
        # A TrainJob's pods follow its JobSet's failure policy (from the runtime), read once per failed pod.
        jobset_policy = cnd.jobset_run_policy(kube.get_jobset(ns, job)) \
            if failure is not None and cnd.JOBSET_NAME_LABEL in ((pod.get("metadata") or {}).get("labels") or {}) \
            else None

        def ours(res: dict[str, Any]) -> bool:
            return (res.get("status") or {}).get("pytorchJob") == job and not res["metadata"].get("deletionTimestamp")

        def on_pod(res: dict[str, Any]) -> Optional[dict[str, Any]]:
            if not ours(res):
                return None
            gen = res["metadata"].get("generation")
            if failure is not None:
                policy = (res.get("spec") or {}).get("runPolicy") or {}
                policy = jobset_policy or {"restartPolicy": policy.get("restartPolicy", "OnFailure"),
                                           "cleanPodPolicy": policy.get("cleanPodPolicy", "None"),
                                           "backoffLimit": policy.get("backoffLimit", 3)}  # the spec's default
                return cnd.observe_pod_failure(res.get("status"), failure, policy, ns, gen, now())
            replica = cnd.pod_running_again(pod, res.get("status"))
            return cnd.observe_pod_running(res.get("status"), replica, gen, now()) if replica else None

        written = kube.update_status(ns, name, on_pod)
        if written is None:
            return
        spec_policy = jobset_policy or {"backoffLimit": 3, **(((kube.cache.get((ns, name)) or {}).get("spec") or {})
                                                              .get("runPolicy") or {})}
        ref = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
               "metadata": {"name": name, "namespace": ns, "uid": (kube.cache.get((ns, name)) or {})
                            .get("metadata", {}).get("uid", "")}}
        if failure is not None:
            message = cnd.describe_failure(failure, spec_policy, ns, len(written.get("failures") or [])) \
                if written.get("phase") != "Failed" else \
                (cnd.get_condition(written, "Failed") or {}).get("message", "")
            kopf.warn(ref, reason=cnd.POD_FAILED, message=message[:1024])
            logger.warning("pod %s failed: %s", failure["pod"], message)
        else:
            kopf.event(ref, type="Normal", reason="Restarted", message=(cnd.get_condition(written, "Restarting") or {}).get("message", ""))


def workload_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, logger: logging.Logger,
                   **_: Any) -> None:
    """Kueue's Workload of one of our child jobs: why the child waits (the `Queued` condition), and when it is
    admitted. Workloads name only the child (owner reference); the child names the resource."""
    workload = _view(body)
    ref = cnd.workload_owner(workload)
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
    by_uid = cnd.preemptor_job_uid(workload)
    by = kube.owner_of_child_uid(ref["kind"], ns, by_uid) if by_uid else None
    with observe("workload-status"):
        seen: list[Optional[dict[str, Any]]] = []

        def on_workload(res: dict[str, Any]) -> Optional[dict[str, Any]]:
            if res["metadata"].get("uid") != uid or res["metadata"].get("deletionTimestamp"):
                return None
            status = res.get("status") or {}
            current = status.get("pytorchJob")
            # An earlier step's (or attempt's) child no longer drives the status; the next step's child may show
            # up here before the handler that created it has written its name.
            if current and current != child and (not status.get("stages") or
                                                 any(r.get("pytorchJob") == child for r in status["stages"])):
                return None
            seen[:] = [cnd.get_condition(status, cnd.QUEUED)]
            return cnd.from_workload(status, workload, res["metadata"].get("generation"), now(),
                                    preemptor=by[0] if by else None)

        written = kube.update_status(ns, name, on_workload)
        if written is None:
            return
        new, old = cnd.get_condition(written, cnd.QUEUED) or {}, (seen[0] if seen else None) or {}
        target = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
                  "metadata": {"name": name, "namespace": ns, "uid": uid}}
        if new.get("status") == "False" and old.get("status") == "True":
            kopf.event(target, type="Normal", reason=cnd.ADMITTED, message=new.get("message", "")[:1024])
        elif new.get("status") == "True" and new.get("reason") != old.get("reason"):
            if new.get("reason") in (cnd.INADMISSIBLE, cnd.PREEMPTED):
                kopf.warn(target, reason=new["reason"], message=new.get("message", "")[:1024])
            elif new.get("reason") in (cnd.WAITING_FOR_QUOTA, cnd.EVICTED):
                kopf.event(target, type="Normal", reason=cnd.QUEUED, message=new.get("message", "")[:1024])


kopf.on.event(cnd.WORKLOAD_GROUP, cnd.WORKLOAD_VERSION, cnd.WORKLOAD_PLURAL, id="workload_event")(workload_event)


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
