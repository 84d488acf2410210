"""Construction of the megatron-core model a job trains: parallel groups, GPTModel chunk(s), DDP, optimizer.

    init_model_parallel(spec, plan)   parallel_state.initialize_model_parallel(TP, PP, VP, CP, EP, ETP), CUDA RNG
    build_model(spec, plan, options)  the engine's kernels installed, GPTModel chunk(s) (one per virtual pipeline
                                      stage) on the GPU, megatron DDP, get_megatron_optimizer (+ distributed
                                      optimizer) -> Model

Unless the spec asks for Transformer Engine (training.transformerEngine; installed or not), the engine swaps in its
own faster modules (kernels, triton_kernels): SDPA attention (cuDNN) with the rope fused into the QKV split,
compiled RMSNorm, Triton SwiGLU, torch grouped GEMM for experts with a sync-free dispatch, fp32 weight-gradient
accumulation, fused AdamW, and the chunked output-layer cross-entropy (loss). `EngineOptions` turns each off on its
own. The learning rate is not scheduled here: the training loop sets it on every step (one schedule for every
engine, qwen_trainer.schedule).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from .config import EngineOptions, ModelPlan, expert_stash_mib, gpt_model_kwargs, layer_spec, wants_cuda_graphs
from .triton_kernels import install_grad_accumulation, install_swiglu, triton_available


@dataclass
class Model:
    """What build_model made: DDP-wrapped chunks, their optimizer, and how to undo the process-wide patches."""

    chunks: list  # megatron DDP modules, one per virtual pipeline stage
    optimizer: object
    config: object  # megatron TransformerConfig
    layer_offsets: list[int]  # global number of each chunk's first layer
    notes: list[str] = field(default_factory=list)
    restore: list[Callable[[], None]] = field(default_factory=list)

    def unwrapped(self) -> list:
        return [m.module for m in self.chunks]


def init_model_parallel(spec, plan: ModelPlan, env) -> None:
    """Collective: megatron's parallel groups over the process group (joined here unless the loop did), and its
    CUDA RNG. `env` is this process's qwen_trainer.distenv.DistEnv."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from qwen_trainer.distenv import init_process_group

    torch.cuda.set_device(env.local_rank)
    init_process_group(env, "nccl")
    p = spec.parallelism
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        virtual_pipeline_model_parallel_size=plan.config_kwargs.get("virtual_pipeline_model_parallel_size"),
        context_parallel_size=p.context,
        expert_model_parallel_size=p.expert,
        expert_tensor_parallel_size=p.expert_tensor,
    )
    # CUDA graph capture needs an RNG tracker whose state lives on the device
    graphs = plan.config_kwargs.get("cuda_graph_impl") == "local" or plan.options.whole_step_graph
    model_parallel_cuda_manual_seed(spec.training.seed, use_cudagraphable_rng=graphs)


def pin_communication_order(spec) -> None:
    """megatron orders its asynchronous TP/CP communication before the next GEMM through a single hardware queue;
    this only takes effect if set before the CUDA context exists (launchers set it too)."""
    if spec.parallelism.tensor > 1 or spec.parallelism.context > 1:
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")


def _install_kernels(plan: ModelPlan, options: EngineOptions, notes: list[str]) -> list[Callable[[], None]]:
    from . import kernels as k

    restore = []
    if plan.experts == "torch-grouped":
        restore.append(k.install_torch_grouped_gemm())
    # Transformer Engine's layers fuse the weight-gradient accumulation themselves; megatron's local layers would
    # need Apex for it, so they take ours (also where TE is installed but not asked for)
    if options.grad_accum_fusion and not plan.use_te:
        if k.wgrad_accumulate_works():
            restore.append(k.install_grad_accum_fusion())
        else:
            plan.config_kwargs["gradient_accumulation_fusion"] = False
            notes.append("gradient accumulation fusion off: addmm(out_dtype=float32) unavailable")
    elif not plan.use_te:
        plan.config_kwargs["gradient_accumulation_fusion"] = False
    if options.foreach_grad_norm:
        restore.append(k.install_foreach_grad_ops())
    if options.fused_swiglu and options.triton_swiglu and triton_available():
        restore.append(install_swiglu())
    return restore


