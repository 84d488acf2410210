"""Operator configuration from command-line flags and environment variables (flags win).

| flag | environment | default |
|---|---|---|
| `-n/--namespace NS` (repeatable, or comma-separated) | `QWEN_OPERATOR_NAMESPACES=a,b` | all namespaces |
| `-A/--all-namespaces` | `QWEN_OPERATOR_NAMESPACES=*` | |
| `--liveness URL` | `QWEN_OPERATOR_LIVENESS` | `http://0.0.0.0:8080/healthz` |
| `--metrics-port N` (0 turns it off) | `QWEN_OPERATOR_METRICS_PORT` | 9090 |
| `--metrics-host H` | `QWEN_OPERATOR_METRICS_HOST` | `0.0.0.0` |
| `--peering NAME` | `QWEN_OPERATOR_PEERING` | none: kopf's auto-detection |
| `--standalone` | `QWEN_OPERATOR_STANDALONE=true` | false |
| `--priority N` | `QWEN_OPERATOR_PRIORITY` | random when peering is on |
| `--peering-lifetime S` | `QWEN_OPERATOR_PEERING_LIFETIME` | 60 (seconds a silent peer counts as alive) |
| `--workers N` | `QWEN_OPERATOR_WORKERS` | 64 |
| `--trainer-service-account NAME` ('' turns it off) | `QWEN_OPERATOR_TRAINER_SERVICE_ACCOUNT` | `qwen-trainer` (used where it exists) |
| `--job-api pytorchjob|trainjob` | `QWEN_OPERATOR_JOB_API` | `pytorchjob` (Kubeflow training-operator v1); `trainjob`: Kubeflow Trainer v2 |
| `--trainjob-runtime NAME` | `QWEN_OPERATOR_TRAINJOB_RUNTIME` | `qwen-torch-distributed` (the chart's ClusterTrainingRuntime) |
| `--gpu-memory-gib N` (0: only cards named by `nvidia.com/gpu.product` in a spec's nodeSelector) | `QWEN_OPERATOR_GPU_MEMORY_GIB` | 79 (an 80 GB H100/A100), the card the MemoryFits condition assumes |
| `--log-format json|plain` | `QWEN_OPERATOR_LOG_FORMAT` | json |
| `--verbose`, `--debug` | `QWEN_OPERATOR_LOG_LEVEL=debug` | info |
"""

from __future__ import annotations

import argparse
import os
import random
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

JOB_APIS = ("pytorchjob", "trainjob")  # kept equal to render.JOB_APIS (this module imports nothing heavy)
DEFAULT_TRAINJOB_RUNTIME = "qwen-torch-distributed"


def _bool(value: Optional[str]) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class OperatorConfig:
    namespaces: list[str] = field(default_factory=list)  # empty: all namespaces
    liveness: Optional[str] = "http://0.0.0.0:8080/healthz"
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9090
    peering: Optional[str] = None
    standalone: bool = False
    priority: Optional[int] = None
    peering_lifetime: int = 60
    # Handlers are synchronous and spend their time waiting on the API server; with 16 threads a burst queued
    # inside the operator (p50/p99 create -> PyTorchJob 3.7-4.2 / 6.4-6.8 s at 100 jobs), with 64 each job is
    # in flight as soon as it arrives (2.0-2.1 / 3.4-3.8 s) for about 15 MiB more memory.
    workers: int = 64
    # The pods' ServiceAccount when a spec names none, in namespaces where it exists (the chart creates it with
    # the Role that lets rank 0 report progress).
    trainer_service_account: Optional[str] = "qwen-trainer"
    # Which child job to render: a Kubeflow PyTorchJob or a Kubeflow Trainer v2 TrainJob on `trainjob_runtime`.
    job_api: str = "pytorchjob"
    trainjob_runtime: str = DEFAULT_TRAINJOB_RUNTIME
    # Memory of the cluster's usual GPU, for the MemoryFits condition where a spec names no card.
    gpu_memory_gib: Optional[float] = 79.0
    log_format: str = "json"
    verbose: bool = False
    debug: bool = False

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces

    @property
    def explicit_namespaces(self) -> bool:
        """Namespaces given by exact name (no globs), so kopf need not scan namespaces."""
        return bool(self.namespaces) and not any(set(ns) & set("*?[]!") for ns in self.namespaces)

    def effective_priority(self) -> int:
        # Equal priorities freeze all kopf peers, so replicas pick distinct random ones unless told otherwise.
        if self.priority is None:
            self.priority = random.SystemRandom().randint(1, 2**31 - 1)
        return self.priority

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "OperatorConfig":
        cfg = cls()
        ns = env.get("QWEN_OPERATOR_NAMESPACES", "").strip()
        if ns and ns != "*":
            cfg.namespaces = [n.strip() for n in ns.split(",") if n.strip()]
        if "QWEN_OPERATOR_LIVENESS" in env:
            cfg.liveness = env["QWEN_OPERATOR_LIVENESS"] or None
        if env.get("QWEN_OPERATOR_METRICS_PORT"):
            cfg.metrics_port = int(env["QWEN_OPERATOR_METRICS_PORT"])
        if env.get("QWEN_OPERATOR_METRICS_HOST"):
            cfg.metrics_host = env["QWEN_OPERATOR_METRICS_HOST"]
        cfg.peering = env.get("QWEN_OPERATOR_PEERING") or None
        cfg.standalone = _bool(env.get("QWEN_OPERATOR_STANDALONE"))
        if env.get("QWEN_OPERATOR_PRIORITY"):
            cfg.priority = int(env["QWEN_OPERATOR_PRIORITY"])
        if env.get("QWEN_OPERATOR_PEERING_LIFETIME"):
            cfg.peering_lifetime = int(env["QWEN_OPERATOR_PEERING_LIFETIME"])
        if env.get("QWEN_OPERATOR_WORKERS"):
            cfg.workers = int(env["QWEN_OPERATOR_WORKERS"])
        if "QWEN_OPERATOR_TRAINER_SERVICE_ACCOUNT" in env:
            cfg.trainer_service_account = env["QWEN_OPERATOR_TRAINER_SERVICE_ACCOUNT"] or None
        if env.get("QWEN_OPERATOR_JOB_API"):
            cfg.job_api = _job_api(env["QWEN_OPERATOR_JOB_API"])
        if env.get("QWEN_OPERATOR_TRAINJOB_RUNTIME"):
            cfg.trainjob_runtime = env["QWEN_OPERATOR_TRAINJOB_RUNTIME"]
        if env.get("QWEN_OPERATOR_GPU_MEMORY_GIB"):
            cfg.gpu_memory_gib = float(env["QWEN_OPERATOR_GPU_MEMORY_GIB"]) or None
        if env.get("QWEN_OPERATOR_LOG_FORMAT"):
            cfg.log_format = env["QWEN_OPERATOR_LOG_FORMAT"]
        level = env.get("QWEN_OPERATOR_LOG_LEVEL", "").lower()
        cfg.debug = level == "debug"
        return cfg


