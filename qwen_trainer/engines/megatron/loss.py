"""Output layer and cross-entropy in token chunks, with the gradients computed during the forward pass.

With a 152k vocabulary the stock path keeps the logits of a whole micro-batch in bf16 plus an fp32 copy for the
softmax (4096 tokens: 1.2 GB + 2.5 GB, and as much again for their gradient). Here each chunk of tokens computes its
logits, the loss, d(loss)/d(logits) = softmax - onehot, and immediately the two GEMMs that turn that into gradients
for the hidden states and the output weight; only those gradients are kept for the backward pass, which just
scales them by the incoming (scalar) gradient. No GEMM is recomputed.

The output is the weighted sum of per-token losses (weights = the loss mask), a scalar; the caller divides by
the token count (`LossScaling` below). Vocabulary parallelism works
as in `vocab_parallel_cross_entropy`: max, sum of exponentials and the target logit are all-reduced over the
tensor-parallel group; the hidden-state gradient is a partial sum over this rank's vocabulary shard, which the
surrounding region op (copy-to-TP or sequence-parallel gather) reduces in its backward.

Where the caller knows, before the forward, the scalar gradient its backward will bring (`main_grad_alpha`: the
schedule's loss normalisation, bf16 without loss scaling), the output weight's gradient goes straight into its
fp32 `main_grad` (megatron DDP's buffer), scaled by that value in the GEMM's epilogue, as megatron's own layers do
with gradient-accumulation fusion. That saves, per micro-batch, a bf16 weight-sized gradient, its zeroing and
scaling and the mixed-precision add into the buffer, and accumulates the chunks in fp32 instead of bf16. The
backward records the gradient it actually got; the engine reads those back with the step's loss and stops the run
if one ever differed from the assumed value (`take_output_grad_scales`, `verify_output_grad_scales`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .kernels import maybe_compile, wgrad_accumulate

# (upstream gradient the backward got, the value the forward assumed): checked by check_output_grad_scale()
_ASSUMED_SCALES: list[tuple[torch.Tensor, float]] = []


def take_output_grad_scales() -> tuple[Optional[torch.Tensor], list[float]]:
    """The gradients the output layer's backwards brought since the last call (a device tensor, None if there were
    none) and the values their forwards assumed; clears them. The caller reads the tensor back with whatever it
    reads anyway (the engine: with the step's loss), so the check adds no device sync of its own."""
    if not _ASSUMED_SCALES:
        return None, []
    got = torch.stack([g.reshape(()).float() for g, _ in _ASSUMED_SCALES])
    assumed = [a for _, a in _ASSUMED_SCALES]
    _ASSUMED_SCALES.clear()
    return got, assumed


def verify_output_grad_scales(got: list[float], assumed: list[float], rtol: float = 1e-4) -> None:
    """Raise if a backward brought another gradient than its forward put into main_grad (the output weight's
    gradient in the buffer, and so the step taken with it, would be wrong)."""
    for g, a in zip(got, assumed):
        if abs(g - a) > rtol * abs(a):
            raise RuntimeError(f"output-layer gradient scaled by {a!r} in the forward, but the backward brought {g!r}")


def check_output_grad_scale(rtol: float = 1e-4) -> None:
    """take_output_grad_scales and verify_output_grad_scales in one (one device sync; a no-op when nothing is
    pending)."""
    got, assumed = take_output_grad_scales()
    if got is not None:
        verify_output_grad_scales(got.cpu().tolist(), assumed, rtol)


def _chunk_loss_and_grad(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor):
    """Whole-vocabulary chunk (no tensor parallelism): the weighted loss sum and d(loss)/d(logits) in the logits'
    dtype, from bf16 logits, in fp32 arithmetic. Written for torch.compile, which turns it into a row-reduction
    kernel and one elementwise kernel, reading the logits a few times instead of the eager path's dozen passes."""
    x = logits.float()
    valid = labels >= 0
    idx = torch.where(valid, labels, torch.zeros_like(labels))
    w = torch.where(valid, weights.float(), torch.zeros_like(weights, dtype=torch.float32))
    row_max = x.amax(dim=-1, keepdim=True)
    e = torch.exp(x - row_max)
    sum_exp = e.sum(dim=-1, keepdim=True)
    target = x.gather(1, idx[:, None])
    loss = (torch.log(sum_exp) + row_max - target).squeeze(1)
    total = (loss * w).sum()
    onehot = torch.arange(x.shape[1], device=x.device)[None, :] == idx[:, None]
    grad = (e / sum_exp - onehot.float()) * w[:, None]
    return total, grad.to(logits.dtype)


chunk_loss_and_grad = maybe_compile(_chunk_loss_and_grad, True)  # compiled on CUDA, eager on CPU


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, loss_weights, chunk_tokens: int, tp_group, fused: bool = True,
                main_grad_alpha: Optional[float] = None):
        n = hidden.shape[0]
        vocab_local = weight.shape[0]
        tp_size = dist.get_world_size(tp_group) if tp_group is not None and dist.is_initialized() else 1
        tp_rank = dist.get_rank(tp_group) if tp_size > 1 else 0
        vocab_start = tp_rank * vocab_local
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        into_main = needs_grad and main_grad_alpha is not None
        ctx.main_grad_alpha = main_grad_alpha if into_main else None
        ctx.weight = weight if into_main else None
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros_like(weight) if needs_grad and not into_main else None

        def add_weight_grad(g, h):
            if into_main:
                wgrad_accumulate(h, g, weight.main_grad, main_grad_alpha)
            else:
                grad_weight.addmm_(g.t(), h)

        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_tokens):
            end = min(start + chunk_tokens, n)
            h = hidden[start:end]
            y = labels[start:end]
            if fused and tp_size == 1:
                chunk_total, g = chunk_loss_and_grad(h @ weight.t(), y, loss_weights[start:end])
                total += chunk_total
                if needs_grad:
                    torch.mm(g, weight, out=grad_hidden[start:end])
                    add_weight_grad(g, h)
                continue
            wt = loss_weights[start:end].float()
            logits = (h @ weight.t()).float()  # [c, V/tp]
            local = y - vocab_start
            in_shard = (local >= 0) & (local < vocab_local) & (y >= 0)
            idx = torch.where(in_shard, local, torch.zeros_like(local))
            target = torch.where(in_shard, logits.gather(1, idx[:, None]).squeeze(1), torch.zeros_like(wt))
            row_max = logits.max(dim=-1).values
            if tp_size > 1:
                dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)
                dist.all_reduce(target, op=dist.ReduceOp.SUM, group=tp_group)
            logits.sub_(row_max[:, None]).exp_()
            sum_exp = logits.sum(dim=-1)
            if tp_size > 1:
                dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM, group=tp_group)
            loss = torch.log(sum_exp) - (target - row_max)
            wt = torch.where(y >= 0, wt, torch.zeros_like(wt))
            total += (loss * wt).sum()
            if needs_grad:
                probs = logits.div_(sum_exp[:, None])
                rows = torch.arange(end - start, device=hidden.device)
                probs[rows, idx] -= in_shard.to(probs.dtype)
                g = probs.mul_(wt[:, None]).to(hidden.dtype)
                del probs, logits
                torch.mm(g, weight, out=grad_hidden[start:end])
                add_weight_grad(g, h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_total.to(grad_hidden.dtype)
        if ctx.main_grad_alpha is not None:
            _ASSUMED_SCALES.append((grad_total.detach(), ctx.main_grad_alpha))
            weight = ctx.weight
            # megatron DDP's hook skips the add for weights so marked; the placeholder only has to exist (it keeps
            # the hook on the main backward thread, as megatron's fused linear layers do)
            weight.grad_added_to_main_grad = True
            placeholder = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
            return grad_hidden * scale, placeholder, None, None, None, None, None, None
        return grad_hidden * scale, grad_weight * scale, None, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         loss_weights: torch.Tensor, chunk_tokens: int = 2048, tp_group=None,
                         fused: bool = True, main_grad_alpha: Optional[float] = None) -> torch.Tensor:
    """sum_t w_t * CE(hidden_t @ weight.T, labels_t); hidden [n, h], weight [V or V/tp, h], labels/w [n].

    Labels below zero are ignored. Under tensor parallelism `hidden` must be the full sequence on every rank and
    `weight` this rank's vocabulary shard. `fused`: without tensor parallelism, each chunk's softmax, loss and
    logits gradient run as one compiled function (`chunk_loss_and_grad`); with it, as separate torch ops around
    the all-reduces. `main_grad_alpha`: the gradient the backward will bring; the weight gradient, times it,
    then goes into `weight.main_grad` (fp32) during the forward (see the module docstring).
    """
    if main_grad_alpha is not None and getattr(getattr(weight, "main_grad", None), "dtype", None) != torch.float32:
        raise ValueError("main_grad_alpha needs a weight with an fp32 main_grad (megatron DDP's gradient buffer)")
    return _LinearCrossEntropy.apply(hidden, weight, labels, loss_weights, int(chunk_tokens), tp_group, fused,
                                     None if main_grad_alpha is None else float(main_grad_alpha))


