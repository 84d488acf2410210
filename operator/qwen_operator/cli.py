"""qwenctl: validate, render, explain and run QwenTrainingJob resources from a terminal.

Every command goes through the same code the operator uses, so what `qwenctl render` prints is what the
operator creates. User errors print one line per problem and exit 1; no traceback reaches the user unless
QWENCTL_DEBUG=1 asks for it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Iterator

import yaml

from qwen_trainer.spec import SpecError

from .api import API_VERSION, KIND, validate_resource_spec


class UsageError(Exception):
    """A problem with the command line or input files (not with a spec's fields)."""


def _documents(path: str) -> Iterator[tuple[int, Any]]:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        docs = list(yaml.safe_load_all(p.read_text()))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise UsageError(f"{path}:{where} is not valid YAML ({getattr(err, 'problem', err)})") from None
    for index, doc in enumerate(docs):
        if doc is not None:
            yield index, doc


def _resources(path: str) -> Iterator[tuple[str, dict]]:
    """QwenTrainingJob documents of a file, with a label for messages."""
    found = False
    for index, doc in _documents(path):
        if not isinstance(doc, dict) or doc.get("kind") != KIND:
            continue
        found = True
        name = (doc.get("metadata") or {}).get("name", f"document {index}")
        if doc.get("apiVersion") != API_VERSION:
            raise UsageError(f"{path}: {name}: apiVersion must be {API_VERSION} (got {doc.get('apiVersion')!r})")
        yield f"{path}: {name}", doc
    if not found:
        raise UsageError(f"{path}: no {KIND} document in the file")


def _validated(label: str, doc: dict):
    if "spec" not in doc:
        raise SpecError([_problem("spec", "required field is missing")])
    return validate_resource_spec(doc["spec"])


def _problem(path: str, message: str):
    from qwen_trainer.spec import Problem

    return Problem(path, message)


def cmd_validate(args) -> int:
    failed = 0
    for path in args.files:
        try:
            for label, doc in _resources(path):
                try:
                    _validated(label, doc)
                    print(f"{label}: valid")
                except SpecError as err:
                    failed += 1
                    for problem in err.problems:
                        print(f"{label}: {problem}", file=sys.stderr)
        except UsageError as err:
            failed += 1
            print(err, file=sys.stderr)
    return 1 if failed else 0


def _single(path: str) -> tuple[str, dict, Any]:
    resources = list(_resources(path))
    if len(resources) != 1:
        raise UsageError(f"{path}: expected exactly one {KIND}, found {len(resources)}")
    label, doc = resources[0]
    return label, doc, _validated(label, doc)


def cmd_render(args) -> int:
    from .render import render

    _, doc, _ = _single(args.file)
    doc = dict(doc)
    doc.setdefault("metadata", {}).setdefault("namespace", args.namespace)
    doc["metadata"].setdefault("uid", "00000000-0000-0000-0000-000000000000")
    print(yaml.safe_dump_all(render(doc, job_api=args.job_api, runtime=args.runtime), sort_keys=False, width=120),
          end="")
    return 0


def cmd_crd(args) -> int:
    from .api.crd import crd_yaml

    print(crd_yaml(), end="")
    return 0


def cmd_explain(args) -> int:
    _, doc, spec = _single(args.file)
    if spec.pipeline is not None:
        from .api.pipeline import pipeline_steps

        reports = {name: _explain_one(step) for name, _, step in pipeline_steps(doc["spec"])}
        report = {"pipeline": reports}
    else:
        report = _explain_one(spec)
    if args.output == "json":
        print(json.dumps(report, indent=2))
    else:
        print(yaml.safe_dump(report, sort_keys=False), end="")
    return 0


def _explain_one(spec) -> dict:
    from qwen_trainer.spec import derive, resolve_architecture
    from qwen_trainer.spec.estimate import checkpoint_size, flops_per_token
    from qwen_trainer.spec.resolve import job_memory_per_gpu

    job = spec.job_spec()
    world = spec.world_size()
    derived = derive(job, world)
    arch = resolve_architecture(job)
    p, t = job.parallelism, job.training
    memory = job_memory_per_gpu(job, world)
    report = {
        "derived": derived.to_dict(),
        "architecture": _camel(arch.to_dict()),
        "flopsPerToken": flops_per_token(arch, t.seq_length),
        "memoryPerGpuEstimate": _camel(memory.to_dict()),
        "memoryNote": "weights, gradients and Adam state exact; activations by formula; allocator overhead not included",
    }
    if job.stage in ("pretrain", "finetune"):
        reshardable = p.distributed_optimizer and job.checkpoint.reshardable_optimizer
        ckpt = checkpoint_size(arch, tensor=p.tensor, pipeline=p.pipeline, expert=p.expert, world=world,
                               save_optimizer=job.checkpoint.save_optimizer, reshardable_optimizer=reshardable)
        report["checkpointEstimate"] = _camel(ckpt.to_dict())
        report["checkpointNote"] = ("every rank writes its own shard (bf16 weights + fp32 main weights and Adam "
                                    "moments); perRankGib is also what a rank stages in host memory while saving")
        if reshardable and job.checkpoint.save_optimizer:
            report["checkpointNote"] += ("; checkpoint.reshardableOptimizer: the first data-parallel rank of each "
                                         "model-parallel group gathers that group's optimizer state in host memory "
                                         "and writes it (perRankGib is that rank's)")
    return report


def _camel(value):
    from pydantic.alias_generators import to_camel

    if isinstance(value, dict):
        return {to_camel(k): _camel(v) for k, v in value.items()}
    return value


def dev_cluster_moved(rest: list[str]) -> int:
    """The local control plane belongs to the development harness (tools/qwen_devcluster), not to qwenctl."""
    print(f"qwenctl dev-cluster moved to the development harness: run {shlex.join(['qwen-devcluster', *rest])}",
          file=sys.stderr)
    return 2


def cmd_run(args) -> int:
    from .local import run_local
    from .render import steps as pipeline_step_names

    _, doc, _ = _single(args.file)
    names = [name for name, _, _ in pipeline_step_names(doc)]
    if args.from_step is not None and names == [None]:
        raise UsageError("--from-step needs a resource with spec.pipeline; this one runs a single stage")
    if args.from_step is not None and args.from_step not in names:
        raise UsageError(f"--from-step {args.from_step}: the resource's steps are {', '.join(names)}")
    return run_local(doc, root=args.root, nproc=args.nproc, dry_run=args.dry_run,
                     first=names.index(args.from_step) if args.from_step else 0)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qwenctl", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate", help="check resources; one line per problem, exit 1 on any")
    v.add_argument("files", nargs="+")
    v.set_defaults(func=cmd_validate)

    r = sub.add_parser("render", help="print the objects the operator would create")
    r.add_argument("file")
    r.add_argument("--namespace", default="default")
    r.add_argument("--job-api", choices=["pytorchjob", "trainjob"], default="pytorchjob",
                   help="render a Kubeflow PyTorchJob (default) or a Kubeflow Trainer v2 TrainJob")
    r.add_argument("--runtime", default="qwen-torch-distributed",
                   help="ClusterTrainingRuntime a TrainJob references (--job-api trainjob)")
    r.set_defaults(func=cmd_render)

    c = sub.add_parser("crd", help="print the QwenTrainingJob CRD generated from the models")
    c.set_defaults(func=cmd_crd)

    e = sub.add_parser("explain", help="derived values: iterations, world size, memory estimate")
    e.add_argument("file")
    e.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml")
    e.set_defaults(func=cmd_explain)

    # Listed so that `qwenctl --help` says where it went; main() answers it before parsing its options.
    d = sub.add_parser("dev-cluster", help="moved: the local control plane is `qwen-devcluster up|down|status`")
    d.set_defaults(func=lambda args: dev_cluster_moved([]))

    run = sub.add_parser("run", help="run a resource's stage on this machine with the pod's own command")
    run.add_argument("file")
    run.add_argument("--local", action="store_true", required=True, help="run here (the only mode)")
    run.add_argument("--root", default=None, help="host directory standing in for the pod's volumes' mount paths")
    run.add_argument("--nproc", type=int, default=None, help="processes per node (default: the spec's)")
    run.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    run.add_argument("--from-step", default=None, metavar="NAME",
                     help="start a pipeline at this step (as the operator resumes a failed one after a fix)")
    run.set_defaults(func=cmd_run)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["dev-cluster"]:
        return dev_cluster_moved(argv[1:])
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecError as err:
        for problem in err.problems:
            print(problem, file=sys.stderr)
        return 1
    except UsageError as err:
        print(err, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # a bug, not a user error: say so briefly
        if os.environ.get("QWENCTL_DEBUG"):
            raise
        print(f"qwenctl: internal error: {type(err).__name__}: {err} (set QWENCTL_DEBUG=1 for a traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
