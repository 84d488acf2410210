"""The megatron engine in the training loop: `trainer.engines.base.Engine` on top of `MegatronEngine`.

The loop (trainer.train) owns the schedule, the data and the checkpoint cadence; this adapter maps its calls onto
the megatron-core model built by `MegatronEngine`:

    create_engine(spec)       pins this process's GPU and works out its data-parallel rank (megatron's rank order,
                              tp-cp-ep-dp-pp) before the loop joins the NCCL group and shards the data
    build(ctx)                model-parallel groups, GPTModel chunk(s), megatron DDP and (distributed) optimizer
    train_step(mbs, lr, mode) the loop's lr on every parameter group, forward/backward through megatron's pipeline
                              schedule, gradient reduce, clip, step
    eval_step(mbs)            forward only: summed loss and loss tokens of the global batch
    save_sharded / load_sharded   collective: every rank writes and reads its own shard of the weights and the
                              optimizer state through megatron-core's dist_checkpointing (trainer.checkpoint.sharded);
                              the training loop's checkpoints take this path
    prepare_checkpoint()      collective: gathers the weights in Hugging Face naming and every rank's optimizer shard
                              to rank 0 for the converter's per-rank layout; only the checkpoint benchmark's baseline
                              (store.save(sharded=False)) still takes it

Loss semantics match the CPU engine. "mean" (pretraining): the step's loss and gradient are the average over all
micro-batches of the global batch of each micro-batch's token-mean. "per_token" (SFT): the sum over all loss tokens
of the global batch divided by their number. Both are expressed through megatron's own normalisation (with
`calculate_per_token_loss` off the schedule divides each micro-batch's loss by the token count it is given and by
the number of micro-batches, and DDP by the data-parallel size), so the MoE load-balancing loss keeps megatron's
scaling, which is the CPU engine's: coefficient x aux / number of micro-batches.

Sharded checkpoints reshard to another layout on load: weights always, the plain optimizer's state too, the
distributed optimizer's only across a changed data-parallel size (otherwise it starts afresh from the checkpoint's
weights, with a log line); see docs/checkpoints.md.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial
from typing import Optional, Sequence

import torch

from trainer.errors import UserError
from trainer.spec import JobSpec

from ..base import EngineContext, StepResult
from .engine import MegatronEngine
from .loss import check_output_grad_scale, loss_sum_from_output
from .weights import hf_from_shards, hf_shapes, is_expert_key, renumber_layers, weight_problems

OPTIMIZER_FORMAT = "megatron-per-rank-v1"


# ------------------------------------------------------------------------------------------------ rank layout


def data_parallel_layout(spec: JobSpec, world_size: int, rank: int) -> tuple[int, int]:
    """(data-parallel size, data-parallel rank) of `rank` under megatron's default order tp-cp-ep-dp-pp: the
    tensor- and context-parallel ranks of one model replica are consecutive, data parallel comes next, pipeline
    stages are outermost. Ranks with the same data-parallel rank must read the same micro-batches."""
    p = spec.parallelism
    model_parallel = p.tensor * p.pipeline * p.context
    if world_size % model_parallel:
        raise UserError(f"{world_size} processes do not divide into tensor {p.tensor} x pipeline {p.pipeline} x "
                        f"context {p.context} parallel replicas", path="parallelism")
    dp = world_size // model_parallel
    if (world_size // p.pipeline) % (p.expert * p.expert_tensor):
        raise UserError(f"expert {p.expert} x expert-tensor {p.expert_tensor} parallel size must divide the "
                        f"{world_size // p.pipeline} processes of a pipeline stage", path="parallelism.expert")
    return dp, (rank // (p.tensor * p.context)) % dp


# ------------------------------------------------------------------------------------------------ loss


@dataclass(frozen=True)
class LossScaling:
    """How one micro-batch's masked loss sum enters megatron's schedule so the step matches the CPU engine."""

    mode: str  # "mean" | "per_token" | "eval"
    num_micro_global: int  # micro-batches of the global batch (all data-parallel ranks)
    global_tokens: int  # loss tokens of the global batch
    context_parallel: int = 1

    def contribution(self, loss_sum: torch.Tensor, micro_tokens: int) -> tuple[torch.Tensor, int]:
        """(value, token count) returned to megatron for one micro-batch.

        Megatron (calculate_per_token_loss off) divides the value by max(token count, 1) and by the local number of
        micro-batches, and DDP divides gradients by data-parallel x context-parallel size; the values here undo
        what does not belong to the wanted loss. `micro_tokens` is the whole micro-batch's count (before a
        context-parallel split); `loss_sum` is this rank's part.
        """
        factor, count = self.factor(micro_tokens)
        return loss_sum * factor, count

    def factor(self, micro_tokens: int) -> tuple[float, int]:
        """(multiplier of the loss sum, token count megatron divides by) of `contribution`."""
        cp = self.context_parallel
        if self.mode == "per_token":
            return cp * self.num_micro_global / max(self.global_tokens, 1), 1
        return float(cp), micro_tokens

    def output_grad(self, micro_tokens: int, local_micro: int) -> float:
        """The gradient megatron's schedule brings to a micro-batch's loss sum in bf16: the factor, divided as the
        schedule divides (by max(count, 1) and by the local number of micro-batches)."""
        factor, count = self.factor(micro_tokens)
        return factor / max(count, 1) / local_micro

    def report(self, loss_sum: torch.Tensor, local_tokens: torch.Tensor, micro_tokens: int) -> torch.Tensor:
        """[numerator, denominator] summed over micro-batches and ranks; their ratio is the step's loss."""
        if self.mode == "mean":
            return torch.stack([loss_sum.detach().float() / max(micro_tokens, 1),
                                torch.full_like(loss_sum, 1.0 / self.context_parallel, dtype=torch.float32)])
        return torch.stack([loss_sum.detach().float(), local_tokens.float()])


