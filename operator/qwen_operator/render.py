"""Render a QwenTrainingJob into the objects that run it: a ConfigMap with the resolved job spec and a
Kubeflow PyTorchJob (job API `pytorchjob`, the default) or a Kubeflow Trainer v2 TrainJob (job API `trainjob`).

Everything here is a pure function of the resource: no API calls, no clock, no randomness, so the operator,
`qwenctl render` and the tests all see the same objects, and rendering twice gives equal output.

Layout of the PyTorchJob:

* one pod per node: a `Master` (node rank 0) plus `nodes - 1` `Worker`s, container `pytorch`;
* `spec.nprocPerNode` is the integer number of processes per pod, so the training-operator's injected
  `WORLD_SIZE` is the total process count and `PET_NPROC_PER_NODE` agrees with the command line;
* the container runs `torchrun` with the rendezvous taken from the variables the training-operator injects
  (`PET_NNODES`, `PET_NODE_RANK`, `PET_MASTER_ADDR`, `PET_MASTER_PORT`), expanded by the kubelet through
  `$(VAR)` references, and then `python -m qwen_trainer run --spec /etc/qwen/job.yaml`.

Layout of the TrainJob (trainer.kubeflow.org/v1alpha1, Trainer v2.3.0):

* `spec.runtimeRef` names the ClusterTrainingRuntime the chart ships (`qwen-torch-distributed`): torch
  distributed, the project's image, container `node`, and the same torchrun command line with
  `--nproc-per-node=$(PET_NPROC_PER_NODE)` (Trainer v2 injects the same PET_* variables);
* `spec.trainer` sets the image, `numNodes`, `numProcPerNode`, `resourcesPerNode` and the environment;
* one `spec.runtimePatches` entry (manager `training.qwen.dev/qwen-operator`) patches the `node` replicated
  job's pod template: the job-spec ConfigMap volume, shared memory, the spec's volumes and their mounts,
  labels, node selection, tolerations, affinity, ServiceAccount and image pull secrets.

Kueue: `spec.scheduling.queueName` (else the resource's own `kueue.x-k8s.io/queue-name` label) becomes the
child's `kueue.x-k8s.io/queue-name` label, `spec.scheduling.workloadPriorityClassName` (else the resource's
`kueue.x-k8s.io/priority-class` label) its `kueue.x-k8s.io/priority-class` label, and a queued child is created
suspended so that Kueue admits it.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Optional

import yaml

from qwen_trainer.spec import JobSpec, Problem, SpecError, derive

from .api import API_VERSION, GROUP, KIND, QwenTrainingJobSpec, validate_resource_spec
from .api.pipeline import is_pipeline, pipeline_steps

PYTORCHJOB_GROUP = "kubeflow.org"
PYTORCHJOB_VERSION = "v1"
PYTORCHJOB_API_VERSION = f"{PYTORCHJOB_GROUP}/{PYTORCHJOB_VERSION}"
PYTORCHJOB_KIND = "PyTorchJob"
PYTORCHJOB_PLURAL = "pytorchjobs"
CONTAINER_NAME = "pytorch"  # the training-operator requires this name
PORT_NAME = "pytorchjob-port"
DEFAULT_PORT = 23456  # the training-operator's default; rendered explicitly so defaulting changes nothing

SPEC_DIR = "/etc/qwen"
SPEC_FILE = "job.yaml"
SPEC_PATH = f"{SPEC_DIR}/{SPEC_FILE}"
SPEC_VOLUME = "qwen-job-spec"
SHM_VOLUME = "qwen-dshm"
RESERVED_VOLUMES = (SPEC_VOLUME, SHM_VOLUME)

MANAGED_BY = "qwen-operator"
APP_NAME = "qwen-training-job"
LABEL_JOB = f"{GROUP}/job"
LABEL_STAGE = f"{GROUP}/stage"
LABEL_STEP = f"{GROUP}/step"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"

# Job APIs the operator can render (operator setting `--job-api` / chart value `jobApi`).
JOB_API_PYTORCHJOB = "pytorchjob"
JOB_API_TRAINJOB = "trainjob"
JOB_APIS = (JOB_API_PYTORCHJOB, JOB_API_TRAINJOB)

# Kubeflow Trainer v2 (v2.3.0 API).
TRAINJOB_GROUP = "trainer.kubeflow.org"
TRAINJOB_VERSION = "v1alpha1"
TRAINJOB_API_VERSION = f"{TRAINJOB_GROUP}/{TRAINJOB_VERSION}"
TRAINJOB_KIND = "TrainJob"
TRAINJOB_PLURAL = "trainjobs"
CLUSTER_RUNTIME_KIND = "ClusterTrainingRuntime"
DEFAULT_RUNTIME = "qwen-torch-distributed"  # the chart's ClusterTrainingRuntime
TRAINJOB_NODE = "node"  # the runtime's replicated job and container name (Trainer v2's convention)
RUNTIME_PATCH_MANAGER = f"{GROUP}/qwen-operator"
CHILD_KINDS = (PYTORCHJOB_KIND, TRAINJOB_KIND)
# Hash of what was rendered (suspend excluded): tells a changed resource spec apart from a hand-edited child.
HASH_ANNOTATION = f"{GROUP}/rendered-hash"

GANG_SCHEDULER_NAMES = {"volcano": "volcano", "scheduler-plugins": "scheduler-plugins-scheduler"}

# PyTorchJob names must be DNS-1035 labels (the training-operator's webhook), and pod and Service names
# append `-worker-<index>`; 45 characters leave room for that suffix (the CRD enforces it on the resource).
MAX_CHILD_NAME = 45
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


# ----------------------------------------------------------------------------------------------- names


def child_name(name: str) -> str:
    """The PyTorchJob's name: the resource's own name when it is a valid short DNS-1035 label, otherwise a
    deterministic sanitised form with a hash suffix so distinct names never collide."""
    if len(name) <= MAX_CHILD_NAME and _DNS1035.match(name):
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    base = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    if not base or not base[0].isalpha():
        base = "q-" + base
    base = base[: MAX_CHILD_NAME - len(digest) - 1].rstrip("-")
    return f"{base}-{digest}"


def configmap_name(name: str) -> str:
    return f"{child_name(name)}-spec"


def common_labels(name: str, stage: str) -> dict[str, str]:
    instance = child_name(name)  # label values are limited to 63 characters of [A-Za-z0-9._-]
    return {
        "app.kubernetes.io/name": APP_NAME,
        "app.kubernetes.io/instance": instance,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_JOB: instance,
        LABEL_STAGE: stage,
    }


def owner_reference(resource: dict[str, Any]) -> Optional[dict[str, Any]]:
    meta = resource.get("metadata") or {}
    if not meta.get("uid"):
        return None  # rendered offline (qwenctl render without a cluster)
    return {
        "apiVersion": resource.get("apiVersion", API_VERSION),
        "kind": resource.get("kind", KIND),
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(resource: dict[str, Any], name: str, labels: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": labels}
    namespace = (resource.get("metadata") or {}).get("namespace")
    if namespace:
        meta["namespace"] = namespace
    owner = owner_reference(resource)
    if owner:
        meta["ownerReferences"] = [owner]
    return meta


# ------------------------------------------------------------------------------------------- job spec


def job_document(spec: QwenTrainingJobSpec) -> dict[str, Any]:
    """What the trainer reads from /etc/qwen/job.yaml."""
    job: JobSpec = spec.job_spec()
    world = spec.world_size()
    return {"spec": job.to_wire(), "derived": derive(job, world).to_dict(), "worldSize": world}


def job_yaml(spec: QwenTrainingJobSpec) -> str:
    return yaml.safe_dump(job_document(spec), sort_keys=True, width=120)


def render_configmap(resource: dict[str, Any], spec: QwenTrainingJobSpec, base: Optional[str] = None) -> dict[str, Any]:
    name = resource["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(resource, configmap_name(base or name), common_labels(name, spec.stage)),
        "data": {SPEC_FILE: job_yaml(spec)},
    }


# ------------------------------------------------------------------------------------------ container


def torchrun_command(processes_per_node: int) -> list[str]:
    return [
        "torchrun",
        "--nnodes=$(PET_NNODES)",
        "--node-rank=$(PET_NODE_RANK)",
        f"--nproc-per-node={processes_per_node}",
        "--master-addr=$(PET_MASTER_ADDR)",
        "--master-port=$(PET_MASTER_PORT)",
        "-m",
        "qwen_trainer",
        "run",
        "--spec",
        SPEC_PATH,
    ]


def _env(resource: dict[str, Any], spec: QwenTrainingJobSpec) -> list[dict[str, Any]]:
    meta = resource["metadata"]
    namespace = meta.get("namespace", "default")
    ours: list[dict[str, Any]] = [
        {"name": "CUDA_DEVICE_MAX_CONNECTIONS", "value": "1"},
        {"name": "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "value": "true"},
        {"name": "QWEN_DIST_TIMEOUT_SECONDS", "value": str(spec.nccl.timeout_seconds)},
        {"name": "QWEN_STATUS_RESOURCE", "value": f"{namespace}/{meta['name']}"},
        {"name": "QWEN_JOB_SPEC", "value": SPEC_PATH},
    ]
    n = spec.nccl
    if n.debug is not None:
        ours.append({"name": "NCCL_DEBUG", "value": n.debug})
    if n.socket_ifname is not None:
        ours.append({"name": "NCCL_SOCKET_IFNAME", "value": n.socket_ifname})
    if n.ib_disable is not None:
        ours.append({"name": "NCCL_IB_DISABLE", "value": "1" if n.ib_disable else "0"})
    if n.ib_hca is not None:
        ours.append({"name": "NCCL_IB_HCA", "value": n.ib_hca})
    for key in sorted(n.extra):
        ours.append({"name": key, "value": n.extra[key]})
    user = []
    for e in spec.env:
        item: dict[str, Any] = {"name": e.name}
        if e.value_from is not None:
            item["valueFrom"] = e.value_from
        else:
            item["value"] = e.value if e.value is not None else ""
        user.append(item)
    overridden = {e["name"] for e in user}
    # A user's variable replaces ours of the same name instead of shadowing it (duplicates draw API warnings).
    return [e for e in ours if e["name"] not in overridden] + user


def _resources(spec: QwenTrainingJobSpec) -> dict[str, Any]:
    r = spec.resources
    limits: dict[str, Any] = {}
    requests: dict[str, Any] = {}
    if r.gpus_per_node > 0:
        limits["nvidia.com/gpu"] = r.gpus_per_node
    if r.cpu is not None:
        limits["cpu"] = requests["cpu"] = r.cpu
    if r.memory is not None:
        limits["memory"] = requests["memory"] = r.memory
    out: dict[str, Any] = {}
    if limits:
        out["limits"] = limits
    if requests:
        out["requests"] = requests
    return out


def _check_volumes(spec: QwenTrainingJobSpec) -> None:
    problems = []
    seen: set[str] = set()
    for i, v in enumerate(spec.volumes):
        if v.name in RESERVED_VOLUMES:
            problems.append(Problem(f"spec.volumes[{i}].name", f"{v.name!r} is reserved by the operator"))
        if v.name in seen:
            problems.append(Problem(f"spec.volumes[{i}].name", f"duplicate volume name {v.name!r}"))
        seen.add(v.name)
        if v.mount_path in (SPEC_DIR, "/dev/shm"):
            problems.append(Problem(f"spec.volumes[{i}].mountPath", f"{v.mount_path} is used by the operator"))
    if problems:
        raise SpecError(problems)


def _volumes(spec: QwenTrainingJobSpec, cm_name: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [
        {"name": SPEC_VOLUME, "configMap": {"name": cm_name, "items": [{"key": SPEC_FILE, "path": SPEC_FILE}]}},
        {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shared_memory}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": SPEC_VOLUME, "mountPath": SPEC_DIR, "readOnly": True},
        {"name": SHM_VOLUME, "mountPath": "/dev/shm"},
    ]
    for v in spec.volumes:
        claim: dict[str, Any] = {"claimName": v.claim_name}
        if v.read_only:
            claim["readOnly"] = True
        volumes.append({"name": v.name, "persistentVolumeClaim": claim})
        mount: dict[str, Any] = {"name": v.name, "mountPath": v.mount_path}
        if v.read_only:
            mount["readOnly"] = True
        if v.sub_path:
            mount["subPath"] = v.sub_path
        mounts.append(mount)
    return volumes, mounts


def pod_template(resource: dict[str, Any], spec: QwenTrainingJobSpec, base: Optional[str] = None,
                 service_account: Optional[str] = None) -> dict[str, Any]:
    name = resource["metadata"]["name"]
    volumes, mounts = _volumes(spec, configmap_name(base or name))
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": spec.image.name,
        "imagePullPolicy": spec.image.pull_policy,
        "command": torchrun_command(spec.resources.processes()),
        "env": _env(resource, spec),
        "ports": [{"name": PORT_NAME, "containerPort": DEFAULT_PORT, "protocol": "TCP"}],
        "volumeMounts": mounts,
        # The trainer writes its error lines to /dev/termination-log; a crash without them leaves the log's tail.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    resources = _resources(spec)
    if resources:
        container["resources"] = resources
    pod: dict[str, Any] = {"containers": [container], "volumes": volumes}
    s = spec.scheduling
    if s.node_selector:
        pod["nodeSelector"] = dict(s.node_selector)
    if s.tolerations:
        pod["tolerations"] = [t.to_wire() for t in s.tolerations]
    if s.affinity:
        pod["affinity"] = s.affinity
    if s.priority_class_name:
        pod["priorityClassName"] = s.priority_class_name
    if s.gang.enabled:
        pod["schedulerName"] = GANG_SCHEDULER_NAMES[s.gang.scheduler]
    if spec.service_account_name or service_account:
        # The spec's own, else the operator's trainer ServiceAccount (which may report progress).
        pod["serviceAccountName"] = spec.service_account_name or service_account
    if spec.image.pull_secrets:
        pod["imagePullSecrets"] = [{"name": n} for n in spec.image.pull_secrets]
    return {"metadata": {"labels": common_labels(name, spec.stage)}, "spec": pod}


# ------------------------------------------------------------------------------------------ PyTorchJob


def run_policy(spec: QwenTrainingJobSpec) -> dict[str, Any]:
    rp = spec.run_policy
    out: dict[str, Any] = {
        "backoffLimit": rp.backoff_limit,
        "cleanPodPolicy": rp.clean_pod_policy,
        "suspend": spec.suspend,
    }
    if rp.active_deadline_seconds is not None:
        out["activeDeadlineSeconds"] = rp.active_deadline_seconds
    if rp.ttl_seconds_after_finished is not None:
        out["ttlSecondsAfterFinished"] = rp.ttl_seconds_after_finished
    gang = spec.scheduling.gang
    if gang.enabled:
        policy: dict[str, Any] = {"minAvailable": spec.resources.nodes}
        if gang.schedule_timeout_seconds is not None:
            policy["scheduleTimeoutSeconds"] = gang.schedule_timeout_seconds
        if spec.scheduling.priority_class_name:
            policy["priorityClass"] = spec.scheduling.priority_class_name
        out["schedulingPolicy"] = policy
    return out


def render_pytorchjob(resource: dict[str, Any], spec: QwenTrainingJobSpec, base: Optional[str] = None,
                      service_account: Optional[str] = None) -> dict[str, Any]:
    name = resource["metadata"]["name"]
    labels = {**common_labels(name, spec.stage), **kueue_labels(resource, spec)}
    template = pod_template(resource, spec, base, service_account)
    replica = {"replicas": 1, "restartPolicy": spec.run_policy.restart_policy, "template": template}
    replicas: dict[str, Any] = {"Master": replica}
    if spec.resources.nodes > 1:
        # Worker replicas must be >= 1 (the webhook rejects 0), so a one-node job has no Worker spec at all.
        replicas["Worker"] = {**replica, "replicas": spec.resources.nodes - 1}
    body = {
        "apiVersion": PYTORCHJOB_API_VERSION,
        "kind": PYTORCHJOB_KIND,
        "metadata": _metadata(resource, child_name(base or name), labels),
        "spec": {
            "nprocPerNode": str(spec.resources.processes()),
            "runPolicy": {**run_policy(spec), "suspend": initially_suspended(resource, spec)},
            "pytorchReplicaSpecs": replicas,
        },
    }
    return body


# ------------------------------------------------------------------------------------------------ Kueue


def kueue_labels(resource: dict[str, Any], spec: QwenTrainingJobSpec) -> dict[str, str]:
    """The Kueue labels of the child: queue and workload priority class, from the spec, else from the
    resource's own labels of the same names."""
    own = (resource.get("metadata") or {}).get("labels") or {}
    out: dict[str, str] = {}
    queue = spec.scheduling.queue_name or own.get(KUEUE_QUEUE_LABEL)
    if queue:
        out[KUEUE_QUEUE_LABEL] = str(queue)
    priority = spec.scheduling.workload_priority_class_name or own.get(KUEUE_PRIORITY_LABEL)
    if priority:
        out[KUEUE_PRIORITY_LABEL] = str(priority)
    return out


