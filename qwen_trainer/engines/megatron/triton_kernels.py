"""Triton kernels for memory-bound steps that torch leaves slower than the memory allows, and their installers.

- SwiGLU over the fused gate/up projection [..., 2F] -> [..., F], forward and backward in one pass each. megatron's
  compiled backward builds the [..., 2F] input gradient as a concatenation of two expressions, so each thread
  reads the output gradient and the gate twice; here each program reads gate, up and gradient once and writes
  both halves.
- The split of megatron's fused QKV projection, the rotary embedding of q and k and the [b, h, s, d] layout SDPA
  reads, in one kernel; its backward writes the fused QKV gradient in one pass instead of concatenating three
  gradients after copies (`QKVRope`, used by `megatron_kernels.fused_qkv_self_attention`).
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
WGRAD_IN_MAIN_GRAD = "wgrad_into_main_grad"
"""Set on a parameter whose weight gradient its own GEMM writes into main_grad (expert_wgrad): the accumulation
hook leaves it alone."""
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

    @triton.jit
    def widen(out_ptr, x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask).to(tl.float32), mask=mask)

    return {"swiglu_fwd": swiglu_fwd, "swiglu_bwd": swiglu_bwd, "accumulate": accumulate, "widen": widen}


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

    from .patches import replace

    def make(original):
        def bias_swiglu_impl(input, bias, fp8_input_store=False, cpu_offload_input=False):
            if bias is None and not fp8_input_store and not cpu_offload_input and input.is_cuda:
                return SwiGLU.apply(input)
            return original(input, bias, fp8_input_store, cpu_offload_input)

        return bias_swiglu_impl

    undo = [replace(m.__name__, {"bias_swiglu_impl": make(m.bias_swiglu_impl)}) for m in (mlp, shared_experts)]

    def restore():
        for u in reversed(undo):
            u()

    return restore


# ----------------------------------------------------------------------------------- gradient accumulation


def _into_fp32(kernel: str, out: torch.Tensor, x: torch.Tensor, torch_op) -> torch.Tensor:
    """One elementwise pass from `x` (any float dtype) into the fp32 `out` of the same number of elements: the
    Triton `kernel` where it runs, else `torch_op(out, x viewed as out)`."""
    if out.dtype != torch.float32 or not out.is_contiguous() or not _use_kernels(out, x):
        return torch_op(out, x.view_as(out))
    x = x.contiguous()
    n = out.numel()
    if n:
        _k(kernel)[((n + _BLOCK_1D - 1) // _BLOCK_1D,)](out, x, n, BLOCK=_BLOCK_1D)
    return out


def accumulate_(acc: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """acc += x in place, acc fp32 and x of any float dtype, both of the same number of elements."""
    if acc.numel() != x.numel():
        raise ValueError(f"cannot accumulate {tuple(x.shape)} into {tuple(acc.shape)}")
    return _into_fp32("accumulate", acc, x, torch.Tensor.add_)


def assign_(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """out = x in place, out fp32 and x of any float dtype, both of the same number of elements. torch's copy_
    between dtypes takes its unvectorised casting path; with this pass the deferred experts' overwriting step
    went from 0.87x to 0.75x the time of the adding one on an H100 (benchmarks/gpu/RESULTS.md)."""
    if out.numel() != x.numel():
        raise ValueError(f"cannot assign {tuple(x.shape)} to {tuple(out.shape)}")
    return _into_fp32("widen", out, x, torch.Tensor.copy_)


def fused_wgrad_params(modules: Iterable[torch.nn.Module]) -> set[int]:
    """ids of weights whose gradient megatron's linear layers put straight into main_grad (a dummy in .grad)."""
    found: set[int] = set()
    for root in modules:
        for module in root.modules():
            fused = getattr(module, "gradient_accumulation_fusion", False) or getattr(
                module, "fuse_wgrad_accumulation", False)  # megatron's linear layers; Transformer Engine's
            if fused and getattr(module, "weight", None) is not None:
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
            if getattr(param, WGRAD_IN_MAIN_GRAD, False):
                continue  # its grouped GEMM accumulates into main_grad itself (expert_wgrad)
            handles.append(param.register_post_accumulate_grad_hook(hook))
    return handles


# ------------------------------------------------------------------------------ QKV split + rotary embedding


