"""The MoE experts' weight gradients accumulated into the fp32 gradient buffer by the grouped GEMM itself.

megatron's GroupedMLP multiplies each expert's tokens by that expert's slice of one weight tensor (a view of
`weight1` / `weight2`). Through autograd, the weight gradient of that grouped GEMM is a bf16 tensor the size of
every expert's weights, which megatron's DDP hook then adds into the fp32 `main_grad` in a separate pass, once per
micro-batch: for the Qwen1.5-MoE shapes most parameters are experts', and that add was the largest non-GEMM cost
of the step (benchmarks/gpu/RESULTS.md). Here the backward computes `main_grad[e] += x_e^T @ dy_e` in one Triton
kernel: the product accumulates in fp32 and lands in the buffer without the bf16 round trip, as megatron's own
linear layers do with gradient-accumulation fusion; autograd gets a placeholder and the parameter is marked
`grad_added_to_main_grad`, so neither megatron's hook nor the engine's accumulation hook adds it again.

Group boundaries stay on the device (the token counts of megatron's dispatcher or the engine's local dispatch), so
no host synchronisation is added. On CPU tensors without TRITON_INTERPRET=1 the same sum runs in torch, per expert.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Optional

import torch

from .triton_kernels import WGRAD_IN_MAIN_GRAD as MARK
from .triton_kernels import _use_kernels

CONFIG = dict(BLOCK_K=128, BLOCK_N=128, BLOCK_T=64, num_warps=8, num_stages=3)
"""The kernel's tiles (benchmarks/gpu/expert_wgrad_bench.py compares others)."""


@functools.lru_cache(maxsize=None)
def _kernel(interpret: bool) -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def grouped_wgrad(x_ptr, dy_ptr, acc_ptr, bounds_ptr, K, N, stride_x, stride_dy,
                      BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, UPCAST: tl.constexpr):
        # acc[e] ([K, N] fp32, experts one after another) += x[rows of e]^T @ dy[rows of e]
        e = tl.program_id(0)
        rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        rn = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        start = tl.load(bounds_ptr + e).to(tl.int64)
        end = tl.load(bounds_ptr + e + 1).to(tl.int64)
        acc = tl.full((BLOCK_K, BLOCK_N), 0.0, tl.float32)  # tl.zeros is a jit helper the interpreter cannot call
        t0 = start
        while t0 < end:  # a while loop: Triton's interpreter cannot range() over loaded bounds
            rt = t0 + tl.arange(0, BLOCK_T)
            rows = rt < end
            x = tl.load(x_ptr + rt[:, None] * stride_x + rk[None, :], mask=rows[:, None] & (rk[None, :] < K),
                        other=0.0)
            dy = tl.load(dy_ptr + rt[:, None] * stride_dy + rn[None, :], mask=rows[:, None] & (rn[None, :] < N),
                         other=0.0)
            if UPCAST:  # Triton's interpreter multiplies bf16 as raw bits
                x, dy = x.to(tl.float32), dy.to(tl.float32)
            acc += tl.dot(tl.trans(x), dy)
            t0 += BLOCK_T
        out = acc_ptr + e.to(tl.int64) * K * N + rk[:, None].to(tl.int64) * N + rn[None, :]
        inside = (rk[:, None] < K) & (rn[None, :] < N)
        tl.store(out, tl.load(out, mask=inside, other=0.0) + acc, mask=inside)

    return grouped_wgrad


def grouped_wgrad_reference(x: torch.Tensor, dy: torch.Tensor, ends: torch.Tensor, acc: torch.Tensor) -> None:
    """acc[e] += x[rows of e]^T @ dy[rows of e] in fp32, expert by expert (reads the boundaries on the host)."""
    start = 0
    for e, end in enumerate(ends.tolist()):
        if end > start:
            acc[e].addmm_(x[start:end].float().t(), dy[start:end].float())
        start = end


def grouped_wgrad_(x: torch.Tensor, dy: torch.Tensor, ends: torch.Tensor, acc: torch.Tensor) -> None:
    """acc ([E, K, N] fp32, contiguous) += per expert e: x[rows of e]^T @ dy[rows of e], rows of e being
    ends[e-1]:ends[e] of x ([T, K]) and dy ([T, N])."""
    if not acc.is_contiguous() or acc.dtype != torch.float32:
        raise ValueError("the gradient buffer must be a contiguous fp32 tensor")
    x, dy = x.contiguous(), dy.contiguous()
    if not _use_kernels(x, dy, acc):
        grouped_wgrad_reference(x, dy, ends, acc)
        return
    experts, k, n = acc.shape
    bounds = torch.cat([ends.new_zeros(1), ends])  # each group's first row, then its end
    grid = (experts, -(-k // CONFIG["BLOCK_K"]), -(-n // CONFIG["BLOCK_N"]))
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    _kernel(interpret)[grid](x, dy, acc, bounds, k, n, x.stride(0), dy.stride(0), UPCAST=interpret, **CONFIG)


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
        grouped_wgrad_(a, dy, ends, param.main_grad.view(b.shape))
        param.grad_added_to_main_grad = True
        # a placeholder, as megatron's fused linear layers return: autograd still reaches the parameter's hooks
        # (DDP's bucket bookkeeping), which skip the add
        return da, torch.empty_like(b), None, None


def mark_expert_weights(modules) -> int:
    """Mark the grouped experts' weights of `modules` for this path; returns how many were marked."""
    from megatron.core.transformer.moe.experts import GroupedMLP

    marked = 0
    for root in modules:
        for module in root.modules():
            if isinstance(module, GroupedMLP):
                for w in (module.weight1, module.weight2):
                    setattr(w, MARK, True)
                    marked += 1
    return marked