def reference_cross_entropy(hidden, weight, labels, loss_weights) -> torch.Tensor:
    """The same sum computed the plain way (fp32 logits of all tokens), for tests."""
    logits = (hidden @ weight.t()).float()
    valid = labels >= 0
    loss = torch.nn.functional.cross_entropy(logits, torch.where(valid, labels, 0), reduction="none")
    return (loss * loss_weights.float() * valid).sum()


def make_model_class():
    """`GPTModel` whose post-processing uses the chunked loss; built lazily so importing this module needs no megatron."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
    )

    class QwenGPTModel(GPTModel):
        """GPTModel returning, when given labels and `loss_mask`, the masked loss *sum* (a scalar).

        `next_output_grad_alpha`, set by the engine just before a forward and used by that forward only: the
        gradient the schedule will bring to the loss sum, so the output weight's gradient can go straight into
        its fp32 buffer (`linear_cross_entropy`). Not for weights tied to the embedding, whose lookup adds a
        gradient of its own."""

        next_output_grad_alpha: Optional[float] = None

        def __init__(self, *args, chunked_loss: bool = True, chunk_tokens: int = 2048, fused_loss: bool = True,
                     **kwargs):
            super().__init__(*args, **kwargs)
            self.chunked_loss = chunked_loss
            self.chunk_tokens = chunk_tokens
            self.fused_loss = fused_loss

        def _postprocess(self, hidden_states, input_ids, position_ids, labels, rotary_pos_emb, rotary_pos_cos,
                         rotary_pos_sin, mtp_in_postprocess=None, loss_mask=None, **kwargs):
            use_chunked = (self.chunked_loss and self.post_process and labels is not None and loss_mask is not None
                           and not mtp_in_postprocess and self.config.mtp_num_layers is None)
            if not use_chunked:
                return super()._postprocess(hidden_states, input_ids, position_ids, labels, rotary_pos_emb,
                                            rotary_pos_cos, rotary_pos_sin, mtp_in_postprocess=mtp_in_postprocess,
                                            loss_mask=loss_mask, **kwargs)
            if self.share_embeddings_and_output_weights:
                weight = self.shared_embedding_or_output_weight()
            else:
                # The loss reads output_layer.weight without calling output_layer, so run its forward pre-hooks
                # by hand: megatron's DDP waits there for the weight's all-gather (distributed optimizer with
                # overlapped parameter gather). Skipped, the gather stays in flight and the next step's
                # gather of that bucket fails.
                for hook in list(self.output_layer._forward_pre_hooks.values()):
                    hook(self.output_layer, ())
                weight = self.output_layer.weight
            tp_group = self.pg_collection.tp
            tp_size = tp_group.size() if tp_group is not None else 1
            if tp_size > 1 and self.config.sequence_parallel:
                hidden_states = gather_from_sequence_parallel_region(hidden_states, True, group=tp_group)
            elif tp_size > 1:
                hidden_states = copy_to_tensor_model_parallel_region(hidden_states, group=tp_group)
            s, b, h = hidden_states.shape
            flat = hidden_states.reshape(s * b, h)  # [s, b] order
            y = labels.transpose(0, 1).reshape(-1)
            w = loss_mask.transpose(0, 1).reshape(-1)
            alpha, self.next_output_grad_alpha = self.next_output_grad_alpha, None
            main_grad = getattr(weight, "main_grad", None)
            if self.share_embeddings_and_output_weights or getattr(main_grad, "dtype", None) != torch.float32:
                alpha = None
            return linear_cross_entropy(flat, weight, y, w, self.chunk_tokens, tp_group if tp_size > 1 else None,
                                        self.fused_loss, main_grad_alpha=alpha)

    return QwenGPTModel


def loss_sum_from_output(output: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """The model's output as a masked loss sum: the chunked path already returns it, the stock path gives [b, s]."""
    if output.dim() == 0:
        return output
    return (output.float() * loss_mask.float()).sum()


