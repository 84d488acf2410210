"""The compiled AdamW kernel (adamw_kernel) on the GPU against torch's fused AdamW on the same tensors: the fp32
weights within float rounding and Adam's moments within two units in the last place (the kernel computes in torch's
precisions: fp64 where torch's double hyperparameters promote) after several steps with a clip divisor, and the bf16 model
weights exactly the fp32 weights rounded to nearest even (Triton's interpreter, which the CPU tests use,
truncates instead)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

from qwen_trainer.engines.megatron import adamw_kernel  # noqa: E402

SHAPES = [(1000, 517), (3,), (3 * adamw_kernel.CHUNK + 5,)]


def _setup():
    gen = torch.Generator(device="cuda").manual_seed(0)
    mains = [torch.randn(s, device="cuda", generator=gen) for s in SHAPES]
    return mains, torch.optim.AdamW([{"params": mains[:1], "weight_decay": 0.1},
                                     {"params": mains[1:], "weight_decay": 0.0}], lr=1e-2, fused=True)


def test_compiled_kernel_steps_like_torchs_fused_adamw_and_rounds_to_nearest_even():
    expected, reference = _setup()
    got, mine = _setup()
    halves = [g.to(torch.bfloat16) for g in got]
    stepper = adamw_kernel.ParamGroupStepper(mine, {id(g): h for g, h in zip(got, halves)})
    for step in range(5):
        gen = torch.Generator(device="cuda").manual_seed(10 + step)
        grads = [torch.randn(s, device="cuda", generator=gen) for s in SHAPES]
        for opt, mains in ((reference, expected), (mine, got)):
            for p, g in zip(mains, grads):
                p.grad = g.clone()
            for group in opt.param_groups:
                group["lr"] = 1e-2 / (step + 1)
            opt.grad_scale = torch.tensor(1.5 + step, device="cuda") if step % 2 else None
        reference.step()
        stepper.step()
    for a, b, h in zip(got, expected, halves):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), float((a - b).abs().max())
        assert torch.equal(h, a.to(torch.bfloat16))
        for key in ("exp_avg", "exp_avg_sq"):
            x, y = mine.state[a][key], reference.state[b][key]
            ulp = 2 * torch.finfo(torch.float32).eps * torch.maximum(x.abs(), y.abs())
            far = (x - y).abs() > ulp
            assert not far.any(), (key, int(far.sum()), float((x - y).abs().max()))
