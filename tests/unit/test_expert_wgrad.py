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


def _exact_products(parts, experts, k, n):
    out = torch.zeros(experts, k, n, dtype=torch.float64)
    for x, dy, sizes in parts:
        start = 0
        for e, size in enumerate(sizes):
            out[e] += x[start:start + size].double().t().matmul(dy[start:start + size].double())
            start += size
    return out


def _parts(count, k, n, seed):
    torch.manual_seed(seed)
    out = []
    for i in range(count):
        sizes = SIZES[i % 2:] + SIZES[:i % 2]  # each micro-batch routes differently
        rows = sum(sizes) + 3  # rows past the last group (padding) are never read
        out.append((torch.randn(rows, k, dtype=torch.bfloat16), torch.randn(rows, n, dtype=torch.bfloat16), sizes))
    return out


def test_the_kernel_adds_each_experts_product_into_the_buffer(interpret):
    k, n = 40, 136  # not multiples of the kernel's column blocks
    parts = _parts(1, k, n, seed=0)
    acc = torch.randn(len(SIZES), k, n)
    expected = acc.double() + _exact_products(parts, len(SIZES), k, n)
    expert_wgrad.grouped_wgrad_([(x, dy, _bounds(sizes)) for x, dy, sizes in parts], acc)
    torch.testing.assert_close(acc, expected.float(), rtol=1e-5, atol=1e-4)
    assert torch.equal(acc[1], expected[1].float())  # an expert without tokens keeps its buffer


@pytest.mark.parametrize("accumulate", [True, False])
@pytest.mark.parametrize("count", [3, expert_wgrad.MAX_PARTS + 2])  # one launch; more parts than one launch reads
def test_the_kernel_sums_several_micro_batches_without_regrouping(interpret, accumulate, count):
    k, n = 24, 40
    parts = _parts(count, k, n, seed=count)
    acc = torch.full((len(SIZES), k, n), 0.25)
    expected = _exact_products(parts, len(SIZES), k, n) + (0.25 if accumulate else 0.0)
    expert_wgrad.grouped_wgrad_([(x, dy, _bounds(sizes)) for x, dy, sizes in parts], acc, accumulate=accumulate)
    torch.testing.assert_close(acc, expected.float(), rtol=1e-5, atol=1e-4)


def test_the_torch_fallback_matches_the_kernel(monkeypatch):
    k, n = 24, 40
    parts = [(x, dy, _bounds(sizes)) for x, dy, sizes in _parts(3, k, n, seed=7)]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fallback = torch.ones(len(SIZES), k, n)
    expert_wgrad.grouped_wgrad_(parts, fallback, accumulate=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernel = torch.ones(len(SIZES), k, n)
    expert_wgrad.grouped_wgrad_(parts, kernel, accumulate=False)
    torch.testing.assert_close(fallback, kernel, rtol=1e-5, atol=1e-4)


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