# ------------------------------------------------------------------------------------------------ normalisation
# The step's loss as the CPU engine defines it. "mean" (pretraining): the average over all micro-batches of the
# global batch of each micro-batch's token-mean. "per_token" (SFT): the sum over all loss tokens of the global batch
# divided by their number. Both are expressed through megatron's own normalisation (with calculate_per_token_loss off
# the schedule divides each micro-batch's loss by the token count it is given and by the number of micro-batches, and
# DDP by the data-parallel size), so the MoE load-balancing loss keeps megatron's scaling, which is the CPU engine's:
# coefficient x aux / number of micro-batches.

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


def take_load_balancing_loss(local_micro: int, num_layers: int) -> Optional[torch.Tensor]:
    """Collective: the unweighted load-balancing loss of the last step, averaged over MoE layers, micro-batches and
    data-parallel ranks (as Megatron-LM logs it), from megatron's tracker, which is then cleared: a 0-dim device
    tensor, for the caller to read back with what it reads anyway (None where the tracker holds none)."""
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
        reduce_aux_losses_tracker_across_ranks,
    )

    tracker = get_moe_layer_wise_logging_tracker()
    names = [n for n in AUX_LOSS_NAMES if n in tracker]
    if not names:
        return None
    reduce_aux_losses_tracker_across_ranks(names)
    total = sum(tracker[n]["values"].sum().double() for n in names)  # new tensors: the clearing zeroes in place
    clear_aux_losses_tracker()
    return total / max(local_micro, 1) / max(num_layers, 1)


def load_balancing_loss(local_micro: int, num_layers: int) -> float:
    """take_load_balancing_loss read back at once (0.0 where the tracker holds none)."""
    total = take_load_balancing_loss(local_micro, num_layers)
    return 0.0 if total is None else float(total)
