"""The GPU benchmark's transformers baseline on several processes (benchmarks/gpu/hf_parallel.py): DDP and FSDP2
train a tiny MoE model, gradients reduced once per step, to the same weights as one process over the whole
global batch (gloo on CPU, real torchrun processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

WORKER = Path(__file__).with_name("hf_parallel_worker.py")


def _rows(stdout: str) -> list[dict]:
    """Every `BASELINE {json}` record, also where two ranks' output ran into one line."""
    decoder = json.JSONDecoder()
    return [decoder.raw_decode(part)[0] for part in stdout.split("BASELINE ")[1:]]


def test_rows_are_read_from_interleaved_output():
    out = 'x\nBASELINE {"rank": 0}BASELINE {"rank": 1}\nnoise\nBASELINE {"rank": 2}\n'
    assert [r["rank"] for r in _rows(out)] == [0, 1, 2]


def _run(mode: str, procs: int) -> list[dict]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={procs}", str(WORKER), mode],
                          env=env, capture_output=True, text=True, timeout=600)
    rows = _rows(proc.stdout)
    assert proc.returncode == 0 and len(rows) == procs, \
        f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return rows


@pytest.fixture(scope="module")
def single() -> dict:
    return _run("single", 1)[0]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_data_parallel_baseline_matches_one_process(single, mode):
    rows = _run(mode, 2)
    assert {r["world"] for r in rows} == {2}
    assert [r["sharded"] for r in rows] == [mode == "fsdp"] * 2
    assert rows[0]["experts"] == single["experts"] == "grouped_mm"  # transformers' fast expert kernels, as on GPU
    for r in rows:
        assert abs(r["loss"] - single["loss"]) < 1e-5, (single, rows)


def test_unknown_baseline_is_refused():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "gpu"))
    from hf_parallel import baseline_mode

    assert baseline_mode("auto", 1) == "single" and baseline_mode("auto", 4) == "ddp"
    assert baseline_mode("fsdp", 4) == "fsdp"
    with pytest.raises(ValueError, match="baseline must be"):
        baseline_mode("zero3", 4)
