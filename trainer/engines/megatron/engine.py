"""The megatron engine: trains on CUDA with the megatron-core pip package (no Megatron-LM repository).

Read top to bottom, one step of a job is:

    init_distributed()  NCCL group, parallel_state.initialize_model_parallel(TP, PP, VP, CP, EP, ETP), CUDA RNG
    build()             GPTModel chunk(s) from the resolved architecture (megatron_config), megatron DDP,
                        optional HF weights, get_megatron_optimizer (+ distributed optimizer), OptimizerParamScheduler
    train_step(mbs)     zero grad buffers, get_forward_backward_func over the micro-batches, optimizer.step(),
                        scheduler.step(global batch) -> loss, grad norm, lr, tokens

Parallelism: tensor (+ sequence), pipeline (+ virtual, interleaved schedule), context (Transformer Engine attention
only), expert (+ expert tensor) parallelism, all from `spec.parallelism`. Loss: the masked sum of per-token losses
with `calculate_per_token_loss`, so gradients are averaged over the tokens of the whole step across data-parallel
ranks (`finalize_model_grads`), as Megatron does for SFT; for pretraining (no masked tokens) it equals the mean.

Unless the spec asks for Transformer Engine (training.transformerEngine; installed or not), the engine swaps in
its own faster modules (megatron_kernels, megatron_triton): SDPA attention (cuDNN) with the rope fused into the QKV
split, compiled RMSNorm, Triton SwiGLU, torch grouped GEMM for experts with a sync-free dispatch, fp32
weight-gradient accumulation, fused AdamW, and the chunked output-layer cross-entropy (megatron_loss).
`EngineOptions` turns each off on its own.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Sequence

import torch

from trainer.errors import UserError
from trainer.spec.resolve import ResolvedArchitecture, lr_decay_style, resolve_architecture, schedule

from .config import (Capabilities, EngineOptions, ModelPlan, gpt_model_kwargs, layer_spec, plan_model,
                              wants_cuda_graphs)
from .loss import check_output_grad_scale
from .triton_kernels import install_grad_accumulation, install_swiglu, triton_available


@dataclass
class StepResult:
    loss: float  # mean loss per token over the step (all data-parallel ranks)
    tokens: int  # loss tokens in the step (all data-parallel ranks)
    grad_norm: Optional[float]
    lr: float
    skipped: bool  # fp16 overflow: the update was skipped

    def to_dict(self) -> dict:
        return dict(loss=self.loss, tokens=self.tokens, grad_norm=self.grad_norm, lr=self.lr, skipped=self.skipped)


class MegatronEngine:
    name = "megatron"

    def __init__(self, spec, options: Optional[EngineOptions] = None, capabilities: Optional[Capabilities] = None):
        self.spec = spec
        self.options = options or EngineOptions()
        self.caps = capabilities or Capabilities.probe()
        if not self.caps.cuda:
            raise UserError("the megatron engine needs a CUDA GPU and none is visible; use the cpu engine",
                            path="spec.model.backend")
        self.arch: ResolvedArchitecture = resolve_architecture(spec)
        self.plan: ModelPlan = plan_model(self.arch, spec, self.options, self.caps)
        self.model: list = []
        self.optimizer = None
        self.scheduler = None
        self.config = None
        self.iteration = 0
        self._restore: list[Callable[[], None]] = []
        self.notes: list[str] = []

    # ---------------------------------------------------------------------------------------------- setup

    def init_distributed(self) -> None:
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        from trainer.distenv import init_process_group, read_env

        env = read_env()
        if self.spec.parallelism.tensor > 1 or self.spec.parallelism.context > 1:
            # megatron orders its asynchronous TP/CP communication before the next GEMM through a single
            # hardware queue; this only takes effect if set before the CUDA context exists (launchers set it)
            os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        torch.cuda.set_device(env.local_rank)
        init_process_group(env, "nccl")
        p = self.spec.parallelism
        vp = self.plan.config_kwargs.get("virtual_pipeline_model_parallel_size")
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=p.tensor,
            pipeline_model_parallel_size=p.pipeline,
            virtual_pipeline_model_parallel_size=vp,
            context_parallel_size=p.context,
            expert_model_parallel_size=p.expert,
            expert_tensor_parallel_size=p.expert_tensor,
        )
        # CUDA graph capture needs an RNG tracker whose state lives on the device
        graphs = self.plan.config_kwargs.get("cuda_graph_impl") == "local"
        model_parallel_cuda_manual_seed(self.spec.training.seed, use_cudagraphable_rng=graphs)

    def _install_kernels(self) -> None:
        from . import kernels as k

        o = self.options
        if self.plan.experts == "torch-grouped":
            self._restore.append(k.install_torch_grouped_gemm())
        # Transformer Engine's layers fuse the weight-gradient accumulation themselves; megatron's local layers
        # would need Apex for it, so they take ours (also where TE is installed but not asked for)
        if o.grad_accum_fusion and not self.plan.use_te:
            if k.wgrad_accumulate_works():
                self._restore.append(k.install_grad_accum_fusion())
            else:
                self.plan.config_kwargs["gradient_accumulation_fusion"] = False
                self.notes.append("gradient accumulation fusion off: addmm(out_dtype=float32) unavailable")
        elif not self.plan.use_te:
            self.plan.config_kwargs["gradient_accumulation_fusion"] = False
        if o.foreach_grad_norm:
            self._restore.append(k.install_foreach_grad_ops())
        if o.fused_swiglu and o.triton_swiglu and triton_available():
            self._restore.append(install_swiglu())

    def build(self, hf_state_dict: Optional[dict] = None) -> None:
        from megatron.core import parallel_state
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
        from megatron.core.transformer import TransformerConfig

        from .loss import make_model_class

        self._install_kernels()
        self.config = config = TransformerConfig(**self.plan.config_kwargs)
        if wants_cuda_graphs(self.spec, self.options) and config.cuda_graph_impl != "local":
            from .config import cuda_graph_blocker

            why = cuda_graph_blocker(self.spec, self.options, self.plan.config_kwargs, self.plan.attention,
                                     self.plan.experts)
            self.notes.append(f"CUDA graphs off: {why or 'set off in extra_config'}")
        model_cls = make_model_class()
        vp_size = parallel_state.get_virtual_pipeline_model_parallel_world_size()
        chunks, offsets = [], []
        for vp_stage in range(vp_size or 1):
            stage = vp_stage if vp_size else None
            pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage)
            post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage)
            chunk = model_cls(
                config=config,
                transformer_layer_spec=self._block_spec(config, stage),
                pre_process=pre,
                post_process=post,
                vp_stage=stage,
                chunked_loss=self.options.chunked_cross_entropy,
                chunk_tokens=self.options.cross_entropy_chunk_tokens,
                fused_loss=self.options.fused_cross_entropy,
                **gpt_model_kwargs(self.plan),
            )
            # Always, as Megatron-LM's get_model does: megatron-core creates a few parameters on the CPU even
            # without use_cpu_initialization (the shared expert's gate of Qwen1.5/Qwen2-MoE), which the mixed
            # precision optimizer then refuses.
            chunk.cuda(torch.cuda.current_device())
            chunks.append(chunk)
            offsets.append(self._layer_offset(config, stage))
        if self.options.local_dispatch and self.plan.experts == "torch-grouped":
            from .dispatch import install_local_dispatch

            _, reasons = install_local_dispatch(chunks)
            if reasons:
                self.notes.append(f"megatron's token dispatcher kept on some MoE layers: {'; '.join(reasons)}")
        if hf_state_dict is not None:
            from .weights import load_into

            load_into(chunks, hf_state_dict, self.arch,
                      tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                      tp_size=parallel_state.get_tensor_model_parallel_world_size(),
                      ep_rank=parallel_state.get_expert_model_parallel_rank(),
                      ep_size=parallel_state.get_expert_model_parallel_world_size(),
                      layer_offsets=offsets)
        p = self.spec.parallelism
        dp = parallel_state.get_data_parallel_world_size()
        overlap = p.overlap_grad_reduce if self.options.overlap_grad_reduce is None else self.options.overlap_grad_reduce
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=overlap,
            overlap_param_gather=p.overlap_param_gather and p.distributed_optimizer and dp > 1,
            use_distributed_optimizer=p.distributed_optimizer,
            bucket_size=self.options.bucket_size,
            average_in_collective=False,
            check_for_nan_in_grad=False,
        )
        self.model = [
            DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
            for i, chunk in enumerate(chunks)
        ]
        # Without Transformer Engine only: TE's linear layers put their weight gradient into main_grad themselves
        # under names of their own, and the hook must never add their placeholder gradients.
        if self.options.triton_grad_accumulation and triton_available() and not self.plan.use_te:
            handles = install_grad_accumulation(self.model)
            self._restore.append(lambda: [h.remove() for h in handles])
        t = self.spec.training
        fp16 = t.precision == "fp16"
        opt_config = OptimizerConfig(
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
        )
        self.optimizer = get_megatron_optimizer(opt_config, self.model)
        if self.options.fused_adam and not self.caps.transformer_engine:
            from .kernels import use_fused_adam

            use_fused_adam(self.optimizer)
        gbs = t.global_batch_size
        sched = schedule(self.spec)
        total = sched.train_iters or 1
        decay = sched.decay_iters if sched.decay_iters else total
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0,
            max_lr=t.lr,
            min_lr=t.min_lr,
            lr_warmup_steps=sched.warmup_iters * gbs,
            lr_decay_steps=max(decay, sched.warmup_iters + 1) * gbs,
            lr_decay_style=lr_decay_style(self.spec),
            start_wd=t.weight_decay,
            end_wd=t.weight_decay,
            wd_incr_steps=total * gbs,
            wd_incr_style="constant",
        )
        config.grad_scale_func = self.optimizer.scale_loss
        config.finalize_model_grads_func = finalize_model_grads
        no_sync = [m.no_sync for m in self.model]
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        if overlap:
            sync = [m.start_grad_sync for m in self.model]
            config.grad_sync_func = sync[0] if len(sync) == 1 else sync
        if ddp_config.overlap_param_gather:
            psync = [m.start_param_sync for m in self.model]
            config.param_sync_func = psync[0] if len(psync) == 1 else psync

    def _block_spec(self, config, vp_stage):
        from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

        from . import kernels as k

        spec = layer_spec(self.plan, config)
        if self.plan.use_te:
            return spec
        num = get_num_layers_to_build(config, vp_stage=vp_stage)
        if self.options.fused_rmsnorm or config.sequence_parallel:
            norm = k.rmsnorm_spec(compiled=self.options.fused_rmsnorm)
        else:
            from megatron.core.transformer.torch_norm import WrappedTorchNorm

            norm = WrappedTorchNorm
        return TransformerBlockSubmodules(layer_specs=[spec] * num, layer_norm=norm)

    @staticmethod
    def _layer_offset(config, vp_stage) -> int:
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

        return get_transformer_layer_offset(config, vp_stage=vp_stage)

    def setup(self, hf_state_dict: Optional[dict] = None) -> "MegatronEngine":
        self.init_distributed()
        self.build(hf_state_dict)
        return self

    # ---------------------------------------------------------------------------------------------- steps

    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        dev = torch.cuda.current_device()
        tokens = batch.tokens.to(dev, non_blocking=True)
        targets = batch.targets.to(dev, non_blocking=True)
        position_ids = batch.position_ids.to(dev, non_blocking=True)
        loss_mask = (targets >= 0).float()
        labels = targets.clamp(min=0)
        tokens, labels, loss_mask, position_ids = self._slice_for_context_parallel(tokens, labels, loss_mask,
                                                                                   position_ids)
        inner = getattr(model, "module", model)
        if hasattr(inner, "next_output_grad_alpha"):
            inner.next_output_grad_alpha = self._output_grad_alpha(batch)
        output = model(tokens, position_ids, None, labels=labels, loss_mask=loss_mask)
        return output, self._loss_for(batch, loss_mask)

    def _loss_for(self, batch, loss_mask):
        """The loss function megatron's schedule applies to this micro-batch's output."""
        return partial(self._loss_func, loss_mask)

    def _output_grad_alpha(self, batch) -> Optional[float]:
        """The gradient megatron's schedule will bring to this micro-batch's loss sum, where the forward can know
        it: bf16 (no dynamic loss scale). With calculate_per_token_loss the schedule passes the sum on unscaled
        (finalize_model_grads divides the gradients by the step's tokens afterwards)."""
        if not self.options.output_grad_into_buffer or self.spec.training.precision != "bf16":
            return None
        return 1.0 if self.plan.config_kwargs.get("calculate_per_token_loss") else None

    @staticmethod
    def _loss_func(loss_mask, output):
        from .loss import loss_sum_from_output

        loss_sum = loss_sum_from_output(output, loss_mask)
        num_tokens = loss_mask.sum().to(torch.int)
        report = torch.stack([loss_sum.detach().float(), num_tokens.float()])
        return loss_sum, num_tokens, {"lm loss": report}

    @staticmethod
    def _slice_for_context_parallel(*tensors):
        from megatron.core import parallel_state

        cp = parallel_state.get_context_parallel_world_size()
        if cp == 1:
            return tensors
        # load-balanced split into 2*cp chunks: rank r keeps chunks r and 2cp-1-r (megatron's layout)
        rank = parallel_state.get_context_parallel_rank()
        out = []
        for t in tensors:
            s = t.shape[1]
            chunks = t.view(t.shape[0], 2 * cp, s // (2 * cp), *t.shape[2:])
            # slices, not an index tensor: building one on the GPU from host values would wait for the stream
            out.append(torch.cat([chunks[:, rank], chunks[:, 2 * cp - 1 - rank]], dim=1))
        return tuple(out)

    def _run(self, micro_batches: Sequence, forward_only: bool) -> list[dict]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        p = self.spec.parallelism
        mbs = micro_batches[0].tokens.shape[0]
        seq = micro_batches[0].tokens.shape[1]
        data = iter(micro_batches)
        iters = [iter(micro_batches) for _ in self.model] if len(self.model) > 1 else data
        self._num_micro = len(micro_batches)
        fwd_bwd = get_forward_backward_func()
        return fwd_bwd(
            forward_step_func=self._forward_step,
            data_iterator=iters,
            model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=len(micro_batches),
            seq_length=seq // p.context,
            micro_batch_size=mbs,
            decoder_seq_length=seq // p.context,
            forward_only=forward_only,
        ) or []

    def _reduce_loss(self, stores: list[dict]) -> tuple[float, int]:
        from megatron.core import parallel_state

        total = torch.zeros(2, dtype=torch.float32, device=torch.cuda.current_device())
        for d in stores:
            total += d["lm loss"].to(total.device)
        # last pipeline stage holds the losses: sum over data parallel (with CP), then share over the pipeline
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            torch.distributed.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
        loss_sum, tokens = total.tolist()
        return loss_sum / max(tokens, 1.0), int(tokens)

    def train_step(self, micro_batches: Sequence) -> StepResult:
        """One optimiser step over this rank's micro-batches (trainer.data.batches.MicroBatch)."""
        for m in self.model:
            m.train()
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        stores = self._run(micro_batches, forward_only=False)
        check_output_grad_scale()
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=self.spec.training.global_batch_size)
        self.iteration += 1
        loss, tokens = self._reduce_loss(stores)
        lr = self.optimizer.param_groups[0]["lr"]
        return StepResult(loss, tokens, float(grad_norm) if grad_norm is not None else None, lr, not ok)

    @torch.no_grad()
    def evaluate(self, micro_batches: Sequence) -> tuple[float, int]:
        for m in self.model:
            m.eval()
        stores = self._run(micro_batches, forward_only=True)
        return self._reduce_loss(stores)

    # ---------------------------------------------------------------------------------------------- state

    def sharded_state_dict(self) -> dict:
        """Model (+ optimizer, scheduler) as megatron dist_checkpointing sharded state dicts."""
        model_sd = {}
        if len(self.model) == 1:
            model_sd["model"] = self.model[0].sharded_state_dict()
        else:
            for i, m in enumerate(self.model):
                model_sd[f"model{i}"] = m.sharded_state_dict()
        return {
            **model_sd,
            "optimizer": self.optimizer.sharded_state_dict(model_sd.get("model") or model_sd),
            "opt_param_scheduler": self.scheduler.state_dict(),
            "iteration": self.iteration,
        }

    def unwrapped(self) -> list:
        return [m.module for m in self.model]

    def close(self) -> None:
        from megatron.core import parallel_state

        for restore in reversed(self._restore):
            restore()
        self._restore.clear()
        if self.config is not None and getattr(self.config, "cuda_graph_impl", "none") == "local":
            # graphs and their memory pool are process-wide in megatron-core: a later engine must start clean
            from megatron.core.transformer.cuda_graphs import delete_cuda_graphs

            delete_cuda_graphs()
        self.model, self.optimizer, self.scheduler = [], None, None
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        with contextlib.suppress(Exception):
            clear_aux_losses_tracker()


def create_engine(spec):
    """The engine the training loop drives (trainer.engines.base.Engine); see megatron_loop."""
    from .loop import create_engine as create

    return create(spec)


def data_parallel_info() -> tuple[int, int]:
    """(data-parallel size, this rank's data-parallel rank) once the engine initialised the groups."""
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()


def environment_note() -> str:
    caps = Capabilities.probe()
    return (f"device={caps.device_name} te={caps.transformer_engine} flash_attn={caps.flash_attn} "
            f"grouped_gemm={caps.grouped_gemm} torch_grouped_mm={caps.torch_grouped_mm} megablocks={caps.megablocks} "
            f"CUDA_DEVICE_MAX_CONNECTIONS={os.environ.get('CUDA_DEVICE_MAX_CONNECTIONS')}")


__all__ = ["MegatronEngine", "EngineOptions", "Capabilities", "StepResult", "create_engine", "data_parallel_info"]