# Names megatron's router tracks the unweighted load-balancing loss under, per moe_router_load_balancing_type.
AUX_LOSS_NAMES = ("load_balancing_loss", "seq_load_balancing_loss", "global_load_balancing_loss")


def load_balancing_loss(local_micro: int, num_layers: int) -> float:
    """Collective: the unweighted load-balancing loss of the last step, averaged over MoE layers, micro-batches and
    data-parallel ranks (as Megatron-LM logs it), from megatron's tracker, which is then cleared."""
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
        reduce_aux_losses_tracker_across_ranks,
    )

    tracker = get_moe_layer_wise_logging_tracker()
    names = [n for n in AUX_LOSS_NAMES if n in tracker]
    if not names:
        return 0.0
    reduce_aux_losses_tracker_across_ranks(names)
    total = sum(float(tracker[n]["values"].sum()) for n in names)
    clear_aux_losses_tracker()
    return total / max(local_micro, 1) / max(num_layers, 1)


# ------------------------------------------------------------------------------------------------ engine

class LoopCore(MegatronEngine):
    """`MegatronEngine` whose loss function follows `scaling` (set by the adapter before each step)."""

    scaling: Optional[LossScaling] = None

    def _loss_for(self, batch, loss_mask):
        return partial(self._scaled_loss, loss_mask, int(batch.loss_tokens))

    def _output_grad_alpha(self, batch) -> Optional[float]:
        if not self.options.output_grad_into_buffer or self.spec.training.precision != "bf16" or self.scaling is None:
            return None
        return self.scaling.output_grad(int(batch.loss_tokens), self._num_micro)

    def _scaled_loss(self, loss_mask, micro_tokens: int, output):
        loss_sum = loss_sum_from_output(output, loss_mask).float()
        value, count = self.scaling.contribution(loss_sum, micro_tokens)
        # a fill on the device: torch.tensor(..., device=cuda) copies from pageable host memory, which waits for
        # the stream, so every micro-batch's backward would start launching only after its forward had finished
        count_t = torch.full((), count, dtype=torch.int, device=loss_sum.device)
        return value, count_t, {"lm loss": self.scaling.report(loss_sum, loss_mask.sum(), micro_tokens)}



def _sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


