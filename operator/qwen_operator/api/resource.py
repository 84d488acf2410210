"""The QwenTrainingJob custom resource: the trainer's job spec plus Kubernetes placement, and its status."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field

from qwen_trainer.spec import JobSpec, Problem, SpecError, Stage, semantic_problems
from qwen_trainer.spec.base import SpecModel
from qwen_trainer.spec.problems import parse

from .placement import EnvVar, Image, Nccl, Resources, RunPolicy, Scheduling, VolumeMount

from qwen_trainer.spec.resource_name import API_VERSION, GROUP, KIND, PLURAL, SHORT_NAMES, SINGULAR, VERSION  # noqa: F401

# Fields a user may change after creation; everything else is fixed once the job exists, because the
# PyTorchJob and the checkpoints on disk were made from it.
MUTABLE_FIELDS = ("suspend",)


class PipelineStep(SpecModel):
    """One stage of a pipeline: its name, its stage, and what it changes of the shared spec."""

    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=20)
    """Step name (a DNS label); part of the step's PyTorchJob name."""
    stage: Stage
    """convert, pretrain, finetune, export or evaluate."""
    training: Optional[dict[str, Any]] = None
    """Overrides of spec.training for this step."""
    data: Optional[dict[str, Any]] = None
    """Overrides of spec.data for this step."""
    checkpoint: Optional[dict[str, Any]] = None
    """This step's checkpoint.output, and checkpoint.source when it does not read the previous step's output."""
    evaluate: Optional[dict[str, Any]] = None
    """Overrides of spec.evaluate for this step."""
    parallelism: Optional[dict[str, Any]] = None
    """Overrides of spec.parallelism for this step."""
    resources: Optional[dict[str, Any]] = None
    """Overrides of spec.resources (e.g. conversion on CPU pods, training on GPU pods)."""
    image: Optional[dict[str, Any]] = None
    """Overrides of spec.image for this step."""


class QwenTrainingJobSpec(JobSpec):
    """A Qwen training stage, or a pipeline of stages, and where it runs."""

    stage: Optional[Stage] = None
    """The one stage to run: convert (HF -> Megatron format), pretrain, finetune (SFT), export (Megatron -> HF) or evaluate. Leave unset when spec.pipeline lists several."""
    pipeline: Optional[list[PipelineStep]] = Field(default=None, min_length=1, max_length=16)
    """Stages run in order, one PyTorchJob each, each step reading the previous step's output; the rest of the spec is shared by all steps."""

    image: Image = Field(default_factory=Image)
    """Trainer image."""
    resources: Resources = Field(default_factory=Resources)
    """Pods, GPUs and host resources."""
    volumes: list[VolumeMount] = Field(default_factory=list, max_length=16)
    """PersistentVolumeClaims mounted into every pod."""
    env: list[EnvVar] = Field(default_factory=list, max_length=64)
    """Extra environment variables for the trainer."""
    scheduling: Scheduling = Field(default_factory=Scheduling)
    """Node selection, tolerations, affinity, priority, Kueue queue, gang scheduling."""
    service_account_name: Optional[str] = Field(default=None, max_length=253)
    """ServiceAccount of the pods (needs the progress-reporter Role to patch status)."""
    suspend: bool = False
    """Create the PyTorchJob suspended, or suspend a running one (Kueue also sets this)."""
    run_policy: RunPolicy = Field(default_factory=RunPolicy)
    """Restart and cleanup policy."""
    nccl: Nccl = Field(default_factory=Nccl)
    """NCCL and distributed settings."""

    def world_size(self) -> int:
        return self.resources.nodes * self.resources.processes()

    def job_spec(self) -> JobSpec:
        """The part the trainer reads (single-stage specs; a pipeline's steps are specs of their own)."""
        if self.stage is None:
            raise ValueError("a pipeline has no single job spec; see qwen_operator.api.pipeline.pipeline_steps")
        return JobSpec.model_validate(self.model_dump(include=set(JobSpec.model_fields)))


class Condition(SpecModel):
    """A Kubernetes API convention condition."""

    type: str = Field(max_length=316)
    """Condition type."""
    status: Literal["True", "False", "Unknown"]
    """True, False or Unknown."""
    reason: str = Field(max_length=1024)
    """One-word CamelCase reason."""
    message: str = Field(default="", max_length=32768)
    """Human-readable detail."""
    last_transition_time: str
    """When the status last changed (RFC 3339)."""
    observed_generation: Optional[int] = None
    """The spec generation this condition was computed from."""


class ReplicaCounts(SpecModel):
    """Pod counts of one PyTorchJob replica type."""

    active: int = 0
    """Running pods."""
    succeeded: int = 0
    """Pods that finished successfully."""
    failed: int = 0
    """Pod runs that failed (including those the training-operator replaced)."""
    restarts: int = 0
    """Failed pods replaced by a running one."""


class PodFailure(SpecModel):
    """One failed run of a pod, as its container's termination state tells it."""

    replica: str
    """Replica type (Master, Worker; Node for a TrainJob)."""
    pod: str
    """Pod name."""
    container: str = ""
    """The failed container (pytorch for a PyTorchJob, node for a TrainJob)."""
    uid: str = ""
    """Pod uid."""
    run: int = 0
    """The container's restart count at that run."""
    exit_code: Optional[int] = None
    """The container's exit code."""
    reason: str = ""
    """Termination reason (Error, OOMKilled, ...)."""
    message: str = ""
    """Termination message: the trainer's last error lines."""
    time: str = ""
    """When it ended (RFC 3339)."""
    replaced: bool = False
    """A replacement pod has run since (or none will: the job failed)."""


