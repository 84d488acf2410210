"""The MoE experts' weight gradients: into the fp32 gradient buffer without autograd's bf16 gradient per micro-batch.

megatron's GroupedMLP multiplies each expert's tokens by that expert's slice of one weight tensor (a view of
`weight1` / `weight2`). Through autograd, the weight gradient of that grouped GEMM is a bf16 tensor the size of
every expert's weights, which megatron's DDP hook then adds into the fp32 `main_grad` in a separate pass, once per
micro-batch: for the Qwen MoE shapes most parameters are experts', and that write and add were the largest
non-GEMM cost of the step (benchmarks/gpu/RESULTS.md). Two ways around it, each an EngineOptions switch:

- deferral (`defer_expert_wgrad`; its memory is the spec's training.expertGradientMemoryMiB): the backward keeps
  each micro-batch's operands (the expert's tokens and their output gradient) and, in the step's last micro-batch
  (megatron DDP's `is_last_microbatch`, before its hook hands the gradient to the reduction), regroups all of
  them by expert (`merge_by_expert`) for one grouped GEMM whose fp32 accumulation runs over every micro-batch's
  tokens, rounded to bf16 once and added once (with `expert_grad_overwrite`, the step's first product is written
  into buffer ranges the step's zeroing leaves out). Where megatron starts a bucket group's reduction before such
  a last backward (a later pipeline stage), the kept micro-batches are added as it starts. The kept operands cost
  memory, capped over all layers (`expert_wgrad_stash_mib`); past the cap the kept micro-batches are added early,
  so the sum is the same, only less is saved.
- the Triton kernel (`expert_wgrad_into_buffer`): `main_grad[e] (+)= sum over micro-batches of x_e^T @ dy_e`,
  accumulated in fp32 straight into the buffer, as megatron's own linear layers do with gradient-accumulation
  fusion. With the deferral it reads every kept micro-batch where it lies (no regrouping copy, no bf16 product, no
  separate add or cast copy); alone, it adds each micro-batch's product as the backward runs.

Either way autograd gets a placeholder and the parameter is marked `grad_added_to_main_grad`, so neither megatron's
hook nor the engine's accumulation hook adds it again. Group boundaries stay on the device (the token counts of
megatron's dispatcher or the engine's local dispatch), so no host synchronisation is added. On CPU tensors without
TRITON_INTERPRET=1 the kernel's sum runs in torch, per expert; torch's grouped GEMM runs on the CPU as it is.
"""

from __future__ import annotations

import functools
import os
import weakref
from typing import Any, Optional

import torch

from .triton_kernels import WGRAD_IN_MAIN_GRAD as MARK
from .triton_kernels import _use_kernels

CONFIG = dict(BLOCK_K=64, BLOCK_N=128, BLOCK_T=64, num_warps=4, num_stages=4)
"""The kernel's tiles: the fastest of seven on an H100 for all four expert shapes over deferred micro-batches
(benchmarks/gpu/expert_wgrad_defer_bench.py, which compares them; expert_wgrad_bench.py per micro-batch)."""


MAX_PARTS = 8
"""Micro-batches one kernel launch reads (more are summed by further launches)."""


