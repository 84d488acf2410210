"""Kubernetes placement of a job: image, pods, volumes, scheduling, run policy. Nothing here reaches the trainer."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field

from qwen_trainer.spec.base import AbsolutePath, PositiveInt, SpecModel

QUANTITY = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DEFAULT_IMAGE = "ghcr.io/qwen-k8s/trainer-gpu:0.1.0"


class Image(SpecModel):
    """Container image the training pods run."""

    name: str = Field(default=DEFAULT_IMAGE, min_length=1, max_length=512)
    """Image reference (registry/repository:tag or @digest)."""
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    """Kubernetes imagePullPolicy."""
    pull_secrets: list[str] = Field(default_factory=list, max_length=16)
    """Names of Secrets used to pull the image."""


class Resources(SpecModel):
    """Pods, GPUs and host resources. Each node runs one pod; the first is the Master, the rest Workers."""

    nodes: PositiveInt = 1
    """Number of pods (one per node)."""
    gpus_per_node: int = Field(default=8, ge=0, le=64)
    """nvidia.com/gpu limit per pod (0 for CPU-only pods)."""
    processes_per_node: Optional[PositiveInt] = None
    """torchrun processes per pod; defaults to gpusPerNode (1 when gpusPerNode is 0)."""
    cpu: Optional[str] = Field(default=None, pattern=QUANTITY, max_length=64)
    """CPU request and limit per pod."""
    memory: Optional[str] = Field(default=None, pattern=QUANTITY, max_length=64)
    """Memory request and limit per pod."""
    shared_memory: str = Field(default="16Gi", pattern=QUANTITY, max_length=64)
    """Size of the in-memory /dev/shm volume (data loaders and NCCL need more than the 64Mi default)."""

    def processes(self) -> int:
        if self.processes_per_node is not None:
            return self.processes_per_node
        return self.gpus_per_node or 1


class VolumeMount(SpecModel):
    """A PersistentVolumeClaim mounted into every pod (datasets, checkpoints)."""

    name: str = Field(pattern=DNS_LABEL, max_length=63)
    """Volume name inside the pod."""
    claim_name: str = Field(min_length=1, max_length=253)
    """PersistentVolumeClaim to mount."""
    mount_path: AbsolutePath
    """Where the claim appears in the container."""
    read_only: bool = False
    """Mount read-only."""
    sub_path: Optional[str] = Field(default=None, max_length=1024)
    """Mount only this sub-directory of the claim."""


class EnvVar(SpecModel):
    """An environment variable for the trainer container."""

    name: str = Field(pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$", max_length=256)
    """Variable name."""
    value: Optional[str] = Field(default=None, max_length=32768)
    """Literal value."""
    value_from: Optional[dict[str, Any]] = None
    """A Kubernetes EnvVarSource (secretKeyRef, configMapKeyRef, fieldRef, resourceFieldRef)."""


class Toleration(SpecModel):
    """A Kubernetes toleration."""

    key: Optional[str] = Field(default=None, max_length=316)
    """Taint key."""
    operator: Literal["Exists", "Equal"] = "Equal"
    """Exists or Equal."""
    value: Optional[str] = Field(default=None, max_length=63)
    """Taint value (Equal)."""
    effect: Optional[Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]] = None
    """Taint effect to tolerate (all when unset)."""
    toleration_seconds: Optional[int] = None
    """How long a NoExecute taint is tolerated."""


class Gang(SpecModel):
    """Gang scheduling through Volcano or the scheduler-plugins coscheduling plugin."""

    enabled: bool = False
    """Schedule all pods together or none."""
    scheduler: Literal["volcano", "scheduler-plugins"] = "volcano"
    """Which gang scheduler the training-operator was started with."""
    schedule_timeout_seconds: Optional[PositiveInt] = None
    """Give up waiting for the whole gang after this long."""


class Scheduling(SpecModel):
    """Where and in which queue the pods run."""

    node_selector: dict[str, str] = Field(default_factory=dict, max_length=32)
    """Node labels the pods require."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    """Taints the pods tolerate (GPU nodes are often tainted)."""
    affinity: Optional[dict[str, Any]] = None
    """A Kubernetes Affinity object, passed through unchanged."""
    priority_class_name: Optional[str] = Field(default=None, max_length=253)
    """PriorityClass of the pods."""
    queue_name: Optional[str] = Field(default=None, max_length=63)
    """Kueue LocalQueue; set as the kueue.x-k8s.io/queue-name label on the child job (PyTorchJob or TrainJob),
    which is then created suspended for Kueue to admit. The resource's own kueue.x-k8s.io/queue-name label is
    used when this is unset."""
    workload_priority_class_name: Optional[str] = Field(default=None, max_length=253)
    """Kueue WorkloadPriorityClass; set as the kueue.x-k8s.io/priority-class label on the child job. The
    resource's own kueue.x-k8s.io/priority-class label is used when this is unset."""
    gang: Gang = Field(default_factory=Gang)
    """Gang scheduling."""


class RunPolicy(SpecModel):
    """Restart and cleanup policy, passed to the PyTorchJob's runPolicy."""

    backoff_limit: int = Field(default=3, ge=0)
    """Pod restarts before the job is marked Failed."""
    restart_policy: Literal["OnFailure", "Never", "ExitCode"] = "OnFailure"
    """Replica restart policy; ExitCode restarts only on retryable exit codes (128-255)."""
    active_deadline_seconds: Optional[PositiveInt] = None
    """Fail the job after it has run this long."""
    ttl_seconds_after_finished: Optional[int] = Field(default=None, ge=0)
    """Delete the PyTorchJob's pods this long after it finishes."""
    clean_pod_policy: Literal["None", "Running", "All"] = "None"
    """Which pods to delete when the job finishes."""


class Nccl(SpecModel):
    """NCCL and torch.distributed settings, written as environment variables."""

    debug: Optional[Literal["VERSION", "WARN", "INFO", "TRACE"]] = None
    """NCCL_DEBUG."""
    socket_ifname: Optional[str] = Field(default=None, max_length=256)
    """NCCL_SOCKET_IFNAME (interfaces for bootstrap and socket transport)."""
    ib_disable: Optional[bool] = None
    """NCCL_IB_DISABLE."""
    ib_hca: Optional[str] = Field(default=None, max_length=256)
    """NCCL_IB_HCA (InfiniBand adapters to use)."""
    timeout_seconds: PositiveInt = 1800
    """Collective timeout in seconds, passed to the trainer as QWEN_DIST_TIMEOUT_SECONDS."""
    extra: dict[str, str] = Field(default_factory=dict, max_length=64)
    """Further NCCL_* variables."""
