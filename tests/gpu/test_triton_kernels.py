"""The engine's Triton kernels compiled for the GPU (the unit tests run them in Triton's CPU interpreter)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
mt = pytest.importorskip("trainer.engines.megatron_triton")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not mt.triton_available(),
                                reason="needs a CUDA GPU and triton")


@pytest.mark.parametrize("shape", [(4096, 2, 2 * 8960), (7, 3, 2 * 1408)])
def test_swiglu_on_gpu_matches_reference(shape):
    torch.manual_seed(0)
    y = torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(*shape[:-1], shape[-1] // 2, device="cuda", dtype=torch.bfloat16)
    out = mt.SwiGLU.apply(y)
    out.backward(g)
    torch.testing.assert_close(out, mt.swiglu_reference(y.detach()), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(y.grad, mt.swiglu_backward_reference(g, y.detach()), rtol=1e-2, atol=1e-2)


def test_accumulate_on_gpu():
    torch.manual_seed(1)
    acc = torch.randn(60 * 2048 * 2816 + 5, device="cuda")
    x = torch.randn_like(acc, dtype=torch.bfloat16)
    expected = acc + x.float()
    mt.accumulate_(acc, x)
    torch.testing.assert_close(acc, expected)