def _block_spec(plan: ModelPlan, options: EngineOptions, config, vp_stage):
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    from . import kernels as k

    spec = layer_spec(plan, config)
    if plan.use_te:
        return spec
    num = get_num_layers_to_build(config, vp_stage=vp_stage)
    if options.fused_rmsnorm or config.sequence_parallel:
        norm = k.rmsnorm_spec(compiled=options.fused_rmsnorm)
    else:
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        norm = WrappedTorchNorm
    return TransformerBlockSubmodules(layer_specs=[spec] * num, layer_norm=norm)


def _params_in_training_dtype(chunk, dtype) -> None:
    """Every parameter in the training dtype, as Megatron-LM's Float16Module makes them. torch's own norm
    (WrappedTorchNorm, the stock path with fused_rmsnorm off) creates fp32 weights in a bf16 model; megatron's
    plain mixed-precision optimizer keeps such parameters apart and its sharded state dict cannot place them."""
    if dtype not in (torch.bfloat16, torch.float16):
        return
    for param in chunk.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def _chunks(spec, plan: ModelPlan, options: EngineOptions, config, notes: list[str]) -> tuple[list, list[int]]:
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from .loss import make_model_class

    model_cls = make_model_class()
    vp_size = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    chunks, offsets = [], []
    for vp_stage in range(vp_size or 1):
        stage = vp_stage if vp_size else None
        chunk = model_cls(
            config=config,
            transformer_layer_spec=_block_spec(plan, options, config, stage),
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            vp_stage=stage,
            chunked_loss=options.chunked_cross_entropy,
            chunk_tokens=options.cross_entropy_chunk_tokens,
            fused_loss=options.fused_cross_entropy,
            **gpt_model_kwargs(plan),
        )
        # Always, as Megatron-LM's get_model does: megatron-core creates a few parameters on the CPU even without
        # use_cpu_initialization (the shared expert's gate of Qwen1.5/Qwen2-MoE), which the mixed precision
        # optimizer then refuses.
        chunk.cuda(torch.cuda.current_device())
        _params_in_training_dtype(chunk, config.params_dtype)
        chunks.append(chunk)
        offsets.append(get_transformer_layer_offset(config, vp_stage=stage))
    if options.local_dispatch and plan.experts == "torch-grouped":
        from .dispatch import install_local_dispatch

        _, reasons = install_local_dispatch(chunks, gather=options.gather_permute)
        if reasons:
            notes.append(f"megatron's token dispatcher kept on some MoE layers: {'; '.join(reasons)}")
    return chunks, offsets


