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


def _set_grad_scale(opt: torch.optim.Optimizer, divisor: float) -> None:
    scale = getattr(opt, "_clip_divisor", None)
    if scale is None:
        device = opt.param_groups[0]["params"][0].device
        scale = opt._clip_divisor = torch.ones((), dtype=torch.float32, device=device)
    scale.fill_(divisor)
    opt.grad_scale = scale


def install(megatron_optimizer) -> Callable[[], None]:
    """Route megatron's clipping of `megatron_optimizer`'s parameters into its fused AdamW groups. Returns the undo."""
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
            return megatron_clip(params, max_norm, total_norm, use_decoupled_grad)
        coeff = max_norm / (total_norm + 1.0e-6)
        if coeff < 1.0:
            for opt in owners:
                _set_grad_scale(opt, 1.0 / coeff)
        return None

    undo = replace(optimizer_module.__name__, {"clip_grad_by_total_norm_fp32": clip})

    def restore() -> None:
        undo()
        for h in handles:
            h.remove()
        for key in mine:
            _OWNERS.pop(key, None)

    return restore
