"""EngineOptions.adamw_writes_model_params through the engine, in real processes (torchrun, 2 ranks, gloo, CPU, bf16,
expert parallelism 2, so megatron chains a dense and an expert optimizer): with clipping in every step (clipGrad
below the gradient norms, handed to the AdamW pass as its divisor), the one-pass AdamW that writes the bf16 model
weights trains like torch's fused AdamW followed by megatron's copy: after the first step the fp32 main weights and
the first moments of every parameter, dense and expert, agree to 1e-6 relative (float rounding), the second moments
to 3e-5 (torch's CPU and CUDA kernels round 1 - beta2 differently), the bf16 weights to 3e-4 (an element whose fp32
weight sits on a rounding boundary may round the other way), the model weights are the
main weights rounded, and three steps' losses agree to 1e-4. On CPU tensors the pass runs the kernel's arithmetic in
torch (adamw_kernel), the class and the engine wiring are the ones a GPU runs."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from tests.unit.test_megatron_resume_cpu import trained_losses  # noqa: E402

STEPS = 3
# the second moment: torch's CPU AdamW forms 1 - beta2 in double, its CUDA kernel (which the pass reproduces) in
# fp32 inside a fused multiply-add, 1.3e-5 relative off for beta2 = 0.999 (tests/unit/test_adamw_kernel.py)
TOLERANCE = {"weight": 3e-4, "main": 1e-6, "exp_avg": 1e-6, "exp_avg_sq": 3e-5}
CLIP = 0.05


def _train(tmp_path, one_pass: bool, dopt: str):
    name = f"adamw-{int(one_pass)}-{dopt}"
    opts = {"fused_adam": True, "clip_in_adam": True, "adamw_writes_model_params": one_pass}
    losses, built = trained_losses(tmp_path, name, 2, STEPS, "ep=2", "dispatcher=alltoall", f"clip={CLIP}",
                                   "save_at=1", f"dopt={dopt}", f"opts={json.dumps(opts)}")
    norms = torch.load(tmp_path / name / "grad_norms.pt")
    return losses, built, [norms[i] for i in range(1, STEPS + 1)], torch.load(tmp_path / name / "save-1.pt")


# dopt=1: megatron's distributed optimizer (the spec's default), whose dense state is split over the two ranks, so
# each rank's pass writes its slice of the bf16 parameter buffer and megatron's all-gather completes the weights
@pytest.mark.parametrize("dopt", ["0", "1"], ids=["mixed-precision-optimizer", "distributed-optimizer"])
def test_one_pass_adamw_trains_like_fused_adamw_and_the_copy_under_expert_parallelism(tmp_path, dopt):
    torch_losses, torch_built, norms, torch_saved = _train(tmp_path, one_pass=False, dopt=dopt)
    losses, built, one_pass_norms, saved = _train(tmp_path, one_pass=True, dopt=dopt)
    assert torch_built["adamw_kernel"] == 0 and built["adamw_kernel"] == 2  # the dense and the expert optimizer
    assert min(norms + one_pass_norms) > CLIP, (norms, one_pass_norms)  # every step clipped
    for key, weight in saved["state"]["weight"].items():  # the model weights are the main weights rounded
        assert torch.equal(weight, saved["state"]["main"][key].to(torch.bfloat16).float()), key
    assert saved["state"]["steps"] == torch_saved["state"]["steps"]  # Adam's step counts
    for quantity in ("weight", "main", "exp_avg", "exp_avg_sq"):
        expected, got = torch_saved["state"][quantity], saved["state"][quantity]
        assert sorted(got) == sorted(expected) and any(".experts." in k for k in expected), quantity
        for key, b in expected.items():
            a = got[key]
            error = float((a.float() - b.float()).norm()) / max(float(b.float().norm()), 1e-30)
            assert error <= TOLERANCE[quantity], (quantity, key, error)
    for a, b in zip(losses, torch_losses):
        assert abs(a - b) <= 1e-4 * abs(b), (losses, torch_losses)
