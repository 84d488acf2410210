"""The engine's Triton kernels compiled for the GPU (the unit tests run them in Triton's CPU interpreter)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
mt = pytest.importorskip("qwen_trainer.engines.megatron.triton_kernels")

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


def test_assign_on_gpu_is_exact():
    torch.manual_seed(3)
    x = torch.randn(60 * 2048 * 2816 + 5, device="cuda", dtype=torch.bfloat16)
    out = torch.full(x.shape, float("nan"), device="cuda")
    mt.assign_(out, x)
    assert torch.equal(out, x.float())


@pytest.mark.parametrize("s,b,g,r,d", [(4096, 2, 2, 6, 128), (33, 3, 4, 1, 64)])
def test_qkv_rope_on_gpu_matches_reference(s, b, g, r, d):
    from qwen_trainer.engines.megatron.kernels import rope_tables

    torch.manual_seed(2)
    mixed = torch.randn(s, b, g, (r + 2) * d, device="cuda", dtype=torch.bfloat16)
    cos, sin = rope_tables(s, d, 1e6, "cuda")
    a = mixed.clone().requires_grad_(True)
    e = mixed.clone().requires_grad_(True)
    got = mt.QKVRope.apply(a, cos, sin, r)
    ref = mt.qkv_rope_reference(e, cos, sin, r)
    grads = [torch.randn_like(t) for t in ref]
    torch.autograd.backward(got, grads)
    torch.autograd.backward(ref, grads)
    for x, y in zip(got, ref):
        torch.testing.assert_close(x, y, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(a.grad, e.grad, rtol=1e-2, atol=1e-2)
