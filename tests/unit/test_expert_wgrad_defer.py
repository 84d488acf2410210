"""Deferred expert weight gradients (EngineOptions.defer_expert_wgrad, qwen_trainer.engines.megatron.expert_wgrad):
micro-batches' operands regrouped by expert so one grouped GEMM sums them all, and the backward that keeps them
until the step's last micro-batch (megatron DDP's `is_last_microbatch`), or until the memory cap, then adds once.
torch's grouped GEMM runs on CPU tensors (bf16, sizes in multiples of 8)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from qwen_trainer.engines.megatron import expert_wgrad  # noqa: E402
from qwen_trainer.engines.megatron.kernels import grouped_mm  # noqa: E402

EXPERTS, K, N = 4, 16, 24
# per micro-batch: tokens per expert (empty experts included) and padding rows after the last group
MICRO_BATCHES = [([3, 0, 9, 4], 0), ([0, 7, 2, 0], 3), ([5, 5, 0, 1], 0)]


def _part(sizes, padding, seed, k=K, n=N):
    g = torch.Generator().manual_seed(seed)
    rows = sum(sizes) + padding
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
    dy = torch.randn(rows, n, generator=g).to(torch.bfloat16)
    ends = torch.cumsum(torch.tensor(sizes), 0).to(torch.int32)
    return x, dy, ends


def _exact_products(parts) -> torch.Tensor:
    out = torch.zeros(EXPERTS, K, N, dtype=torch.float64)
    for x, dy, ends in parts:
        start = 0
        for e, end in enumerate(ends.tolist()):
            out[e] += x[start:end].double().t() @ dy[start:end].double()
            start = end
    return out


# rows of 32 / 48 bytes (copied as 16-byte elements), 8 / 12 (8 and 4), 6 / 2 (as bf16 itself)
@pytest.mark.parametrize("k,n", [(K, N), (4, 6), (3, 1)])
def test_merged_micro_batches_list_each_experts_rows_in_order(k, n):
    parts = [_part(sizes, pad, i, k, n) for i, (sizes, pad) in enumerate(MICRO_BATCHES)]
    x_all, dy_all, ends = expert_wgrad.merge_by_expert(parts)
    totals = [sum(s[e] for s, _ in MICRO_BATCHES) for e in range(EXPERTS)]
    assert ends.tolist() == torch.cumsum(torch.tensor(totals), 0).tolist()
    assert x_all.shape[0] == sum(x.shape[0] for x, _, _ in parts)
    start = 0
    for e in range(EXPERTS):
        expected_x, expected_dy = [], []
        for x, dy, part_ends in parts:
            lo = 0 if e == 0 else int(part_ends[e - 1])
            expected_x.append(x[lo:int(part_ends[e])])
            expected_dy.append(dy[lo:int(part_ends[e])])
        end = int(ends[e])
        assert torch.equal(x_all[start:end], torch.cat(expected_x)), e
        assert torch.equal(dy_all[start:end], torch.cat(expected_dy)), e
        start = end
    # the padding rows come last, where the grouped GEMM does not read
    pads = torch.cat([x[int(ends_[-1]):] for x, _, ends_ in parts])
    assert torch.equal(x_all[start:], pads)


def test_one_grouped_gemm_over_the_merged_rows_is_the_sum_of_every_micro_batchs_product():
    parts = [_part(sizes, pad, 10 + i) for i, (sizes, pad) in enumerate(MICRO_BATCHES)]
    merged = expert_wgrad.grouped_wgrad(*expert_wgrad.merge_by_expert(parts))
    exact = _exact_products(parts)
    # one fp32 sum over all micro-batches, rounded to bf16 once
    torch.testing.assert_close(merged.double(), exact, rtol=8e-3, atol=1e-2)
    assert merged.abs().sum() > 0


@pytest.fixture
def stash():
    saved = expert_wgrad.STASH.limit
    expert_wgrad.STASH.limit = 1 << 30
    yield expert_wgrad.STASH
    expert_wgrad.reset_deferred()
    expert_wgrad.STASH.limit = saved


def _deferring_weight(group) -> torch.nn.Parameter:
    w = torch.nn.Parameter(torch.randn(K, EXPERTS * N, dtype=torch.bfloat16))  # GroupedMLP's weight1 layout
    w.main_grad = torch.full((K, EXPERTS * N), 0.5)  # what an earlier step's flush would not touch
    w.grad_added_to_main_grad = False
    setattr(w, expert_wgrad.MARK, True)
    setattr(w, expert_wgrad.DEFER, group)
    return w


def _backward(w, part, sizes):
    x, dy, _ = part
    a = x.clone().requires_grad_()
    grouped_mm(a, w.view(EXPERTS, K, -1), torch.tensor(sizes)).backward(dy)
    return a.grad


def test_the_backward_keeps_operands_until_the_last_micro_batch_then_adds_once(stash):
    group = SimpleNamespace(is_last_microbatch=False)
    w = _deferring_weight(group)
    parts = [_part(sizes, 0, 20 + i) for i, (sizes, _) in enumerate(MICRO_BATCHES)]
    for i, (part, (sizes, _)) in enumerate(zip(parts, MICRO_BATCHES)):
        group.is_last_microbatch = i == len(parts) - 1  # what megatron's no_sync leaves set
        da = _backward(w, part, sizes)
        plain = torch._grouped_mm(part[1], w.detach().view(EXPERTS, K, N).transpose(-1, -2),
                                  offs=part[2])
        assert torch.equal(da, plain)  # the input gradient is never deferred
        assert w.grad_added_to_main_grad
        if not group.is_last_microbatch:
            assert torch.equal(w.main_grad, torch.full_like(w.main_grad, 0.5)), i
            assert stash.bytes > 0
    assert stash.bytes == 0 and not stash.parts
    expected = 0.5 + _exact_products(parts)
    torch.testing.assert_close(w.main_grad.view(EXPERTS, K, N).double(), expected, rtol=8e-3, atol=1e-2)


def test_starting_a_bucket_groups_reduction_adds_what_its_weights_kept_first(stash):
    # megatron's pipeline schedule runs a later stage's last backward with the flag down and starts the reduction
    # afterwards: the wrapped start adds that group's kept micro-batches, and only that group's, before it starts
    started = []
    groups = [SimpleNamespace(is_last_microbatch=False) for _ in range(2)]
    for g in groups:
        g.start_grad_sync = expert_wgrad._flushing_first(g, lambda g=g: started.append((g, stash.bytes)))
    weights = [_deferring_weight(g) for g in groups]
    parts = [_part(sizes, 0, 50 + i) for i, (sizes, _) in enumerate(MICRO_BATCHES)]
    for w in weights:
        for part, (sizes, _) in zip(parts, MICRO_BATCHES):
            _backward(w, part, sizes)
    kept = stash.bytes
    groups[0].start_grad_sync()
    assert started == [(groups[0], kept // 2)]  # the first group's operands added before its reduction began
    torch.testing.assert_close(weights[0].main_grad.view(EXPERTS, K, N).double(), 0.5 + _exact_products(parts),
                               rtol=8e-3, atol=1e-2)
    assert torch.equal(weights[1].main_grad, torch.full_like(weights[1].main_grad, 0.5))
    assert expert_wgrad.finish_backward() == 1  # the safety net adds what is left and says for how many weights
    assert stash.bytes == 0 and expert_wgrad.finish_backward() == 0
    torch.testing.assert_close(weights[1].main_grad.view(EXPERTS, K, N).double(), 0.5 + _exact_products(parts),
                               rtol=8e-3, atol=1e-2)


def test_past_the_memory_cap_each_micro_batch_is_added_at_once(stash):
    stash.limit = 1  # nothing fits
    group = SimpleNamespace(is_last_microbatch=False)
    w = _deferring_weight(group)
    sizes, _ = MICRO_BATCHES[0]
    part = _part(sizes, 0, 30)
    _backward(w, part, sizes)
    assert stash.bytes == 0
    torch.testing.assert_close(w.main_grad.view(EXPERTS, K, N).double(), 0.5 + _exact_products([part]),
                               rtol=8e-3, atol=1e-2)


def test_a_new_step_drops_what_an_interrupted_one_kept(stash):
    group = SimpleNamespace(is_last_microbatch=False)
    w = _deferring_weight(group)
    sizes, _ = MICRO_BATCHES[0]
    _backward(w, _part(sizes, 0, 40), sizes)
    assert stash.bytes > 0
    expert_wgrad.reset_deferred()
    assert stash.bytes == 0 and not stash.parts
    group.is_last_microbatch = True
    part = _part(sizes, 0, 41)
    _backward(w, part, sizes)
    torch.testing.assert_close(w.main_grad.view(EXPERTS, K, N).double(), 0.5 + _exact_products([part]),
                               rtol=8e-3, atol=1e-2)


def test_the_ranges_left_to_zero_are_everything_outside_the_overwritten_ones():
    assert expert_wgrad.complement([(10, 20), (0, 4), (20, 25)], 30) == [(4, 10), (25, 30)]
    assert expert_wgrad.complement([], 7) == [(0, 7)]
    assert expert_wgrad.complement([(0, 7)], 7) == []


def test_an_overwriting_weight_writes_its_first_product_of_a_step_and_adds_the_rest(stash):
    group = SimpleNamespace(is_last_microbatch=True)  # one flush per backward
    w = _deferring_weight(group)
    w.main_grad.fill_(float("nan"))  # a range the step's zeroing left out: whatever the last step put there
    setattr(w, expert_wgrad.OVERWRITE, True)
    stash.overwriting.add(w)
    parts = [_part(sizes, 0, 50 + i) for i, (sizes, _) in enumerate(MICRO_BATCHES[:2])]
    _backward(w, parts[0], MICRO_BATCHES[0][0])
    first = expert_wgrad.grouped_wgrad(*parts[0]).float()
    assert torch.equal(w.main_grad.view(EXPERTS, K, N), first)  # written: same bits as adding into zeros
    _backward(w, parts[1], MICRO_BATCHES[1][0])
    second = expert_wgrad.grouped_wgrad(*parts[1]).float()
    assert torch.equal(w.main_grad.view(EXPERTS, K, N), first + second)
    expert_wgrad.reset_deferred()  # the next step writes again
    _backward(w, parts[1], MICRO_BATCHES[1][0])
    assert torch.equal(w.main_grad.view(EXPERTS, K, N), second)


def test_an_overwriting_weight_without_a_gradient_in_a_step_gets_zeros(stash):
    w = _deferring_weight(SimpleNamespace(is_last_microbatch=True))
    setattr(w, expert_wgrad.OVERWRITE, True)
    stash.overwriting.add(w)
    expert_wgrad.reset_deferred()
    expert_wgrad.finish_backward()
    assert torch.equal(w.main_grad, torch.zeros_like(w.main_grad))


def test_the_deferral_is_refused_where_cuda_graphs_capture_the_experts():
    pytest.importorskip("megatron.core")
    from megatron.core.transformer.enums import CudaGraphScope

    from qwen_trainer.engines.megatron.build import experts_in_cuda_graphs

    def config(impl, scope):
        return SimpleNamespace(cuda_graph_impl=impl, cuda_graph_scope=scope)

    assert experts_in_cuda_graphs(config("local", []))  # whole layers (megatron's "full")
    assert experts_in_cuda_graphs(config("local", [CudaGraphScope.moe]))
    assert experts_in_cuda_graphs(config("local", [CudaGraphScope.full_iteration]))
    assert not experts_in_cuda_graphs(config("local", [CudaGraphScope.moe_router, CudaGraphScope.moe_preprocess]))
    assert not experts_in_cuda_graphs(config("none", []))


@pytest.mark.parametrize("overwrite", [True, False])
def test_with_the_kernel_the_kept_micro_batches_go_into_the_buffer_unrounded(stash, monkeypatch, overwrite):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    group = SimpleNamespace(is_last_microbatch=False)
    w = _deferring_weight(group)
    setattr(w, expert_wgrad.KERNEL, True)
    if overwrite:
        w.main_grad.fill_(float("nan"))  # never zeroed: the step's one kernel launch writes it
        setattr(w, expert_wgrad.OVERWRITE, True)
        stash.overwriting.add(w)
    parts = [_part(sizes, pad, 60 + i) for i, (sizes, pad) in enumerate(MICRO_BATCHES)]
    for i, (part, (sizes, _)) in enumerate(zip(parts, MICRO_BATCHES)):
        group.is_last_microbatch = i == len(parts) - 1
        _backward(w, part, sizes)
        if not group.is_last_microbatch:
            assert stash.bytes > 0
    assert stash.bytes == 0
    expected = _exact_products(parts) + (0.0 if overwrite else 0.5)
    # fp32 sums of bf16 products, never rounded to bf16: far inside bf16's precision
    torch.testing.assert_close(w.main_grad.view(EXPERTS, K, N).double(), expected, rtol=1e-5, atol=1e-4)
