"""The megatron engine: `qwen_trainer.engines.base.Engine` for megatron-core on CUDA (bf16/fp16; TP, PP + virtual, CP,
EP, DP, distributed optimizer), the one class `qwen_trainer run` trains with and the GPU benchmarks measure.

The loop (qwen_trainer.train) owns the schedule, the data and the checkpoint cadence; one job is:

    MegatronEngine(spec)      pins this process's GPU and works out its data-parallel rank (megatron's rank order,
                              tp-cp-ep-dp-pp) before the loop joins the NCCL group and shards the data
    build(ctx)                model-parallel groups, GPTModel chunk(s), megatron DDP and (distributed) optimizer
                              (build.py)
    train_step(mbs, lr, mode) the loop's lr on every parameter group, forward/backward through megatron's pipeline
                              schedule with the loss normalisation of loss.LossScaling, gradient reduce, clip, step
    eval_step(mbs)            forward only: summed loss and loss tokens of the global batch
    save_sharded / load_sharded   collective: every rank writes and reads its own shard of the weights and the
                              optimizer state (state.py, qwen_trainer.checkpoint.sharded); the loop's checkpoints take
                              this path
    prepare_checkpoint()      collective: weights in Hugging Face naming and every rank's optimizer shard gathered
                              on rank 0, for the converter's per-rank layout (the checkpoint benchmark's baseline,
                              store.save(sharded=False))
"""

from __future__ import annotations

import dataclasses
import os
from functools import partial
from typing import Optional, Sequence

import torch

from qwen_trainer.errors import UserError
from qwen_trainer.spec import JobSpec
from qwen_trainer.spec.resolve import resolve_architecture

from ..base import EngineContext, StepResult
from . import state
from .build import Model, build_model, init_model_parallel, pin_communication_order, release
from .config import Capabilities, EngineOptions, plan_model, whole_step_graph_blocker
from .layout import FULLY_RESHARDABLE, data_parallel_layout, layout_record, optimizer_sharding
from .loss import LossScaling, loss_sum_from_output, take_load_balancing_loss, take_output_grad_scales
from .pending_step import PendingStep
from .step_graph import StepGraph, graph_action, graph_safe_generators, step_key


