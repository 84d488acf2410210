"""Every megatron-core module attribute the engine replaces, in one place, checked against the pinned version.

The engine's faster paths (kernels.py, triton_kernels.py) and the checkpoint writer's staging
(qwen_trainer.checkpoint.staging) enter megatron-core by swapping module-level functions and objects it looks up at
call time. Such a swap silently does nothing if an upgrade renames or moves the attribute, so each one goes through
`replace`, which refuses an attribute the module does not have (unless it is listed as one megatron-core binds only
on some installs), and `version_note` says when the installed megatron-core is not the version these patches were
checked against.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

# The megatron-core these patches were written and tested against (pyproject.toml pins it).
PINNED_MEGATRON_CORE = "0.16.1"

# (module, attribute) -> why the engine replaces it
PATCHED = {
    ("megatron.core.transformer.moe.grouped_gemm_util", "grouped_gemm"):
        "legacy GroupedMLP on torch's grouped GEMM (torch._grouped_mm) instead of the grouped_gemm package",
    ("megatron.core.transformer.moe.grouped_gemm_util", "ops"): "as above, the ops namespace GroupedMLP calls",
    ("megatron.core.tensor_parallel.layers", "fused_weight_gradient_mlp_cuda"):
        "weight-gradient accumulation into fp32 main_grad without Apex (addmm with out_dtype=float32)",
    ("megatron.core.tensor_parallel.layers", "_grad_accum_fusion_available"): "as above: megatron checks this flag",
    ("megatron.core.optimizer.clip_grads", "multi_tensor_applier"):
        "gradient norm and clipping with torch foreach ops: megatron's Apex-less fallback syncs once per tensor",
    ("megatron.core.optimizer.clip_grads", "l2_norm_impl"): "as above",
    ("megatron.core.optimizer.clip_grads", "multi_tensor_scale_impl"): "as above",
    ("megatron.core.optimizer.optimizer", "multi_tensor_applier"): "as above, the optimizer's gradient scaling",
    ("megatron.core.optimizer.optimizer", "multi_tensor_scale_impl"): "as above",
    ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32"):
        "gradient clipping as fused AdamW's grad_scale divisor instead of a scaling pass (clip_in_adam)",
    ("megatron.core.optimizer.optimizer", "get_grad_norm_fp32"):
        "the gradient norm kept on the device, the clip divisor computed there (clip_in_adam, grad_norm_on_device)",
    ("megatron.core.transformer.moe.token_dispatcher", "permute"):
        "gather_permute under expert parallelism: the all-to-all dispatcher's local permutation with a gathered "
        "backward (only while a dispatcher switched to it runs; others get megatron's function)",
    ("megatron.core.transformer.moe.token_dispatcher", "unpermute"): "as above, the combine as a gather",
    ("megatron.core.transformer.mlp", "bias_swiglu_impl"): "Triton SwiGLU for the dense MLP (no bias, no fp8)",
    ("megatron.core.transformer.moe.shared_experts", "bias_swiglu_impl"): "Triton SwiGLU for the shared expert",
    ("megatron.core.transformer.moe.moe_utils", "te_general_gemm"):
        "bound to None without Transformer Engine: the router GEMM refers to it even when TE is absent",
    ("megatron.core.dist_checkpointing.strategies.torch", "FileSystemWriterAsync"):
        "the torch_dist writer stages a save's GPU tensors in one reused host buffer per rank, not fresh pinned "
        "tensors per save (qwen_trainer.checkpoint.staging; set only while a sharded save runs)",
}
# attributes megatron-core binds only when an optional package imports (absent here is expected)
OPTIONAL = {("megatron.core.transformer.moe.moe_utils", "te_general_gemm"),
            ("megatron.core.tensor_parallel.layers", "fused_weight_gradient_mlp_cuda")}


# (megatron-core class, attribute) -> why the engine reads or replaces it on that class's objects; `require`
# checks them where they are used, since most are set in __init__ and a class cannot be asked for them
INSTANCE_ATTRIBUTES = {
    ("DistributedDataParallel", "param_to_bucket_group"):
        "deferred expert weight gradients: each expert weight's bucket group says when the step's last backward runs",
    ("DistributedDataParallel", "buffers"): "expert_grad_overwrite: the gradient buffers whose zeroing skips ranges",
    ("DistributedDataParallel", "expert_parallel_buffers"): "as above, the expert-parallel gradient buffers",
    ("_ParamAndGradBucketGroup", "is_last_microbatch"):
        "deferred expert weight gradients: set by megatron DDP's no_sync / finish_grad_sync around the last backward",
    ("_ParamAndGradBucketGroup", "start_grad_sync"):
        "deferred expert weight gradients: wrapped per bucket group to add the kept micro-batches first (megatron's "
        "pipeline schedule starts the last stages' reduction after a last backward run with the flag down)",
    ("_ParamAndGradBuffer", "reset"):
        "expert_grad_overwrite: replaced per buffer by a zeroing that leaves the overwritten expert ranges out "
        "(zero_grad_buffer calls it as every step starts)",
    ("_ParamAndGradBuffer", "param_index_map"): "as above: each weight's range in grad_data",
    ("_ParamAndGradBuffer", "grad_data"): "as above: the flat gradient buffer",
    ("Float16OptimizerWithFloat16Params", "_copy_main_params_to_model_params"):
        "adamw_writes_model_params: skipped once after each one-pass AdamW step, which already wrote the bf16 weights",
    ("Float16OptimizerWithFloat16Params", "float16_groups"): "as above: the bf16 model weights, group by group",
    ("Float16OptimizerWithFloat16Params", "fp32_from_float16_groups"): "as above: their fp32 main weights",
    ("Float16OptimizerWithFloat16Params", "optimizer"):
        "as above: the torch AdamW whose step becomes the one pass",
    ("DistributedOptimizer", "_copy_main_params_to_model_params"): "as above, for the distributed optimizer",
    ("DistributedOptimizer", "optimizer"): "as above",
    ("DistributedOptimizer", "shard_fp32_from_float16_groups"): "as above: this rank's fp32 main weight shards",
    ("DistributedOptimizer", "model_float16_groups"): "as above: the bf16 model weights they belong to",
    ("DistributedOptimizer", "model_param_gbuf_map"): "as above: each weight's buffer and bucket",
    ("DistributedOptimizer", "buffers"): "as above: the parameter and gradient buffers",
    ("DistributedOptimizer", "_get_model_param_range_map"): "as above: each shard's range in its bucket",
    ("_ParamAndGradBuffer", "buckets"): "as above: a buffer's buckets",
    ("_ParamAndGradBucket", "param_data"): "as above: a bucket's bf16 parameter buffer, which the all-gather sends",
}


class PatchError(RuntimeError):
    pass


def require(obj: Any, names: tuple[str, ...]) -> None:
    """Refuse (PatchError) a megatron-core object that lacks a registered attribute the engine relies on."""
    cls = type(obj).__name__
    for name in names:
        if (cls, name) not in INSTANCE_ATTRIBUTES:
            raise PatchError(f"{cls}.{name} is not a registered megatron-core attribute")
        if not hasattr(obj, name):
            raise _missing(f"{cls}.{name}", INSTANCE_ATTRIBUTES[(cls, name)])


def _missing(what: str, why: str) -> PatchError:
    return PatchError(f"{what} does not exist in megatron-core {installed_version()} (the engine was checked "
                      f"against {PINNED_MEGATRON_CORE}); needed for {why}")


def replace(module_name: str, values: dict[str, Any]) -> Callable[[], None]:
    """Set `values` on the module and return the function that puts the originals back."""
    module = importlib.import_module(module_name)
    missing = object()
    saved = {}
    for name in values:
        if (module_name, name) not in PATCHED:
            raise PatchError(f"{module_name}.{name} is not a registered megatron-core patch")
        if not hasattr(module, name) and (module_name, name) not in OPTIONAL:
            raise _missing(f"{module_name}.{name}", PATCHED[(module_name, name)])
        saved[name] = getattr(module, name, missing)
    for name, value in values.items():
        setattr(module, name, value)

    def restore() -> None:
        for name, value in saved.items():
            if value is missing:
                delattr(module, name)
            else:
                setattr(module, name, value)

    return restore


def installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("megatron-core")
    except PackageNotFoundError:
        return "unknown"


def version_note() -> str | None:
    """A line for the engine's notes when megatron-core is not the version the patches were checked against."""
    have = installed_version()
    if have == PINNED_MEGATRON_CORE:
        return None
    return f"megatron-core {have} installed, the engine's patches were checked against {PINNED_MEGATRON_CORE}"