def queue_of(resource: dict[str, Any], spec: QwenTrainingJobSpec, where: str = "spec") -> Optional[tuple[str, str]]:
    """(Kueue queue name, the field that names it) of a step, or None without a queue."""
    if spec.scheduling.queue_name:
        shared = ((resource.get("spec") or {}).get("scheduling") or {}).get("queueName")
        # A pipeline step inherits the resource's scheduling unless it sets its own.
        return str(spec.scheduling.queue_name), ("spec" if shared == spec.scheduling.queue_name else where) + \
            ".scheduling.queueName"
    own = ((resource.get("metadata") or {}).get("labels") or {}).get(KUEUE_QUEUE_LABEL)
    if own:
        return str(own), f"metadata.labels[{KUEUE_QUEUE_LABEL}]"
    return None


def initially_suspended(resource: dict[str, Any], spec: QwenTrainingJobSpec) -> bool:
    """Whether the child is created suspended: the user asked for it, or a Kueue queue admits it."""
    return bool(spec.suspend or KUEUE_QUEUE_LABEL in kueue_labels(resource, spec))


# -------------------------------------------------------------------------------------------- TrainJob


def _check_trainjob(spec: QwenTrainingJobSpec, where: str) -> None:
    """Settings a TrainJob cannot carry (Trainer v2.3.0 lets a TrainJob patch only some pod fields; the rest
    belongs to the runtime)."""
    problems = []
    s = spec.scheduling
    if s.gang.enabled:
        problems.append(Problem(f"{where}.scheduling.gang.enabled", "gang scheduling with the trainjob job API is "
                                "configured on the ClusterTrainingRuntime (podGroupPolicy), not per job"))
    if s.priority_class_name:
        problems.append(Problem(f"{where}.scheduling.priorityClassName", "a TrainJob cannot set the pods' "
                                "PriorityClass; use scheduling.workloadPriorityClassName with Kueue"))
    if problems:
        raise SpecError(problems)


