"""The Triton kernels of the megatron engine, run on CPU by Triton's interpreter, against torch references; and
the gradient-accumulation hook against the contract of megatron's DDP hook (which runs after it)."""

from __future__ import annotations

import pytest
import torch

from qwen_trainer.engines.megatron import triton_kernels as mt

pytestmark = pytest.mark.skipif(not mt.triton_available(), reason="triton is not installed")


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 2, 2 * 1500), (5, 2 * 64)])
def test_swiglu_kernels_match_reference(interpret, dtype, shape):
    torch.manual_seed(0)
    y = torch.randn(*shape, dtype=dtype)
    g = torch.randn(*shape[:-1], shape[-1] // 2, dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(mt.swiglu_forward(y), mt.swiglu_reference(y), **tol)
    torch.testing.assert_close(mt.swiglu_backward(g, y), mt.swiglu_backward_reference(g, y), **tol)


def test_swiglu_function_gradient_matches_autograd(interpret):
    torch.manual_seed(1)
    y = torch.randn(4, 3, 2 * 1100, dtype=torch.float32, requires_grad=True)
    y_ref = y.detach().clone().requires_grad_(True)
    g = torch.randn(4, 3, 1100)
    out = mt.SwiGLU.apply(y)
    out.backward(g)
    gate, up = y_ref.chunk(2, dim=-1)
    (torch.nn.functional.silu(gate) * up).backward(g)
    torch.testing.assert_close(y.grad, y_ref.grad, rtol=1e-5, atol=1e-5)


def test_swiglu_rejects_odd_width():
    with pytest.raises(ValueError, match="even last dimension"):
        mt.SwiGLU.apply(torch.randn(2, 5))


def test_accumulate_adds_low_precision_into_fp32(interpret):
    torch.manual_seed(2)
    acc = torch.randn(3 * 4096 + 17)
    x = torch.randn(3 * 4096 + 17, dtype=torch.bfloat16)
    expected = acc + x.float()
    out = mt.accumulate_(acc, x)
    assert out is acc
    torch.testing.assert_close(acc, expected)


def test_assign_widens_low_precision_into_fp32(interpret):
    torch.manual_seed(3)
    out = torch.randn(2 * 4096 + 5)
    x = torch.randn(2 * 4096 + 5, dtype=torch.bfloat16)
    assert mt.assign_(out, x) is out
    assert torch.equal(out, x.float())  # widening is exact


def test_accumulate_refuses_mismatched_sizes():
    with pytest.raises(ValueError, match="cannot accumulate"):
        mt.accumulate_(torch.zeros(4), torch.zeros(5))
    with pytest.raises(ValueError, match="cannot assign"):
        mt.assign_(torch.zeros(4), torch.zeros(5))


class _FusedLinear(torch.nn.Module):
    """Stands for a megatron linear layer with gradient-accumulation fusion: it writes the weight gradient into
    main_grad itself and hands autograd a placeholder."""

    def __init__(self, fused: bool = True):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(3, 3))
        self.gradient_accumulation_fusion = fused

    def forward(self, x):
        return _FusedLinearFn.apply(x, self.weight) if self.gradient_accumulation_fusion else x @ self.weight.t()


class _FusedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w.t()

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        w.main_grad.add_(g.t() @ x)
        w.grad_added_to_main_grad = True
        return g @ w, torch.full_like(w, float("nan"))  # a placeholder, never to be added


def _megatron_like_ddp(model: torch.nn.Module) -> list:
    """main_grad buffers and the hook megatron's DDP registers on each parameter's gradient accumulator."""
    keep = []
    for p in model.parameters():
        p.main_grad = torch.zeros_like(p, dtype=torch.float32)
        p.grad_added_to_main_grad = False

        def hook(*_, p=p):
            if p.grad is not None and not p.grad_added_to_main_grad:
                p.main_grad.add_(p.grad.data)
            p.grad = None

        acc = p.expand_as(p).grad_fn.next_functions[0][0]
        acc.register_hook(hook)
        keep.append(acc)
    return keep


def test_grad_accumulation_hook_runs_before_ddp_and_skips_fused_weights(interpret, monkeypatch):
    torch.manual_seed(3)
    calls = []
    kernel_add = mt.accumulate_
    monkeypatch.setattr(mt, "accumulate_", lambda acc, x: calls.append(acc.shape) or kernel_add(acc, x))

    class Model(torch.nn.Module):
        def __init__(self, fused: bool = True):
            super().__init__()
            self.emb = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.bfloat16))  # tied: used twice
            self.norm = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
            self.fused = _FusedLinear(fused)

        def forward(self, ids):
            h = self.emb[ids].float() * self.norm.float()
            h = self.fused(h)
            return (h @ self.emb.float().t()).square().mean()

    model = Model()
    reference = Model(fused=False)
    reference.load_state_dict(model.state_dict())
    keep = _megatron_like_ddp(model)
    handles = mt.install_grad_accumulation([model])
    assert len(handles) == 2  # emb and norm; the fused weight is left to its layer
    batches = [torch.tensor([0, 1, 4]), torch.tensor([2, 2, 3])]
    for ids in batches:  # two micro-batches accumulate
        model(ids).backward()
    for ids in batches:
        reference(ids).backward()
    # the kernel did every add (DDP's own hook found them done): emb and norm, once per micro-batch
    assert sorted(calls) == sorted([torch.Size([5, 3]), torch.Size([3])] * 2)
    for name, p in model.named_parameters():
        assert p.grad is None, name
        torch.testing.assert_close(p.main_grad, dict(reference.named_parameters())[name].grad.float(),
                                   rtol=2e-2, atol=2e-2, msg=name)
    assert torch.isfinite(model.fused.weight.main_grad).all()
    for h in handles:
        h.remove()
    del keep


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("s,b,g,r,d", [(5, 2, 2, 3, 8), (3, 1, 1, 1, 16)])
def test_qkv_rope_matches_split_rotate_and_layout(interpret, dtype, s, b, g, r, d):
    from qwen_trainer.engines.megatron.kernels import rope_tables

    torch.manual_seed(4)
    mixed = torch.randn(s, b, g, (r + 2) * d, dtype=dtype)
    cos, sin = rope_tables(s, d, 10000.0, "cpu")
    ref_in = mixed.detach().clone().requires_grad_(True)
    got_in = mixed.detach().clone().requires_grad_(True)
    ref = mt.qkv_rope_reference(ref_in, cos, sin, r)
    got = mt.QKVRope.apply(got_in, cos, sin, r)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for a, e in zip(got, ref):
        assert a.shape == e.shape and a.is_contiguous()
        torch.testing.assert_close(a, e, **tol)
    grads = [torch.randn_like(t) for t in ref]
    torch.autograd.backward(ref, grads)
    torch.autograd.backward(got, grads)
    torch.testing.assert_close(got_in.grad, ref_in.grad, **tol)


def test_qkv_rope_refuses_odd_head_size(interpret):
    with pytest.raises(ValueError, match="power-of-two head size"):
        mt.QKVRope.apply(torch.randn(2, 1, 1, 3 * 6), torch.ones(2, 6), torch.zeros(2, 6), 1)
