"""AdamW over the fp32 main weights that also writes the bf16 model weights, in one pass (`adamw_writes_model_params`).

megatron's mixed-precision optimizer steps torch's AdamW over fp32 copies of the bf16 weights and then copies every
main weight back into its bf16 model weight in a pass of its own. With clipping folded into fused AdamW
(clip_in_adam), torch's kernel also writes the divided gradient back to memory. For the MoE benchmark shapes, about
2.3 billion parameters, that is 38 bytes moved per parameter a step where the update needs 30 (read weight,
gradient, two moments; write weight, two moments, bf16 weight): the fused AdamW and the copy were 34 ms of a 165 ms
step (benchmarks/gpu/RESULTS.md).

This kernel runs torch's AdamW arithmetic (torch 2.11's `_fused_adamw_`, ADAMW mode) element by element in the same
precisions and order: every hyperparameter cast to fp32, the bias corrections in fp32 (from the host), the
decoupled weight decay and both moments (in lerp form, `fma(beta, m, fma(-beta, g, g))`) as fp32 fused
multiply-adds, IEEE division and square root; it divides the gradient by the clip divisor as it loads it, and stores
the weight both in fp32 and, rounded to nearest even, in bf16. Every tensor of a parameter group goes to one launch:
a table of each tensor's addresses (cached while they stay put) and a table of fixed-size chunks, so large and small
tensors share the GPU evenly. The optimizer state stays torch's (`step`, `exp_avg`, `exp_avg_sq` under the same
keys), so checkpoints do not change and turning the switch off resumes the same run.

It steps the inner AdamW of megatron's `Float16OptimizerWithFloat16Params` and of its `DistributedOptimizer` (the
default: there the bf16 destination is this rank's slice of the parameter buffer, which megatron's all-gather then
sends), each one of a chained optimizer (expert parallelism's expert optimizer too), only where every group is torch
AdamW in its fused mode without amsgrad or maximize and bf16 weights are trained; fp16 with its loss scaler, the
precision-aware optimizer and other optimizers keep megatron's path. On CPU tensors without TRITON_INTERPRET=1 the
same arithmetic runs in torch, tensor by tensor.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy
import torch

from .triton_kernels import _use_kernels

CHUNK = 1 << 14
"""Elements per program: about 140,000 programs for the MoE shapes, so no tensor's tail leaves the GPU idle (the
fastest of benchmarks/gpu/adamw_bench.py's tiles on an H100)."""
BLOCK = 1024
NUM_WARPS = 4
SLOTS = 5  # addresses per tensor in the table: weight, gradient, first moment, second moment, bf16 weight (or 0)