@functools.lru_cache(maxsize=None)
def _kernel(interpret: bool) -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def grouped_wgrad(xs, dys, acc_ptr, bounds_ptr, experts, K, N, PARTS: tl.constexpr, ACCUMULATE: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, UPCAST: tl.constexpr):
        # acc[e] ([K, N] fp32, experts one after another) (+)= sum over parts m of xs[m][rows of e]^T @ dys[m][rows
        # of e]; bounds holds each part's group starts and its end, PARTS rows of experts + 1
        # one expert's tiles are launched together, so the CTAs running at once read the same rows (from L2)
        e = tl.program_id(1)
        n_tiles = (N + BLOCK_N - 1) // BLOCK_N  # tl.cdiv is a jit helper too
        rk = (tl.program_id(0) // n_tiles) * BLOCK_K + tl.arange(0, BLOCK_K)
        rn = (tl.program_id(0) % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.full((BLOCK_K, BLOCK_N), 0.0, tl.float32)  # tl.zeros is a jit helper the interpreter cannot call
        for m in tl.static_range(PARTS):
            x_ptr = xs[m]
            dy_ptr = dys[m]
            start = tl.load(bounds_ptr + m * (experts + 1) + e).to(tl.int64)
            end = tl.load(bounds_ptr + m * (experts + 1) + e + 1).to(tl.int64)
            t0 = start
            while t0 < end:  # a while loop: Triton's interpreter cannot range() over loaded bounds
                rt = t0 + tl.arange(0, BLOCK_T)
                rows = rt < end
                x = tl.load(x_ptr + rt[:, None] * K + rk[None, :], mask=rows[:, None] & (rk[None, :] < K),
                            other=0.0)
                dy = tl.load(dy_ptr + rt[:, None] * N + rn[None, :], mask=rows[:, None] & (rn[None, :] < N),
                             other=0.0)
                if UPCAST:  # Triton's interpreter multiplies bf16 as raw bits
                    x, dy = x.to(tl.float32), dy.to(tl.float32)
                acc += tl.dot(tl.trans(x), dy)
                t0 += BLOCK_T
        out = acc_ptr + e.to(tl.int64) * K * N + rk[:, None].to(tl.int64) * N + rn[None, :]
        inside = (rk[:, None] < K) & (rn[None, :] < N)
        if ACCUMULATE:
            acc += tl.load(out, mask=inside, other=0.0)
        tl.store(out, acc, mask=inside)

    return grouped_wgrad


def grouped_wgrad_reference(parts: list, acc: torch.Tensor, accumulate: bool = True) -> None:
    """grouped_wgrad_ in torch, expert by expert in fp32 (reads the group boundaries on the host)."""
    if not accumulate:
        acc.zero_()
    for x, dy, ends in parts:
        start = 0
        for e, end in enumerate(ends.tolist()):
            if end > start:
                acc[e].addmm_(x[start:end].float().t(), dy[start:end].float())
            start = end


def grouped_wgrad_(parts: list, acc: torch.Tensor, accumulate: bool = True) -> None:
    """acc ([E, K, N] fp32, contiguous) += (or with `accumulate` False, =) the sum over the micro-batches `parts`
    ((x [T, K], dy [T, N], ends [E]) each) of x[rows of e]^T @ dy[rows of e] per expert e, rows of e being
    ends[e-1]:ends[e]; the products are summed in fp32 and never rounded, whichever micro-batch they come from,
    so kept micro-batches need no regrouping by expert."""
    if not acc.is_contiguous() or acc.dtype != torch.float32:
        raise ValueError("the gradient buffer must be a contiguous fp32 tensor")
    parts = [(x.contiguous(), dy.contiguous(), ends) for x, dy, ends in parts]
    if not _use_kernels(acc, *(t for x, dy, _ in parts for t in (x, dy))):
        grouped_wgrad_reference(parts, acc, accumulate)
        return
    experts, k, n = acc.shape
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    grid = (-(-k // CONFIG["BLOCK_K"]) * -(-n // CONFIG["BLOCK_N"]), experts)
    for first in range(0, len(parts), MAX_PARTS):
        chunk = parts[first:first + MAX_PARTS]
        zero = chunk[0][2].new_zeros(1)
        bounds = torch.cat([torch.cat([zero, ends]) for _, _, ends in chunk])  # each part's group starts, its end
        _kernel(interpret)[grid](tuple(x for x, _, _ in chunk), tuple(dy for _, dy, _ in chunk), acc, bounds,
                                 experts, k, n, PARTS=len(chunk), ACCUMULATE=accumulate or first > 0,
                                 UPCAST=interpret, **CONFIG)


def main_grad_param(b: torch.Tensor) -> Optional[torch.nn.Parameter]:
    """The parameter whose `main_grad` receives the gradient of `b` (the parameter itself, or the parameter `b`
    is a full reshaping view of, as GroupedMLP's per-expert views are), where this module may write it."""
    base = b if isinstance(b, torch.nn.Parameter) else b._base
    if not isinstance(base, torch.nn.Parameter) or not getattr(base, MARK, False):
        return None
    main = getattr(base, "main_grad", None)
    if main is None or main.numel() != b.numel() or not b.is_contiguous() or b.data_ptr() != base.data_ptr():
        return None
    return base


def grouped_wgrad(x: torch.Tensor, dy: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """[E, K, N] in x's dtype: per expert e, x[rows of e]^T @ dy[rows of e] (torch's grouped GEMM, fp32 inside)."""
    return torch._grouped_mm(x.t(), dy, offs=ends)


def merge_by_expert(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """Several micro-batches' (x, dy, ends) as one: each expert's rows contiguous, micro-batches in order within
    an expert, so one grouped GEMM sums every micro-batch's product. Rows past a part's last group (padding) go
    after every group, where the GEMM does not read. Everything stays on the device (no host sync)."""
    experts = parts[0][2].numel()
    extended, counts = [], []
    for x, _, ends in parts:
        ext = torch.cat([ends, ends.new_full((1,), x.shape[0])])  # the padding as one more group
        extended.append(ext)
        counts.append(torch.diff(ext, prepend=ext.new_zeros(1)))
    total = torch.stack(counts).sum(0)
    merged_ends = torch.cumsum(total, 0, dtype=parts[0][2].dtype)
    merged_starts = merged_ends - total
    rows = sum(x.shape[0] for x, _, _ in parts)
    x_all = parts[0][0].new_empty((rows, parts[0][0].shape[1]))
    dy_all = parts[0][1].new_empty((rows, parts[0][1].shape[1]))
    before = torch.zeros_like(total)
    for (x, dy, _), ext, count in zip(parts, extended, counts):
        row = torch.arange(x.shape[0], device=x.device, dtype=ext.dtype)
        group = torch.searchsorted(ext, row, right=True)
        dest = ((merged_starts + before - (ext - count)).index_select(0, group) + row).long()
        _wide_rows(x_all).index_copy_(0, dest, _wide_rows(x))
        _wide_rows(dy_all).index_copy_(0, dest, _wide_rows(dy))
        before += count
    return x_all, dy_all, merged_ends[:experts]


def _wide_rows(t: torch.Tensor) -> torch.Tensor:
    """`t` ([rows, cols], contiguous) with each row's bytes viewed as the widest element that divides them: torch's
    index_copy moves one element per thread, so bf16 rows copied as 16-byte elements need an eighth of the work."""
    row_bytes = t.shape[1] * t.element_size()
    if not t.is_contiguous():
        return t
    for wide in (torch.complex128, torch.int64, torch.int32):
        size = wide.itemsize
        if size > t.element_size() and row_bytes % size == 0 and (t.storage_offset() * t.element_size()) % size == 0:
            return t.view(wide)
    return t


class _Stash:
    """Deferred operands of the experts' weight gradients, per parameter, within one optimizer step."""

    def __init__(self) -> None:
        # id(param) -> (param, its kept (x, dy, ends), their bytes, the [E, K, N] shape of its main_grad)
        self.parts: dict[int, tuple] = {}
        self.bytes = 0
        self.limit = 0
        self.written: set[int] = set()  # overwriting weights whose gradient this step has already written
        self.overwriting: "weakref.WeakSet[torch.nn.Parameter]" = weakref.WeakSet()

    def take(self, param) -> list:
        _, parts, size, _ = self.parts.pop(id(param), (None, [], 0, None))
        self.bytes -= size
        return parts

    def keep(self, param, parts: list, shape) -> bool:
        size = sum(_nbytes(x, dy) for x, dy, _ in parts)
        if self.bytes + size > self.limit:
            return False
        self.parts[id(param)] = (param, parts, size, shape)
        self.bytes += size
        return True

    def waiting(self, group=None) -> list:
        """(param, shape) of every weight with kept operands (of DDP bucket group `group` only, if given)."""
        return [(p, shape) for p, _, _, shape in self.parts.values() if group is None or getattr(p, DEFER) is group]

    def clear(self) -> None:
        self.parts.clear()
        self.bytes = 0
        self.written.clear()


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


STASH = _Stash()
DEFER = "expert_wgrad_deferred"
"""On a marked expert weight: megatron's DDP bucket group holding it, whose `is_last_microbatch` says when the
step's last backward runs (the gradient must be complete before DDP's hook hands it to the reduction)."""
KERNEL = "expert_wgrad_kernel"
"""On a marked expert weight: accumulate with the Triton kernel (expert_wgrad_into_buffer)."""
OVERWRITE = "expert_wgrad_overwrite"
"""On a marked expert weight: its range of the gradient buffer is not zeroed as a step starts; the step's first
product is written there instead of added (expert_grad_overwrite)."""


def reset_deferred() -> None:
    """Drop whatever an interrupted step left deferred (called as every training step starts)."""
    STASH.clear()


def flush(group=None) -> None:
    """Multiply and add every kept micro-batch now (of DDP bucket group `group` only, if given)."""
    for param, shape in STASH.waiting(group):
        _into_main_grad(param, STASH.take(param), shape)


def finish_backward() -> int:
    """After the step's backward: anything still kept is added (a schedule that never raised the last-micro-batch
    flag and never started the reduction, which megatron's does not do), and an overwriting weight that got no
    gradient in the step (none is known to, but its buffer range still holds the last step's) gets zeros, as a
    zeroed buffer would have given it. Returns how many weights were added this late (the engine reports it: with
    data parallelism their reduction may already have run)."""
    late = len(STASH.waiting())
    flush()
    for param in list(STASH.overwriting):
        if id(param) not in STASH.written:
            param.main_grad.zero_()
    return late


def _flushing_first(group, start_grad_sync):
    def start(*args, **kwargs):
        # megatron's pipeline schedule runs the last stages' last backward with the flag down and starts their
        # reduction afterwards: the kept micro-batches must be in the buffer before it does
        flush(group)
        return start_grad_sync(*args, **kwargs)

    return start


def complement(ranges: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """The parts of [0, size) outside every half-open range of `ranges` (which may touch but not overlap)."""
    out, at = [], 0
    for start, end in sorted(ranges):
        if start > at:
            out.append((at, start))
        at = max(at, end)
    if at < size:
        out.append((at, size))
    return out


def _zero_outside(buffer, skipped: list[tuple[int, int]]):
    keep = complement(skipped, buffer.grad_data.numel())

    def reset() -> None:  # megatron's buffer.reset zeroes all of grad_data
        for start, end in keep:
            buffer.grad_data[start:end].zero_()

    return reset


def accumulate_expert_wgrad(param, x: torch.Tensor, dy: torch.Tensor, ends: torch.Tensor, shape) -> None:
    """main_grad of `param` (viewed as `shape`, [E, K, N]) += this micro-batch's per-expert x^T dy, now or, where
    the parameter defers, together with later micro-batches' in one grouped GEMM and one add (in the step's last
    backward, or as megatron starts the gradient's reduction, whichever comes first)."""
    parts = [(x, dy, ends)]
    group = getattr(param, DEFER, None)
    if group is not None:
        parts = STASH.take(param) + parts
        if not group.is_last_microbatch and STASH.keep(param, parts, shape):
            return
    _into_main_grad(param, parts, shape)


def _into_main_grad(param, parts: list, shape) -> None:
    from .triton_kernels import accumulate_, assign_

    main = param.main_grad.view(shape)
    first = getattr(param, OVERWRITE, False) and id(param) not in STASH.written
    if first:  # this step's first product: the range was not zeroed
        STASH.written.add(id(param))
    if getattr(param, KERNEL, False):
        grouped_wgrad_(parts, main, accumulate=not first)
        return
    if len(parts) > 1:
        parts = [merge_by_expert(parts)]
    (assign_ if first else accumulate_)(main, grouped_wgrad(*parts[0]))


class GroupedMMIntoMainGrad(torch.autograd.Function):
    """a @ b[e] for the rows of each group e (torch's grouped GEMM), whose weight gradient goes into the fp32
    main_grad of `param` (b's parameter) instead of autograd."""

    @staticmethod
    def forward(ctx, a, b, ends, param):
        ctx.save_for_backward(a, b, ends)
        ctx.param = param
        return torch._grouped_mm(a, b, offs=ends)

    @staticmethod
    def backward(ctx, dy):
        a, b, ends = ctx.saved_tensors
        dy = dy.contiguous()
        da = torch._grouped_mm(dy, b.transpose(-1, -2), offs=ends) if ctx.needs_input_grad[0] else None
        param = ctx.param
        accumulate_expert_wgrad(param, a, dy, ends, b.shape)
        param.grad_added_to_main_grad = True
        # a placeholder, as megatron's fused linear layers return: autograd still reaches the parameter's hooks
        # (DDP's bucket bookkeeping), which skip the add
        return da, torch.empty_like(b), None, None


def install(wrapped, kernel: bool, defer_bytes: int, overwrite: bool = False) -> tuple[int, int]:
    """Route the weight gradients of the grouped experts in `wrapped` (megatron DDP modules) through this module:
    with `kernel`, the Triton kernel adds each micro-batch's product into main_grad; with `defer_bytes` > 0,
    micro-batches' operands (up to that many bytes over all experts) wait for the step's last backward and are
    multiplied in one grouped GEMM (or one kernel launch); with `overwrite` (deferring), the step's first product
    is written into the buffer, whose zeroing then leaves those ranges out. Returns (weights routed, weights
    deferring)."""
    from megatron.core.transformer.moe.experts import GroupedMLP

    from .patches import require

    routed = deferring = 0
    STASH.limit = max(defer_bytes, 0)
    STASH.overwriting = weakref.WeakSet()
    for ddp in wrapped:
        if defer_bytes > 0:
            require(ddp, ("param_to_bucket_group",))
        for module in ddp.module.modules():
            if not isinstance(module, GroupedMLP):
                continue
            for w in (module.weight1, module.weight2):
                group = ddp.param_to_bucket_group.get(w) if defer_bytes > 0 else None
                if not kernel and group is None:
                    continue
                setattr(w, MARK, True)
                setattr(w, KERNEL, kernel)
                if group is not None:
                    require(group, ("is_last_microbatch", "start_grad_sync"))
                    if not getattr(group.start_grad_sync, "flushes_expert_wgrad", False):
                        group.start_grad_sync = _flushing_first(group, group.start_grad_sync)
                        group.start_grad_sync.flushes_expert_wgrad = True
                    setattr(w, DEFER, group)
                    deferring += 1
                    if overwrite:
                        setattr(w, OVERWRITE, True)
                        STASH.overwriting.add(w)
                routed += 1
        if not STASH.overwriting:
            continue
        require(ddp, ("buffers", "expert_parallel_buffers"))
        for buffer in ddp.buffers + ddp.expert_parallel_buffers:
            require(buffer, ("reset", "param_index_map", "grad_data"))
            index = buffer.param_index_map
            skipped = [index[p][:2] for p in index if getattr(p, OVERWRITE, False)]
            if skipped:
                buffer.reset = _zero_outside(buffer, skipped)
    return routed, deferring