class MegatronLoopEngine:
    """trainer.engines.base.Engine for megatron-core on CUDA (bf16; TP, PP, EP, DP, distributed optimizer)."""

    name = "megatron"
    device = "cuda"

    def __init__(self, spec: JobSpec, options=None, *, env=None):
        from trainer.distenv import read_env

        from .config import EngineOptions

        p = spec.parallelism
        if p.expert_tensor != 1:
            raise UserError("the megatron engine trains with expertTensor 1 only (experts whole on each "
                            "expert-parallel rank)", path="parallelism.expertTensor")
        if not torch.cuda.is_available():
            raise UserError("the megatron engine needs a CUDA GPU and none is visible; use the cpu engine")
        self.spec = spec
        self.env = env or read_env()
        if p.tensor > 1 or p.context > 1:
            # must precede the CUDA context (see MegatronEngine.init_distributed)
            os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        # The loop joins the NCCL group and runs collectives before build(): pin the device first.
        torch.cuda.set_device(self.env.local_rank)
        self.data_parallel_size, self.data_parallel_rank = data_parallel_layout(spec, self.env.world_size,
                                                                                self.env.rank)
        self.options = options or EngineOptions()
        self.core = None
        self.notes: list[str] = []
        self.ctx: Optional[EngineContext] = None
        self._config = None
        self._gloo = None
        self._pending_weights: Optional[dict] = None
        self._pending_optimizer: Optional[dict] = None
        self._pending_for: Optional[int] = None
        self._steps = 0
        # every rank saves and loads its own shard (trainer.checkpoint.sharded); MegaBlocks' expert modules have
        # no sharded state dict, so that backend's checkpoints still go through rank 0
        self.saves_sharded = spec.model.backend != "megablocks"

    # ---- construction -------------------------------------------------------------------------------------------
    def build(self, ctx: EngineContext) -> None:
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from .. import hf_model

        self.ctx = ctx
        core = LoopCore(self.spec, self.options)
        # Loss normalisation is megatron's (see the module docstring); DDP reads this at construction.
        core.plan.config_kwargs["calculate_per_token_loss"] = False
        core.init_distributed()
        self.core = core
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        if (dp, dp_rank) != (self.data_parallel_size, self.data_parallel_rank):
            raise RuntimeError(f"data-parallel layout {(self.data_parallel_size, self.data_parallel_rank)} differs "
                               f"from megatron's {(dp, dp_rank)}")
        core.build()
        self.notes = list(core.notes)
        self._gloo = dist.new_group(backend="gloo")
        self._config = hf_model.hf_config(ctx.arch, init_std=ctx.init_std, dropout=self.spec.training.attention_dropout)
        p = self.spec.parallelism
        attention = core.plan.attention
        if attention == "sdpa" and core.plan.options.sdpa_backend:
            attention += f"/{core.plan.options.sdpa_backend}"  # the kernels SDPA is pinned to (training.flashAttention)
        ctx.log(f"engine=megatron tp={p.tensor} pp={p.pipeline} ep={p.expert} cp={p.context} dp={dp} "
                f"precision={self.spec.training.precision} attention={attention} "
                f"experts={core.plan.experts} distributed-optimizer={p.distributed_optimizer} "
                f"cuda-graphs={'on' if core.config.cuda_graph_impl == 'local' else 'off'} "
                f"device={torch.cuda.get_device_name()}" + (f" ({'; '.join(core.notes)})" if core.notes else ""))

    def hf_config(self):
        return self._config

    @property
    def _moe(self) -> bool:
        return self.ctx is not None and self.ctx.arch.moe is not None

    # ---- weights ------------------------------------------------------------------------------------------------
    def _layer_offsets(self) -> list[int]:
        from megatron.core import parallel_state as ps

        vp = ps.get_virtual_pipeline_model_parallel_world_size()
        return [self.core._layer_offset(self.core.config, i if vp else None) for i in range(len(self.core.model))]

    def load_checkpoint_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        from megatron.core import parallel_state as ps

        from ..cpu import WeightsMismatch
        from .weights import load_into

        problems = weight_problems(self.ctx.arch, state_dict)
        if problems:
            raise WeightsMismatch(problems)
        try:
            load_into(self.core.unwrapped(), state_dict, self.ctx.arch,
                      tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=ps.get_tensor_model_parallel_world_size(),
                      ep_rank=ps.get_expert_model_parallel_rank(), ep_size=ps.get_expert_model_parallel_world_size(),
                      layer_offsets=self._layer_offsets())
        except (KeyError, ValueError) as err:
            raise WeightsMismatch([str(err)]) from None
        self.core.optimizer.reload_model_params()  # fp32 master weights follow the new weights
        self._pending_weights = None

    def _sync_params(self) -> None:
        """With the distributed optimizer and overlapped parameter all-gather, the weights a step updated reach the
        other data-parallel ranks only in the next training forward pass; evaluation and checkpoints need them now
        (as Megatron-LM syncs before evaluating or saving)."""
        for m in self.core.model:
            c = m.ddp_config
            if c.use_distributed_optimizer and c.overlap_param_gather:
                m.start_param_sync(force_sync=True)

    def _local_shards(self) -> tuple[Optional[dict], Optional[dict]]:
        """(dense tensors, expert tensors) this rank contributes: dense from data-parallel rank 0, experts from
        expert-data-parallel rank 0; global layer numbers, on CPU."""
        from megatron.core import parallel_state as ps

        dense_wanted = ps.get_data_parallel_rank() == 0
        expert_wanted = self._moe and ps.get_expert_data_parallel_rank() == 0
        dense, experts = {}, {}
        for chunk, offset in zip(self.core.unwrapped(), self._layer_offsets()):
            own = {name: param.detach() for name, param in chunk.named_parameters()}
            for k, v in renumber_layers(own, offset).items():
                target = experts if is_expert_key(k) else dense
                if (target is experts and expert_wanted) or (target is dense and dense_wanted):
                    target[k] = v.detach().to("cpu", copy=True)
        return (dense if dense_wanted else None), (experts if expert_wanted else None)

    def _gather_weights(self) -> Optional[dict[str, torch.Tensor]]:
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        dense, experts = self._local_shards()
        mine = {"tp": ps.get_tensor_model_parallel_rank(), "ep": ps.get_expert_model_parallel_rank(),
                "dense": dense, "experts": experts}
        everyone = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(mine, everyone, dst=0, group=self._gloo)
        if dist.get_rank() != 0:
            return None
        by_tp: dict[int, dict] = {}
        by_ep: dict[int, dict] = {}
        for part in everyone:
            if part["dense"] is not None:
                by_tp.setdefault(part["tp"], {}).update(part["dense"])
            if part["experts"] is not None:
                by_ep.setdefault(part["ep"], {}).update(part["experts"])
        return hf_from_shards(by_tp, by_ep, self.ctx.arch)

    def prepare_checkpoint(self, save_optimizer: bool = True) -> None:
        """Collective (every rank): gather what rank 0 writes in the checkpoint save that follows."""
        import torch.distributed as dist

        self._sync_params()
        torch.cuda.synchronize()
        self._pending_weights = self._gather_weights()
        self._pending_optimizer = None
        if save_optimizer:
            local = self._local_optimizer_state()
            everyone = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
            dist.gather_object(local, everyone, dst=0, group=self._gloo)
            if everyone is not None:
                self._pending_optimizer = {"format": OPTIMIZER_FORMAT, "layout": self.layout(), "ranks": everyone}
        self._pending_for = self._steps

    def checkpoint_weights(self) -> dict[str, torch.Tensor]:
        if self._pending_weights is None or self._pending_for != self._steps:
            if self.env.world_size > 1:
                raise RuntimeError("the megatron engine's weights are sharded over processes: every rank must call "
                                   "prepare_checkpoint() before the checkpoint is written")
            self.prepare_checkpoint(save_optimizer=False)
        out, self._pending_weights = self._pending_weights, None
        return out

    # ---- sharded checkpoints (every rank its own part) -----------------------------------------------------------
    def _sharded_state_dict(self, with_optimizer: bool, is_loading: bool) -> dict:
        """Megatron's sharded state dicts of the model chunks (keys `model` or `model0..`, as Megatron-LM names
        them) and, if asked, of the optimizer, in formats that reshard to any layout."""
        from trainer.checkpoint.sharded import SHARDED_STATE_METADATA

        md = dict(SHARDED_STATE_METADATA)
        chunks = self.core.unwrapped()
        if len(chunks) == 1:
            out = {"model": chunks[0].sharded_state_dict(metadata=md)}
        else:
            out = {f"model{i}": c.sharded_state_dict(metadata=md) for i, c in enumerate(chunks)}
        if with_optimizer:
            out["optimizer"] = self.core.optimizer.sharded_state_dict(dict(out), is_loading=is_loading, metadata=md)
        return out

    def save_sharded(self, folder, save_optimizer: bool, async_save: bool = False):
        """Collective: this rank's shards of the weights (and optimizer state) into `folder`; with `async_save`
        the request that writes them (trainer.checkpoint.sharded.AsyncSaves)."""
        from trainer.checkpoint import sharded

        self._sync_params()
        return sharded.save(self._sharded_state_dict(save_optimizer, is_loading=False), folder, async_save)

    def load_sharded(self, folder, load_optimizer: bool, saved_layout: Optional[dict] = None) -> bool:
        """Collective: the regions of a sharded checkpoint this rank needs, whatever layout saved it. Returns
        whether optimizer state was restored: where the checkpoint holds it, it is asked for, and (distributed
        optimizer) the checkpoint's TP/PP/EP split is this run's."""
        from trainer.checkpoint import sharded

        from .kernels import use_fused_adam

        with_optimizer = load_optimizer and any(k.startswith("optimizer.") for k in sharded.saved_keys(folder))
        if with_optimizer and saved_layout and saved_layout.get("distributed_optimizer"):
            now = self.layout()
            moved = [f for f in sharded.MODEL_PARALLEL_FIELDS if saved_layout.get(f) != now.get(f)]
            if moved:
                self.ctx.log(f"the distributed optimizer's state was saved at {saved_layout} and this run is {now} "
                             f"({', '.join(moved)} changed); its shards cannot follow that change: starting the "
                             "optimizer afresh from the checkpoint's weights")
                with_optimizer = False
        state = sharded.load(self._sharded_state_dict(with_optimizer, is_loading=True), folder)
        chunks = self.core.unwrapped()
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(state["model" if len(chunks) == 1 else f"model{i}"], strict=True)
        if with_optimizer:
            self.core.optimizer.load_state_dict(state["optimizer"])
            if self.options.fused_adam:
                use_fused_adam(self.core.optimizer)  # a restored step sits on the host
        else:
            self.core.optimizer.reload_model_params()  # fp32 master weights follow the loaded weights
        self._pending_weights = None
        return with_optimizer

    # ---- optimiser state ----------------------------------------------------------------------------------------
    def layout(self) -> dict:
        p = self.spec.parallelism
        return {"world": self.env.world_size, "tensor": p.tensor, "pipeline": p.pipeline, "context": p.context,
                "expert": p.expert, "virtual_pipeline": p.virtual_pipeline_layers,
                "distributed_optimizer": p.distributed_optimizer}

    def _local_optimizer_state(self) -> dict:
        out = []
        for opt in _sub_optimizers(self.core.optimizer):
            inner = opt.optimizer
            params = [p for g in inner.param_groups for p in g["params"]]
            scaler = getattr(opt, "grad_scaler", None)
            out.append({"main_params": [p.detach().to("cpu", copy=True) for p in params],
                        "state": _to_cpu(inner.state_dict()["state"]),
                        "grad_scaler": scaler.state_dict() if scaler is not None else None})
        return {"optimizers": out}

    def optimizer_state_dict(self) -> dict:
        if self._pending_optimizer is None or self._pending_for != self._steps:
            if self.env.world_size > 1:
                raise RuntimeError("the megatron engine's optimizer state is sharded over processes: every rank must "
                                   "call prepare_checkpoint() before the checkpoint is written")
            self.prepare_checkpoint(save_optimizer=True)
        out, self._pending_optimizer = self._pending_optimizer, None
        return out

    def load_optimizer_state_dict(self, state: dict) -> None:
        from .kernels import use_fused_adam

        say = self.ctx.log if self.ctx is not None else print
        if not isinstance(state, dict) or state.get("format") != OPTIMIZER_FORMAT:
            say("optimizer state is not in this engine's per-rank format; starting the optimizer afresh")
            return
        if state.get("layout") != self.layout():
            say(f"optimizer state was saved with layout {state.get('layout')}, this run is {self.layout()}; "
                "starting the optimizer afresh from the checkpoint's weights")
            return
        mine = state["ranks"][self.env.rank]["optimizers"]
        subs = _sub_optimizers(self.core.optimizer)
        problems = [] if len(mine) == len(subs) else [f"{len(mine)} optimizers saved, {len(subs)} built"]
        for opt, saved in zip(subs, mine):
            params = [p for g in opt.optimizer.param_groups for p in g["params"]]
            if [tuple(p.shape) for p in params] != [tuple(t.shape) for t in saved["main_params"]]:
                problems.append("parameter shards differ")
        if problems:
            raise RuntimeError(f"optimizer state does not fit this model: {'; '.join(problems)}")
        with torch.no_grad():
            for opt, saved in zip(subs, mine):
                inner = opt.optimizer
                params = [p for g in inner.param_groups for p in g["params"]]
                for p, t in zip(params, saved["main_params"]):
                    p.copy_(t)
                current = inner.state_dict()
                current["state"] = saved["state"]
                inner.load_state_dict(current)
                scaler = getattr(opt, "grad_scaler", None)
                if scaler is not None and saved.get("grad_scaler") is not None:
                    scaler.load_state_dict(saved["grad_scaler"])
        # The model's bf16 weights came from the same checkpoint and are the rounded master weights already.
        if self.options.fused_adam:
            use_fused_adam(self.core.optimizer)

    # ---- steps --------------------------------------------------------------------------------------------------
    def _reduce_report(self, stores: list[dict]) -> tuple[float, float]:
        from megatron.core import parallel_state as ps

        total = torch.zeros(2, dtype=torch.float64, device=torch.cuda.current_device())
        for d in stores:
            total += d["lm loss"].to(total.device, torch.float64)
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            torch.distributed.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
        if ps.get_pipeline_model_parallel_world_size() > 1:  # only the last stage holds losses
            torch.distributed.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
        a, b = total.tolist()
        return a, b

    def _global_tokens(self, micro_batches: Sequence) -> int:
        from megatron.core import parallel_state as ps

        n = torch.tensor([sum(mb.loss_tokens for mb in micro_batches)], dtype=torch.int64,
                         device=torch.cuda.current_device())
        torch.distributed.all_reduce(n, group=ps.get_data_parallel_group())
        return int(n.item())

    def _set_lr(self, lr: float) -> None:
        wd = self.spec.training.weight_decay
        for group in self.core.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = wd * group.get("wd_mult", 1.0)

    def train_step(self, micro_batches: Sequence, lr: float, loss_mode: str) -> StepResult:
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        if loss_mode not in ("mean", "per_token"):
            raise ValueError(f"unknown loss mode {loss_mode!r}")
        core = self.core
        self._pending_weights = self._pending_optimizer = None
        for m in core.model:
            m.train()
            m.zero_grad_buffer()
        core.optimizer.zero_grad()
        self._set_lr(lr)
        global_tokens = self._global_tokens(micro_batches)
        core.scaling = LossScaling(loss_mode, len(micro_batches) * self.data_parallel_size, global_tokens,
                                   self.spec.parallelism.context)
        if self._moe:
            clear_aux_losses_tracker()
        stores = core._run(micro_batches, forward_only=False)
        check_output_grad_scale()
        ok, grad_norm, _ = core.optimizer.step()
        self._steps += 1
        num, den = self._reduce_report(stores)
        loss = num / max(den, 1e-12)
        aux = load_balancing_loss(len(micro_batches), self.ctx.arch.num_layers) if self._moe else None
        norm = float(grad_norm) if grad_norm is not None else float("nan")
        if not ok:
            self.ctx.log("fp16 loss-scale overflow: the optimizer step was skipped")
        elif not math.isfinite(norm) or not math.isfinite(loss):
            raise FloatingPointError(f"loss {loss} / grad norm {norm} is not finite")
        return StepResult(loss, aux, norm, global_tokens)

    @torch.no_grad()
    def eval_step(self, micro_batches: Sequence) -> tuple[float, int]:
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        self._sync_params()
        for m in self.core.model:
            m.eval()
        self.core.scaling = LossScaling("eval", len(micro_batches) * self.data_parallel_size, 0,
                                        self.spec.parallelism.context)
        stores = self.core._run(micro_batches, forward_only=True)
        if self._moe:
            clear_aux_losses_tracker()
        total, tokens = self._reduce_report(stores)
        return total, int(round(tokens))

    def close(self) -> None:
        if self.core is not None:
            self.core.close()
            self.core = None


def create_engine(spec: JobSpec) -> MegatronLoopEngine:
    """The training loop's entry point (trainer.engines.select_engine, through trainer.engines.megatron)."""
    return MegatronLoopEngine(spec)


__all__ = ["MegatronLoopEngine", "create_engine", "data_parallel_layout", "hf_from_shards", "hf_shapes",
           "load_balancing_loss", "LossScaling", "weight_problems"]