class MegatronEngine:
    name = "megatron"
    device = "cuda"

    def __init__(self, spec: JobSpec, options: Optional[EngineOptions] = None, *, env=None,
                 capabilities: Optional[Capabilities] = None):
        from qwen_trainer.distenv import read_env

        p = spec.parallelism
        if p.expert_tensor != 1:
            raise UserError("the megatron engine trains with expertTensor 1 only (experts whole on each "
                            "expert-parallel rank)", path="parallelism.expertTensor")
        self.caps = capabilities or Capabilities.probe()
        if not self.caps.cuda:
            raise UserError("the megatron engine needs a CUDA GPU and none is visible; use the cpu engine",
                            path="spec.model.backend")
        self.spec = spec
        self.env = env or read_env()
        self.options = options or EngineOptions()
        self.arch = resolve_architecture(spec)
        self.plan = plan_model(self.arch, spec, self.options, self.caps)
        # one normalisation (loss.LossScaling); megatron's DDP reads this at construction
        self.plan.config_kwargs["calculate_per_token_loss"] = False
        pin_communication_order(spec)
        # The loop joins the NCCL group and runs collectives before build(): pin the device first.
        torch.cuda.set_device(self.env.local_rank)
        self.data_parallel_size, self.data_parallel_rank = data_parallel_layout(spec, self.env.world_size,
                                                                                self.env.rank)
        # every rank saves and loads its own shard (MegaBlocks' experts through megablocks_mlp's sharded state dict)
        self.saves_sharded = True
        self.model: Optional[Model] = None
        self.ctx: Optional[EngineContext] = None
        self.notes: list[str] = []
        self._late_expert_grads_reported = False
        self._hf_config = None
        self._gloo = None
        self._scaling: Optional[LossScaling] = None
        self._num_micro = 1
        self._pending_weights: Optional[dict] = None
        self._pending_optimizer: Optional[dict] = None
        self._pending_for: Optional[int] = None
        self._steps = 0
        self._unread: Optional[PendingStep] = None
        self._step_graph: Optional[StepGraph] = None
        self._eager_steps_reported = False

    # ---- construction -------------------------------------------------------------------------------------------
    def build(self, ctx: EngineContext) -> None:
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from .. import hf_model

        self.ctx = ctx
        wanted = self.plan.options.whole_step_graph
        graph_blocker = self._whole_step_graph_blocker() if wanted else None
        step_graph = wanted and graph_blocker is None
        if not step_graph:
            # the plan says what runs: megatron's graph-safe RNG (init_model_parallel) only where a graph will be
            self.plan = dataclasses.replace(self.plan, options=self.plan.options.replace(whole_step_graph=False))
        init_model_parallel(self.spec, self.plan, self.env)
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        if (dp, dp_rank) != (self.data_parallel_size, self.data_parallel_rank):
            raise RuntimeError(f"data-parallel layout {(self.data_parallel_size, self.data_parallel_rank)} differs "
                               f"from megatron's {(dp, dp_rank)}")
        if step_graph:
            # off the legacy default stream before the model exists: megatron DDP keeps each parameter's
            # gradient-accumulation node, which runs the backward's last op on the stream it was made on, and
            # a captured backward may not make the legacy stream wait for the capture (megatron's per-layer
            # graphs move to a side stream likewise)
            torch.cuda.set_stream(torch.cuda.Stream())
        self.model = build_model(self.spec, self.plan, self.options, self.caps.transformer_engine)
        self.notes = list(self.model.notes)
        if graph_blocker:
            self.notes.append(f"whole-step graph off: {graph_blocker}")
        elif step_graph:
            self._step_graph = StepGraph(graph_safe_generators())
        self._gloo = dist.new_group(backend="gloo")
        self._hf_config = hf_model.hf_config(ctx.arch, init_std=ctx.init_std,
                                             dropout=self.spec.training.attention_dropout)
        p = self.spec.parallelism
        attention = self.plan.attention
        if attention == "sdpa" and self.plan.options.sdpa_backend:
            attention += f"/{self.plan.options.sdpa_backend}"  # the kernels SDPA is pinned to (training.flashAttention)
        graphs = self.model.config.cuda_graph_impl == "local"
        ctx.log(f"engine=megatron tp={p.tensor} pp={p.pipeline} ep={p.expert} cp={p.context} dp={dp} "
                f"precision={self.spec.training.precision} attention={attention} experts={self.plan.experts} "
                f"distributed-optimizer={p.distributed_optimizer} cuda-graphs={'on' if graphs else 'off'} "
                f"whole-step-graph={'on' if self._step_graph is not None else 'off'} "
                f"device={torch.cuda.get_device_name()}" + (f" ({'; '.join(self.notes)})" if self.notes else ""))

    def _whole_step_graph_blocker(self) -> Optional[str]:
        """Why the whole-step graph cannot run here (None: it can)."""
        if not torch.cuda.is_available():
            return "no CUDA device"
        return whole_step_graph_blocker(self.spec, self.plan.options, self.plan.config_kwargs, self.plan.attention,
                                        self.plan.experts, self.env.world_size)

    def hf_config(self):
        return self._hf_config

    def unwrapped(self) -> list:
        return self.model.unwrapped()

    @property
    def _moe(self) -> bool:
        return self.arch.moe is not None

    def layout(self) -> dict:
        return layout_record(self.spec, self.env.world_size)

    # ---- weights ------------------------------------------------------------------------------------------------
    def load_checkpoint_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        from megatron.core import parallel_state as ps

        from ..cpu import WeightsMismatch
        from .weights import load_into, weight_problems

        problems = weight_problems(self.arch, state_dict)
        if problems:
            raise WeightsMismatch(problems)
        try:
            load_into(self.unwrapped(), state_dict, self.arch,
                      tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=ps.get_tensor_model_parallel_world_size(),
                      ep_rank=ps.get_expert_model_parallel_rank(), ep_size=ps.get_expert_model_parallel_world_size(),
                      layer_offsets=self.model.layer_offsets)
        except (KeyError, ValueError) as err:
            raise WeightsMismatch([str(err)]) from None
        self.model.optimizer.reload_model_params()  # fp32 master weights follow the new weights
        self._pending_weights = None
        self._recapture()

    def prepare_checkpoint(self, save_optimizer: bool = True) -> None:
        """Collective (every rank): gather what rank 0 writes in the gathered checkpoint save that follows."""
        self._settle()
        state.sync_params(self.model.chunks)
        torch.cuda.synchronize()
        self._pending_weights = state.gather_hf_weights(self.model, self.arch, self._gloo)
        self._pending_optimizer = (state.gather_optimizer_state(self.model.optimizer, self.layout(), self._gloo)
                                   if save_optimizer else None)
        self._pending_for = self._steps

    def _prepared(self, what: str, save_optimizer: bool):
        if getattr(self, f"_pending_{what}") is None or self._pending_for != self._steps:
            if self.env.world_size > 1:
                raise RuntimeError(f"the megatron engine's {what} are sharded over processes: every rank must call "
                                   "prepare_checkpoint() before the checkpoint is written")
            self.prepare_checkpoint(save_optimizer=save_optimizer)
        out = getattr(self, f"_pending_{what}")
        setattr(self, f"_pending_{what}", None)
        return out

    def checkpoint_weights(self) -> dict[str, torch.Tensor]:
        return self._prepared("weights", save_optimizer=False)

    def optimizer_state_dict(self) -> dict:
        return self._prepared("optimizer", save_optimizer=True)

    def load_optimizer_state_dict(self, saved: dict) -> None:
        from .kernels import use_fused_adam

        say = self.ctx.log if self.ctx is not None else print
        if not isinstance(saved, dict) or saved.get("format") != state.OPTIMIZER_FORMAT:
            say("optimizer state is not in this engine's per-rank format; starting the optimizer afresh")
            return
        if saved.get("layout") != self.layout():
            say(f"optimizer state was saved with layout {saved.get('layout')}, this run is {self.layout()}; "
                "starting the optimizer afresh from the checkpoint's weights")
            return
        state.restore_optimizer_state(self.model.optimizer, saved["ranks"][self.env.rank]["optimizers"])
        if self.options.fused_adam:
            use_fused_adam(self.model.optimizer)  # a restored step sits on the host

    # ---- sharded checkpoints (every rank its own part) -----------------------------------------------------------
    def save_sharded(self, folder, save_optimizer: bool, async_save: bool = False):
        """Collective: this rank's shards of the weights (and optimizer state) into `folder`; with `async_save` the
        request that writes them (qwen_trainer.checkpoint.sharded.AsyncSaves)."""
        from qwen_trainer.checkpoint import sharded

        self._settle()
        state.sync_params(self.model.chunks)
        return sharded.save(state.sharded_state_dict(self.model, save_optimizer, is_loading=False,
                                                     optimizer_sharding=optimizer_sharding(self.layout())),
                            folder, async_save)

    def _unusable_optimizer_state(self, saved_layout: Optional[dict], saved_chains: Optional[int],
                                  regroup: bool) -> list[str]:
        """Why the optimizer state of a sharded checkpoint (saved by a run that chained `saved_chains` optimizers)
        cannot be restored into this run's optimizer (none: it can, as far as its chain and layout tell)."""
        reasons = []
        if not regroup and saved_chains is not None and saved_chains != state.chain_length(self.model.optimizer):
            reasons.append(f"the checkpoint's optimizer was megatron's chain of {saved_chains} optimizers and this "
                           f"run's is {state.chain_length(self.model.optimizer)} (MoE: one for the experts apart from "
                           "the dense parameters at expert parallel > 1 only), whose kept settings cannot be matched")
        moved = state.moved_fields(saved_layout, self.layout())
        if moved:
            reasons.append(f"the distributed optimizer's state was saved at {saved_layout} and this run is "
                           f"{self.layout()} ({', '.join(moved)} changed); its shards cannot follow that change")
        return reasons

    def load_sharded(self, folder, load_optimizer: bool, saved_layout: Optional[dict] = None) -> bool:
        """Collective: the regions of a sharded checkpoint this rank needs, whatever layout saved it. Returns whether
        optimizer state was restored: where the checkpoint holds it under the names this optimizer asks for, it is
        asked for, megatron chained as many optimizers when it was saved (MoE: EP 1 against EP > 1) or the state is
        named by parameter (the plain optimizer's, the distributed optimizer's saved reshardable: regrouped), and
        (distributed optimizer) the checkpoint's TP/PP/EP split is this run's or was saved reshardable.
        tests/unit/test_megatron_resume_cpu.py
        runs this engine on CPU under torchrun through each case."""
        from qwen_trainer.checkpoint import sharded

        from .kernels import use_fused_adam

        with_optimizer = load_optimizer and state.holds_optimizer(sharded.saved_keys(folder))
        saved_chains = state.optimizer_chains(folder) if with_optimizer else None
        saved_sharding = optimizer_sharding(saved_layout)
        # state saved by another chain (MoE: expert parallel 1 against more) is regrouped where it is named by
        # parameter: the plain optimizer's, and the distributed optimizer's in the fully_reshardable format
        regroup = saved_chains is not None and saved_chains != state.chain_length(self.model.optimizer) and \
            (not self.model.chunks[0].ddp_config.use_distributed_optimizer or saved_sharding == FULLY_RESHARDABLE)
        unusable = self._unusable_optimizer_state(saved_layout, saved_chains, regroup) if with_optimizer else []
        request = state.sharded_state_dict(self.model, with_optimizer and not unusable, is_loading=True,
                                           optimizer_sharding=saved_sharding)
        if with_optimizer and not unusable:
            missing = state.missing_optimizer_keys(request, sharded.saved_keys(folder))
            if missing:
                unusable.append(f"the checkpoint's optimizer state does not name the tensors this optimizer needs "
                                f"({len(missing)} missing, e.g. {missing[0]})")
                request = state.sharded_state_dict(self.model, False, is_loading=True)
        if unusable:
            self.ctx.log("; ".join(unusable) + ": starting the optimizer afresh from the checkpoint's weights")
            with_optimizer = False
        loaded = sharded.load(request, folder)
        state.load_sharded_state(self.model, loaded, with_optimizer, saved_sharding, regroup=with_optimizer and regroup)
        if with_optimizer and self.options.fused_adam:
            use_fused_adam(self.model.optimizer)  # a restored step sits on the host
        self._pending_weights = None
        self._recapture()
        return with_optimizer

    # ---- one micro-batch through megatron's schedule -------------------------------------------------------------
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
        micro_tokens = int(batch.loss_tokens)
        inner = getattr(model, "module", model)
        if hasattr(inner, "next_output_grad_alpha"):
            inner.next_output_grad_alpha = self._output_grad_alpha(micro_tokens)
        output = model(tokens, position_ids, None, labels=labels, loss_mask=loss_mask)
        return output, partial(self._scaled_loss, loss_mask, micro_tokens)

    def _output_grad_alpha(self, micro_tokens: int) -> Optional[float]:
        """The gradient megatron's schedule will bring to this micro-batch's loss sum, where the forward can know
        it: bf16 (no dynamic loss scale), training."""
        if not self.options.output_grad_into_buffer or self.spec.training.precision != "bf16":
            return None
        if self._scaling is None or self._scaling.mode == "eval":
            return None
        return self._scaling.output_grad(micro_tokens, self._num_micro)

    def _scaled_loss(self, loss_mask, micro_tokens: int, output):
        loss_sum = loss_sum_from_output(output, loss_mask).float()
        value, count = self._scaling.contribution(loss_sum, micro_tokens)
        # a fill on the device: torch.tensor(..., device=cuda) copies from pageable host memory, which waits for
        # the stream, so every micro-batch's backward would start launching only after its forward had finished
        count_t = torch.full((), count, dtype=torch.int, device=loss_sum.device)
        return value, count_t, {"lm loss": self._scaling.report(loss_sum, loss_mask.sum(), micro_tokens)}

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

        cp = self.spec.parallelism.context
        mbs, seq = micro_batches[0].tokens.shape[:2]
        chunks = self.model.chunks
        data = [iter(micro_batches) for _ in chunks] if len(chunks) > 1 else iter(micro_batches)
        self._num_micro = len(micro_batches)
        return get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=data,
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=len(micro_batches),
            seq_length=seq // cp,
            micro_batch_size=mbs,
            decoder_seq_length=seq // cp,
            forward_only=forward_only,
        ) or []

    def _reduced_figures(self, stores: list[dict], along: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """Collective, no read-back: [loss numerator, denominator] summed over the data-parallel ranks (and
        pipeline stages), then the values of `along` (this rank's own), as one float64 device tensor."""
        from megatron.core import parallel_state as ps

        total = torch.zeros(2, dtype=torch.float64, device=torch.cuda.current_device())
        for d in stores:
            total += d["lm loss"].to(total.device, torch.float64)
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            torch.distributed.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
        if ps.get_pipeline_model_parallel_world_size() > 1:  # only the last stage holds losses
            torch.distributed.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
        return torch.cat([total, *(t.reshape(-1).to(total.device, torch.float64) for t in along)])

    def _reduce_report(self, stores: list[dict]) -> tuple[float, float]:
        """The summed loss and token count, read back now."""
        a, b = self._reduced_figures(stores).tolist()
        return a, b

    def _global_tokens(self, micro_batches: Sequence) -> int:
        from megatron.core import parallel_state as ps

        local = sum(mb.loss_tokens for mb in micro_batches)
        if ps.get_data_parallel_world_size() == 1:
            return local
        # summed on the host (gloo): a device all-reduce read back here would wait for the previous step's
        # optimizer, which the loop no longer waits for (read_back_next_step)
        counts = torch.zeros(self.env.world_size, dtype=torch.int64)
        counts[self.env.rank] = local
        torch.distributed.all_reduce(counts, group=self._gloo)
        return int(counts[torch.distributed.get_process_group_ranks(ps.get_data_parallel_group())].sum())

    def _set_lr(self, lr: float) -> None:
        wd = self.spec.training.weight_decay
        for group in self.model.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = wd * group.get("wd_mult", 1.0)

    # ---- steps --------------------------------------------------------------------------------------------------
    def train_step(self, micro_batches: Sequence, lr: float, loss_mode: str) -> StepResult:
        return self.launch_step(micro_batches, lr, loss_mode).result()

    def launch_step(self, micro_batches: Sequence, lr: float, loss_mode: str) -> PendingStep:
        """The step's work queued on the device (forward, backward, reduction, clipping, optimizer); its figures
        are read back by the returned step's `result()` (at once unless options.read_back_next_step)."""
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        from .expert_wgrad import reset_deferred

        if loss_mode not in ("mean", "per_token"):
            raise ValueError(f"unknown loss mode {loss_mode!r}")
        model = self.model
        self._pending_weights = self._pending_optimizer = None
        for m in model.chunks:
            m.train()
            m.zero_grad_buffer()
        model.optimizer.zero_grad()
        self._set_lr(lr)
        global_tokens = self._global_tokens(micro_batches)
        self._scaling = LossScaling(loss_mode, len(micro_batches) * self.data_parallel_size, global_tokens,
                                    self.spec.parallelism.context)
        if self._moe:
            clear_aux_losses_tracker()
            reset_deferred()  # operands a failed step may have left behind
        stores, late, (scales, assumed) = self._forward_backward_step(micro_batches, loss_mode, global_tokens)
        if self._moe:
            if late and not self._late_expert_grads_reported:
                self._late_expert_grads_reported = True
                self.ctx.log(f"deferred expert weight gradients of {late} weights were added after the backward, not "
                             "as their bucket's reduction started (a pipeline schedule this engine does not know); "
                             f"with data parallelism {self.data_parallel_size} they may have missed the reduction: "
                             "set training.expertGradientMemoryMiB: 0 if the loss goes astray")
        ok, grad_norm, _ = model.optimizer.step()
        self._steps += 1
        # the output-layer scales are read back with the loss (a wrong one stops the run before this step's weights
        # can be saved), not before the optimizer: a device sync there leaves the GPU idle while the host prepares
        # the step
        aux = take_load_balancing_loss(len(micro_batches), self.arch.num_layers) if self._moe else None
        norm_on_device = isinstance(grad_norm, torch.Tensor)  # grad_norm_on_device
        along = [t for t in (scales, grad_norm if norm_on_device else None, aux) if t is not None]
        step = PendingStep(self._reduced_figures(stores, along), assumed=assumed,
                           norm=None if norm_on_device else grad_norm, norm_on_device=norm_on_device,
                           aux_on_device=aux is not None, moe=self._moe, stepped=ok, global_tokens=global_tokens,
                           log=self.ctx.log)
        self._unread = step
        if not self.options.read_back_next_step:
            self._settle()
        return step

    def _forward_backward(self, micro_batches: Sequence) -> tuple:
        """Every micro-batch's forward and backward, the deferred expert gradients added, the output layer's scales
        taken: (megatron's loss stores, deferred gradients added late, (scales, assumed))."""
        from .expert_wgrad import finish_backward

        stores = self._run(micro_batches, forward_only=False)
        late = finish_backward() if self._moe else 0
        return stores, late, take_output_grad_scales()

    def _forward_backward_step(self, micro_batches: Sequence, loss_mode: str, global_tokens: int) -> tuple:
        """_forward_backward, replayed from the whole-step graph where one is captured for this step's key; the
        first step runs eagerly (it compiles, tunes and creates what the model makes lazily), the second is
        captured."""
        graph = self._step_graph
        if graph is None or graph.given_up:
            return self._forward_backward(micro_batches)
        key = step_key(micro_batches, loss_mode, global_tokens)
        action = graph_action(graph.captured, graph.matches(key), self._steps)
        if action == "replay":
            return graph.replay(micro_batches)
        if action == "drop":
            self._drop_mismatched_graph(graph)
        if action == "capture":
            try:
                return graph.capture(self._forward_backward, micro_batches, key)
            except RuntimeError as err:  # torch.AcceleratorError too: the capture records, it runs nothing
                return self._eager_after_failed_capture(micro_batches, err)
        return self._forward_backward(micro_batches)  # the first step, or one whose graph was dropped

    def _drop_mismatched_graph(self, graph: StepGraph) -> None:
        """This step's key differs from the captured step's: release the graph, and say once in the log what
        follows (captured again by the next step, or capturing stops for the run)."""
        if graph.drop_for_mismatch():
            self.notes.append("whole-step graph off: the steps' shapes or loss-token counts keep changing")
            self.ctx.log("whole-step CUDA graph off for this run: the steps' shapes or loss-token counts keep "
                         "changing (as SFT batches' do), so no capture gets replayed")
        elif not self._eager_steps_reported:
            self._eager_steps_reported = True
            self.ctx.log("a step whose shapes or loss-token counts differ from the captured step's ran without "
                         "the whole-step graph, which is captured again by the next step (said once)")

    def _eager_after_failed_capture(self, micro_batches: Sequence, err: Exception) -> tuple:
        """A capture that failed ran none of its kernels: forget the graph and the host-side state the captured
        Python left (deferred expert operands, output-layer scales), then run the step eagerly, said once in the
        log, so that the job goes on as it would without the graph."""
        from .expert_wgrad import reset_deferred

        self._step_graph = None
        if self._moe:
            reset_deferred()
        take_output_grad_scales()
        self.notes.append("whole-step graph off: its capture failed")
        self.ctx.log(f"whole-step CUDA graph capture failed ({type(err).__name__}: {str(err).splitlines()[0][:300]}); "
                     "training goes on without it")
        return self._forward_backward(micro_batches)

    @property
    def whole_step_graph_replays(self) -> int:
        """Steps whose forward and backward ran from the whole-step graph (0 without one)."""
        return self._step_graph.replays if self._step_graph is not None else 0

    @property
    def whole_step_graph_given_up(self) -> bool:
        """Capturing stopped for the run because the steps' keys kept changing (StepGraph.drop_for_mismatch)."""
        return self._step_graph is not None and self._step_graph.given_up

    def _recapture(self) -> None:
        """Weights or state were replaced: capture the step again rather than replay kernels that may read the old
        tensors."""
        if self._step_graph is not None:
            self._step_graph.release()

    def _settle(self) -> None:
        """Read back the last launched step if nobody has: before anything saves, evaluates or reads weights, so
        that a step that must stop the run stops it first."""
        step, self._unread = self._unread, None
        if step is not None and not step.read:
            step.result()

    @torch.no_grad()
    def eval_step(self, micro_batches: Sequence) -> tuple[float, int]:
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        self._settle()
        state.sync_params(self.model.chunks)
        for m in self.model.chunks:
            m.eval()
        self._scaling = LossScaling("eval", len(micro_batches) * self.data_parallel_size, 0,
                                    self.spec.parallelism.context)
        stores = self._run(micro_batches, forward_only=True)
        if self._moe:
            clear_aux_losses_tracker()
        total, tokens = self._reduce_report(stores)
        return total, int(round(tokens))

    def close(self) -> None:
        from qwen_trainer.checkpoint import staging

        self._recapture()  # the graph's memory holds the last step's activations
        if self.model is not None:
            release(self.model)
            self.model = None
        staging.HOST_BUFFER.free()  # the checkpoint staging buffer (kept while a background save still holds it)


def create_engine(spec: JobSpec) -> MegatronEngine:
    """The training loop's entry point (qwen_trainer.engines.select_engine)."""
    return MegatronEngine(spec)


def data_parallel_info() -> tuple[int, int]:
    """(data-parallel size, this rank's data-parallel rank) once the engine initialised the groups."""
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()


def environment_note() -> str:
    caps = Capabilities.probe()
    return (f"device={caps.device_name} te={caps.transformer_engine} flash_attn={caps.flash_attn} "
            f"grouped_gemm={caps.grouped_gemm} torch_grouped_mm={caps.torch_grouped_mm} megablocks={caps.megablocks} "
            f"CUDA_DEVICE_MAX_CONNECTIONS={os.environ.get('CUDA_DEVICE_MAX_CONNECTIONS')}")


__all__ = ["MegatronEngine", "EngineOptions", "Capabilities", "create_engine", "data_parallel_info"]