@functools.lru_cache(maxsize=None)
def _qkv_kernels(interpret: bool) -> dict[str, Any]:
    import triton
    import triton.language as tl

    @triton.jit
    def qkv_rope_fwd(mixed_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, batch, seq, groups,
                     R: tl.constexpr, HALF: tl.constexpr):
        # one program per (token, query group); token = s * batch + b, the row order of megatron's [s, b, ...]
        token = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1).to(tl.int64)
        s = token // batch
        b = token % batch
        D: tl.constexpr = 2 * HALF
        lo = tl.arange(0, HALF)
        c1 = tl.load(cos_ptr + s * D + lo)
        c2 = tl.load(cos_ptr + s * D + HALF + lo)
        s1 = tl.load(sin_ptr + s * D + lo)
        s2 = tl.load(sin_ptr + s * D + HALF + lo)
        src = mixed_ptr + (token * groups + g) * (R + 2) * D
        for j in tl.static_range(R + 1):  # R query heads, then the key head: rotated
            x1 = tl.load(src + j * D + lo).to(tl.float32)
            x2 = tl.load(src + j * D + HALF + lo).to(tl.float32)
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
            if j < R:
                dst = q_ptr + ((b * groups * R + g * R + j) * seq + s) * D
            else:
                dst = k_ptr + ((b * groups + g) * seq + s) * D
            tl.store(dst + lo, y1.to(q_ptr.dtype.element_ty))
            tl.store(dst + HALF + lo, y2.to(q_ptr.dtype.element_ty))
        dst = v_ptr + ((b * groups + g) * seq + s) * D
        tl.store(dst + lo, tl.load(src + (R + 1) * D + lo))
        tl.store(dst + HALF + lo, tl.load(src + (R + 1) * D + HALF + lo))

    @triton.jit
    def qkv_rope_bwd(dq_ptr, dk_ptr, dv_ptr, cos_ptr, sin_ptr, dmixed_ptr, batch, seq, groups,
                     R: tl.constexpr, HALF: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1).to(tl.int64)
        s = token // batch
        b = token % batch
        D: tl.constexpr = 2 * HALF
        lo = tl.arange(0, HALF)
        c1 = tl.load(cos_ptr + s * D + lo)
        c2 = tl.load(cos_ptr + s * D + HALF + lo)
        s1 = tl.load(sin_ptr + s * D + lo)
        s2 = tl.load(sin_ptr + s * D + HALF + lo)
        dst = dmixed_ptr + (token * groups + g) * (R + 2) * D
        for j in tl.static_range(R + 1):
            if j < R:
                src = dq_ptr + ((b * groups * R + g * R + j) * seq + s) * D
            else:
                src = dk_ptr + ((b * groups + g) * seq + s) * D
            dy1 = tl.load(src + lo).to(tl.float32)
            dy2 = tl.load(src + HALF + lo).to(tl.float32)
            dx1 = dy1 * c1 + dy2 * s2
            dx2 = dy2 * c2 - dy1 * s1
            tl.store(dst + j * D + lo, dx1.to(dmixed_ptr.dtype.element_ty))
            tl.store(dst + j * D + HALF + lo, dx2.to(dmixed_ptr.dtype.element_ty))
        src = dv_ptr + ((b * groups + g) * seq + s) * D
        tl.store(dst + (R + 1) * D + lo, tl.load(src + lo))
        tl.store(dst + (R + 1) * D + HALF + lo, tl.load(src + HALF + lo))

    return {"fwd": qkv_rope_fwd, "bwd": qkv_rope_bwd}


def _qk(name: str):
    return _qkv_kernels(os.environ.get("TRITON_INTERPRET") == "1")[name]


def qkv_rope_supported(head_dim: int) -> bool:
    return head_dim >= 2 and head_dim & (head_dim - 1) == 0 and triton_available()


def qkv_rope_reference(mixed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads_per_group: int):
    """mixed [s, b, g, (r + 2) d] (megatron's fused QKV layout) -> q [b, g*r, s, d], k and v [b, g, s, d], q and k
    rotated (rotate-half convention, cos/sin [s, d] in fp32)."""
    s, b, g, width = mixed.shape
    r = heads_per_group
    d = width // (r + 2)
    q, k, v = mixed.split([r * d, d, d], dim=-1)
    q = q.reshape(s, b, g * r, d)

    def rotate(x):
        x32 = x.float()
        half = d // 2
        rot = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
        return (x32 * cos[:, None, None, :] + rot * sin[:, None, None, :]).to(x.dtype)

    def bhsd(x):
        return x.permute(1, 2, 0, 3).contiguous()

    return bhsd(rotate(q)), bhsd(rotate(k)), bhsd(v)


class QKVRope(torch.autograd.Function):
    """The split of megatron's fused QKV projection, the rotary embedding of q and k, and the [b, h, s, d] layout
    SDPA reads, in one kernel each way. The backward writes the fused QKV gradient directly (no concatenation)."""

    @staticmethod
    def forward(ctx, mixed, cos, sin, heads_per_group: int):
        s, b, g, width = mixed.shape
        r = heads_per_group
        d = width // (r + 2)
        if width != (r + 2) * d or not qkv_rope_supported(d) or not _use_kernels(mixed):
            raise ValueError(f"fused QKV + rope needs a power-of-two head size and the kernels, "
                             f"got {tuple(mixed.shape)}")
        mixed = mixed.contiguous()
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
        q = torch.empty(b, g * r, s, d, dtype=mixed.dtype, device=mixed.device)
        k = torch.empty(b, g, s, d, dtype=mixed.dtype, device=mixed.device)
        v = torch.empty_like(k)
        if mixed.numel():
            _qk("fwd")[(s * b, g)](mixed, cos, sin, q, k, v, b, s, g, R=r, HALF=d // 2)
        ctx.save_for_backward(cos, sin)
        ctx.shape = (s, b, g, width, r, d)
        return q, k, v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        s, b, g, width, r, d = ctx.shape
        ref = next(t for t in (dq, dk, dv) if t is not None)
        dq, dk, dv = (torch.zeros(shape, dtype=ref.dtype, device=ref.device) if t is None else t.contiguous()
                      for t, shape in ((dq, (b, g * r, s, d)), (dk, (b, g, s, d)), (dv, (b, g, s, d))))
        dmixed = torch.empty(s, b, g, width, dtype=ref.dtype, device=ref.device)
        if dmixed.numel():
            _qk("bwd")[(s * b, g)](dq, dk, dv, cos, sin, dmixed, b, s, g, R=r, HALF=d // 2)
        return dmixed, None, None, None


def qkv_rope(mixed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads_per_group: int):
    """QKVRope where the kernels run (CUDA), the same arithmetic in torch elsewhere (CPU runs of the engine)."""
    if _use_kernels(mixed):
        return QKVRope.apply(mixed, cos, sin, heads_per_group)
    return qkv_rope_reference(mixed, cos, sin, heads_per_group)
