"""Triton kernels for memory-bound steps that torch leaves slower than the memory allows, and their installers.

- SwiGLU over the fused gate/up projection [..., 2F] -> [..., F], forward and backward in one pass each. megatron's
  compiled backward builds the [..., 2F] input gradient as a concatenation of two expressions, so each thread
  reads the output gradient and the gate twice; here each program reads gate, up and gradient once and writes
  both halves.
- Accumulating a bf16/fp16 gradient into the fp32 main-gradient buffer. torch's mixed-dtype `add_` takes its
  unvectorised elementwise path; this kernel converts on load and streams at the memory's rate. Megatron adds
  `param.grad` into `param.main_grad` once per parameter and micro-batch for every parameter whose weight
  gradient is not produced by the fused GEMM (embeddings, norms, biases, the router, the MoE experts' grouped
  GEMMs): for the MoE shapes that is most of the parameters.

Kernels are compiled on first use. On CPU tensors (and where Triton is missing) the same arithmetic runs in torch;
with TRITON_INTERPRET=1 the kernels themselves run on CPU tensors, which is how the unit tests check them.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Iterable

import torch

_BLOCK_1D = 4096
_BLOCK_COLS = 1024


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _use_kernels(*tensors: torch.Tensor) -> bool:
    if not triton_available():
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _kernels(interpret: bool) -> dict[str, Any]:
    """The jitted kernels (keyed by the interpreter switch, which triton reads when a kernel is defined)."""
    import triton
    import triton.language as tl

    @triton.jit
    def swiglu_fwd(y_ptr, out_ptr, width, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < width
        gate = tl.load(y_ptr + row * 2 * width + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(y_ptr + row * 2 * width + width + cols, mask=mask, other=0.0).to(tl.float32)
        out = gate / (1.0 + tl.exp(-gate)) * up  # tl.sigmoid is a jit helper the interpreter cannot call
        tl.store(out_ptr + row * width + cols, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def swiglu_bwd(g_ptr, y_ptr, dy_ptr, width, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < width
        g = tl.load(g_ptr + row * width + cols, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(y_ptr + row * 2 * width + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(y_ptr + row * 2 * width + width + cols, mask=mask, other=0.0).to(tl.float32)
        s = 1.0 / (1.0 + tl.exp(-gate))
        d_gate = g * s * (1.0 + gate * (1.0 - s)) * up
        d_up = g * gate * s
        tl.store(dy_ptr + row * 2 * width + cols, d_gate.to(dy_ptr.dtype.element_ty), mask=mask)
        tl.store(dy_ptr + row * 2 * width + width + cols, d_up.to(dy_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def accumulate(acc_ptr, x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        acc = tl.load(acc_ptr + offs, mask=mask)
        x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
        tl.store(acc_ptr + offs, acc + x, mask=mask)

    return {"swiglu_fwd": swiglu_fwd, "swiglu_bwd": swiglu_bwd, "accumulate": accumulate}


def _k(name: str):
    return _kernels(os.environ.get("TRITON_INTERPRET") == "1")[name]


def _grid_cols(rows: int, width: int) -> tuple[int, int]:
    return rows, (width + _BLOCK_COLS - 1) // _BLOCK_COLS


# ---------------------------------------------------------------------------------------------------- SwiGLU


def swiglu_reference(y: torch.Tensor) -> torch.Tensor:
    gate, up = y.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(y.dtype)


def swiglu_backward_reference(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    gate, up = y.float().chunk(2, dim=-1)
    g32 = g.float()
    s = torch.sigmoid(gate)
    return torch.cat([g32 * s * (1 + gate * (1 - s)) * up, g32 * gate * s], dim=-1).to(y.dtype)


def swiglu_forward(y: torch.Tensor) -> torch.Tensor:
    if not _use_kernels(y):
        return swiglu_reference(y)
    y = y.contiguous()
    width = y.shape[-1] // 2
    out = torch.empty(*y.shape[:-1], width, dtype=y.dtype, device=y.device)
    rows = y.numel() // (2 * width)
    if rows:
        _k("swiglu_fwd")[_grid_cols(rows, width)](y, out, width, BLOCK=_BLOCK_COLS)
    return out


def swiglu_backward(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if not _use_kernels(g, y):
        return swiglu_backward_reference(g, y)
    g, y = g.contiguous(), y.contiguous()
    width = y.shape[-1] // 2
    dy = torch.empty_like(y)
    rows = y.numel() // (2 * width)
    if rows:
        _k("swiglu_bwd")[_grid_cols(rows, width)](g, y, dy, width, BLOCK=_BLOCK_COLS)
    return dy


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up over the last dimension [gate | up]; saves only the input, as megatron's fused version."""

    @staticmethod
    def forward(ctx, y):
        if y.shape[-1] % 2:
            raise ValueError(f"SwiGLU needs an even last dimension, got {y.shape[-1]}")
        ctx.save_for_backward(y)
        return swiglu_forward(y)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return swiglu_backward(g, y)