def build_model(spec, plan: ModelPlan, options: EngineOptions, transformer_engine_installed: bool) -> Model:
    """Collective (after init_model_parallel): the model chunks, wrapped and with their optimizer."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer import TransformerConfig

    from .patches import version_note

    notes: list[str] = [n for n in (version_note(),) if n]
    restore = _install_kernels(plan, options, notes)
    config = TransformerConfig(**plan.config_kwargs)
    if wants_cuda_graphs(spec, options) and config.cuda_graph_impl != "local":
        from .config import cuda_graph_blocker

        why = cuda_graph_blocker(spec, options, plan.config_kwargs, plan.attention, plan.experts)
        notes.append(f"CUDA graphs off: {why or 'set off in extra_config'}")
    chunks, offsets = _chunks(spec, plan, options, config, notes)
    if options.gather_permute and config.num_moe_experts:
        from .dispatch import install_alltoall_gather

        _, reasons, undo = install_alltoall_gather(chunks)
        restore.append(undo)
        if reasons:
            notes.append(f"gathered MoE permutation off on some layers: {'; '.join(reasons)}")

    p = spec.parallelism
    dp = parallel_state.get_data_parallel_world_size()
    overlap = p.overlap_grad_reduce if options.overlap_grad_reduce is None else options.overlap_grad_reduce
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap,
        overlap_param_gather=p.overlap_param_gather and p.distributed_optimizer and dp > 1,
        use_distributed_optimizer=p.distributed_optimizer,
        bucket_size=options.bucket_size,
        average_in_collective=False,
        check_for_nan_in_grad=False,
    )
    wrapped = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
               for i, chunk in enumerate(chunks)]
    if plan.experts == "torch-grouped":
        restore.append(_route_expert_wgrad(spec, options, config, wrapped, notes))
    if options.embedding_grad_into_buffer:
        from . import embedding_grad

        _, reasons = embedding_grad.install([w.module for w in wrapped])
        if reasons:
            notes.append(f"embedding gradient through autograd: {'; '.join(reasons)}")
    # Without Transformer Engine only: TE's linear layers put their weight gradient into main_grad themselves under
    # names of their own, and the hook must never add their placeholder gradients.
    if options.triton_grad_accumulation and triton_available() and not plan.use_te:
        handles = install_grad_accumulation(wrapped)
        restore.append(lambda: [h.remove() for h in handles])

    t = spec.training
    fp16 = t.precision == "fp16"
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=not fp16,
        fp16=fp16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=p.distributed_optimizer,
        overlap_param_gather=ddp_config.overlap_param_gather,
        **({"initial_loss_scale": 2.0**16} if fp16 else {}),
    ), wrapped)
    if options.fused_adam and not transformer_engine_installed:
        from .kernels import use_fused_adam

        use_fused_adam(optimizer)
        if options.clip_in_adam and t.clip_grad > 0:
            from . import clip_in_adam

            restore.append(clip_in_adam.install(optimizer, norm_on_device_too=options.grad_norm_on_device))
        if options.adamw_writes_model_params:
            from . import adamw_kernel

            undo, reasons = adamw_kernel.install(optimizer)
            restore.append(undo)
            if reasons:
                notes.append(f"megatron's optimizer step and weight copy kept: {'; '.join(sorted(set(reasons)))}")

    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    no_sync = [m.no_sync for m in wrapped]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    if overlap:
        sync = [m.start_grad_sync for m in wrapped]
        config.grad_sync_func = sync[0] if len(sync) == 1 else sync
    if ddp_config.overlap_param_gather:
        psync = [m.start_param_sync for m in wrapped]
        config.param_sync_func = psync[0] if len(psync) == 1 else psync
    return Model(wrapped, optimizer, config, offsets, notes, restore)


def experts_in_cuda_graphs(config) -> bool:
    """Whether megatron's CUDA graphs capture the MoE experts: local graphs over whole layers (an empty scope, what
    megatron makes of "full"), or a scope naming MoE layers or the whole iteration."""
    if getattr(config, "cuda_graph_impl", "none") != "local":
        return False
    names = {getattr(s, "name", s) for s in (getattr(config, "cuda_graph_scope", None) or [])}
    return not names or bool(names & {"moe", "full_iteration", "full"})


def _route_expert_wgrad(spec, options: EngineOptions, config, wrapped, notes: list[str]) -> Callable[[], None]:
    """The experts' weight gradients deferred and/or through the Triton kernel (expert_wgrad). Returns the undo."""
    from . import expert_wgrad

    if not getattr(config, "num_moe_experts", None):
        return expert_wgrad.reset_deferred
    # on CPU tensors the kernel's sum runs in torch (expert by expert, in fp32), as exact, only slower
    kernel = options.expert_wgrad_into_buffer and (triton_available() or not torch.cuda.is_available())
    stash_mib = expert_stash_mib(spec, options)
    if (stash_mib or kernel) and experts_in_cuda_graphs(config):
        # a captured backward replays its kernels whatever the micro-batch: no place for a per-step decision, and
        # the parameter's mark that its gradient is already in the buffer would be set at capture only
        notes.append("expert weight gradients through autograd: whole MoE layers are captured as CUDA graphs")
        stash_mib, kernel = 0, False
    if kernel or stash_mib:
        routed, deferring = expert_wgrad.install(wrapped, kernel, stash_mib << 20,
                                                 overwrite=options.expert_grad_overwrite)
        if not routed:
            notes.append("expert weight gradients through autograd: no grouped expert weights (GroupedMLP)")
        elif stash_mib and not deferring:
            notes.append("expert weight gradients per micro-batch: no expert weight is in a DDP bucket group")
    return expert_wgrad.reset_deferred


def release(model: Model) -> None:
    """Undo the process-wide patches and megatron's global state, so a later engine in this process starts clean."""
    import contextlib

    from megatron.core import parallel_state

    for undo in reversed(model.restore):
        undo()
    model.restore.clear()
    if getattr(model.config, "cuda_graph_impl", "none") == "local":
        # graphs and their memory pool are process-wide in megatron-core
        from megatron.core.transformer.cuda_graphs import delete_cuda_graphs

        delete_cuda_graphs()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    with contextlib.suppress(Exception):
        clear_aux_losses_tracker()
