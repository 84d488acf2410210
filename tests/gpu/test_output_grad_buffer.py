"""The output weight's gradient written by the chunked loss straight into the fp32 gradient buffer (scaled by the
schedule's loss normalisation, known before the forward) trains the same model as the bf16 gradient path, under
both loss modes of the engine's normalisation: "mean" (pretraining) and "per_token" (SFT).
The buffer path accumulates the chunks in fp32 rather than bf16, so losses may differ in the last digits; a wrong
scale would move them by far more after the first step (and check_output_grad_scale would stop the run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                                reason="needs a Hopper GPU")

WORKER = Path(__file__).with_name("cuda_graph_worker.py")
TOLERANCE = 2e-3


def _run(case: str, into_buffer: bool, loss_mode: str) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    options = json.dumps({"output_grad_into_buffer": into_buffer})
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                           str(WORKER), case, "off", options, loss_mode], env=env, capture_output=True, text=True,
                          timeout=600)
    for line in proc.stdout.splitlines():
        if line.startswith("GRAPHS "):
            return json.loads(line[len("GRAPHS "):])
    raise AssertionError(f"worker failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


@pytest.mark.parametrize("loss_mode", ["mean", "per_token"])
@pytest.mark.parametrize("case", ["moe", "dense-untied"])
def test_buffer_path_trains_like_the_bf16_gradient_path(case, loss_mode):
    bf16, buffer = _run(case, False, loss_mode), _run(case, True, loss_mode)
    assert not buffer["tied"]
    for a, b in zip(buffer["losses"] + buffer["evals"], bf16["losses"] + bf16["evals"]):
        assert abs(a - b) < TOLERANCE, (bf16, buffer)
    assert buffer["losses"][-1] < buffer["losses"][0] - 0.1, buffer