def install_swiglu() -> Callable[[], None]:
    """Route megatron's fused SwiGLU (dense MLP and MoE shared expert) through the kernels above when the call
    has no bias, no fp8 input store and no activation offloading (the case for every Qwen model); any other call
    goes to megatron's own function."""
    from megatron.core.transformer import mlp
    from megatron.core.transformer.moe import shared_experts

    modules = (mlp, shared_experts)
    saved = [m.bias_swiglu_impl for m in modules]

    def make(original):
        def bias_swiglu_impl(input, bias, fp8_input_store=False, cpu_offload_input=False):
            if bias is None and not fp8_input_store and not cpu_offload_input and input.is_cuda:
                return SwiGLU.apply(input)
            return original(input, bias, fp8_input_store, cpu_offload_input)

        return bias_swiglu_impl

    for m, original in zip(modules, saved):
        m.bias_swiglu_impl = make(original)

    def restore():
        for m, original in zip(modules, saved):
            m.bias_swiglu_impl = original

    return restore


# ----------------------------------------------------------------------------------- gradient accumulation


def accumulate_(acc: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """acc += x in place, acc fp32 and x of any float dtype, both of the same number of elements."""
    if acc.numel() != x.numel():
        raise ValueError(f"cannot accumulate {tuple(x.shape)} into {tuple(acc.shape)}")
    if acc.dtype != torch.float32 or not acc.is_contiguous() or not _use_kernels(acc, x):
        return acc.add_(x.view_as(acc))
    x = x.contiguous()
    n = acc.numel()
    if n:
        _k("accumulate")[((n + _BLOCK_1D - 1) // _BLOCK_1D,)](acc, x, n, BLOCK=_BLOCK_1D)
    return acc


def fused_wgrad_params(modules: Iterable[torch.nn.Module]) -> set[int]:
    """ids of weights whose gradient megatron's linear layers put straight into main_grad (a dummy in .grad)."""
    found: set[int] = set()
    for root in modules:
        for module in root.modules():
            if getattr(module, "gradient_accumulation_fusion", False) and getattr(module, "weight", None) is not None:
                found.add(id(module.weight))
    return found


def install_grad_accumulation(modules: list[torch.nn.Module]) -> list[Any]:
    """For every parameter of `modules` that megatron's DDP accumulates by `main_grad.add_(grad)`, do that add
    with the kernel first and mark it done (`grad_added_to_main_grad`), so DDP's own hook, which runs after it,
    only releases `.grad` and schedules the reduction. Weights of linear layers with gradient-accumulation fusion
    are left alone: their `.grad` is a placeholder. Call after the DDP wrappers exist (they create `main_grad`).
    Returns the hook handles."""
    skip = fused_wgrad_params(modules)
    handles = []

    def hook(param: torch.Tensor) -> None:
        main = getattr(param, "main_grad", None)
        if param.grad is None or main is None:
            return
        accumulate_(main, param.grad)
        param.grad_added_to_main_grad = True

    for root in modules:
        for param in root.parameters():
            if not param.requires_grad or id(param) in skip or not hasattr(param, "main_grad"):
                continue
            if not hasattr(param, "grad_added_to_main_grad"):
                continue  # not a parameter megatron's DDP manages
            handles.append(param.register_post_accumulate_grad_hook(hook))
    return handles