class Progress(SpecModel):
    """Training progress reported by the trainer's rank 0."""

    iteration: Optional[int] = None
    """Last completed optimiser step."""
    train_iters: Optional[int] = None
    """Total steps."""
    loss: Optional[float] = None
    """Latest training loss."""
    tokens_per_second: Optional[float] = None
    """Throughput of the whole job."""
    mfu: Optional[float] = None
    """Model FLOPs utilisation of each GPU (0-1), where the card's peak is known."""
    percentage: Optional[float] = None
    """Completed steps as a percentage of the stage's steps."""
    elapsed_seconds: Optional[int] = None
    """Time this run of the stage has trained so far."""
    estimated_remaining_seconds: Optional[int] = None
    """The remaining steps at the mean time of this run's steps so far (checkpoints and evaluations included)."""
    checkpoint: Optional[str] = None
    """Newest complete checkpoint."""
    engine: Optional[str] = None
    """Engine that ran the stage (megatron or cpu)."""
    notes: Optional[list[str]] = None
    """What the spec asked for that the engine does not do on this hardware, and why (for example CUDA graphs
    under tensor parallelism)."""
    summary: Optional[str] = None
    """One-line progress for kubectl get."""
    updated: Optional[str] = None
    """When the trainer last reported (RFC 3339)."""


class StageStatus(SpecModel):
    """State of one pipeline step."""

    name: str
    """Step name."""
    stage: str
    """Its stage."""
    phase: str = "Pending"
    """Pending, Running, Succeeded or Failed."""
    pytorch_job: Optional[str] = None
    """Its PyTorchJob."""
    attempt: int = 0
    """How many times the step was restarted after a fix."""
    start_time: Optional[str] = None
    """When its PyTorchJob was created."""
    completion_time: Optional[str] = None
    """When it finished."""
    message: Optional[str] = None
    """The child's last message."""


class QwenTrainingJobStatus(SpecModel):
    """Observed state of the job."""

    phase: Optional[str] = None
    """Display summary for kubectl get: Pending, Created, Queued (held by Kueue), Running, Restarting, Suspended,
    Succeeded, Failed or Invalid."""
    observed_generation: Optional[int] = None
    """The spec generation the status reflects."""
    conditions: list[Condition] = Field(default_factory=list)
    """Conditions keyed by type."""
    pytorch_job: Optional[str] = None
    """Name of the child job: a PyTorchJob, or a TrainJob when the operator runs with the trainjob job API."""
    config_map: Optional[str] = None
    """Name of the ConfigMap holding the resolved job spec."""
    replicas: dict[str, ReplicaCounts] = Field(default_factory=dict)
    """Pod counts by replica type (Master, Worker)."""
    restarts: Optional[int] = None
    """Pod restarts of all replicas together."""
    failures: list[PodFailure] = Field(default_factory=list, max_length=8)
    """The latest failed pod runs (newest last): pod, exit code, reason and the trainer's error."""
    duration: Optional[str] = None
    """How long the PyTorchJob ran (set when it finished)."""
    start_time: Optional[str] = None
    """When the PyTorchJob started running."""
    completion_time: Optional[str] = None
    """When it finished."""
    derived: Optional[dict[str, Any]] = None
    """Values computed from the spec: iterations, world and data-parallel sizes, padded vocabulary."""
    progress: Optional[Progress] = None
    """Trainer-reported progress."""
    current_stage: Optional[str] = None
    """The stage (or pipeline step) running now, or the last one that ran."""
    stages: list[StageStatus] = Field(default_factory=list)
    """Per-step state of a pipeline, in order."""
    evaluation: Optional[dict[str, Any]] = None
    """Evaluate stage results: scores by task, a one-line summary and the results file."""


def placement_problems(spec: QwenTrainingJobSpec, prefix: str = "spec") -> list[Problem]:
    """Rules between the job and where it runs (the CRD carries the same rules in CEL)."""
    r = spec.resources
    missing = [name for name, value in (("cpu", r.cpu), ("memory", r.memory)) if value is None]
    if r.gpus_per_node == 0 and spec.stage in ("pretrain", "finetune") and missing:
        return [Problem(f"{prefix}.resources.{missing[0]}",
                        f"the {spec.stage} stage on CPU (gpusPerNode is 0) must request "
                        f"{' and '.join('resources.' + m for m in missing)}: without them the pods may land on a "
                        "node without room for the model")]
    return []


# The same rule in CEL, on the spec object (single-stage specs; a pipeline's steps are checked by the operator).
PLACEMENT_CEL = [{
    "rule": "!has(self.stage) || !(self.stage in ['pretrain', 'finetune']) || self.resources.gpusPerNode > 0 || "
            "(has(self.resources.cpu) && has(self.resources.memory))",
    "message": "spec.resources: training on CPU (gpusPerNode 0) must request resources.cpu and resources.memory",
    "fieldPath": ".resources",
    "reason": "FieldValueRequired",
}]


def validate_stage_spec(data: Any, prefix: str = "spec") -> QwenTrainingJobSpec:
    """Structural then semantic validation of a single-stage spec (a resource's, or one pipeline step's effective
    spec); raises SpecError naming fields under `prefix`. api.validation.validate_resource_spec takes pipelines."""
    spec = parse(QwenTrainingJobSpec, data, prefix)
    if spec.stage is None:
        raise SpecError([Problem(f"{prefix}.stage", "required field is missing (or list stages in spec.pipeline)")])
    problems: list[Problem] = semantic_problems(spec.job_spec(), spec.world_size(), prefix,
                                                gpus_per_node=spec.resources.gpus_per_node)
    problems += placement_problems(spec, prefix)
    if problems:
        raise SpecError(problems)
    return spec