def _job_api(value: str) -> str:
    value = value.strip().lower()
    if value not in JOB_APIS:
        raise ValueError(f"QWEN_OPERATOR_JOB_API={value!r}: expected one of {', '.join(JOB_APIS)}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen-operator", description="Reconcile QwenTrainingJobs into Kubeflow PyTorchJobs or TrainJobs.")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=None, metavar="NS",
                       help="watch this namespace (repeatable, or comma-separated); default: all")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch all namespaces")
    p.add_argument("--liveness", default=None, metavar="URL", help="kopf liveness endpoint ('' turns it off)")
    p.add_argument("--metrics-port", type=int, default=None, help="port of /metrics and /readyz (0 turns it off)")
    p.add_argument("--metrics-host", default=None)
    peer = p.add_mutually_exclusive_group()
    peer.add_argument("--peering", default=None, metavar="NAME", help="kopf peering object (makes peering mandatory)")
    peer.add_argument("--standalone", action="store_true", default=None, help="no peering: the only replica")
    p.add_argument("--priority", type=int, default=None, help="peering priority (default: random)")
    p.add_argument("--peering-lifetime", type=int, default=None, help="seconds until a silent peer is presumed dead")
    p.add_argument("--workers", type=int, default=None, help="threads for handlers and API calls")
    p.add_argument("--trainer-service-account", default=None, metavar="NAME",
                   help="the pods' ServiceAccount when a spec names none, where it exists ('' turns it off)")
    p.add_argument("--job-api", choices=list(JOB_APIS), default=None,
                   help="child job API: pytorchjob (Kubeflow training-operator) or trainjob (Kubeflow Trainer v2)")
    p.add_argument("--trainjob-runtime", default=None, metavar="NAME",
                   help="ClusterTrainingRuntime the TrainJobs reference (job API trainjob)")
    p.add_argument("--gpu-memory-gib", type=float, default=None, metavar="N",
                   help="GiB of the cluster's usual GPU, for the MemoryFits condition (0: only cards named in specs)")
    p.add_argument("--log-format", choices=["json", "plain", "full"], default=None)
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--debug", action="store_true")
    return p


def from_args(argv: Optional[Sequence[str]] = None, env: Mapping[str, str] = os.environ) -> OperatorConfig:
    args = parser().parse_args(argv)
    cfg = OperatorConfig.from_env(env)
    if args.all_namespaces:
        cfg.namespaces = []
    elif args.namespace:
        cfg.namespaces = [n.strip() for item in args.namespace for n in item.split(",") if n.strip()]
    if args.liveness is not None:
        cfg.liveness = args.liveness or None
    if args.metrics_port is not None:
        cfg.metrics_port = args.metrics_port
    if args.metrics_host is not None:
        cfg.metrics_host = args.metrics_host
    if args.peering is not None:
        cfg.peering, cfg.standalone = args.peering, False
    if args.standalone:
        cfg.standalone, cfg.peering = True, None
    if args.priority is not None:
        cfg.priority = args.priority
    if args.peering_lifetime is not None:
        cfg.peering_lifetime = args.peering_lifetime
    if args.workers is not None:
        cfg.workers = args.workers
    if args.trainer_service_account is not None:
        cfg.trainer_service_account = args.trainer_service_account or None
    if args.job_api is not None:
        cfg.job_api = args.job_api
    if args.trainjob_runtime is not None:
        cfg.trainjob_runtime = args.trainjob_runtime
    if args.gpu_memory_gib is not None:
        cfg.gpu_memory_gib = args.gpu_memory_gib or None
    if args.log_format is not None:
        cfg.log_format = args.log_format
    cfg.verbose = cfg.verbose or args.verbose
    cfg.debug = cfg.debug or args.debug
    return cfg
