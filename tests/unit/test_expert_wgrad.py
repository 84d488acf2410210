"""The MoE experts' weight gradients accumulated into the fp32 gradient buffer by the grouped GEMM itself
(qwen_trainer.engines.megatron.expert_wgrad): the Triton kernel itself, run by Triton's interpreter on CPU tensors,
against a per-expert fp32 product; and the grouped GEMM's backward, against torch's own autograd of the grouped
GEMM followed by the add megatron would make."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from qwen_trainer.engines.megatron import expert_wgrad  # noqa: E402
from qwen_trainer.engines.megatron.kernels import grouped_mm  # noqa: E402

# ragged groups: an empty one, one shorter than the kernel's row block, one spanning several blocks
SIZES = [5, 0, 70, 17]


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _bounds(sizes):
    return torch.cumsum(torch.tensor(sizes, dtype=torch.int32), 0, dtype=torch.int32)


def test_the_kernel_adds_each_experts_product_into_the_buffer(interpret):
    torch.manual_seed(0)
    k, n = 40, 136  # not multiples of the kernel's column blocks
    x = torch.randn(sum(SIZES), k, dtype=torch.bfloat16)
    dy = torch.randn(sum(SIZES), n, dtype=torch.bfloat16)
    acc = torch.randn(len(SIZES), k, n)
    expected = acc.clone()
    start = 0
    for e, size in enumerate(SIZES):
        expected[e] += x[start:start + size].double().t().matmul(dy[start:start + size].double()).float()
        start += size
    expert_wgrad.grouped_wgrad_(x, dy, _bounds(SIZES), acc)
    torch.testing.assert_close(acc, expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(acc[1], expected[1])  # an expert without tokens keeps its buffer


def _expert_weight(experts: int, k: int, n: int, marked: bool) -> torch.nn.Parameter:
    torch.manual_seed(1)
    w = torch.nn.Parameter(torch.randn(k, experts * n, dtype=torch.bfloat16))  # GroupedMLP's weight1 layout
    w.main_grad = torch.full((k, experts * n), 0.5)  # what earlier micro-batches left in the buffer
    w.grad_added_to_main_grad = False
    if marked:
        setattr(w, expert_wgrad.MARK, True)
        setattr(w, expert_wgrad.KERNEL, True)
    return w


def test_the_grouped_gemm_backward_accumulates_into_main_grad_like_autograd_and_an_add(interpret):
    experts, k, n = len(SIZES), 32, 48
    torch.manual_seed(2)
    tokens = torch.randn(sum(SIZES), k, dtype=torch.bfloat16)
    upstream = torch.randn(sum(SIZES), n, dtype=torch.bfloat16)
    sizes = torch.tensor(SIZES)
    results = {}
    for marked in (False, True):
        w = _expert_weight(experts, k, n, marked)
        a = tokens.clone().requires_grad_()
        out = grouped_mm(a, w.view(experts, k, -1), sizes)
        out.backward(upstream)
        if not marked:  # megatron's DDP hook: the bf16 gradient added into the buffer
            w.main_grad += w.grad.float()
        results[marked] = (out.detach(), a.grad, w)
    (out_plain, da_plain, w_plain), (out_fused, da_fused, w_fused) = results[False], results[True]
    assert torch.equal(out_fused, out_plain)
    assert torch.equal(da_fused, da_plain)
    assert w_fused.grad_added_to_main_grad and not w_plain.grad_added_to_main_grad
    # fp32 accumulation against a bf16-rounded gradient: equal to bf16's precision
    torch.testing.assert_close(w_fused.main_grad, w_plain.main_grad, rtol=1e-2, atol=2e-2)
    exact = torch.full((k, experts * n), 0.5).view(experts, k, n)
    start = 0
    for e, size in enumerate(SIZES):
        exact[e] += tokens[start:start + size].double().t().matmul(upstream[start:start + size].double()).float()
        start += size
    torch.testing.assert_close(w_fused.main_grad.view(experts, k, n), exact, rtol=1e-5, atol=1e-4)


def test_only_marked_parameters_with_a_buffer_take_the_path():
    w = _expert_weight(2, 16, 8, marked=True)
    assert expert_wgrad.main_grad_param(w.view(2, 16, -1)) is w
    assert expert_wgrad.main_grad_param(w) is w
    assert expert_wgrad.main_grad_param(_expert_weight(2, 16, 8, marked=False).view(2, 16, -1)) is None
    del w.main_grad
    assert expert_wgrad.main_grad_param(w.view(2, 16, -1)) is None
