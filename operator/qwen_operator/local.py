"""`qwenctl run --local`: run a resource's stage on this machine with the command and environment a pod
would get, so a job can be debugged on a workstation before it goes to the cluster.

The resource is rendered by the same code the operator uses. The Master container's command and env are
taken as they are; what the kubelet and the training-operator would provide is supplied locally: the
`$(PET_*)` rendezvous variables (one node, loopback), the job spec file (written to a temporary
directory instead of the ConfigMap mount), and the volumes (each volume's mountPath is mapped to a
directory under `--root`, and paths in the job spec are rewritten to match).
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import yaml

from .render import SPEC_PATH, render_step, steps


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _remap(value: Any, mounts: list[str], root: Optional[Path]) -> Any:
    if root is None:
        return value
    if isinstance(value, dict):
        return {k: _remap(v, mounts, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_remap(v, mounts, root) for v in value]
    if isinstance(value, str):
        for mount in mounts:
            if value == mount or value.startswith(mount.rstrip("/") + "/"):
                return str(root) + value
    return value


def local_command(resource: dict, *, root: Optional[str], nproc: Optional[int], workdir: Path,
                  step: int = 0) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) for running the Master pod of the resource's step locally; writes the job spec into
    workdir."""
    resource = copy.deepcopy(resource)
    spec = resource.setdefault("spec", {})
    for override in spec.get("pipeline") or []:  # one machine: every step runs with the same local layout
        override.pop("resources", None)
    resources = spec.setdefault("resources", {})
    nodes = int(resources.get("nodes", 1))
    if nproc is None:  # the whole job's world size, on one machine
        per_node = resources.get("processesPerNode") or resources.get("gpusPerNode", 8) or 1
        nproc = nodes * int(per_node)
    resources.update({"nodes": 1, "processesPerNode": nproc})
    meta = resource.setdefault("metadata", {})
    meta.setdefault("namespace", "default")
    _, (configmap, pytorchjob) = render_step(resource, step, 0)

    root_path = Path(root).resolve() if root else None
    mounts = [v["mountPath"] for v in spec.get("volumes", [])]
    job = yaml.safe_load(configmap["data"]["job.yaml"])
    job = _remap(job, mounts, root_path)
    spec_file = workdir / "job.yaml"
    spec_file.write_text(yaml.safe_dump(job, sort_keys=True))

    container = pytorchjob["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    env = dict(os.environ)
    pet = {
        "PET_NNODES": "1",
        "PET_NODE_RANK": "0",
        "PET_MASTER_ADDR": "127.0.0.1",
        "PET_MASTER_PORT": str(_free_port()),
        "PET_NPROC_PER_NODE": str(nproc),
    }
    env.update(pet)
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            print(f"qwenctl: {item['name']} comes from a Kubernetes source (valueFrom) and is not set locally", file=sys.stderr)
    env.pop("QWEN_STATUS_RESOURCE", None)  # no cluster to report to
    env["QWEN_JOB_SPEC"] = str(spec_file)

    def expand(arg: str) -> str:
        arg = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), arg)
        return str(spec_file) if arg == SPEC_PATH else arg

    argv = [expand(a) for a in container["command"]]
    if argv and argv[0] == "torchrun":  # the same interpreter that runs qwenctl, so the venv is used
        argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    if root_path is not None:
        for mount in mounts:
            (root_path / mount.lstrip("/")).mkdir(parents=True, exist_ok=True)
    return argv, env


def run_local(resource: dict, *, root: Optional[str] = None, nproc: Optional[int] = None, dry_run: bool = False,
              first: int = 0) -> int:
    """Run the resource's stage, or each step of its pipeline in order from step `first`, stopping at the first
    failure."""
    all_steps = steps(resource)
    for index, (name, stage, _) in enumerate(all_steps):
        if index < first:
            continue
        with tempfile.TemporaryDirectory(prefix="qwenctl-run-") as tmp:
            argv, env = local_command(resource, root=root, nproc=nproc, workdir=Path(tmp), step=index)
            if len(all_steps) > 1:
                print(f"qwenctl: step {name} ({index + 1}/{len(all_steps)}): {stage}", file=sys.stderr)
            print("qwenctl: running " + shlex.join(argv), file=sys.stderr)
            if dry_run:
                print(Path(tmp, "job.yaml").read_text())
                continue
            code = subprocess.call(argv, env=env)
            if code != 0:
                if len(all_steps) > 1:
                    print(f"qwenctl: step {name} ({index + 1}/{len(all_steps)}) failed with exit code {code}", file=sys.stderr)
                return code
    return 0