def _trainjob_pod_patch(resource: dict[str, Any], spec: QwenTrainingJobSpec, base: Optional[str],
                        service_account: Optional[str]) -> dict[str, Any]:
    name = resource["metadata"]["name"]
    volumes, mounts = _volumes(spec, configmap_name(base or name))
    pod: dict[str, Any] = {"volumes": volumes, "containers": [{"name": TRAINJOB_NODE, "volumeMounts": mounts}]}
    s = spec.scheduling
    if s.node_selector:
        pod["nodeSelector"] = dict(s.node_selector)
    if s.tolerations:
        pod["tolerations"] = [t.to_wire() for t in s.tolerations]
    if s.affinity:
        pod["affinity"] = s.affinity
    if spec.service_account_name or service_account:
        pod["serviceAccountName"] = spec.service_account_name or service_account
    if spec.image.pull_secrets:
        pod["imagePullSecrets"] = [{"name": n} for n in spec.image.pull_secrets]
    return {"metadata": {"labels": common_labels(name, spec.stage)}, "spec": pod}


def render_trainjob(resource: dict[str, Any], spec: QwenTrainingJobSpec, base: Optional[str] = None,
                    service_account: Optional[str] = None, runtime: str = DEFAULT_RUNTIME) -> dict[str, Any]:
    """A Kubeflow Trainer v2 TrainJob running the trainer on the ClusterTrainingRuntime `runtime`."""
    name = resource["metadata"]["name"]
    labels = {**common_labels(name, spec.stage), **kueue_labels(resource, spec)}
    trainer: dict[str, Any] = {
        "image": spec.image.name,
        "numNodes": spec.resources.nodes,
        "numProcPerNode": spec.resources.processes(),
        "env": _env(resource, spec),
    }
    resources = _resources(spec)
    if resources:
        trainer["resourcesPerNode"] = resources
    patch = {
        "manager": RUNTIME_PATCH_MANAGER,
        "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [{
            "name": TRAINJOB_NODE,
            "template": {"spec": {"template": _trainjob_pod_patch(resource, spec, base, service_account)}},
        }]}}},
    }
    body: dict[str, Any] = {
        "apiVersion": TRAINJOB_API_VERSION,
        "kind": TRAINJOB_KIND,
        "metadata": _metadata(resource, child_name(base or name), labels),
        "spec": {
            "runtimeRef": {"name": runtime, "apiGroup": TRAINJOB_GROUP, "kind": CLUSTER_RUNTIME_KIND},
            "trainer": trainer,
            "runtimePatches": [patch],
            "suspend": initially_suspended(resource, spec),
        },
    }
    if spec.run_policy.active_deadline_seconds is not None:
        body["spec"]["activeDeadlineSeconds"] = spec.run_policy.active_deadline_seconds
    return body


