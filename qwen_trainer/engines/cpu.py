"""CPU engine: the Qwen model from transformers, data-parallel over torch.distributed (gloo), fp32.

For machines without GPUs and for CPU-only integration tests. Every rank holds the whole model (tensor, pipeline
and expert parallel sizes of the spec shape only the checkpoint layout). Gradients are summed with one
all-reduce of a flat buffer after the micro-batches, with the loss already scaled so the sum is the global
average; this is deterministic, so a resumed run repeats an uninterrupted one bit for bit.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from qwen_trainer.data.batches import IGNORE_INDEX, MicroBatch

from . import hf_model
from .base import EngineContext, StepResult


class CpuEngine:
    name = "cpu"
    device = "cpu"
    saves_sharded = False  # rank 0 writes full weights through the converter

    def __init__(self) -> None:
        self.model = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.data_parallel_size = 1
        self.data_parallel_rank = 0
        self._config = None
        self._aux_coeff = 0.0
        self.notes: list[str] = []

    # ---- construction -------------------------------------------------------------------------------------------
    def build(self, ctx: EngineContext) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        self.ctx = ctx
        self.data_parallel_size = ctx.dist.world_size
        self.data_parallel_rank = ctx.dist.rank
        t = ctx.spec.training
        if t.cuda_graphs:
            self.notes.append("CUDA graphs off: the CPU engine runs without a GPU")
        self._config = hf_model.hf_config(ctx.arch, init_std=ctx.init_std, dropout=t.attention_dropout)
        torch.manual_seed(ctx.seed)
        self.model = hf_model.build_model(self._config, dtype=torch.float32)
        self._broadcast_weights()
        moe = ctx.arch.moe
        self._moe = moe is not None
        self._aux_coeff = moe.aux_loss_coeff if moe is not None and moe.load_balancing_type != "none" else 0.0
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (no_decay if p.ndim < 2 else decay).append(p)  # biases and norms: no weight decay (as Megatron)
        self.params = [p for p in self.model.parameters()]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, foreach=False,
        )
        self.clip_grad = t.clip_grad

    def hf_config(self):
        return self._config

    def _broadcast_weights(self) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            with torch.no_grad():
                for p in self.model.state_dict().values():
                    dist.broadcast(p, src=0)

    # ---- weights ------------------------------------------------------------------------------------------------
    def checkpoint_weights(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in hf_model.checkpoint_state_dict(self.model).items()}

    def load_checkpoint_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        own = hf_model.checkpoint_state_dict(self.model)
        problems = []
        for k in sorted(set(own) - set(state_dict))[:5]:
            problems.append(f"missing {k}")
        for k in sorted(set(state_dict) - set(own))[:5]:
            problems.append(f"unexpected {k}")
        for k in sorted(set(own) & set(state_dict)):
            if tuple(own[k].shape) != tuple(state_dict[k].shape):
                problems.append(f"{k} has shape {tuple(state_dict[k].shape)}, the model needs {tuple(own[k].shape)}")
        if problems:
            raise WeightsMismatch(problems)
        converted = {k: v.to(torch.float32) for k, v in state_dict.items()}
        hf_model.load_checkpoint_state_dict(self.model, converted)
        self._broadcast_weights()

    # ---- optimiser state ----------------------------------------------------------------------------------------
    def optimizer_state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_optimizer_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    # ---- steps --------------------------------------------------------------------------------------------------
    def _forward(self, mb: MicroBatch):
        out = self.model(input_ids=mb.tokens, position_ids=mb.position_ids, attention_mask=None, use_cache=False,
                         output_router_logits=True if self._moe else None)
        logits = out.logits.float()
        ce = F.cross_entropy(logits.view(-1, logits.size(-1)), mb.targets.view(-1), ignore_index=IGNORE_INDEX,
                             reduction="sum")
        aux = getattr(out, "aux_loss", None) if self._moe else None
        return ce, aux

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t)
        return t

    def train_step(self, micro_batches: Sequence[MicroBatch], lr: float, loss_mode: str) -> StepResult:
        model = self.model
        model.train()
        n_micro = len(micro_batches) * self.data_parallel_size
        local_tokens = sum(mb.loss_tokens for mb in micro_batches)
        global_tokens = int(self._all_reduce(torch.tensor([local_tokens], dtype=torch.int64)).item())
        report = torch.zeros(2, dtype=torch.float64)  # lm loss, aux loss
        for mb in micro_batches:
            ce, aux = self._forward(mb)
            if loss_mode == "per_token":
                lm = ce / max(global_tokens, 1)
            else:
                lm = ce / max(mb.loss_tokens, 1) / n_micro
            loss = lm
            if aux is not None:
                loss = loss + self._aux_coeff * aux / n_micro
                report[1] += float(aux.detach()) / n_micro
            loss.backward()
            report[0] += float(lm.detach())
        self._reduce_grads()
        self._all_reduce(report)
        max_norm = self.clip_grad if self.clip_grad > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        if not math.isfinite(grad_norm) or not math.isfinite(float(report[0])):
            raise FloatingPointError(f"loss {float(report[0])} / grad norm {grad_norm} is not finite")
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(float(report[0]), float(report[1]) if self._moe else None, grad_norm, global_tokens)

    def _reduce_grads(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            for p, g in zip(self.params, grads):
                p.grad = g
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        at = 0
        for p in self.params:
            n = p.numel()
            p.grad = flat[at:at + n].view_as(p).clone()
            at += n

    @torch.no_grad()
    def eval_step(self, micro_batches: Sequence[MicroBatch]) -> tuple[float, int]:
        self.model.eval()
        acc = torch.zeros(2, dtype=torch.float64)
        for mb in micro_batches:
            ce, _ = self._forward(mb)
            acc[0] += float(ce)
            acc[1] += mb.loss_tokens
        self._all_reduce(acc)
        return float(acc[0]), int(acc[1])


class WeightsMismatch(ValueError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))
