"""Fast modules for megatron-core's local (non-Transformer-Engine) layer spec, written on plain torch.

- `SDPAAttention`: a drop-in `core_attention` that calls torch's `scaled_dot_product_attention` (cuDNN's fused
  attention on Hopper, torch's flash kernels as the fallback) instead of megatron's unfused `DotProductAttention` (which materialises the [b, h, s, s]
  scores). It can also apply the rotary embedding itself, in one compiled kernel that writes q and k straight into
  the layout SDPA reads; the model is then built with `position_embedding_type="none"`.
- `fused_qkv_self_attention`: megatron's SelfAttention whose QKV split, rotary embedding and SDPA layout are one
  Triton kernel each way (megatron_triton.QKVRope), for layers without q/k norm.
- `RMSNorm`: compiled RMSNorm in fp32 arithmetic, one kernel each way; marks its weight for the tensor-parallel
  gradient all-reduce under sequence parallelism (torch.nn.RMSNorm, the local default, refuses sequence parallelism).
- `torch_grouped_gemm`: the `gmm` operation megatron's `GroupedMLP` expects from the grouped_gemm package,
  implemented with `torch._grouped_mm` (CUTLASS grouped GEMM in torch, bf16 on sm90+).
- `wgrad_accumulate`: weight-gradient GEMM that accumulates into the fp32 gradient buffer (`addmm` with
  `out_dtype=float32`), standing in for Apex's `fused_weight_gradient_mlp_cuda`.
- foreach gradient norm and scaling, and the fused AdamW switch, replacing megatron's fallbacks for missing Apex.

The process-wide switches (`install_*`) change module attributes of megatron-core; each returns a function that
restores what was there, so the benchmark can measure every lever on its own inside one process.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .expert_wgrad import GroupedMMIntoMainGrad, main_grad_param

# --------------------------------------------------------------------------------------------------------------
# compiled helpers


def maybe_compile(fn: Callable, enabled: bool) -> Callable:
    """torch.compile on CUDA; eager elsewhere (the arithmetic is the same, CPU tests need no C++ toolchain)."""
    if not enabled:
        return fn
    compiled = None

    def run(*args):
        nonlocal compiled
        if not args[0].is_cuda:
            return fn(*args)
        if compiled is None:
            import torch._dynamo

            # one specialisation per activation shape (layers, q/k heads, sequence-parallel shards); a run has few,
            # but a process that builds several models (benchmark ablations, tests) needs more than the default 8
            cfg = torch._dynamo.config
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(cfg, name):
                    setattr(cfg, name, max(getattr(cfg, name), 64))
            compiled = torch.compile(fn, dynamic=False)
        return compiled(*args)

    return run


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


_rms_norm_compiled = maybe_compile(_rms_norm, True)


class RMSNorm(torch.nn.Module):
    """RMSNorm with megatron's module signature (`config, hidden_size, eps`).

    `copy_input`: normalise a private copy of the input. The compiled norm keeps its raw input for the backward;
    in a layer captured as a CUDA graph that input is the graph's input buffer, which megatron-core hands back to
    its buffer pool after capture whenever no other graph produced it (the first layer's, every MoE layer's) and
    later graphs overwrite. A copy made inside the graph lives in the graph's own memory until its backward."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, compiled: bool = True, copy_input: bool = False,
                 **_ignored):
        super().__init__()
        device = "cpu" if config.use_cpu_initialization or not torch.cuda.is_available() else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=device))
        # finalize_model_grads all-reduces grads of parameters marked so over the tensor-parallel group
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))
        self.eps = eps
        self._fn = _rms_norm_compiled if compiled else _rms_norm
        self.copy_input = copy_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x.clone() if self.copy_input else x, self.weight, self.eps)


def rmsnorm_spec(compiled: bool = True, copy_input: bool = False):
    from megatron.core.transformer.spec_utils import ModuleSpec

    return ModuleSpec(module=RMSNorm, params={"compiled": compiled, "copy_input": copy_input})


# --------------------------------------------------------------------------------------------------------------
# rotary embedding + SDPA


