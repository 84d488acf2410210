"""Shared helpers for the trainer's torchrun integration tests (tiny models, CPU engine, gloo)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]

TINY_ARCH = {"numLayers": 2, "hiddenSize": 64, "ffnHiddenSize": 128, "numAttentionHeads": 4, "numQueryGroups": 2,
             "vocabSize": 600, "maxPositionEmbeddings": 256}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def torchrun(spec_path: Path, nproc: int = 2, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), "-m", "qwen_trainer", "run", "--spec", str(spec_path)]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
                **(env or {})}
    full_env.pop("QWEN_TRAINER_FAULT", None) if "QWEN_TRAINER_FAULT" not in (env or {}) else None
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def losses(out_dir: Path) -> dict[int, float]:
    from qwen_trainer.metrics import read_metrics

    return {r["iteration"]: r["loss"] for r in read_metrics(out_dir / "logs" / "metrics.jsonl")}


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
