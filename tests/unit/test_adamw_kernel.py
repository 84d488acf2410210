"""AdamW that writes the bf16 model weights in the same pass (qwen_trainer.engines.megatron.adamw_kernel): the
Triton kernel (run by Triton's interpreter on CPU tensors) and its torch fallback against torch's own fused AdamW,
step by step, with weight decay on one group and not the other, a changing learning rate, a clip divisor on some
steps and a tensor spanning two of the kernel's chunks; the optimizer state stays torch's, so a run moves between
the two steppers through a state dict."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from qwen_trainer.engines.megatron import adamw_kernel  # noqa: E402

SHAPES = [(30, 25), (7,), (adamw_kernel.CHUNK + 4464,)]


@pytest.fixture(params=["kernel", "torch-fallback"])
def path(request, monkeypatch):
    if request.param == "kernel":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return request.param


def _optimizer(mains):
    return torch.optim.AdamW([{"params": mains[:2], "weight_decay": 0.1}, {"params": mains[2:], "weight_decay": 0.0}],
                             lr=1e-2, betas=(0.9, 0.999), eps=1e-8, fused=True)


def _weights(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) for s in SHAPES]


def _grads(step):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=gen) * (step + 1) for s in SHAPES]


def _step(opt, mains, step, divisor):
    for p, g in zip(mains, _grads(step)):
        p.grad = g
    for group in opt.param_groups:
        group["lr"] = 1e-2 / (step + 1)
    opt.grad_scale = torch.tensor(divisor) if divisor else None


DIVISORS = [None, 2.5, None, 4.0]


def _as_bf16(w, path):
    """The bf16 weight expected from `path`: torch rounds to nearest even, as the compiled kernel does
    (tests/gpu/test_adamw_kernel.py); Triton's interpreter truncates."""
    if path == "kernel":
        return (w.view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)
    return w.to(torch.bfloat16)


def _close(a, b, what):
    # The reference is torch's CPU fused AdamW, which forms 1 - beta2 in double. torch's CUDA kernel, which the
    # compiled kernel reproduces bit for bit (tests/gpu/test_adamw_kernel.py), forms it inside fp32 fused
    # multiply-adds: 1.3e-5 relative off for beta2 = 0.999, so the second moment differs by that much (the torch
    # fallback, whose fused multiply-adds are exact) or by up to 7e-5 (Triton's interpreter rounds the product
    # before the add), and the weight by that much of its update.
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (what, float((a - b).abs().max()))


def test_the_kernel_steps_like_torchs_fused_adamw_and_writes_the_bf16_weights(path):
    expected, got = _weights(), _weights()
    halves = [w.to(torch.bfloat16) for w in got]
    reference, mine = _optimizer(expected), _optimizer(got)
    stepper = adamw_kernel.ParamGroupStepper(mine, {id(m): h for m, h in zip(got, halves)})
    for step, divisor in enumerate(DIVISORS):
        _step(reference, expected, step, divisor)
        reference.step()
        _step(mine, got, step, divisor)
        stepper.step()
        assert mine.grad_scale is None  # the divisor holds for its own step only
        for i, (a, b) in enumerate(zip(got, expected)):
            _close(a, b, f"weight {i} after step {step}")
            assert torch.equal(halves[i], _as_bf16(a, path)), f"bf16 weight {i} after step {step}"
    for a, b in zip(got, expected):
        sa, sb = mine.state[a], reference.state[b]
        assert sorted(sa) == sorted(sb) and float(sa["step"]) == float(sb["step"]) == len(DIVISORS)
        assert sa["step"].dtype == sb["step"].dtype
        _close(sa["exp_avg"], sb["exp_avg"], "exp_avg")
        _close(sa["exp_avg_sq"], sb["exp_avg_sq"], "exp_avg_sq")


def _step_both(reference, expected, opt, got, step, divisor, stepper=None):
    """One step of the reference (torch) and of `opt` (by `stepper` if given, else torch), then the weights."""
    _step(reference, expected, step, divisor)
    reference.step()
    _step(opt, got, step, divisor)
    (stepper or opt).step()
    for i, (a, b) in enumerate(zip(got, expected)):
        _close(a, b, f"weight {i} after step {step}")


def test_a_run_moves_between_torch_and_the_kernel_through_the_state_dict(path):
    expected, got = _weights(), _weights()
    reference, mine = _optimizer(expected), _optimizer(got)
    for step in range(2):  # both start on torch's AdamW
        _step_both(reference, expected, mine, got, step, None)
    stepper = adamw_kernel.ParamGroupStepper(mine, {})  # fp32 weights only: no bf16 copies to write
    for step in range(2, 4):
        _step_both(reference, expected, mine, got, step, 3.0, stepper)
    restored = _optimizer(got)  # a new torch AdamW takes the kernel's state and goes on like the reference
    restored.load_state_dict(mine.state_dict())
    _step_both(reference, expected, restored, got, 4, None)
    again = adamw_kernel.ParamGroupStepper(restored, {})  # and back: new state tensors, a new layout
    _step_both(reference, expected, restored, got, 5, None, again)
    assert all(float(restored.state[a]["step"]) == 6 for a in got)


def test_step_counts_that_differ_within_a_group_are_refused():
    mains = _weights()
    opt = _optimizer(mains)
    _step(opt, mains, 0, None)
    opt.step()
    opt.state[mains[0]]["step"] += 1
    with pytest.raises(ValueError, match="step counts differ"):
        adamw_kernel.ParamGroupStepper(opt, {}).step()


def test_the_fp32_factors_are_computed_in_fp32_as_torchs_kernel_does():
    step_size, bc2_sqrt = adamw_kernel.fp32_factors(1e-3, 0.9, 0.999, 3.0)
    f = torch.float32
    bc1 = 1 - torch.tensor(0.9, dtype=f) ** torch.tensor(3.0, dtype=f)
    bc2 = 1 - torch.tensor(0.999, dtype=f) ** torch.tensor(3.0, dtype=f)
    assert step_size == pytest.approx((torch.tensor(1e-3, dtype=f) / bc1).item(), rel=3e-7)
    assert bc2_sqrt == pytest.approx(math.sqrt(bc2.item()), rel=3e-7)
    assert step_size == torch.tensor(step_size, dtype=f).item() and bc2_sqrt == torch.tensor(bc2_sqrt, dtype=f).item()