def child_suspend_patch(kind: str, suspend: bool) -> dict[str, Any]:
    """The merge patch that suspends or resumes a child of `kind`."""
    if kind == TRAINJOB_KIND:
        return {"spec": {"suspend": suspend}}
    return {"spec": {"runPolicy": {"suspend": suspend}}}


def child_kind(job_api: str) -> str:
    if job_api not in JOB_APIS:
        raise ValueError(f"unknown job API {job_api!r}; expected one of {', '.join(JOB_APIS)}")
    return TRAINJOB_KIND if job_api == JOB_API_TRAINJOB else PYTORCHJOB_KIND


# ------------------------------------------------------------------------------------------------ all


def rendered_hash(obj: dict[str, Any]) -> str:
    """A stable digest of what we render for a child, leaving out `runPolicy.suspend` / the TrainJob's
    `spec.suspend` (which Kueue and the user's spec.suspend both move)."""
    if obj.get("kind") == PYTORCHJOB_KIND:
        content = json.loads(json.dumps(obj["spec"]))
        content.get("runPolicy", {}).pop("suspend", None)
    elif obj.get("kind") == TRAINJOB_KIND:
        content = json.loads(json.dumps(obj["spec"]))
        content.pop("suspend", None)
    else:
        content = obj.get("data", {})
    blob = json.dumps({"labels": obj["metadata"].get("labels", {}), "content": content}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _finish(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for obj in objs:
        obj["metadata"]["annotations"] = {HASH_ANNOTATION: rendered_hash(obj)}
    return objs


def step_base(name: str, step: Optional[str], attempt: int) -> str:
    """Name stem of a step's children: the resource's own name for a single stage, `<name>-<step>` in a
    pipeline, with `-r<attempt>` once a failed step is rerun after a fix (the failed child is kept)."""
    stem = name if step is None else f"{name}-{step}"
    return stem if attempt == 0 else f"{stem}-r{attempt}"


def steps(resource: dict[str, Any]) -> list[tuple[Optional[str], str, dict[str, Any]]]:
    """(step name or None for a single stage, stage, effective single-stage spec) of a resource.
    Raises SpecError naming every problem."""
    if not isinstance(resource, dict) or not (resource.get("metadata") or {}).get("name"):
        raise SpecError([Problem("metadata.name", "required field is missing")])
    data = resource.get("spec")
    if is_pipeline(data):
        return [(name, effective["stage"], effective) for name, effective, _ in pipeline_steps(data)]
    spec = validate_resource_spec(data, prefix="spec")
    return [(None, spec.stage, data)]


def render_step(resource: dict[str, Any], index: int = 0, attempt: int = 0, service_account: Optional[str] = None,
                job_api: str = JOB_API_PYTORCHJOB, runtime: str = DEFAULT_RUNTIME,
                ) -> tuple[QwenTrainingJobSpec, list[dict[str, Any]]]:
    """The validated spec and [ConfigMap, child job] of one step (index 0 of a single-stage job); the child is a
    PyTorchJob or, with `job_api="trainjob"`, a TrainJob on the ClusterTrainingRuntime `runtime`.
    `service_account` is the pods' ServiceAccount when the spec names none (the operator's trainer account)."""
    kind = child_kind(job_api)
    all_steps = steps(resource)
    step, _, data = all_steps[index]
    where = "spec" if step is None else f"spec.pipeline[{index}]"
    spec = validate_resource_spec(data, prefix=where)
    _check_volumes(spec)
    base = step_base(resource["metadata"]["name"], step, attempt)
    if kind == TRAINJOB_KIND:
        _check_trainjob(spec, where)
        child = render_trainjob(resource, spec, base, service_account, runtime)
    else:
        child = render_pytorchjob(resource, spec, base, service_account)
    objs = [render_configmap(resource, spec, base), child]
    if step is not None:
        for obj in objs:
            obj["metadata"]["labels"][LABEL_STEP] = step
    return spec, _finish(objs)


def render_with_spec(resource: dict[str, Any]) -> tuple[QwenTrainingJobSpec, list[dict[str, Any]]]:
    """The validated spec and [ConfigMap, PyTorchJob] of a single-stage job (see `render`)."""
    return render_step(resource, 0, 0)


def render(resource: dict[str, Any], job_api: str = JOB_API_PYTORCHJOB, runtime: str = DEFAULT_RUNTIME
           ) -> list[dict[str, Any]]:
    """[ConfigMap, PyTorchJob] (or [ConfigMap, TrainJob] with `job_api="trainjob"`) for a QwenTrainingJob resource
    (a dict as read from the API or a YAML file); for a pipeline, those of every step in order (as each would be
    created, first attempt).

    Raises `qwen_trainer.spec.SpecError` (one problem per broken rule, each naming its field) if the spec is invalid.
    """
    count = len(steps(resource))
    return [obj for i in range(count) for obj in render_step(resource, i, 0, job_api=job_api, runtime=runtime)[1]]
