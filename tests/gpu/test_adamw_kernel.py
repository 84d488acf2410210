"""The compiled AdamW kernel (adamw_kernel) on the GPU against torch's fused AdamW on the same tensors: after several
steps with weight decay, a changing learning rate and a clip divisor on some steps, the fp32 weights and Adam's
moments are bit for bit torch's (the kernel computes in torch's precisions and order), and the bf16 model weights are
the fp32 weights rounded to nearest even (Triton's interpreter, which the CPU tests use, truncates instead)."""

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
    mismatches = {}
    for i, (a, b, h) in enumerate(zip(got, expected, halves)):
        assert torch.equal(h, a.to(torch.bfloat16)), i
        for what, x, y in (("weight", a, b), ("exp_avg", mine.state[a]["exp_avg"], reference.state[b]["exp_avg"]),
                           ("exp_avg_sq", mine.state[a]["exp_avg_sq"], reference.state[b]["exp_avg_sq"])):
            mismatches[(i, what)] = int((x != y).sum())
    assert not any(mismatches.values()), mismatches