def rope_tables(seq_len: int, dim: int, base: float, device, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, fp32 [seq, dim], in the rotate-half convention (frequencies repeated, as HF and megatron)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    pos = torch.arange(offset, offset + seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def _rope_to_bhsd(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [s, b, h, d] -> rotated, laid out [b, h, s, d] contiguous."""
    x32 = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    y = x32 * cos[:, None, None, :] + rotated * sin[:, None, None, :]
    return y.to(x.dtype).permute(1, 2, 0, 3).contiguous()


def _to_bhsd(x: torch.Tensor) -> torch.Tensor:
    return x.permute(1, 2, 0, 3)


_rope_compiled = maybe_compile(_rope_to_bhsd, True)

_SDPA_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}


class SDPAAttention(torch.nn.Module):
    """Core attention on `torch.nn.functional.scaled_dot_product_attention`, megatron's core_attention signature.

    Inputs q [sq, b, np, hn], k/v [sk, b, ng, hn] (this rank's heads); output [sq, b, np*hn]. Causal masking
    comes from the mask type; a padding mask passed in is not applied (right padding under a causal mask only
    affects the padded positions, which carry no loss).
    """

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str = "self",
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None, rope_base: Optional[float] = None,
                 backend: Optional[str] = "cudnn", compiled_rope: bool = True, rope_in_qkv: bool = False):
        super().__init__()
        from megatron.core.transformer.enums import AttnMaskType

        if config.context_parallel_size != 1:
            raise ValueError("SDPA attention does not support context parallelism")
        self.config = config
        self.layer_number = max(1, layer_number)
        self.causal = attn_mask_type == AttnMaskType.causal
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        if config.apply_query_key_layer_scaling:
            self.softmax_scale /= self.layer_number
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.rope_base = rope_base
        # q and k arrive rotated and laid out [b, h, s, d] (as [s, b, h, d] views) from FusedQKVSelfAttention
        self.rope_in_qkv = rope_in_qkv
        self.backend = backend
        self._rope = _rope_compiled if compiled_rope else _rope_to_bhsd
        self._tables: dict = {}
        self._gqa_native: Optional[bool] = None
        self.path: Optional[tuple[Optional[str], bool]] = None  # (backend, native GQA) chosen on the first call

    def _cos_sin(self, seq_len: int, dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (seq_len, dim, device)
        if key not in self._tables:
            self._tables.clear()
            self._tables[key] = rope_tables(seq_len, dim, self.rope_base, device)
        return self._tables[key]

    def _candidates(self) -> list[tuple[Optional[str], bool]]:
        """(backend, native GQA) pairs to try in order; cuDNN's fused attention is the fastest on Hopper, torch's
        flash kernels the fallback."""
        order = {"cudnn": ["cudnn", "flash"]}.get(self.backend, [self.backend])
        return [(b, native) for b in order for native in (True, False)]

    def _sdpa(self, q, k, v, backend: Optional[str], enable_gqa: bool):
        dropout = self.dropout_p if self.training else 0.0
        kwargs = dict(dropout_p=dropout, is_causal=self.causal, scale=self.softmax_scale, enable_gqa=enable_gqa)
        if backend and q.is_cuda:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([getattr(SDPBackend, _SDPA_BACKENDS[backend])]):
                return F.scaled_dot_product_attention(q, k, v, **kwargs)
        return F.scaled_dot_product_attention(q, k, v, **kwargs)

    def _attend(self, q, k, v):
        heads, groups = q.shape[1], k.shape[1]

        def call(backend, native):
            if groups == heads or native:
                return self._sdpa(q, k, v, backend, groups != heads)
            rep = heads // groups
            return self._sdpa(q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), backend, False)

        if self.path is not None or not q.is_cuda:
            return call(*(self.path or (None, True)))
        for i, candidate in enumerate(self._candidates()):  # first call: keep the first path that runs
            try:
                out = call(*candidate)
            except RuntimeError:
                if i == len(self._candidates()) - 1:
                    raise
                continue
            self.path = candidate
            self._gqa_native = candidate[1] if groups != heads else None
            return out
        raise RuntimeError("no scaled_dot_product_attention backend ran")

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPA attention supports neither packed sequences nor an attention bias")
        sq, b, heads, dim = query.shape
        if self.rope_in_qkv:
            q, k = _to_bhsd(query), _to_bhsd(key)
        elif self.rope_base is not None:
            cos, sin = self._cos_sin(sq, dim, query.device)
            q = self._rope(query, cos, sin)
            k = self._rope(key, cos, sin)
        else:
            q, k = _to_bhsd(query), _to_bhsd(key)
        v = _to_bhsd(value)
        out = self._attend(q, k, v)
        # [b, np, sq, hn] -> [sq, b, np*hn]
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * dim)


def sdpa_attention_spec(rope_base: Optional[float], backend: Optional[str], compiled_rope: bool = True,
                        rope_in_qkv: bool = False):
    from megatron.core.transformer.spec_utils import ModuleSpec

    return ModuleSpec(module=SDPAAttention, params={"rope_base": rope_base, "backend": backend,
                                                    "compiled_rope": compiled_rope, "rope_in_qkv": rope_in_qkv})


@functools.lru_cache(maxsize=None)
def fused_qkv_self_attention():
    """megatron's SelfAttention with the QKV split, the rotary embedding of q and k and the [b, h, s, d] layout
    done by one Triton kernel (`megatron_triton.QKVRope`), whose backward writes the fused QKV gradient in one
    pass. Its core attention must be an `SDPAAttention` built with `rope_in_qkv=True`. Only for layers without
    q/k normalisation or output gate, with at least one query group per tensor-parallel rank."""
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.typed_torch import apply_module

    from .triton_kernels import qkv_rope

    class FusedQKVSelfAttention(SelfAttention):
        def get_query_key_value_tensors(self, hidden_states, key_value_states=None, output_gate=False,
                                        split_qkv=True):
            if output_gate or not split_qkv or self.config.num_query_groups < self.world_size:
                raise ValueError("FusedQKVSelfAttention: output gate, unsplit QKV and fewer query groups than "
                                 "tensor-parallel ranks are not supported")
            mixed, _ = apply_module(self.linear_qkv)(hidden_states)
            sq, b = mixed.shape[:2]
            groups = self.num_query_groups_per_partition
            per_group = self.num_attention_heads_per_partition // groups
            dim = self.hidden_size_per_attention_head
            mixed = mixed.view(sq, b, groups, (per_group + 2) * dim)
            cos, sin = self.core_attention._cos_sin(sq, dim, mixed.device)
            q, k, v = qkv_rope(mixed, cos, sin, per_group)
            return q.permute(2, 0, 1, 3), k.permute(2, 0, 1, 3), v.permute(2, 0, 1, 3)

    return FusedQKVSelfAttention


class FlashAttnAttention(torch.nn.Module):
    """Core attention on the flash-attn package (`flash_attn_func`), used only when it is installed."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str = "self",
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__()
        from flash_attn import flash_attn_func

        from megatron.core.transformer.enums import AttnMaskType

        self.fn = flash_attn_func
        self.causal = attn_mask_type == AttnMaskType.causal
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        sq, b, heads, dim = query.shape
        q, k, v = (t.transpose(0, 1) for t in (query, key, value))  # [b, s, h, d]
        out = self.fn(q, k, v, dropout_p=self.dropout_p if self.training else 0.0,
                      softmax_scale=self.softmax_scale, causal=self.causal)
        return out.transpose(0, 1).reshape(sq, b, heads * dim)


def flash_attn_spec():
    from megatron.core.transformer.spec_utils import ModuleSpec

    return ModuleSpec(module=FlashAttnAttention)


# --------------------------------------------------------------------------------------------------------------
# process-wide switches


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient (grouped GEMM rejects expanded strides)."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_mm(a: torch.Tensor, b: torch.Tensor, batch_sizes: torch.Tensor, trans_b: bool = False) -> torch.Tensor:
    """sum over groups g of a[rows of g] @ b[g] (b[g].T with trans_b); the grouped_gemm package's `gmm` contract."""
    offs = torch.cumsum(batch_sizes.to(device=a.device, dtype=torch.int32), dim=0, dtype=torch.int32)
    if not trans_b and b.requires_grad and torch.is_grad_enabled():
        param = main_grad_param(b)  # set where the experts' weight gradients go straight into the fp32 buffer
        if param is not None:
            return GroupedMMIntoMainGrad.apply(a, b, offs, param)
    w = b.transpose(-1, -2) if trans_b else b
    return torch._grouped_mm(_ContiguousGrad.apply(a), w, offs=offs)


class _TorchGroupedGemmOps:
    @staticmethod
    def gmm(a, b, batch_sizes, trans_b=False):
        return _ContiguousGrad.apply(grouped_mm(a, b, batch_sizes, trans_b))


class _TorchGroupedGemmPackage:
    """Stands in for the grouped_gemm package inside megatron's grouped_gemm_util."""

    ops = _TorchGroupedGemmOps


def install_torch_grouped_gemm() -> Callable[[], None]:
    from megatron.core.transformer.moe import experts as experts_mod
    from megatron.core.transformer.moe import grouped_gemm_util as gg

    from .patches import replace

    assert experts_mod.gg is gg  # GroupedMLP looks the ops up through this module at call time
    return replace(gg.__name__, {"grouped_gemm": _TorchGroupedGemmPackage, "ops": _TorchGroupedGemmOps})


def wgrad_accumulate(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor,
                     alpha: float = 1.0) -> None:
    """main_grad (fp32) += alpha * grad_output^T @ total_input, with bf16/fp16 operands and fp32 accumulation
    (on CPU, where addmm has no out_dtype, the operands are cast to fp32 first)."""
    g = grad_output.reshape(-1, grad_output.shape[-1])
    x = total_input.reshape(-1, total_input.shape[-1])
    if main_grad.is_cuda:
        torch.addmm(main_grad, g.t(), x, out_dtype=torch.float32, alpha=alpha, out=main_grad)
    else:
        main_grad.addmm_(g.t().float(), x.float(), alpha=alpha)


def wgrad_accumulate_low_precision(total_input, grad_output, main_grad) -> None:
    g = grad_output.reshape(-1, grad_output.shape[-1])
    x = total_input.reshape(-1, total_input.shape[-1])
    main_grad.addmm_(g.t(), x)


class _WgradModule:
    wgrad_gemm_accum_fp32 = staticmethod(wgrad_accumulate)
    wgrad_gemm_accum_fp16 = staticmethod(wgrad_accumulate_low_precision)


def wgrad_accumulate_works() -> bool:
    """addmm with out_dtype=float32 into its own input exists on CUDA builds of recent torch; check it once."""
    if not torch.cuda.is_available():
        return False
    try:
        a = torch.randn(64, 32, device="cuda", dtype=torch.bfloat16)
        g = torch.randn(64, 16, device="cuda", dtype=torch.bfloat16)
        acc = torch.randn(16, 32, device="cuda", dtype=torch.float32)
        ref = acc + g.float().t() @ a.float()
        wgrad_accumulate(a, g, acc)
        return bool(torch.allclose(acc, ref, rtol=1e-2, atol=1e-2))
    except (RuntimeError, TypeError):
        return False


def ensure_moe_without_te() -> None:
    """megatron-core 0.16.1 refers to `te_general_gemm` in its router GEMM even when Transformer Engine is absent
    (the name is only bound by a TE import), so every MoE forward fails with NameError; bind it to None so the
    torch path is taken. Idempotent, and a no-op when TE is installed."""
    from megatron.core.transformer.moe import moe_utils

    from .patches import replace

    if not hasattr(moe_utils, "te_general_gemm"):
        replace(moe_utils.__name__, {"te_general_gemm": None})  # for the process: nothing else binds it


def install_grad_accum_fusion() -> Callable[[], None]:
    from megatron.core.tensor_parallel import layers

    from .patches import replace

    return replace(layers.__name__, {"fused_weight_gradient_mlp_cuda": _WgradModule,
                                     "_grad_accum_fusion_available": True})


def _foreach_l2norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    tensors = [t for t in tensor_lists[0] if t.numel() > 0]
    if not tensors:
        return torch.zeros(1, dtype=torch.float32, device="cuda"), None
    norms = torch._foreach_norm([t.float() if t.dtype != torch.float32 else t for t in tensors])
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def _foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    src, dst = tensor_lists[0], tensor_lists[1]
    if all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def _applier(op, noop_flag, tensor_lists, *args):
    return op(2048 * 32, noop_flag, tensor_lists, *args)


def install_foreach_grad_ops() -> Callable[[], None]:
    """Replace megatron's Apex-less fallbacks (one host sync per tensor in the grad norm) with foreach ops."""
    from megatron.core.optimizer import clip_grads, optimizer

    if getattr(clip_grads, "l2_norm_impl", None).__module__ not in ("megatron.core.utils", __name__):
        return lambda: None  # Apex or TE kernels are present: keep them
    from .patches import replace

    undo = [replace(clip_grads.__name__, {"multi_tensor_applier": _applier, "l2_norm_impl": _foreach_l2norm,
                                          "multi_tensor_scale_impl": _foreach_scale}),
            replace(optimizer.__name__, {"multi_tensor_applier": _applier, "multi_tensor_scale_impl": _foreach_scale})]

    def restore():
        for u in reversed(undo):
            u()

    return restore


def inner_torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside a megatron (chained / mixed-precision / distributed) optimizer."""
    found = []
    stack = [optimizer]
    while stack:
        o = stack.pop()
        if isinstance(o, torch.optim.Optimizer):
            found.append(o)
        elif hasattr(o, "chained_optimizers"):
            stack.extend(o.chained_optimizers)
        elif getattr(o, "optimizer", None) is not None:
            stack.append(o.optimizer)
    return found


def megatron_optimizers(optimizer) -> list:
    """The megatron optimizers a chained one holds (or the optimizer itself when it is not chained)."""
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def use_fused_adam(optimizer) -> int:
    """Switch torch Adam/AdamW groups whose parameters are all fp32 tensors on a device with torch's fused kernel
    (CUDA; the CPU too, where the engine's CPU tests run it) to that kernel."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:
        devices = {"cuda"}
    switched = 0
    for opt in inner_torch_optimizers(optimizer):
        if not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in opt.param_groups:
            params = group["params"]
            if params and all(p.device.type in devices and p.dtype == torch.float32 for p in params):
                group["fused"] = True
                group["foreach"] = False
                switched += 1
                for p in params:  # a step restored from a checkpoint may sit on the host; fused wants it beside p
                    step = opt.state.get(p, {}).get("step")
                    if isinstance(step, torch.Tensor) and step.device != p.device:
                        opt.state[p]["step"] = step.to(device=p.device, dtype=torch.float32)
    return switched
