"""EngineOptions.clip_in_adam under expert parallelism, in real processes (torchrun, 2 ranks, gloo, CPU, bf16):
megatron chains a separate optimizer for the expert weights at EP > 1 and clips each with the norm of all of them;
with clipping handed to torch's fused AdamW (its gradient divisor) every step clips (clipGrad below the gradient
norms) like megatron's scaling pass followed by the same fused AdamW: Adam's first moment after the first step
(the clipped gradient, gathered over both ranks) agrees to 1e-4 for every weight, dense and expert, and the losses
within 1e-3 relative (losses alone would not show it: Adam's update barely moves when every gradient is scaled)."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from tests.unit.test_megatron_resume_cpu import trained_losses  # noqa: E402

STEPS = 4
CLIP = 0.05


def _train(tmp_path, in_adam: bool):
    name = f"clip-{int(in_adam)}"
    opts = {"fused_adam": True, "clip_in_adam": in_adam}
    losses, _ = trained_losses(tmp_path, name, 2, STEPS, "ep=2", "dispatcher=alltoall", f"clip={CLIP}",
                               "save_at=1", f"opts={json.dumps(opts)}")
    norms = torch.load(tmp_path / name / "grad_norms.pt")
    first_moment = torch.load(tmp_path / name / "save-1.pt")["state"]["exp_avg"]
    return losses, [norms[i] for i in range(1, STEPS + 1)], first_moment


def test_clipping_in_fused_adamw_trains_like_megatrons_pass_under_expert_parallelism(tmp_path):
    passed, pass_norms, pass_moment = _train(tmp_path, in_adam=False)
    folded, folded_norms, folded_moment = _train(tmp_path, in_adam=True)
    assert min(pass_norms + folded_norms) > CLIP, (pass_norms, folded_norms)  # every step clipped
    assert sorted(folded_moment) == sorted(pass_moment) and any(".experts." in k for k in pass_moment)
    for key, b in pass_moment.items():
        a = folded_moment[key]
        assert b.abs().max() > 0, key
        assert float((a - b).norm() / b.norm()) < 1e-4, (key, float((a - b).norm() / b.norm()))
    assert len(folded) == len(passed) == STEPS
    for a, b in zip(folded, passed):
        assert abs(a - b) <= 1e-3 * abs(b), (folded, passed)
