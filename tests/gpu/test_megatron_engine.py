"""GPU check of the megatron engine (2 GPUs): small dense and MoE models train under TP=2 (with sequence parallelism),
data parallelism and EP=2, and the first step's loss matches the fp32 CPU transformers model on the same weights and
data.

Tolerance: the engine computes in bf16 (weights, activations; fp32 softmax and loss), the reference in fp32, so
the losses (about ln(1024) = 6.9 here) may differ by bf16 rounding: we require |bf16 - fp32| < 0.02 (0.3 %).
Training must lower the loss over 6 steps on a repeated batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                reason="needs 2 CUDA GPUs")

TOLERANCE = 0.02
WORKER = Path(__file__).with_name("megatron_parity_worker.py")


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_DEVICE_MAX_CONNECTIONS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(WORKER)], env=env, capture_output=True, text=True, timeout=900)
    rows = {}
    for line in proc.stdout.splitlines():
        if line.startswith("PARITY "):
            row = json.loads(line[len("PARITY "):])
            rows[row["layout"]] = row
    print(proc.stdout[-4000:])
    print(proc.stderr[-4000:])
    return rows


@pytest.mark.parametrize("layout", ["dense-tp2", "dense-dp2", "moe-tp2", "moe-ep2"])
def test_first_step_loss_matches_cpu_reference(results, layout):
    row = results.get(layout)
    assert row is not None, f"{layout}: no result"
    assert "error" not in row, row["error"]
    ref = row["reference_fp32_cpu"]
    assert abs(row["first_step_loss_bf16"] - ref) < TOLERANCE, row
    assert abs(row["eval_loss_bf16"] - ref) < TOLERANCE, row
    assert row["losses"][-1] < row["losses"][0] - 0.05, row["losses"]
