"""Where the control-plane binaries live, and how to build them.

``tools/build-controlplane.sh`` owns the layout; this module only asks it (``--print-bin-dir``)
so the harness and the build can never disagree about the version-keyed cache path.
``QWEN_K8S_BIN_DIR`` overrides the lookup.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "kwokctl",
            "training-operator.v1")
OPTIONAL_BINARIES = ("helm",)
PYTORCHJOB_CRD = "crds/kubeflow.org_pytorchjobs.yaml"
KWOK_STAGES = ("node-initialize.yaml", "node-heartbeat-with-lease.yaml", "pod-ready.yaml", "pod-complete.yaml",
               "pod-delete.yaml")


class BinariesMissing(RuntimeError):
    pass


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def build_script() -> Path:
    return repo_root() / "tools" / "build-controlplane.sh"


def _run_script(*args: str, timeout: float | None = None) -> str:
    script = build_script()
    if not script.exists():
        raise BinariesMissing(f"{script} not found; set QWEN_K8S_BIN_DIR to a directory holding {', '.join(BINARIES)}")
    proc = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise BinariesMissing(f"{script.name} {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if not lines:
        raise BinariesMissing(f"{script.name} printed no bin dir")
    return lines[-1].strip()


def bin_dir() -> Path:
    """The bin dir for the pinned versions (it may not have been built yet)."""
    env = os.environ.get("QWEN_K8S_BIN_DIR")
    if env:
        return Path(env)
    return Path(_run_script("--print-bin-dir"))


def assets_dir(bins: Path) -> Path:
    """CRDs and kwok stage files sit next to bin/ in the cache."""
    return bins.parent


def missing(bins: Path) -> list[str]:
    out = [b for b in BINARIES if not os.access(bins / b, os.X_OK)]
    assets = assets_dir(bins)
    if not (assets / PYTORCHJOB_CRD).is_file():
        out.append(PYTORCHJOB_CRD)
    out += [f"kwok-stages/{s}" for s in KWOK_STAGES if not (assets / "kwok-stages" / s).is_file()]
    return out


def ensure_built(timeout: float | None = None) -> Path:
    """Run the (idempotent) build script and return the bin dir; with QWEN_K8S_BIN_DIR set, only check it."""
    if os.environ.get("QWEN_K8S_BIN_DIR"):
        bins = bin_dir()
    else:
        bins = Path(_run_script(timeout=timeout))
    gone = missing(bins)
    if gone:
        raise BinariesMissing(f"missing in {bins}: {', '.join(gone)} (run tools/build-controlplane.sh)")
    return bins