@functools.lru_cache(maxsize=None)
def _kernel(interpret: bool) -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def adamw(table_ptr, numel_ptr, chunk_tensor_ptr, chunk_start_ptr, divisor_ptr, lr_wd, beta1, beta2, eps,
              step_size, bc2_sqrt, HAS_DIVISOR: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        # torch's kernel: every hyperparameter cast to fp32, the decoupled weight decay and both moments (in lerp
        # form) as fp32 fused multiply-adds; the step size and bias correction come from the host (fp32_factors)
        c = tl.program_id(0)
        t = tl.load(chunk_tensor_ptr + c).to(tl.int64)
        start = tl.load(chunk_start_ptr + c)
        end = tl.minimum(start + CHUNK, tl.load(numel_ptr + t))
        row = table_ptr + t * 5
        w_ptr = tl.load(row).to(tl.pointer_type(tl.float32))
        g_ptr = tl.load(row + 1).to(tl.pointer_type(tl.float32))
        m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
        v_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
        half = tl.load(row + 4)
        divisor = 1.0
        if HAS_DIVISOR:
            divisor = tl.load(divisor_ptr)
        for offset in tl.range(0, CHUNK, BLOCK):  # a fixed trip count: the loads of the next block are issued early
            idx = start + offset + tl.arange(0, BLOCK)
            mask = idx < end
            g = tl.load(g_ptr + idx, mask=mask, other=0.0)
            if HAS_DIVISOR:  # IEEE division and square root, as torch's kernel (Triton's defaults approximate)
                g = tl.div_rn(g, divisor)
            w = tl.load(w_ptr + idx, mask=mask, other=0.0)
            m = tl.load(m_ptr + idx, mask=mask, other=0.0)
            v = tl.load(v_ptr + idx, mask=mask, other=0.0)
            w = tl.fma(-lr_wd, w, w)
            m = tl.fma(beta1, m, tl.fma(-beta1, g, g))
            g2 = g * g
            v = tl.fma(beta2, v, tl.fma(-beta2, g2, g2))
            denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
            w = w - tl.div_rn(step_size * m, denom)
            tl.store(w_ptr + idx, w, mask=mask)
            tl.store(m_ptr + idx, m, mask=mask)
            tl.store(v_ptr + idx, v, mask=mask)
            if half != 0:
                tl.store(half.to(tl.pointer_type(tl.bfloat16)) + idx, w.to(tl.bfloat16), mask=mask)

    return adamw


def _f32(x: float) -> float:
    return float(numpy.float32(x))


def fp32_scalars(lr: float, weight_decay: float, beta1: float, beta2: float, eps: float) -> tuple[float, ...]:
    """lr * weight_decay, beta1, beta2 and eps as torch's kernel holds them: fp32 (the product of the fp32 two)."""
    return _f32(_f32(lr) * _f32(weight_decay)), _f32(beta1), _f32(beta2), _f32(eps)


def fp32_factors(lr: float, beta1: float, beta2: float, step: float) -> tuple[float, float]:
    """step_size = lr / (1 - beta1^t) and sqrt(1 - beta2^t) as torch's kernel computes them, each operation in fp32
    from the fp32 hyperparameters, rounded correctly (torch's kernel calls CUDA's powf, which may round the power
    the other way in rare steps: an ulp of the step size)."""
    b1, b2 = _f32(beta1), _f32(beta2)
    bc1, bc2 = _f32(1.0 - _f32(b1 ** step)), _f32(1.0 - _f32(b2 ** step))
    return _f32(_f32(lr) / bc1), _f32(math.sqrt(bc2))


def _fma(a, b, c: torch.Tensor) -> torch.Tensor:
    """fp32 fused multiply-add (the product of two fp32 values is exact in fp64)."""
    a = a.double() if torch.is_tensor(a) else a
    b = b.double() if torch.is_tensor(b) else b
    return (a * b + c.double()).float()


def adamw_reference(w, g, m, v, half, *, lr, weight_decay, beta1, beta2, eps, step, divisor=None) -> None:
    """The same update in torch ops on one tensor (`step` already counts this step), in the same precisions."""
    if divisor is not None:
        g = g / divisor
    lr_wd, b1, b2, eps = fp32_scalars(lr, weight_decay, beta1, beta2, eps)
    w.copy_(_fma(-lr_wd, w, w))
    m.copy_(_fma(b1, m, _fma(-b1, g, g)))
    g2 = g * g
    v.copy_(_fma(b2, v, _fma(-b2, g2, g2)))
    step_size, bc2_sqrt = fp32_factors(lr, beta1, beta2, step)
    # a correctly rounded square root (torch's CPU one for fp32 is not) and a tensor divisor (torch multiplies by
    # the reciprocal of a scalar one), as on the GPU
    denom = v.double().sqrt().float() / torch.full_like(v, bc2_sqrt) + eps
    w.sub_((step_size * m) / denom)
    if half is not None:
        half.copy_(w)


@dataclass
class _Launch:
    """One parameter group's tensors, laid out for the kernel (rebuilt when an address or the step changes)."""

    key: tuple
    steps: list
    step: float  # the group's step count on the host, so no step tensor is read back
    table: Optional[torch.Tensor] = None
    numels: Optional[torch.Tensor] = None
    chunk_tensor: Optional[torch.Tensor] = None
    chunk_start: Optional[torch.Tensor] = None
    halves: list = field(default_factory=list)


class ParamGroupStepper:
    """Steps the groups of one torch AdamW (megatron's inner optimizer) with the kernel."""

    def __init__(self, opt: torch.optim.Optimizer, model_of: dict[int, torch.Tensor]) -> None:
        self.opt = opt
        self.model_of = model_of  # id(main fp32 weight) -> the bf16 tensor its values go to
        self.launches: dict[int, _Launch] = {}
        self.wrote_model_params = False  # set by install's step: megatron's next copy is already done

    def _state(self, p: torch.Tensor) -> dict:
        state = self.opt.state[p]
        if not state:  # as torch's fused AdamW creates it on a parameter's first step
            state["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _launch(self, index: int, params: list) -> _Launch:
        states = [self._state(p) for p in params]
        halves = [self.model_of.get(id(p)) for p in params]
        key = tuple((p.data_ptr(), p.grad.data_ptr(), s["exp_avg"].data_ptr(), s["exp_avg_sq"].data_ptr(),
                     h.data_ptr() if h is not None else 0, s["step"].data_ptr(), p.numel())
                    for p, s, h in zip(params, states, halves))
        old = self.launches.get(index)
        if old is not None and old.key == key:
            return old
        steps = [s["step"] for s in states]
        counts = {float(s) for s in steps}  # read back once per layout, not per step
        if len(counts) != 1:
            raise ValueError(f"AdamW step counts differ within a parameter group: {sorted(counts)}")
        launch = _Launch(key=key, steps=steps, step=counts.pop(), halves=halves)
        device = params[0].device
        launch.table = torch.tensor([k[:SLOTS] for k in key], dtype=torch.int64).to(device)
        numels = [p.numel() for p in params]
        launch.numels = torch.tensor(numels, dtype=torch.int64).to(device)
        chunks = [(t, s) for t, n in enumerate(numels) for s in range(0, n, CHUNK)]
        launch.chunk_tensor = torch.tensor([t for t, _ in chunks], dtype=torch.int32).to(device)
        launch.chunk_start = torch.tensor([s for _, s in chunks], dtype=torch.int64).to(device)
        self.launches[index] = launch
        return launch

    def step(self) -> None:
        divisor = getattr(self.opt, "grad_scale", None)  # clip_in_adam's divisor for this step
        for index, group in enumerate(self.opt.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            launch = self._launch(index, params)
            torch._foreach_add_(launch.steps, 1.0)
            launch.step += 1.0
            beta1, beta2 = group["betas"]
            lr, wd, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
            if _use_kernels(params[0]):
                interpret = os.environ.get("TRITON_INTERPRET") == "1"
                scale = divisor if divisor is not None else launch.numels  # an unread placeholder pointer
                step_size, bc2_sqrt = fp32_factors(lr, beta1, beta2, launch.step)
                _kernel(interpret)[(launch.chunk_tensor.numel(),)](
                    launch.table, launch.numels, launch.chunk_tensor, launch.chunk_start, scale,
                    *fp32_scalars(lr, wd, beta1, beta2, eps), step_size, bc2_sqrt, HAS_DIVISOR=divisor is not None,
                    CHUNK=CHUNK, BLOCK=BLOCK, num_warps=NUM_WARPS)
            else:
                for p, half in zip(params, launch.halves):
                    s = self.opt.state[p]
                    adamw_reference(p.data, p.grad, s["exp_avg"], s["exp_avg_sq"], half, lr=lr, weight_decay=wd,
                                    beta1=beta1, beta2=beta2, eps=eps, step=launch.step, divisor=divisor)
        self.opt.grad_scale = None  # the divisor holds for one step (clip_in_adam sets it again if needed)


def eligible(megatron_opt) -> Optional[str]:
    """Why `megatron_opt` (one non-chained megatron optimizer) keeps megatron's step, or None if the kernel fits."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    if type(megatron_opt) not in (Float16OptimizerWithFloat16Params, DistributedOptimizer):
        return f"{type(megatron_opt).__name__} (only megatron's mixed-precision and distributed optimizers)"
    if megatron_opt.grad_scaler is not None:
        return "fp16 with a loss scaler"
    config = megatron_opt.config
    if getattr(config, "use_precision_aware_optimizer", False) or getattr(config, "reuse_grad_buf_for_mxfp8_param_ag",
                                                                          False):
        return "megatron's precision-aware optimizer or mxfp8 parameter buffers"
    if getattr(megatron_opt, "is_stub_optimizer", False):
        return "a stub optimizer (no parameters on this rank)"
    opt = megatron_opt.optimizer
    if not isinstance(opt, torch.optim.AdamW) and not (isinstance(opt, torch.optim.Adam)
                                                      and opt.defaults.get("decoupled_weight_decay")):
        return f"inner optimizer {type(opt).__name__}, not AdamW"
    for group in opt.param_groups:
        if not group.get("fused") or group.get("amsgrad") or group.get("maximize"):
            return "a parameter group outside fused AdamW (or with amsgrad/maximize)"
        if any(p.dtype != torch.float32 for p in group["params"]):
            return "a parameter group with weights other than fp32"
    distributed = isinstance(megatron_opt, DistributedOptimizer)
    models = megatron_opt.model_float16_groups if distributed else megatron_opt.float16_groups
    # under the distributed optimizer, fp32 model weights would need megatron's copy of their shards
    if (distributed and any(megatron_opt.shard_fp32_groups)) or any(p.dtype != torch.bfloat16
                                                                   for group in models for p in group):
        return "model weights other than bf16"
    return None


def bf16_destinations(megatron_opt) -> dict[int, torch.Tensor]:
    """id(each fp32 main weight the inner AdamW steps) -> the bf16 tensor megatron's copy writes it into: the model
    weight itself, or, under the distributed optimizer, this rank's slice of the weight in the bucket's parameter
    buffer (which the parameter all-gather then sends), as `_copy_main_params_to_model_params` finds them."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from .patches import require

    if not isinstance(megatron_opt, DistributedOptimizer):
        require(megatron_opt, ("float16_groups", "fp32_from_float16_groups"))
        return {id(main): model for models, mains in zip(megatron_opt.float16_groups,
                                                         megatron_opt.fp32_from_float16_groups)
                for model, main in zip(models, mains)}
    require(megatron_opt, ("shard_fp32_from_float16_groups", "model_float16_groups", "model_param_gbuf_map",
                           "buffers", "_get_model_param_range_map"))
    out = {}
    for mains, models in zip(megatron_opt.shard_fp32_from_float16_groups, megatron_opt.model_float16_groups):
        for main, model in zip(mains, models):
            world = megatron_opt._get_model_param_range_map(model)["gbuf_world_in_bucket"]
            buffer_index, _, bucket_index = megatron_opt.model_param_gbuf_map[model]
            buffer = megatron_opt.buffers[buffer_index]
            require(buffer, ("buckets",))
            bucket = buffer.buckets[bucket_index]
            require(bucket, ("param_data",))
            if world.size != main.numel():
                raise ValueError(f"a main weight of {main.numel()} elements against a buffer range of {world.size}")
            out[id(main)] = bucket.param_data.view(-1)[world.start:world.end]
    return out


def install(megatron_optimizer) -> tuple[Callable[[], None], list[str]]:
    """Step every eligible megatron optimizer inside `megatron_optimizer` with the kernel. Returns the undo and the
    reasons the others keep megatron's step.

    megatron's `step_with_ready_grads` stays in charge (the distributed optimizer's parameter all-gather follows
    it): the inner AdamW's `step` becomes the one pass, and the copy of the main weights into the bf16 ones that
    megatron runs next is skipped once after each pass, so every other caller (a checkpoint's reload) still copies."""
    from .kernels import megatron_optimizers
    from .patches import require

    undo, reasons = [], []
    for megatron_opt in megatron_optimizers(megatron_optimizer):
        why = eligible(megatron_opt)
        if why:
            reasons.append(why)
            continue
        require(megatron_opt, ("_copy_main_params_to_model_params", "optimizer"))
        stepper = ParamGroupStepper(megatron_opt.optimizer, bf16_destinations(megatron_opt))
        megatron_copy = megatron_opt._copy_main_params_to_model_params

        def one_pass(stepper=stepper) -> None:
            with torch.no_grad():
                stepper.step()
            stepper.wrote_model_params = True

        def copy_unless_written(stepper=stepper, megatron_copy=megatron_copy) -> None:
            if stepper.wrote_model_params:
                stepper.wrote_model_params = False
                return
            megatron_copy()

        megatron_opt.optimizer.step = one_pass
        megatron_opt._copy_main_params_to_model_params = copy_unless_written
        megatron_opt.adamw_stepper = stepper
        undo.append(megatron_opt)

    def restore() -> None:
        for megatron_opt in undo:
            del megatron_opt.optimizer.step
            del megatron_opt._copy_main_params_to_model_params
            del megatron_opt.adamw_stepper

    return restore, reasons
