"""Gradient clipping folded into torch's fused AdamW.

megatron clips by scaling every fp32 main gradient by `max_norm / norm` in a pass of its own before the optimizer
step: a read and a write of 4 bytes per parameter (5 ms of the MoE benchmark's step, benchmarks/gpu/RESULTS.md).
torch's fused Adam/AdamW kernel divides each gradient by its optimizer's `grad_scale` tensor as it loads it (the
hook torch.amp's GradScaler uses), so the same scaling costs nothing there: megatron's clipping call is replaced by
setting that divisor, `norm / max_norm`, on the optimizers owning the parameters, for their next step only.

The norm, and whether to clip, are megatron's own (`clip_grad_norm`: total norm, `max_norm / (norm + 1e-6)`, clip
below 1). Parameters not all owned by fused AdamW groups, and megatron's decoupled-gradient mode, keep megatron's
scaling pass, so turning this on never changes what is clipped, only where; the result differs from the pass by
the rounding of a division against a multiplication.

With `norm_on_device` (EngineOptions.grad_norm_on_device) the norm also stays on the GPU: megatron reads it back
(`get_grad_norm_fp32` returns `total.item() ** 0.5`), which makes the host wait for the whole backward before it
can launch the optimizer and leaves the GPU idle while it does. Here the norm is megatron's sum of squares up to
that read, its square root taken on the device in float64 as the host takes it, and the divisor, `1 / coeff` where
`coeff < 1` else 1 (dividing by 1 is exact), computed there too; the step hands back the norm as a 0-dim float64
tensor, which the engine reads with the loss. Where megatron itself needs the value (its own scaling pass for
parameters fused AdamW does not own, a chain of optimizers with separate statistics groups), it is read there.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

_OWNERS: dict[int, torch.optim.Optimizer] = {}
"""id(parameter) -> the fused torch optimizer stepping it, for every optimizer this path was installed on."""


def _owners(params: list[torch.Tensor]) -> Optional[set]:
    owners = set()
    for p in params:
        opt = _OWNERS.get(id(p))
        if opt is None:
            return None
        owners.add(opt)
    return owners


def _clear_grad_scale(opt, args, kwargs) -> None:
    opt.grad_scale = None


def _divisor(opt: torch.optim.Optimizer) -> torch.Tensor:
    """The optimizer's one fp32 divisor tensor (made once), set as its grad_scale for the next step."""
    scale = getattr(opt, "_clip_divisor", None)
    if scale is None:
        device = opt.param_groups[0]["params"][0].device
        scale = opt._clip_divisor = torch.ones((), dtype=torch.float32, device=device)
    opt.grad_scale = scale
    return scale


def _set_grad_scale(opt: torch.optim.Optimizer, divisor: float) -> None:
    _divisor(opt).fill_(divisor)


def _set_grad_scale_on_device(owners, max_norm: float, norm: torch.Tensor) -> None:
    coeff = max_norm / (norm + 1.0e-6)
    divisor = torch.where(coeff < 1.0, 1.0 / coeff, torch.ones_like(coeff))
    for opt in owners:
        _divisor(opt).copy_(divisor)  # float64 -> float32, rounded as the host's fill_ rounds a Python float


def norm_on_device(megatron_norm: Callable) -> Callable:
    """megatron's `get_grad_norm_fp32` (2-norm) without its read-back: a 0-dim float64 tensor on the gradients'
    device. Other norms and FSDP's DTensor gradients take megatron's function."""
    from megatron.core.optimizer import clip_grads

    def get_grad_norm_fp32(grads_for_norm, norm_type=2, grad_stats_parallel_group=None):
        grads = [grads_for_norm] if isinstance(grads_for_norm, torch.Tensor) else list(grads_for_norm)
        if float(norm_type) != 2.0 or any(clip_grads.get_data_parallel_group_if_dtensor(g, None) is not None
                                          for g in grads):
            return megatron_norm(grads_for_norm, norm_type, grad_stats_parallel_group)
        if grads:
            noop = torch.zeros(1, dtype=torch.int, device=grads[0].device)
            norm, _ = clip_grads.multi_tensor_applier(clip_grads.l2_norm_impl, noop, [grads], False)
        else:
            norm = torch.zeros(1, dtype=torch.float, device=torch.cuda.current_device())
        total = norm**2.0  # megatron's arithmetic up to its .item(): squares summed over the statistics group
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM, group=grad_stats_parallel_group)
        return total.double().sqrt().reshape(())

    return get_grad_norm_fp32


def install(megatron_optimizer, norm_on_device_too: bool = False) -> Callable[[], None]:
    """Route megatron's clipping of `megatron_optimizer`'s parameters into its fused AdamW groups (with
    `norm_on_device_too`, keep the norm on the device as well). Returns the undo."""
    from megatron.core.optimizer import optimizer as optimizer_module

    from .kernels import inner_torch_optimizers
    from .patches import replace

    handles, mine = [], []
    for opt in inner_torch_optimizers(megatron_optimizer):
        if not opt.param_groups or not all(g.get("fused") for g in opt.param_groups):
            continue  # torch's other Adam paths refuse a grad_scale
        handles.append(opt.register_step_post_hook(_clear_grad_scale))
        for group in opt.param_groups:
            for p in group["params"]:
                _OWNERS[id(p)] = opt
                mine.append(id(p))
    megatron_clip = optimizer_module.clip_grad_by_total_norm_fp32

    def clip(parameters, max_norm, total_norm, use_decoupled_grad=False):
        params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        owners = None if use_decoupled_grad else _owners(params)
        if owners is None:
            return megatron_clip(params, max_norm, float(total_norm), use_decoupled_grad)
        if isinstance(total_norm, torch.Tensor):
            _set_grad_scale_on_device(owners, max_norm, total_norm)
            return None
        coeff = max_norm / (total_norm + 1.0e-6)
        if coeff < 1.0:
            for opt in owners:
                _set_grad_scale(opt, 1.0 / coeff)
        return None

    patched = {"clip_grad_by_total_norm_fp32": clip}
    if norm_on_device_too and mine:
        patched["get_grad_norm_fp32"] = norm_on_device(optimizer_module.get_grad_norm_fp32)
    undo = replace(optimizer_module.__name__, patched)

    def restore() -> None:
        undo()
        for h in handles:
            h.remove()
        for key in mine:
            _OWNERS.pop(key, None)

    return restore
